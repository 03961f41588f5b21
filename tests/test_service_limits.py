"""Per-tenant limits (issue 6, item 9): active jobs and request rate, answered with 429 and
Retry-After, one tenant's excess never touching another's."""

from __future__ import annotations

import contextlib
import json
import shutil

import pytest
from fastapi.testclient import TestClient
from service_fixtures import RecordingRay, dataset_body, service_settings

from service import store
from service.app import create_app
from service.limits import TokenBuckets
from service.store import Status


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_token_bucket_allows_a_burst_then_the_rate_per_tenant():
    clock = Clock()
    buckets = TokenBuckets(rate=2.0, burst=3, clock=clock)
    assert [buckets.take("acme") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("acme") == pytest.approx(0.5)  # empty: half a second to the next token
    assert buckets.take("globex") == 0.0  # another tenant has its own bucket
    clock.now += 0.5
    assert buckets.take("acme") == 0.0
    clock.now += 60  # a quiet minute refills only up to the burst
    assert [buckets.take("acme") for _ in range(4)][-1] > 0


@contextlib.contextmanager
def limited_client(tmp_path, tiny_model, ray, **limits):
    app = create_app(service_settings(tmp_path / "data", tiny_model, **limits), ray=ray, reconcile=False)
    with TestClient(app) as client:
        with app.state.control.sessions() as session:
            client.headers_for = {t: {"Authorization": f"Bearer {store.create_api_key(session, t)}"}
                                  for t in ("acme", "globex")}
        yield client


def test_active_job_limit_answers_429_until_a_job_ends(tmp_path, tiny_model):
    ray = RecordingRay()
    with limited_client(tmp_path, tiny_model, ray, tenant_max_active_jobs=2) as client:
        body = dataset_body(tmp_path / "data")
        first, _ = (client.post("/v1/datasets", json=body, headers=client.headers_for["acme"]).json() for _ in range(2))
        refused = client.post("/v1/datasets", json=body, headers=client.headers_for["acme"])
        assert refused.status_code == 429
        assert int(refused.headers["Retry-After"]) > 0
        assert "2 jobs queued or running (the limit is 2)" in refused.json()["detail"]
        assert len(ray.jobs) == 2  # nothing was recorded or submitted for the refused request
        # Another tenant is not affected.
        inputs = tmp_path / "data/artifacts/tenants"
        shutil.copytree(inputs / "acme/inputs", inputs / "globex/inputs")
        globex = json.loads(json.dumps(body).replace("/tenants/acme/", "/tenants/globex/"))
        assert client.post("/v1/datasets", json=globex, headers=client.headers_for["globex"]).status_code == 202
        # Once one of acme's jobs ends, acme may submit again.
        ray.set(f"raysft-{first['id']}", Status.SUCCEEDED)
        client.app.state.control.reconcile_once()
        assert client.post("/v1/datasets", json=body, headers=client.headers_for["acme"]).status_code == 202


def test_request_rate_limit_answers_429_with_retry_after_per_tenant(tmp_path, tiny_model):
    with limited_client(tmp_path, tiny_model, RecordingRay(), tenant_requests_per_s=0.5, tenant_request_burst=3) as client:
        codes = [client.get("/v1/jobs", headers=client.headers_for["acme"]).status_code for _ in range(4)]
        assert codes == [200, 200, 200, 429]
        refused = client.get("/v1/jobs", headers=client.headers_for["acme"])
        assert refused.status_code == 429 and 1 <= int(refused.headers["Retry-After"]) <= 2
        assert client.get("/v1/jobs", headers=client.headers_for["globex"]).status_code == 200
        assert client.get("/healthz").status_code == 200  # probes are never limited
