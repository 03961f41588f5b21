"""raysft deployed as it runs for real: containers of the image (`make image`), a Ray head and two
workers with no volume shared, the control plane in a container of its own talking to the head
through the token-protected job API, and an S3-compatible server as the only storage. Driven the
two ways users drive raysft: REST (a pipeline: prepare on the cluster, then DeepSpeed ZeRO-2 LoRA
with its two workers on two nodes) and `ray job submit` from outside the cluster.

`make test-cluster` (needs podman; builds the image first)."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
from support import REPO
from support.cluster import Cluster, actors, image_exists, podman

from service.local_ray import free_port

pytestmark = [pytest.mark.integration, pytest.mark.cluster, pytest.mark.timeout(1200)]
BUCKET = "raysft"
MODEL = f"s3://{BUCKET}/models/tiny"
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


def test_no_node_sees_another_nodes_filesystem(cluster):
    roles = ["head", "worker-0", "worker-1", "control-plane"]
    for role in roles:
        cluster.exec(role, "sh", "-c", f"echo {role} > /tmp/raysft-node-{role}")
    for role in roles:
        seen = cluster.exec(role, "sh", "-c", "ls /tmp | grep raysft-node- || true").stdout.split()
        assert seen == [f"raysft-node-{role}"], (role, seen)
    mounts = json.loads(podman("inspect", *[cluster.name(r) for r in roles]).stdout)
    assert all(not c["Mounts"] for c in mounts), [c["Mounts"] for c in mounts]


def ray_submit(cluster: Cluster, module: str, spec: dict, token: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | {"RAY_AUTH_MODE": "token"}
    if token is not None:
        env["RAY_AUTH_TOKEN"] = token
    ray = str(Path(sys.executable).with_name("ray"))
    return subprocess.run([ray, "job", "submit", "--address", cluster.dashboard, "--",
                           "python", "-m", module, "--spec", json.dumps(spec)],
                          capture_output=True, text=True, env=env, timeout=900)


def test_ray_job_submit_from_outside_runs_both_jobs_and_needs_the_token(cluster):
    data = f"s3://{BUCKET}/submitted/messages.jsonl"
    boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).upload_file(
        str(REPO / "configs/data/messages.jsonl"), BUCKET, data.removeprefix(f"s3://{BUCKET}/"))
    prepared = f"s3://{BUCKET}/submitted/prepared"
    dataset = {"name": "submitted", "sources": [{"uri": data, "format": "messages"}], "tokenizer": MODEL,
               "template": "chatml", "max_seq_length": 512, "output": prepared}

    refused = ray_submit(cluster, "jobs.prepare", dataset, token=None)
    assert refused.returncode != 0
    assert "token" in (refused.stdout + refused.stderr).lower(), refused.stdout[-2000:] + refused.stderr[-2000:]

    done = ray_submit(cluster, "jobs.prepare", dataset, token=cluster.token)
    assert done.returncode == 0 and "succeeded" in done.stdout.lower(), done.stdout[-3000:] + done.stderr[-3000:]
    training = {"name": "submitted-lora", "model": {"uri": MODEL, "dtype": "fp32"}, "datasets": [{"uri": prepared}],
                "method": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}, "max_steps": 4,
                "scaling": {"num_workers": 2, "cpus_per_worker": 2}, "eval": {"every_steps": 4},
                "checkpoint": {"storage": f"s3://{BUCKET}/submitted/runs", "every_steps": 4}}
    done = ray_submit(cluster, "jobs.train", training, token=cluster.token)
    assert done.returncode == 0 and "succeeded" in done.stdout.lower(), done.stdout[-3000:] + done.stderr[-3000:]
