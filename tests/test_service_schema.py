"""A schemathesis run over the service's OpenAPI schema (in process, real SQLite database, Ray
stood in by `RecordingRay`): generated requests, authenticated and not, never get a 5xx, and
responses match their schemas."""

from __future__ import annotations

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance
from service_fixtures import ADMIN_KEY, RecordingRay, service_settings

from service.app import create_app


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_model):
    app = create_app(service_settings(tmp_path_factory.mktemp("data"), tiny_model), ray=RecordingRay(),
                     reconcile=False)
    with TestClient(app):  # runs the lifespan: migrations, the bootstrap key, app.state
        yield app


def test_no_server_errors(app):
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 9

    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case):
            for headers in ({"Authorization": f"Bearer {ADMIN_KEY}"}, {}):
                response = case.call(headers=headers)
                case.validate_response(response, checks=[not_a_server_error, response_schema_conformance])

        check()
