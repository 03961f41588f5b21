"""Admission and limits: per-tenant active jobs and request rate, answered
with 429 and Retry-After, one tenant's excess never touching another's; trainings the cluster can
never run refused at submission; jobs that never start failed after a deadline."""

from __future__ import annotations

import contextlib
import json
import shutil
import time

import pytest
from fastapi.testclient import TestClient
from support.service import RecordingRay, dataset_body, service_settings, training_body

from service import store
from service.app import create_app
from service.core.reconcile import reconcile_once
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
        with app.state.core.sessions() as session:
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
        assert int(refused.headers["Retry-After"]) == 5  # no Ray job ends much sooner: retrying faster only adds load
        assert "2 jobs queued or running (the limit is 2)" in refused.json()["detail"]
        assert len(ray.jobs) == 2  # nothing was recorded or submitted for the refused request
        # Another tenant is not affected.
        inputs = tmp_path / "data/artifacts/tenants"
        shutil.copytree(inputs / "acme/inputs", inputs / "globex/inputs")
        globex = json.loads(json.dumps(body).replace("/tenants/acme/", "/tenants/globex/"))
        assert client.post("/v1/datasets", json=globex, headers=client.headers_for["globex"]).status_code == 202
        # Once one of acme's jobs ends, acme may submit again.
        ray.set(f"raysft-{first['id']}", Status.SUCCEEDED)
        reconcile_once(client.app.state.core)
        assert client.post("/v1/datasets", json=body, headers=client.headers_for["acme"]).status_code == 202


def test_request_rate_limit_answers_429_with_retry_after_per_tenant(tmp_path, tiny_model):
    with limited_client(tmp_path, tiny_model, RecordingRay(), tenant_requests_per_s=0.5, tenant_request_burst=3) as client:
        codes = [client.get("/v1/jobs", headers=client.headers_for["acme"]).status_code for _ in range(4)]
        assert codes == [200, 200, 200, 429]
        refused = client.get("/v1/jobs", headers=client.headers_for["acme"])
        assert refused.status_code == 429 and 1 <= int(refused.headers["Retry-After"]) <= 2
        assert client.get("/v1/jobs", headers=client.headers_for["globex"]).status_code == 200
        assert client.get("/healthz").status_code == 200  # probes are never limited


def test_a_training_the_cluster_can_never_run_is_refused_at_submission(tmp_path, tiny_model):
    with limited_client(tmp_path, tiny_model, RecordingRay(), cluster_max_gpus=0, cluster_max_cpus=4) as client:
        data = tmp_path / "data"
        acme = client.headers_for["acme"]
        dataset = client.post("/v1/datasets", json=dataset_body(data), headers=acme).json()
        store_done(client, dataset["id"])
        body = training_body(data, datasets=[{"uri": f"job:{dataset['id']}"}])
        gpus = client.post("/v1/trainings", json=body | {"scaling": {"num_workers": 2, "use_gpu": True}}, headers=acme)
        assert gpus.status_code == 422
        assert gpus.json()["detail"]["problems"] == [
            "scaling: 2 GPUs wanted (num_workers x gpus_per_worker) but the cluster can have at most 0: "
            "lower num_workers or the per-worker GPUs"]
        cpus = client.post("/v1/pipelines", json={"dataset": dataset_body(data), "training": training_body(
            data, scaling={"num_workers": 3, "cpus_per_worker": 2})}, headers=acme)
        assert cpus.status_code == 422 and cpus.json()["detail"]["problems"][0].startswith(
            "training.scaling: 6 CPUs wanted")
        assert client.post("/v1/trainings", json=body | {"scaling": {"num_workers": 2, "cpus_per_worker": 2}},
                           headers=acme).status_code == 202


def store_done(client, job_id: str) -> None:
    client.app.state.core.ray.set(f"raysft-{job_id}", Status.SUCCEEDED)
    reconcile_once(client.app.state.core)


def test_a_job_that_never_starts_fails_with_the_reason_after_the_deadline(tmp_path, tiny_model):
    ray = RecordingRay()
    with limited_client(tmp_path, tiny_model, ray, start_deadline_s=1) as client:
        data, acme = tmp_path / "data", client.headers_for["acme"]
        pending = client.post("/v1/datasets", json=dataset_body(data), headers=acme).json()
        ray.set(f"raysft-{pending['id']}", Status.QUEUED)  # Ray: PENDING, no room for the driver
        running = client.post("/v1/datasets", json=dataset_body(data), headers=acme).json()  # Ray: RUNNING
        dataset = client.post("/v1/datasets", json=dataset_body(data), headers=acme).json()
        store_done(client, dataset["id"])
        training = client.post("/v1/trainings", json=training_body(data, datasets=[{"uri": f"job:{dataset['id']}"}]),
                               headers=acme).json()  # RUNNING with no step: its workers are not placed
        reconcile_once(client.app.state.core)
        assert client.get(f"/v1/jobs/{pending['id']}", headers=acme).json()["status"] == "QUEUED"
        time.sleep(1.2)
        reconcile_once(client.app.state.core)
        for job_id in (pending["id"], training["id"]):
            job = client.get(f"/v1/jobs/{job_id}", headers=acme).json()
            assert job["status"] == "FAILED" and "not started after" in job["error"] and "add nodes" in job["error"]
            assert ray.statuses[f"raysft-{job_id}"].status is Status.CANCELLED  # and Ray was told to stop it
        # A dataset job that is running is not judged by the deadline: it has no step to report.
        assert client.get(f"/v1/jobs/{running['id']}", headers=acme).json()["status"] == "RUNNING"
