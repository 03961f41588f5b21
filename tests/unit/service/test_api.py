"""The REST API on a real database (SQLite) with Ray stood in by `RecordingRay`: auth, tenancy,
validation, URIs, idempotency, size limits, injection, reconciliation, pipelines, and reused or
forced preparations."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest
from fastapi.testclient import TestClient
from support.jobs import stub_manifest
from support.service import ADMIN_KEY, RecordingRay, dataset_body, service_settings, training_body

from service import store
from service.app import create_app
from service.core.reconcile import reconcile_once
from service.store import Status


@pytest.fixture
def ray():
    return RecordingRay()


@pytest.fixture
def data_dir(tmp_path):
    return tmp_path / "data"


@pytest.fixture
def app(data_dir, tiny_model, ray):
    return create_app(service_settings(data_dir, tiny_model), ray=ray, reconcile=False)


@pytest.fixture
def client(app):
    with TestClient(app) as c:
        with app.state.core.sessions() as session:
            keys = {t: store.create_api_key(session, t) for t in ("acme", "globex")}
        c.keys = keys
        yield c


def auth(client, tenant="acme"):
    return {"Authorization": f"Bearer {client.keys[tenant]}"}


def reconcile(client):
    reconcile_once(client.app.state.core)


def test_health_needs_no_key_but_the_api_does(client):
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").json() == {"ready": True, "database": True, "ray": True}
    assert client.get("/v1/jobs").status_code == 401
    assert client.get("/v1/jobs", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert client.get("/v1/jobs", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).status_code == 200  # bootstrap key


def test_dataset_job_is_recorded_then_submitted_with_a_fixed_entrypoint(client, ray, data_dir):
    response = client.post("/v1/datasets", json=dataset_body(data_dir), headers=auth(client))
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["status"] == "QUEUED" and job["kind"] == "dataset"
    assert job["spec"]["output"] == str(data_dir.absolute() / f"artifacts/tenants/acme/jobs/{job['id']}/dataset")
    [(submission_id, submitted)] = ray.jobs.items()
    spec_file = data_dir.absolute() / f"artifacts/tenants/acme/jobs/{job['id']}/spec.json"
    assert submitted["entrypoint"] == f"python -m jobs.prepare --spec {spec_file}"
    assert json.loads(spec_file.read_text()) == job["spec"]
    assert submitted["metadata"] == {"raysft_job_id": job["id"], "raysft_tenant": "acme"}


def test_another_tenants_job_does_not_exist(client, data_dir):
    job = client.post("/v1/datasets", json=dataset_body(data_dir), headers=auth(client)).json()
    assert client.get(f"/v1/jobs/{job['id']}", headers=auth(client, "globex")).status_code == 404
    assert client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth(client, "globex")).status_code == 404
    assert client.get(f"/v1/jobs/{job['id']}/logs", headers=auth(client, "globex")).status_code == 404
    assert client.get("/v1/jobs", headers=auth(client, "globex")).json()["total"] == 0
    assert client.get("/v1/jobs", headers=auth(client)).json()["total"] == 1
    # globex may not read acme's inputs either
    refused = client.post("/v1/datasets", json=dataset_body(data_dir), headers=auth(client, "globex"))
    assert refused.status_code == 422 and "not readable by this tenant" in refused.text


def test_every_problem_is_reported_at_once(client, data_dir):
    body = dataset_body(data_dir, max_seq_length=1, surprise=True,
                        sources=[{"uri": "http://169.254.169.254/x", "format": "alpaca"}])
    problems = client.post("/v1/datasets", json=body, headers=auth(client)).json()["detail"]["problems"]
    text = "\n".join(problems)
    assert "max_seq_length" in text and "surprise" in text and "http" in text, problems


def test_outputs_outside_the_tenant_prefix_and_untrusted_code_are_refused(client, data_dir):
    body = dataset_body(data_dir, output=str(data_dir / "artifacts/tenants/globex/stolen"))
    assert "output: outputs must be under" in client.post("/v1/datasets", json=body, headers=auth(client)).text
    body = training_body(data_dir, datasets=[{"uri": str(data_dir / "artifacts/tenants/acme/x")}],
                         model={"uri": str(data_dir / "models/tiny"), "dtype": "fp32", "trust_remote_code": True})
    assert "not on the operator's allowlist" in client.post("/v1/trainings", json=body, headers=auth(client)).text


def test_same_idempotency_key_same_job_different_body_422(client, ray, data_dir):
    headers = auth(client) | {"Idempotency-Key": "k1"}
    first = client.post("/v1/datasets", json=dataset_body(data_dir), headers=headers).json()
    again = client.post("/v1/datasets", json=dataset_body(data_dir), headers=headers).json()
    assert again["id"] == first["id"] and len(ray.jobs) == 1
    other = client.post("/v1/datasets", json=dataset_body(data_dir, seed=7), headers=headers)
    assert other.status_code == 422 and "different request body" in other.text


def test_an_empty_idempotency_key_is_no_key(client, data_dir):
    """Found by the stateful run: two requests with an empty key collided in the unique index."""
    first, second = (client.post("/v1/datasets", json=dataset_body(data_dir), headers=auth(client) | {"Idempotency-Key": ""})
                     for _ in range(2))
    assert first.status_code == second.status_code == 202 and first.json()["id"] != second.json()["id"]


def test_concurrent_duplicates_create_exactly_one_ray_job(client, ray, data_dir):
    headers = auth(client) | {"Idempotency-Key": "burst"}
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda _: client.post("/v1/datasets", json=dataset_body(data_dir), headers=headers), range(8)))
    assert {r.status_code for r in responses} == {202}
    assert len({r.json()["id"] for r in responses}) == 1
    assert len(ray.jobs) == 1 and client.get("/v1/jobs", headers=auth(client)).json()["total"] == 1


def test_bodies_over_the_limit_get_413(client):
    huge = b"{" + b" " * (2 << 20) + b"}"
    response = client.post("/v1/datasets", content=huge, headers=auth(client) | {"Content-Type": "application/json"})
    assert response.status_code == 413


def test_yaml_bodies_are_safe_loaded(client, data_dir):
    import yaml

    ok = client.post("/v1/datasets", content=yaml.safe_dump(dataset_body(data_dir)),
                     headers=auth(client) | {"Content-Type": "application/yaml"})
    assert ok.status_code == 202
    evil = "!!python/object/apply:os.system ['touch /tmp/raysft-pwned']"
    refused = client.post("/v1/datasets", content=evil, headers=auth(client) | {"Content-Type": "application/yaml"})
    assert refused.status_code == 422


def test_shell_text_in_a_spec_never_reaches_the_entrypoint(client, ray, data_dir):
    body = dataset_body(data_dir, template="$(touch /tmp/raysft-pwned) {{ messages }}",
                        eot_token="`reboot`; rm -rf /")
    job = client.post("/v1/datasets", json=body, headers=auth(client)).json()
    entrypoint = ray.jobs[f"raysft-{job['id']}"]["entrypoint"]
    assert entrypoint.startswith("python -m jobs.prepare --spec /") and "$(" not in entrypoint and "`" not in entrypoint


def test_reconcile_follows_ray_and_marks_unknown_jobs_lost(client, ray, data_dir):
    a = client.post("/v1/datasets", json=dataset_body(data_dir), headers=auth(client)).json()
    b = client.post("/v1/datasets", json=dataset_body(data_dir, seed=1), headers=auth(client)).json()
    reconcile(client)
    assert client.get(f"/v1/jobs/{a['id']}", headers=auth(client)).json()["status"] == "RUNNING"
    ray.set(f"raysft-{a['id']}", Status.FAILED, "Traceback ... ValueError: boom")
    del ray.jobs[f"raysft-{b['id']}"]  # the cluster restarted and forgot it
    reconcile(client)
    a_now, b_now = (client.get(f"/v1/jobs/{j['id']}", headers=auth(client)).json() for j in (a, b))
    assert a_now["status"] == "FAILED" and "boom" in a_now["error"] and a_now["finished_at"]
    assert b_now["status"] == "LOST" and "Ray no longer knows this job" in b_now["error"]


def test_force_adds_the_one_fixed_flag_to_a_preparation_and_only_to_it(client, ray, data_dir):
    forced = client.post("/v1/datasets?force=true", json=dataset_body(data_dir), headers=auth(client)).json()
    plain = client.post("/v1/datasets", json=dataset_body(data_dir), headers=auth(client)).json()
    for job, tail in ((forced, " --force"), (plain, "")):
        spec_file = data_dir.absolute() / f"artifacts/tenants/acme/jobs/{job['id']}/spec.json"
        assert ray.jobs[f"raysft-{job['id']}"]["entrypoint"] == f"python -m jobs.prepare --spec {spec_file}{tail}"
    # the flag is part of the request an Idempotency-Key stands for
    headers = auth(client) | {"Idempotency-Key": "f1"}
    client.post("/v1/datasets", json=dataset_body(data_dir), headers=headers)
    refused = client.post("/v1/datasets?force=true", json=dataset_body(data_dir), headers=headers)
    assert refused.status_code == 422 and "different request body" in refused.text
    # a pipeline prepares again; its training takes no flag
    body = {"dataset": dataset_body(data_dir), "training": training_body(data_dir)}
    pipeline = client.post("/v1/pipelines?force=true", json=body, headers=auth(client)).json()
    [dataset_id] = pipeline["children"]
    assert ray.jobs[f"raysft-{dataset_id}"]["entrypoint"].endswith(" --force")
    ray.set(f"raysft-{dataset_id}", Status.SUCCEEDED)
    reconcile(client)
    training_id = client.get(f"/v1/jobs/{pipeline['id']}", headers=auth(client)).json()["children"][1]
    assert ray.jobs[f"raysft-{training_id}"]["entrypoint"].startswith("python -m jobs.train --spec /")
    assert "--force" not in ray.jobs[f"raysft-{training_id}"]["entrypoint"]


def test_progress_says_whether_the_preparation_reused_an_earlier_output(client, ray, data_dir):
    output = data_dir / "artifacts/tenants/acme/datasets/shared"  # an explicit output: a job's own is new
    output.mkdir(parents=True)
    earlier = (datetime.now(UTC) - timedelta(hours=1)).isoformat(timespec="seconds")
    (output / "manifest.json").write_text(stub_manifest("abc").model_copy(update={"created_at": earlier}).to_json())
    job = client.post("/v1/datasets", json=dataset_body(data_dir, output=str(output)), headers=auth(client)).json()

    def progress():
        reconcile(client)
        return client.get(f"/v1/jobs/{job['id']}", headers=auth(client)).json()["progress"]

    assert progress()["rows"] is None  # running: the earlier manifest says nothing of this job yet
    ray.set(f"raysft-{job['id']}", Status.SUCCEEDED)
    done = progress()
    assert done["reused"] is True and done["percent"] == 100.0 and done["rows"] == 8
    # a manifest the job wrote itself is no reuse
    again = client.post("/v1/datasets?force=true", json=dataset_body(data_dir, output=str(output)),
                        headers=auth(client)).json()
    written = (datetime.now(UTC) + timedelta(seconds=5)).isoformat(timespec="seconds")
    (output / "manifest.json").write_text(stub_manifest("abc").model_copy(update={"created_at": written}).to_json())
    ray.set(f"raysft-{again['id']}", Status.SUCCEEDED)
    reconcile(client)
    assert client.get(f"/v1/jobs/{again['id']}", headers=auth(client)).json()["progress"]["reused"] is False


def test_a_job_ray_could_not_take_is_submitted_later(client, ray, data_dir):
    ray.down = True
    job = client.post("/v1/datasets", json=dataset_body(data_dir), headers=auth(client)).json()
    assert job["status"] == "QUEUED" and not ray.jobs
    ray.down = False
    reconcile(client)
    assert f"raysft-{job['id']}" in ray.jobs


def test_pipeline_trains_only_after_its_dataset_succeeds(client, ray, data_dir):
    body = {"dataset": dataset_body(data_dir), "training": training_body(data_dir)}
    pipeline = client.post("/v1/pipelines", json=body, headers=auth(client)).json()
    [dataset_id] = pipeline["children"]
    reconcile(client)
    assert len(ray.jobs) == 1
    ray.set(f"raysft-{dataset_id}", Status.SUCCEEDED)
    reconcile(client)
    children = client.get(f"/v1/jobs/{pipeline['id']}", headers=auth(client)).json()["children"]
    assert len(children) == 2 and len(ray.jobs) == 2
    training = client.get(f"/v1/jobs/{children[1]}", headers=auth(client)).json()
    dataset = client.get(f"/v1/jobs/{dataset_id}", headers=auth(client)).json()
    assert training["spec"]["datasets"] == [{"uri": dataset["spec"]["output"], "weight": 1.0}]
    ray.set(f"raysft-{children[1]}", Status.SUCCEEDED)
    reconcile(client)
    assert client.get(f"/v1/jobs/{pipeline['id']}", headers=auth(client)).json()["status"] == "SUCCEEDED"


def test_two_replicas_advancing_a_pipeline_at_once_start_one_training(client, ray, data_dir, monkeypatch):
    """Each replica's reconcile loop advances pipelines: two may see the same dataset succeed."""
    from service.core import jobs
    from service.core.reconcile import advance_pipeline

    body = {"dataset": dataset_body(data_dir), "training": training_body(data_dir)}
    pipeline = client.post("/v1/pipelines", json=body, headers=auth(client)).json()
    [dataset_id] = pipeline["children"]
    reconcile(client)
    ray.set(f"raysft-{dataset_id}", Status.SUCCEEDED)
    make_child = jobs.child

    def the_other_replica_commits_first(parent, kind, spec):
        monkeypatch.setattr(jobs, "child", make_child)
        advance_pipeline(client.app.state.core, parent.id)  # a whole pass, in its own session
        return make_child(parent, kind, spec)

    monkeypatch.setattr(jobs, "child", the_other_replica_commits_first)
    reconcile(client)  # loses the race: no error, and nothing of its own is kept
    children = client.get(f"/v1/jobs/{pipeline['id']}", headers=auth(client)).json()["children"]
    assert len(children) == 2 and sorted(ray.jobs) == sorted(f"raysft-{c}" for c in children)
    ray.set(f"raysft-{children[1]}", Status.SUCCEEDED)
    reconcile(client)
    assert client.get(f"/v1/jobs/{pipeline['id']}", headers=auth(client)).json()["status"] == "SUCCEEDED"


def test_pipeline_fails_with_the_reason_when_preparation_fails(client, ray, data_dir):
    body = {"dataset": dataset_body(data_dir), "training": training_body(data_dir)}
    pipeline = client.post("/v1/pipelines", json=body, headers=auth(client)).json()
    ray.set(f"raysft-{pipeline['children'][0]}", Status.FAILED, "too many invalid rows")
    reconcile(client)
    reconcile(client)
    final = client.get(f"/v1/jobs/{pipeline['id']}", headers=auth(client)).json()
    assert final["status"] == "FAILED" and "dataset job" in final["error"] and "too many invalid rows" in final["error"]
    assert len(ray.jobs) == 1  # no training was started


def test_training_names_its_dataset_by_job_id(client, ray, data_dir):
    dataset = client.post("/v1/datasets", json=dataset_body(data_dir), headers=auth(client)).json()
    body = training_body(data_dir, datasets=[{"uri": f"job:{dataset['id']}"}])
    early = client.post("/v1/trainings", json=body, headers=auth(client))
    assert early.status_code == 422 and "train once it has SUCCEEDED" in early.text
    ray.set(f"raysft-{dataset['id']}", Status.SUCCEEDED)
    reconcile(client)
    training = client.post("/v1/trainings", json=body, headers=auth(client)).json()
    assert training["spec"]["datasets"][0]["uri"] == dataset["spec"]["output"]
    assert client.post("/v1/trainings", json=body, headers=auth(client, "globex")).status_code == 422


def test_cancel_stops_the_ray_job(client, ray, data_dir):
    job = client.post("/v1/datasets", json=dataset_body(data_dir), headers=auth(client)).json()
    cancelled = client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth(client)).json()
    assert cancelled["status"] == "CANCELLED"
    assert ray.statuses[f"raysft-{job['id']}"].status is Status.CANCELLED


def test_list_filters_and_pages(client, data_dir):
    for seed in range(5):
        client.post("/v1/datasets", json=dataset_body(data_dir, seed=seed), headers=auth(client))
    page = client.get("/v1/jobs", params={"kind": "dataset", "status": "QUEUED", "limit": 2, "offset": 2},
                      headers=auth(client)).json()
    assert page["total"] == 5 and len(page["items"]) == 2
    assert client.get("/v1/jobs", params={"status": "RUNNING"}, headers=auth(client)).json()["total"] == 0
    assert client.get("/v1/jobs", params={"status": "NOPE"}, headers=auth(client)).status_code == 422


def test_logs_tail(client, data_dir):
    job = client.post("/v1/datasets", json=dataset_body(data_dir), headers=auth(client)).json()
    assert client.get(f"/v1/jobs/{job['id']}/logs", params={"tail": 2}, headers=auth(client)).text == "line 3\nline 4"


def test_readiness_reports_ray_down_and_prometheus_counts(client, ray, data_dir):
    client.post("/v1/datasets", json=dataset_body(data_dir), headers=auth(client))
    ray.down = True
    not_ready = client.get("/readyz")
    assert not_ready.status_code == 503 and not_ready.json() == {"ready": False, "database": True, "ray": False}
    text = client.get("/metrics").text
    assert 'raysft_jobs{status="QUEUED"} 1.0' in text
    assert 'raysft_http_requests_total{method="POST",route="/v1/datasets",status="202"} 1.0' in text
    assert 'raysft_http_request_seconds_count{method="POST",route="/v1/datasets"} 1.0' in text
    client.get("/v1/jobs")  # no key
    assert 'raysft_http_requests_total{method="GET",route="/v1/jobs",status="401"} 1.0' in client.get("/metrics").text


def test_known_api_keys_are_remembered_unknown_ones_looked_up_every_time(client):
    cache = client.app.state.core.keys
    sessions, opened = cache.sessions, []
    cache.sessions = lambda: opened.append(1) or sessions()
    assert cache.tenant_for_key(client.keys["acme"]) == "acme" and len(opened) == 1
    assert cache.tenant_for_key(client.keys["acme"]) == "acme" and len(opened) == 1  # no second lookup
    assert cache.tenant_for_key("rsk_unknown") is None and cache.tenant_for_key("rsk_unknown") is None
    assert len(opened) == 3 and len(cache.known) == 1


def test_a_get_is_one_query_and_a_pipelines_two(client, data_dir):
    core = client.app.state.core
    dataset = client.post("/v1/datasets", json=dataset_body(data_dir), headers=auth(client)).json()
    pipeline = client.post("/v1/pipelines", json={"dataset": dataset_body(data_dir), "training": training_body(data_dir)},
                           headers=auth(client)).json()
    sessions, opened = core.sessions, []
    core.sessions = lambda: opened.append(1) or sessions()
    assert client.get(f"/v1/jobs/{dataset['id']}", headers=auth(client)).json()["children"] == []
    assert len(opened) == 1  # the job; datasets and trainings have no children to look for
    assert len(client.get(f"/v1/jobs/{pipeline['id']}", headers=auth(client)).json()["children"]) == 1
    assert len(opened) == 3


def test_ray_errors_are_classified_by_what_they_say_not_by_digits_in_ids():
    from service.ray_jobs import RayJobs, RayUnavailable, UnknownToRay

    class FailingClient:
        def __init__(self, message):
            self.message = message

        def submit_job(self, *args, **kwargs):
            raise RuntimeError(self.message)

        get_job_info = submit_job

    jobs = RayJobs("http://127.0.0.1:1")

    def failing(message):
        jobs._client = FailingClient(message)
        return jobs

    # A second submit of one id is adopted, even when the id holds "404" and Ray answers 500.
    already = ("Request failed with status code 500: Traceback ... ValueError: Job with submission_id "
               "raysft-a404f already exists. Please use a different submission_id.")
    failing(already).submit(store.Kind.DATASET, "/spec.json", "raysft-a404f", {})
    with pytest.raises(RayUnavailable):
        failing("Request failed with status code 500: raysft-a404f: the agent is not ready").submit(
            store.Kind.DATASET, "/spec.json", "raysft-a404f", {})
    with pytest.raises(UnknownToRay):
        failing("Request failed with status code 404: Job raysft-b not found").status("raysft-b")
    with pytest.raises(UnknownToRay):
        failing("Job raysft-b does not exist.").status("raysft-b")


def test_an_evaluation_names_a_trainings_export_and_a_dataset_by_job_id_and_reports_its_figures(client, ray, data_dir):
    dataset = client.post("/v1/datasets", json=dataset_body(data_dir), headers=auth(client)).json()
    ray.set(f"raysft-{dataset['id']}", Status.SUCCEEDED)
    reconcile(client)
    training = client.post("/v1/trainings", json=training_body(data_dir, datasets=[{"uri": f"job:{dataset['id']}"}]),
                           headers=auth(client)).json()
    body = {"name": "eval", "model": {"uri": str(data_dir / "models/tiny"), "dtype": "fp32"},
            "adapter": f"job:{training['id']}", "dataset": f"job:{dataset['id']}"}
    early = client.post("/v1/evaluations", json=body, headers=auth(client))
    assert early.status_code == 422 and "evaluate once it has SUCCEEDED" in early.text
    ray.set(f"raysft-{training['id']}", Status.SUCCEEDED)
    reconcile(client)
    assert client.post("/v1/evaluations", json=body, headers=auth(client, "globex")).status_code == 422
    job = client.post("/v1/evaluations", json=body, headers=auth(client)).json()
    assert job["kind"] == "evaluation" and job["evaluates"] == training["id"]
    listed = client.get(f"/v1/jobs?evaluates={training['id']}", headers=auth(client)).json()["items"]
    assert [j["id"] for j in listed] == [job["id"]]
    run = training["spec"]["checkpoint"]["storage"] + "/lora"
    assert job["spec"]["adapter"] == f"{run}/export/adapter" and job["spec"]["dataset"] == dataset["spec"]["output"]
    assert job["spec"]["output"] == str(data_dir.absolute() / f"artifacts/tenants/acme/jobs/{job['id']}/evaluation")
    spec_file = data_dir.absolute() / f"artifacts/tenants/acme/jobs/{job['id']}/spec.json"
    assert ray.jobs[f"raysft-{job['id']}"]["entrypoint"] == f"python -m jobs.evaluate --spec {spec_file}"

    # What the job writes is what the API reports: the model's figures, the base model's, the answers.
    report = {"rows": 3, "metrics": {"eval_loss": 1.5}, "base_metrics": {"eval_loss": 2.5},
              "generations": [{"prompt": "Hi", "answer": "Hello"}], "base_generations": []}
    (data_dir / job["spec"]["output"]).mkdir(parents=True)
    (data_dir / job["spec"]["output"] / "evaluation.json").write_text(json.dumps(report))
    ray.set(f"raysft-{job['id']}", Status.SUCCEEDED)
    reconcile(client)
    done = client.get(f"/v1/jobs/{job['id']}", headers=auth(client)).json()
    assert done["metrics"] == {k: report[k] for k in ("metrics", "base_metrics", "generations", "base_generations")}
    assert done["artifacts"]["evaluation"].endswith("/evaluation/evaluation.json")

    outside = client.post("/v1/evaluations", json=body | {"adapter": "s3://elsewhere/adapter", "output": "s3://x/y"},
                          headers=auth(client)).json()["detail"]["problems"]
    assert any(p.startswith("adapter: not readable") for p in outside) and any(p.startswith("output:") for p in outside)


def test_a_sweep_makes_one_training_per_run_validated_together_and_kept_together(client, ray, data_dir):
    dataset = client.post("/v1/datasets", json=dataset_body(data_dir), headers=auth(client)).json()
    ray.set(f"raysft-{dataset['id']}", Status.SUCCEEDED)
    reconcile(client)
    training = training_body(data_dir, datasets=[{"uri": f"job:{dataset['id']}"}])
    body = {"training": training, "runs": [{"optim.lr": 1e-4}, {"optim.lr": 2e-4, "lora.r": 16}, {"optim.lr": 5e-4}]}
    created = client.post("/v1/sweeps", json=body, headers=auth(client))
    assert created.status_code == 202, created.text
    sweep = created.json()
    assert [j["spec"]["optim"]["lr"] for j in sweep["jobs"]] == [1e-4, 2e-4, 5e-4]
    assert [j["spec"]["name"] for j in sweep["jobs"]] == ["lora-1", "lora-2", "lora-3"]
    assert [j["spec"]["lora"]["r"] for j in sweep["jobs"]] == [8, 16, 8]
    assert {j["sweep_id"] for j in sweep["jobs"]} == {sweep["id"]}
    assert {f"raysft-{j['id']}" for j in sweep["jobs"]} <= set(ray.jobs)
    assert client.get(f"/v1/sweeps/{sweep['id']}", headers=auth(client)).json() == sweep
    assert client.get(f"/v1/jobs/{sweep['jobs'][1]['id']}", headers=auth(client)).json()["sweep_id"] == sweep["id"]
    assert client.get(f"/v1/sweeps/{sweep['id']}", headers=auth(client, "globex")).status_code == 404

    # The same Idempotency-Key returns the same sweep; nothing more is submitted.
    keyed = {**auth(client), "Idempotency-Key": "sweep-1"}
    first = client.post("/v1/sweeps", json=body, headers=keyed).json()
    submitted = len(ray.jobs)
    assert client.post("/v1/sweeps", json=body, headers=keyed).json() == first and len(ray.jobs) == submitted

    # Every run's problems at once, with the run's index; nothing recorded.
    bad = {"training": training, "runs": [{"optim.lr": -1}, {"optim.lr": 1e-4}, {"lora.rank": 4, "epochs.x": 1}]}
    problems = client.post("/v1/sweeps", json=bad, headers=auth(client)).json()["detail"]["problems"]
    assert any(p.startswith("runs.0.optim.lr") for p in problems)
    assert any(p.startswith("runs.2.lora.rank") for p in problems) and any(p.startswith("runs.2.epochs") for p in problems)
    assert client.get("/v1/jobs?kind=training", headers=auth(client)).json()["total"] == 6
    assert client.post("/v1/sweeps", json={"training": training}, headers=auth(client)).json()["detail"]["problems"] == [
        "runs: required, a list of 1 to 64 mappings of field paths to values (e.g. [{optim.lr: 1.0e-4}, {optim.lr: 2.0e-4}])"]
