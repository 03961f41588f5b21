"""Schemathesis runs over the service's OpenAPI schema (in process, real SQLite database, Ray
stood in by `RecordingRay`): generated requests, authenticated and not, never get a 5xx, and
responses match their schemas; and a stateful run follows the schema's links from a created job
(submit → get → logs → metrics → cancel; tenant → key → revoke; upload → get → delete) with the
same checks."""

from __future__ import annotations

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance
from sqlalchemy import delete, update
from support.service import ADMIN_KEY, RecordingRay, dataset_body, service_settings

from service import store
from service.app import create_app


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


def unlimited_app(data_dir, tiny_model):
    """No limits: a 429 that depends on the clock would make runs differ between replays."""
    settings = service_settings(data_dir, tiny_model, tenant_requests_per_s=1e9, tenant_request_burst=10**9,
                                tenant_max_active_jobs=10**9)
    return create_app(settings, ray=RecordingRay(), reconcile=False)


@pytest.fixture(scope="module")
def app(data_dir, tiny_model):
    app = unlimited_app(data_dir, tiny_model)
    with TestClient(app):  # runs the lifespan: migrations, the bootstrap key, app.state
        yield app


@pytest.fixture
def fresh_app(tmp_path, tiny_model):
    """An app of its own on an empty database (the module's app holds whatever earlier fuzzing
    created): with `derandomize` and a reset per scenario, a stateful run is the same every time."""
    app = unlimited_app(tmp_path / "data", tiny_model)
    with TestClient(app):
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


def test_stateful_submit_get_logs_cancel(app, data_dir):
    with app.state.core.sessions() as session:
        key = store.create_api_key(session, "acme")  # the tenant whose prefix holds the example inputs
    schema = schemathesis.openapi.from_asgi("/openapi.json", app).exclude(path_regex="^/(v1/(admin|files)|openai/)")
    calls: dict[str, int] = {}

    class Workflow(schema.as_state_machine()):
        def setup(self):
            # Every scenario starts from no jobs, so a replayed scenario sees what it saw first.
            with app.state.core.sessions() as session:
                session.execute(delete(store.Job).where(store.Job.parent_id.is_not(None)))
                session.execute(delete(store.Job))
                session.commit()

        def before_call(self, case):
            # Realistic data for the producers: a valid dataset spec (random ones are all 422s, and
            # a 422 creates nothing to follow). The name stays generated.
            if case.method == "POST" and case.path == "/v1/datasets":
                name = case.body.get("name") if isinstance(case.body, dict) else None
                case.body = dataset_body(data_dir) | ({"name": name} if isinstance(name, str) and name.strip() else {})
                case.media_type = "application/json"
                case.query = {}  # a fuzzed `force` value is a 422 too (test_no_server_errors fuzzes it)

        def get_call_kwargs(self, case):
            return {"headers": {"Authorization": f"Bearer {key}"}}

        def validate_response(self, response, case, **kwargs):
            calls[f"{case.method} {case.path} {response.status_code}"] = calls.get(
                f"{case.method} {case.path} {response.status_code}", 0) + 1
            case.validate_response(response, checks=[not_a_server_error, response_schema_conformance])

    Workflow.run(settings=settings(max_examples=40, stateful_step_count=6, deadline=None, database=None,
                                   derandomize=True, suppress_health_check=list(HealthCheck)))
    followed = {call.rsplit(" ", 1)[0] for call in calls if call.endswith(" 200")}
    assert "POST /v1/datasets 202" in calls
    assert {"GET /v1/jobs/{job_id}", "GET /v1/jobs/{job_id}/logs", "POST /v1/jobs/{job_id}/cancel"} <= followed, calls


def test_stateful_tenant_key_revoke(fresh_app):
    schema = schemathesis.openapi.from_asgi("/openapi.json", fresh_app).include(path_regex="^/v1/admin")
    calls: dict[str, int] = {}

    class Workflow(schema.as_state_machine()):
        def setup(self):
            # Every scenario starts from the bootstrap tenant alone (see the files workflow).
            # A scenario may have revoked the bootstrap key itself: it starts valid again.
            with fresh_app.state.core.sessions() as session:
                session.execute(delete(store.ApiKey).where(store.ApiKey.key_hash != store.hash_key(ADMIN_KEY)))
                session.execute(update(store.ApiKey).values(revoked_at=None))
                session.execute(delete(store.Tenant).where(store.Tenant.id != "admin"))
                session.commit()
            self.tenants_made = 0

        def before_call(self, case):
            # Valid bodies for the producers (random ones are 422s that create nothing to follow).
            if case.method == "POST" and case.path == "/v1/admin/tenants":
                self.tenants_made += 1
                case.body = {"id": f"tenant-{self.tenants_made}"}
            elif case.method == "POST" and case.path.endswith("/keys"):
                case.body = {"name": "generated"}

        def get_call_kwargs(self, case):
            return {"headers": {"Authorization": f"Bearer {ADMIN_KEY}"}}

        def validate_response(self, response, case, **kwargs):
            call = f"{case.method} {case.path} {response.status_code}"
            calls[call] = calls.get(call, 0) + 1
            case.validate_response(response, checks=[not_a_server_error, response_schema_conformance])

    Workflow.run(settings=settings(max_examples=40, stateful_step_count=8, deadline=None, database=None,
                                   derandomize=True, suppress_health_check=list(HealthCheck)))
    assert {"POST /v1/admin/tenants 201", "POST /v1/admin/tenants/{tenant_id}/keys 201",
            "DELETE /v1/admin/keys/{key_id} 200"} <= calls.keys(), calls


def test_stateful_upload_get_delete(fresh_app):
    with fresh_app.state.core.sessions() as session:
        key = store.create_api_key(session, "acme")
    schema = schemathesis.openapi.from_asgi("/openapi.json", fresh_app).include(path_regex="^/v1/files")
    calls: dict[str, int] = {}

    class Workflow(schema.as_state_machine()):
        def setup(self):
            # Every scenario starts from no files, so a replayed scenario sees what it saw first.
            with fresh_app.state.core.sessions() as session:
                session.execute(delete(store.File))
                session.commit()

        def get_call_kwargs(self, case):
            return {"headers": {"Authorization": f"Bearer {key}"}}

        def validate_response(self, response, case, **kwargs):
            call = f"{case.method} {case.path} {response.status_code}"
            calls[call] = calls.get(call, 0) + 1
            case.validate_response(response, checks=[not_a_server_error, response_schema_conformance])

    Workflow.run(settings=settings(max_examples=20, stateful_step_count=4, deadline=None, database=None,
                                   derandomize=True, suppress_health_check=list(HealthCheck)))
    assert {"POST /v1/files 201", "GET /v1/files/{file_id} 200", "DELETE /v1/files/{file_id} 200"} <= calls.keys(), calls
