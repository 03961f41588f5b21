"""raysft deployed as it runs for real: containers of the image (`make image`), a Ray head and two
workers with no volume shared, the control plane in a container of its own talking to the head
through the token-protected job API, and an S3-compatible server as the only storage. Driven the
two ways users drive raysft: REST (a pipeline: prepare on the cluster, then DeepSpeed ZeRO-2 LoRA
with its two workers on two nodes) and `ray job submit` from outside the cluster.

`make test-cluster` (needs podman; builds the image first)."""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
from support import REPO
from support.cluster import Cluster, actors, image_exists, podman
from support.jobs import max_difference

from service.local_ray import free_port

pytestmark = [pytest.mark.integration, pytest.mark.cluster, pytest.mark.timeout(1200)]
BUCKET = "raysft"
MODEL = f"s3://{BUCKET}/models/tiny"
ADMIN_PREFIX = f"s3://{BUCKET}/artifacts/tenants/admin"
TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED", "LOST"}


@pytest.fixture(scope="module")
def cluster(tiny_model, tmp_path_factory):
    if not image_exists():
        pytest.fail("no raysft image: run `make image` (make test-cluster does)")
    from moto.server import ThreadedMotoServer

    cluster = Cluster(token=secrets.token_hex(16), s3_env={})
    server = None
    try:
        port = free_port()
        cluster.s3_env = {"AWS_ENDPOINT_URL": f"http://{cluster.gateway}:{port}", "AWS_ACCESS_KEY_ID": "testing",
                          "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}
        started = time.perf_counter()
        cluster.start_head()
        # The host's S3 server, on the one host address the containers reach: the network's gateway.
        server = ThreadedMotoServer(ip_address=cluster.gateway, port=port, verbose=False)
        server.start()
        os.environ.update(cluster.s3_env)  # the test reads S3 as the nodes do
        s3 = boto3.client("s3", endpoint_url=cluster.s3_env["AWS_ENDPOINT_URL"])
        s3.create_bucket(Bucket=BUCKET)
        for path in tiny_model.rglob("*"):
            if path.is_file():
                s3.upload_file(str(path), BUCKET, f"models/tiny/{path.relative_to(tiny_model)}")
        cluster.start_rest(control_plane={"RAYSFT_ARTIFACT_ROOT": f"s3://{BUCKET}/artifacts",
                                          "RAYSFT_SHARED_READ_PREFIXES": json.dumps([f"s3://{BUCKET}/models/"])})
        print(f"cluster up in {time.perf_counter() - started:.1f} s", flush=True)
        yield cluster
    finally:
        if os.environ.get("RAYSFT_CLUSTER_LOGS"):
            print(cluster.logs(200))
        cluster.down()
        if server is not None:
            server.stop()


def wait(http, job_id: str, until=lambda job: job["status"] in TERMINAL, timeout: float = 900) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = http.get(f"/v1/jobs/{job_id}").json()
        if until(job) or job["status"] in TERMINAL:
            return job
        time.sleep(1)
    raise TimeoutError(f"job {job_id} still {job['status']} after {timeout:.0f} s")


def download(uri: str, out: Path) -> Path:
    import pyarrow.fs as pafs

    fs = pafs.S3FileSystem(endpoint_override=os.environ["AWS_ENDPOINT_URL"], region="us-east-1")
    out.mkdir(parents=True)
    pafs.copy_files(uri.removeprefix("s3://"), str(out), source_filesystem=fs)
    return out


def test_a_pipeline_through_rest_trains_on_two_nodes_survives_a_control_plane_restart_and_exports(cluster, tmp_path):
    http = cluster.http()
    with (REPO / "configs/data/messages.jsonl").open("rb") as f:
        uploaded = http.post("/v1/files", files={"file": ("messages.jsonl", f)})
    assert uploaded.status_code == 201, uploaded.text
    body = {"dataset": {"name": "cluster-data", "sources": [{"uri": f"file:{uploaded.json()['id']}", "format": "messages"}],
                        "tokenizer": MODEL, "template": "chatml", "max_seq_length": 512, "val_ratio": 0.1},
            "training": {"name": "cluster-lora", "model": {"uri": MODEL, "dtype": "fp32"}, "method": "lora",
                         "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
                         "strategy": {"kind": "deepspeed", "zero_stage": 2},
                         "optim": {"lr": 0.01, "warmup_ratio": 0.0}, "batch": {"micro_batch_size": 2, "grad_accum": 1},
                         "max_steps": 8, "log_every_steps": 2,
                         "scaling": {"num_workers": 2, "cpus_per_worker": 2},
                         "checkpoint": {"every_steps": 4, "keep": 2}, "eval": {"every_steps": 4}}}
    started = time.perf_counter()
    created = http.post("/v1/pipelines", json=body)
    assert created.status_code == 202, created.text
    pipeline = created.json()["id"]
    # The control plane's container restarted once training is under way: its database is in the
    # container, the job in Ray; nothing is lost and the record catches up.
    training_started = wait(http, pipeline, until=lambda job: (job["progress"].get("step") or 0) >= 1)
    assert training_started["status"] == "RUNNING", json.dumps(training_started, indent=2)
    restarted = time.perf_counter()
    podman("restart", "-t", "0", cluster.name("control-plane"))
    cluster.wait_for_api()
    print(f"control plane restarted and ready in {time.perf_counter() - restarted:.1f} s", flush=True)
    final = wait(http, pipeline)
    assert final["status"] == "SUCCEEDED", json.dumps(final, indent=2) + cluster.logs()
    print(f"pipeline on the cluster: {time.perf_counter() - started:.1f} s", flush=True)
    dataset_id, training_id = final["children"]
    training = http.get(f"/v1/jobs/{training_id}").json()

    # Ray's own state: the two training workers ran on the two worker nodes, one on each.
    nodes = {n["node_id"]: n["node_ip"] for n in cluster.ray_get("/api/v0/nodes?limit=100")["data"]["result"]["result"]}
    workers = actors(cluster, "RayTrainWorker")
    assert len(workers) == 2, workers
    ips = {nodes[a["node_id"]] for a in workers}
    assert ips == {cluster.ip(11), cluster.ip(12)}, (ips, workers)

    # The export, read back from S3 alone, loads in a fresh process and generates.
    export = download(training["artifacts"]["export_model"], tmp_path / "export")
    loaded = subprocess.run([sys.executable, "-c", (
        "import sys, torch; from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]); t = AutoTokenizer.from_pretrained(sys.argv[1])\n"
        "print(m.generate(**t('Hello', return_tensors='pt'), max_new_tokens=4).shape)"), str(export)],
        capture_output=True, text=True, timeout=120)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert "torch.Size([1," in loaded.stdout, loaded.stdout


def test_the_image_runs_as_non_root_with_every_extra_the_jobs_use_and_a_working_healthcheck(cluster):
    for role in ("head", "worker-0", "control-plane"):
        assert cluster.exec(role, "id", "-u").stdout.strip() == "1000", role
    cluster.exec("worker-0", "python", "-c", "import deepspeed, peft, wandb, mlflow, tensorboardX, prometheus_client, jobs.serve.app")
    health = podman("healthcheck", "run", cluster.name("control-plane"), check=False)
    assert health.returncode == 0, health.stdout + health.stderr


def test_no_node_sees_another_nodes_filesystem(cluster):
    roles = ["head", "worker-0", "worker-1", "control-plane"]
    for role in roles:
        cluster.exec(role, "sh", "-c", f"echo {role} > /tmp/raysft-node-{role}")
    for role in roles:
        seen = cluster.exec(role, "sh", "-c", "ls /tmp | grep raysft-node- || true").stdout.split()
        assert seen == [f"raysft-node-{role}"], (role, seen)
    mounts = json.loads(podman("inspect", *[cluster.name(r) for r in roles]).stdout)
    assert all(not c["Mounts"] for c in mounts), [c["Mounts"] for c in mounts]


def ray_submit(cluster: Cluster, module: str, spec: dict, token: str | None, wait: bool = True):
    """`ray job submit` from the host, as a user outside the cluster runs it: the finished process,
    or (wait=False) the submission id."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | {"RAY_AUTH_MODE": "token"}
    if token is not None:
        env["RAY_AUTH_TOKEN"] = token
    submission_id = f"raysft-test-{secrets.token_hex(4)}"
    ray = str(Path(sys.executable).with_name("ray"))
    done = subprocess.run([ray, "job", "submit", "--address", cluster.dashboard, "--submission-id", submission_id,
                           *([] if wait else ["--no-wait"]), "--", "python", "-m", module, "--spec", json.dumps(spec)],
                          capture_output=True, text=True, env=env, timeout=900)
    if wait:
        return done
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return submission_id


@pytest.fixture(scope="module")
def submitted(cluster) -> dict:
    """A dataset prepared by `ray job submit` from outside the cluster, with the token; and what
    the same submission gets without it."""
    # Under the admin tenant's prefix, so the service's jobs may read what `ray job submit` made.
    data = f"{ADMIN_PREFIX}/submitted/messages.jsonl"
    boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).upload_file(
        str(REPO / "configs/data/messages.jsonl"), BUCKET, data.removeprefix(f"s3://{BUCKET}/"))
    prepared = f"{ADMIN_PREFIX}/submitted/prepared"
    dataset = {"name": "submitted", "sources": [{"uri": data, "format": "messages"}], "tokenizer": MODEL,
               "template": "chatml", "max_seq_length": 512, "output": prepared}
    refused = ray_submit(cluster, "jobs.prepare", dataset, token=None)
    done = ray_submit(cluster, "jobs.prepare", dataset, token=cluster.token)
    return {"uri": prepared, "refused": refused, "done": done}


def lora_run(name: str, prepared: str, steps: int, **overrides) -> dict:
    """Two workers, ZeRO-2 LoRA with dropout on (so the random streams matter), checkpoints in S3."""
    return {"name": name, "model": {"uri": MODEL, "dtype": "fp32"}, "datasets": [{"uri": prepared}],
            "method": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.1},
            "strategy": {"kind": "deepspeed", "zero_stage": 2}, "optim": {"lr": 0.01, "warmup_ratio": 0.0},
            "batch": {"micro_batch_size": 2, "grad_accum": 1}, "max_steps": steps, "log_every_steps": 1,
            "scaling": {"num_workers": 2, "cpus_per_worker": 2}, "eval": {"every_steps": steps},
            "checkpoint": {"storage": f"s3://{BUCKET}/runs", "every_steps": 4, "keep": 2}} | overrides


# Long enough that a kill after the second checkpoint (step 8) lands with most of the run still ahead
# of it: at about 0.6 s a step, 16 steps are some 10 s, however late Ray's job logs arrive.
FAULT_STEPS = 24


@pytest.fixture(scope="module")
def uninterrupted(cluster, submitted) -> subprocess.CompletedProcess:
    """`ray job submit` of a training on what `submitted` prepared, never interrupted: the run the
    fault tests end equal to."""
    return ray_submit(cluster, "jobs.train", lora_run("uninterrupted", submitted["uri"], FAULT_STEPS),
                      token=cluster.token)


def test_ray_job_submit_from_outside_runs_both_jobs_and_needs_the_token(cluster, submitted, uninterrupted):
    refused = submitted["refused"]
    assert refused.returncode != 0
    assert "token" in (refused.stdout + refused.stderr).lower(), refused.stdout[-2000:] + refused.stderr[-2000:]
    for done in (submitted["done"], uninterrupted):  # jobs.prepare, then jobs.train
        assert done.returncode == 0 and "succeeded" in done.stdout.lower(), done.stdout[-3000:] + done.stderr[-3000:]


def adapter(run: str, step: int) -> dict:
    from safetensors.torch import load

    from jobs.common import run_layout, storage

    fs, path = storage.filesystem(f"s3://{BUCKET}/runs/{run}/{run_layout.checkpoint_dir_name(step)}")
    with fs.open_input_stream(f"{path}/adapter_model.safetensors") as f:
        return load(f.read())


def checkpoint_written(run: str, step: int) -> bool:
    from pyarrow import fs as pafs

    from jobs.common import run_layout, storage

    fs, path = storage.filesystem(f"s3://{BUCKET}/runs/{run}/{run_layout.checkpoint_dir_name(step)}")
    return fs.get_file_info(f"{path}/adapter_model.safetensors").type == pafs.FileType.File


def job_status(cluster: Cluster, submission_id: str) -> str:
    return cluster.ray_get(f"/api/jobs/{submission_id}")["status"]


def job_logs(cluster: Cluster, submission_id: str) -> str:
    return cluster.ray_get(f"/api/jobs/{submission_id}/logs")["logs"]


def wait_for_ray_job(cluster: Cluster, submission_id: str, until, timeout: float = 600,
                     poll_s: float = 1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if until():
            return
        if job_status(cluster, submission_id) in {"FAILED", "STOPPED"}:
            raise AssertionError(job_logs(cluster, submission_id)[-4000:])
        time.sleep(poll_s)
    raise TimeoutError(job_logs(cluster, submission_id)[-4000:])


def test_a_worker_node_killed_mid_training_is_survived_with_the_parameters_of_an_uninterrupted_run(
        cluster, submitted, uninterrupted, record_property):
    assert uninterrupted.returncode == 0, uninterrupted.stdout[-3000:]
    spec = lora_run("node-lost", submitted["uri"], FAULT_STEPS)
    submission = ray_submit(cluster, "jobs.train", spec, token=cluster.token, wait=False)
    # Killed once step 8's checkpoint is in S3, so step 4's is surely registered with Ray Train: the
    # signal is the storage itself, not the job's logs, which can arrive seconds late.
    wait_for_ray_job(cluster, submission, lambda: checkpoint_written("node-lost", 8), poll_s=0.2)
    assert job_status(cluster, submission) == "RUNNING", "the run ended before its worker node could be killed"
    killed = time.perf_counter()
    podman("kill", cluster.name("worker-1"))  # the node, not a process: its raylet and worker die with it
    wait_for_ray_job(cluster, submission, lambda: len(cluster.alive_nodes()) == 2)
    detected = time.perf_counter() - killed
    podman("start", cluster.name("worker-1"))  # a replacement node (KubeRay would start a new pod)
    wait_for_ray_job(cluster, submission, lambda: job_status(cluster, submission) == "SUCCEEDED")
    recovered = time.perf_counter() - killed
    logs = job_logs(cluster, submission)
    resumed = re.search(r"resumed from step (\d+)", logs)
    assert resumed and int(resumed[1]) in {4, 8}, logs[-4000:]
    assert max_difference(adapter("node-lost", FAULT_STEPS), adapter("uninterrupted", FAULT_STEPS)) < 1e-5
    record_property("worker_node_lost", {"detected_s": round(detected, 1), "finished_after_s": round(recovered, 1)})
    print(f"worker node killed: Ray saw it gone in {detected:.1f} s; the run resumed and finished "
          f"{recovered:.1f} s after the kill", flush=True)


def test_a_restarted_head_loses_the_job_and_a_resubmit_resumes_from_s3(cluster, submitted):
    http = cluster.http()
    body = lora_run("head-restart", submitted["uri"], FAULT_STEPS)
    del body["checkpoint"]["storage"]  # the job's own directory in the artifact store, as users leave it
    created = http.post("/v1/trainings", json=body)
    assert created.status_code == 202, created.text
    job = created.json()
    wait(http, job["id"], until=lambda j: (j["progress"].get("step") or 0) >= 6)
    restarted = time.perf_counter()
    # The head's container restarts (a new GCS: no job history); its workers' raylets lose their
    # cluster with it and come back as new nodes, as KubeRay restarts worker pods.
    podman("restart", "-t", "0", cluster.name("head"))
    podman("restart", "-t", "0", cluster.name("worker-0"), cluster.name("worker-1"))
    lost = wait(http, job["id"], timeout=300)
    detected = time.perf_counter() - restarted
    assert lost["status"] == "LOST" and "resubmit" in lost["error"], json.dumps(lost, indent=2)
    cluster.wait_for_dashboard()
    cluster.wait_for_nodes(3)

    storage = http.get(f"/v1/jobs/{job['id']}").json()["spec"]["checkpoint"]["storage"]
    again = http.post("/v1/trainings", json=body | {"checkpoint": body["checkpoint"] | {"storage": storage}})
    assert again.status_code == 202, again.text
    final = wait(http, again.json()["id"])
    assert final["status"] == "SUCCEEDED", json.dumps(final, indent=2)
    recovered = time.perf_counter() - restarted
    logs = http.get(f"/v1/jobs/{final['id']}/logs", params={"tail": 100_000}).text
    assert "resumed from step" in logs and "resumed from step 0" not in logs, logs[-3000:]
    print(f"head restarted: the job was reported LOST {detected:.1f} s later; the resubmitted run finished "
          f"{recovered:.1f} s after the restart", flush=True)
