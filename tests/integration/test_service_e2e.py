"""End to end: the service under uvicorn on loopback, a real local
Ray head with token auth, real HTTP. A pipeline on the scaffold model, one input uploaded, succeeds while its progress
is seen to grow; cancel stops the Ray job; a service restart mid-job keeps and reconciles the
record; a Ray restart mid-job ends it LOST with the reason."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from support.service import ADMIN_KEY, REPO, Service, dataset_body, training_body

from service import local_ray, store

pytestmark = pytest.mark.integration
@pytest.fixture
def service(tmp_path, tiny_model, head):
    svc = Service(tmp_path / "data", tiny_model, head)
    yield svc
    svc.kill()


def test_pipeline_runs_to_success_and_survives_a_service_restart(service, tmp_path):
    data_dir = tmp_path / "data"
    inputs = data_dir / "artifacts/tenants/admin/inputs"
    inputs.mkdir(parents=True)
    # A file whose name is shell syntax: it must be read as a name, never run.
    (inputs / "$(touch pwned).jsonl").write_bytes((REPO / "configs/data/messages.jsonl").read_bytes())
    # The other input is uploaded, as a user without access to the artifact store gets data in.
    with (REPO / "configs/data/alpaca.jsonl").open("rb") as f:
        uploaded = service.http.post("/v1/files", files={"file": ("alpaca.jsonl", f)}).json()
    body = {"dataset": dataset_body(data_dir, sources=[{"uri": f"file:{uploaded['id']}", "format": "alpaca"},
                                                        {"uri": str(inputs / "$(touch pwned).jsonl"), "format": "messages"}]),
            "training": training_body(data_dir, eval={"every_steps": 6, "prompts": ["How long should I rest a steak?"],
                                                      "max_new_tokens": 8},
                                      tracking={"report_to": ["mlflow", "tensorboard"], "project": "e2e"})}
    created = service.http.post("/v1/pipelines", json=body)
    assert created.status_code == 202, created.text
    pipeline = created.json()

    # Restart the service once training is under way: the record survives and is reconciled.
    seen = service.wait(pipeline["id"], until=lambda job: (job["progress"].get("step") or 0) >= 1)
    service.kill()
    service.start()
    seen += service.wait(pipeline["id"])
    final = seen[-1]
    assert final["status"] == "SUCCEEDED", json.dumps(final, indent=2)
    percents = [job["progress"]["percent"] for job in seen if job["progress"]["percent"] is not None]
    assert percents == sorted(percents) and percents[-1] == 100.0 and len(set(percents)) >= 3
    dataset_id, training_id = final["children"]

    history = service.http.get(f"/v1/jobs/{pipeline['id']}/metrics").json()
    assert [m["step"] for m in history][-1] == 12 and "eval_loss" in history[-1]
    # The MLflow run (the local store beside the run) has exactly the history the API serves.
    from mlflow.tracking import MlflowClient

    mlflow = MlflowClient(tracking_uri=f"sqlite:///{Path(final['artifacts']['metrics']).parent / 'mlflow.db'}")
    [run] = mlflow.search_runs([mlflow.get_experiment_by_name("e2e").experiment_id])
    for key in ("loss", "lr", "eval_loss", "tokens_per_s"):
        served = [(m["step"], m[key]) for m in history if key in m]
        assert [(m.step, m.value) for m in mlflow.get_metric_history(run.info.run_id, key)] == served, key
    assert run.info.status == "FINISHED" and run.data.params["method"] == "lora"
    assert any((Path(final["artifacts"]["metrics"]).parent / "tensorboard").iterdir())
    # Another tenant sees neither the upload nor the jobs.
    with service.session() as session:
        other = {"Authorization": f"Bearer {store.create_api_key(session, 'globex')}"}
    assert service.http.get(f"/v1/files/{uploaded['id']}", headers=other).status_code == 404
    assert service.http.get(f"/v1/jobs/{pipeline['id']}", headers=other).status_code == 404
    assert service.http.get("/v1/files", headers=other).json()["total"] == 0
    assert history[-1]["generations"][0]["prompt"] == "How long should I rest a steak?"
    assert "training finished: step 12" in service.http.get(f"/v1/jobs/{training_id}/logs").text
    assert "succeeded" in service.http.get(f"/v1/jobs/{dataset_id}/logs").text

    artifacts = final["artifacts"]
    assert Path(artifacts["manifest"]).is_file() and Path(artifacts["metrics"]).is_file()
    assert (Path(artifacts["export_model"]) / "model.safetensors").is_file()
    assert all(Path(c).is_dir() for c in artifacts["checkpoints"]) and artifacts["checkpoints"]
    assert not list(REPO.glob("pwned")) and not list(data_dir.rglob("pwned"))
    # The CLI, as a script would use it: exit codes it can trust.
    raysft = str(Path(sys.executable).with_name("raysft"))
    cli_env = service.env | {"RAYSFT_URL": f"http://127.0.0.1:{service.port}", "RAYSFT_API_KEY": ADMIN_KEY}
    waited = subprocess.run([raysft, "jobs", "wait", pipeline["id"]], env=cli_env, capture_output=True, text=True)
    assert waited.returncode == 0 and "SUCCEEDED" in waited.stdout and "answer:" in waited.stdout, waited.stdout
    listed = subprocess.run([raysft, "jobs", "list", "--kind", "pipeline"], env=cli_env, capture_output=True, text=True)
    assert pipeline["id"] in listed.stdout
    assert subprocess.run([raysft, "jobs", "get", "nope"], env=cli_env, capture_output=True).returncode == 2
    assert subprocess.run([raysft, "jobs", "list"], env=cli_env | {"RAYSFT_URL": "http://127.0.0.1:9"},
                          capture_output=True).returncode == 3
    # The Ray job carries ids only: no spec, no secrets.
    metadata = httpx.get(f"{service.env['RAY_ADDRESS']}/api/jobs/raysft-{training_id}",
                         headers={"Authorization": f"Bearer {service.env['RAY_AUTH_TOKEN']}"}).json()["metadata"]
    assert set(metadata) == {"raysft_job_id", "raysft_tenant"}


def test_cancel_stops_the_ray_job(service, tmp_path):
    data_dir = tmp_path / "data"
    dataset = service.http.post("/v1/datasets", json=dataset_body(data_dir, sources=[
        {"uri": str(data_dir / "artifacts/tenants/acme/inputs/alpaca.jsonl"), "format": "alpaca"}]))
    assert dataset.status_code == 422  # the admin tenant may not read acme's inputs
    inputs = data_dir / "artifacts/tenants/admin/inputs"
    inputs.mkdir(parents=True)
    (inputs / "alpaca.jsonl").write_bytes((REPO / "configs/data/alpaca.jsonl").read_bytes())
    body = {"dataset": dataset_body(data_dir, sources=[{"uri": str(inputs / "alpaca.jsonl"), "format": "alpaca"}]),
            "training": training_body(data_dir, max_steps=10_000, checkpoint={"every_steps": 10_000})}
    pipeline = service.http.post("/v1/pipelines", json=body).json()
    service.wait(pipeline["id"], until=lambda job: (job["progress"].get("step") or 0) >= 1)
    cancelled = service.http.post(f"/v1/jobs/{pipeline['id']}/cancel").json()
    assert cancelled["status"] == "CANCELLED"
    training_id = cancelled["children"][1]
    token = service.env["RAY_AUTH_TOKEN"]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ray_status = httpx.get(f"{service.env['RAY_ADDRESS']}/api/jobs/raysft-{training_id}",
                               headers={"Authorization": f"Bearer {token}"}).json()["status"]
        if ray_status == "STOPPED":
            break
        time.sleep(1)
    assert ray_status == "STOPPED"
    assert service.http.get(f"/v1/jobs/{training_id}").json()["status"] == "CANCELLED"


def restart_on(port: int, token: str) -> local_ray.LocalRay:
    """A new head on the old head's dashboard port, once the port is free again (the old one's
    processes may hold it for a moment after they are killed)."""
    for attempt in range(5):
        try:
            return local_ray.start(num_cpus=4, dashboard_port=port, token=token)
        except RuntimeError:
            if attempt == 4:
                raise
            time.sleep(3)


def test_a_ray_restart_mid_job_ends_it_lost_with_the_reason_and_keeps_its_log(tmp_path, tiny_model, record_property):
    data_dir = tmp_path / "data"
    head = local_ray.start(num_cpus=4)
    service = None
    try:  # the head is stopped even when the service fails to start
        service = Service(data_dir, tiny_model, head, log_copy_interval_s=1)
        inputs = data_dir / "artifacts/tenants/admin/inputs"
        inputs.mkdir(parents=True)
        # Over 4 MiB, so the job runs on Ray (small inputs finish in the driver in seconds)
        # and is still running when the head goes.
        (inputs / "alpaca.jsonl").write_bytes((REPO / "configs/data/alpaca.jsonl").read_bytes() * 140)
        job = service.http.post("/v1/datasets", json=dataset_body(data_dir, sources=[
            {"uri": str(inputs / "alpaca.jsonl"), "format": "alpaca"}])).json()
        service.wait(job["id"], until=lambda j: j["status"] == "RUNNING")
        copy = data_dir / f"artifacts/tenants/admin/jobs/{job['id']}/job.log"
        deadline = time.monotonic() + 60
        while not (copy.exists() and copy.read_text().strip()) and time.monotonic() < deadline:
            time.sleep(0.5)
        before_crash = copy.read_text()
        port = int(head.address.rsplit(":", 1)[1])
        stopped = time.monotonic()
        head.stop()
        head = restart_on(port, head.token)  # same address, empty job table
        started = time.monotonic()
        final = service.wait(job["id"], timeout=120)[-1]
        assert final["status"] == "LOST" and "Ray no longer knows this job" in final["error"]
        assert time.monotonic() - started < 60
        record_property("head_back_to_lost_s", round(time.monotonic() - started, 1))
        record_property("head_stop_to_lost_s", round(time.monotonic() - stopped, 1))
        # Ray's copy of the log went with its head; the service kept one.
        logs = service.http.get(f"/v1/jobs/{job['id']}/logs")
        assert logs.status_code == 200 and before_crash.strip().splitlines()[0] in logs.text
    finally:
        if service is not None:
            service.kill()
        head.stop()


def test_service_killed_between_ray_submit_and_commit_adopts_the_ray_job(tmp_path, tiny_model, head, record_property):
    data_dir = tmp_path / "data"
    service = Service(data_dir, tiny_model, head, factory="support.faults:create_app_dying_after_ray_submit")
    inputs = data_dir / "artifacts/tenants/admin/inputs"
    inputs.mkdir(parents=True)
    (inputs / "alpaca.jsonl").write_bytes((REPO / "configs/data/alpaca.jsonl").read_bytes())
    with pytest.raises(httpx.TransportError):  # the service dies before answering
        service.http.post("/v1/datasets", json=dataset_body(data_dir, sources=[
            {"uri": str(inputs / "alpaca.jsonl"), "format": "alpaca"}]))
    assert service.process.wait(timeout=30) == 137
    try:
        restarted = time.monotonic()
        service.start()  # the real service, on the same database and Ray
        [job] = service.http.get("/v1/jobs").json()["items"]  # recorded before Ray was called
        service.wait(job["id"], until=lambda j: j["status"] != "QUEUED")  # Ray's status reached the record
        record_property("restart_to_adopted_s", round(time.monotonic() - restarted, 1))
        final = service.wait(job["id"])[-1]
        assert final["status"] == "SUCCEEDED", final
        token = service.env["RAY_AUTH_TOKEN"]
        ray_jobs = httpx.get(f"{service.env['RAY_ADDRESS']}/api/jobs/", headers={"Authorization": f"Bearer {token}"}).json()
        assert [j["submission_id"] for j in ray_jobs
                if (j.get("metadata") or {}).get("raysft_job_id") == job["id"]] == [f"raysft-{job['id']}"]
    finally:
        service.kill()


def test_secrets_never_appear_in_api_responses_ray_metadata_or_logs(tmp_path, tiny_model, s3_server, monkeypatch):
    """Canary secrets (an S3 secret access key, Hugging Face, MLflow and W&B tokens), in the
    environment of the service and of every Ray process as a deployment gives them (the chart's S3
    Secret and `ray.jobSecrets`), after a whole pipeline on S3 that also writes TensorBoard event
    files to the bucket: nowhere a user or Ray can read."""
    import boto3

    canary = f"CANARY{secrets.token_hex(12)}"
    tokens = {name: f"CANARY{secrets.token_hex(12)}" for name in ("HF_TOKEN", "MLFLOW_TRACKING_TOKEN", "WANDB_API_KEY")}
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", canary)
    for name, value in tokens.items():
        monkeypatch.setenv(name, value)
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="raysft")
    s3.put_object(Bucket="raysft", Key="artifacts/tenants/admin/inputs/alpaca.jsonl",
                  Body=(REPO / "configs/data/alpaca.jsonl").read_bytes())
    data_dir = tmp_path / "data"
    head = local_ray.start(num_cpus=4)  # inherits the canary, like a Ray node given the S3 Secret
    service = None
    try:
        service = Service(data_dir, tiny_model, head, artifact_root="s3://raysft/artifacts", log_copy_interval_s=1)
        assert service.env["AWS_SECRET_ACCESS_KEY"] == canary and service.env["HF_TOKEN"] == tokens["HF_TOKEN"]
        body = {"dataset": dataset_body(data_dir, sources=[
                    {"uri": "s3://raysft/artifacts/tenants/admin/inputs/alpaca.jsonl", "format": "alpaca"}]),
                "training": training_body(data_dir, max_steps=4, checkpoint={"every_steps": 4, "keep": 1},
                                          eval={"every_steps": 4}, tracking={"report_to": ["tensorboard"]})}
        pipeline = service.http.post("/v1/pipelines", json=body).json()
        final = service.wait(pipeline["id"])[-1]
        assert final["status"] == "SUCCEEDED", final
        seen = [service.http.get("/v1/jobs").text]
        for job_id in [pipeline["id"], *final["children"]]:
            for path in ("", "/logs", "/metrics"):
                response = service.http.get(f"/v1/jobs/{job_id}{path}")
                assert response.status_code == 200
                seen.append(response.text)
        seen.append(service.http.get(f"/v1/jobs/{pipeline['id']}/dataset").text)  # the dashboard's report
        ray = httpx.Client(base_url=head.address, headers={"Authorization": f"Bearer {head.token}"})
        ray_jobs = ray.get("/api/jobs/").json()
        seen.append(json.dumps(ray_jobs))  # metadata, entrypoints, runtime envs
        seen += [ray.get(f"/api/jobs/{job['submission_id']}/logs").json()["logs"] for job in ray_jobs]
        stored = s3.list_objects_v2(Bucket="raysft", Prefix="artifacts/tenants/admin/jobs/")["Contents"]
        assert any("/tensorboard/events.out.tfevents." in o["Key"] for o in stored)  # copied to the bucket
        for key in [o["Key"] for o in stored if o["Key"].endswith(("job.log", "spec.json", "manifest.json", "metrics.jsonl"))
                    or "tfevents" in o["Key"]]:
            seen.append(s3.get_object(Bucket="raysft", Key=key)["Body"].read().decode(errors="replace"))
        seen.append(service.log.read_text())
        assert sum(len(text) for text in seen) > 10_000  # the logs and records were really read
        leaks = [text[max(0, text.find(c) - 200):text.find(c) + 50] for c in (canary, *tokens.values())
                 for text in seen if c in text]
        assert leaks == []
    finally:
        if service is not None:
            service.kill()
        head.stop()
