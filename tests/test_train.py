"""Issue 3 (part): the training job on real Ray Train workers: DeepSpeed ZeRO-2/3 with LoRA and
DDP full fine-tuning on the scaffold model, checkpoints on a loopback S3 server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]


def run(module: str, spec: dict, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | (env or {})
    proc = subprocess.run([sys.executable, "-m", module, "--spec", json.dumps(spec)], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    return proc


def step_metrics(proc: subprocess.CompletedProcess) -> dict[int, dict]:
    """Rank 0 prints one JSON object of metrics per step."""
    metrics = {}
    for line in (proc.stdout + proc.stderr).splitlines():
        if '{"step"' in line:
            m = json.loads(line[line.index('{"step"'):])
            metrics[m["step"]] = m
    return metrics


@pytest.fixture(scope="module")
def prepared(tiny_model, example_spec, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "demo"
    run("jobs.prepare", example_spec("demo", out))
    return out


def training_spec(tiny_model, prepared, storage, **overrides) -> dict:
    spec = {"name": "t", "model": {"uri": str(tiny_model), "dtype": "fp32"},
            "datasets": [{"uri": str(prepared)}], "method": "lora",
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0}, "optim": {"lr": 0.01, "warmup_ratio": 0.0},
            "batch": {"micro_batch_size": 2, "grad_accum": 2}, "max_steps": 10,
            "scaling": {"num_workers": 2}, "eval": {"every_steps": 10},
            "checkpoint": {"storage": storage, "every_steps": 5, "keep": 2}}
    return spec | overrides


def assert_learns(metrics: dict[int, dict], steps: int) -> None:
    assert sorted(metrics) == list(range(1, steps + 1))
    first, last = metrics[1]["loss"], sum(metrics[s]["loss"] for s in range(steps - 2, steps + 1)) / 3
    assert last < first - 0.02, (first, last)
    assert metrics[steps]["eval_loss"] > 0 and 0 <= metrics[steps]["token_accuracy"] <= 1
    assert all(m["trainable_tokens_per_s"] > 0 and m["grad_norm"] is not None for m in metrics.values())


def test_lora_zero2_two_workers_checkpoints_to_s3(s3_server, tiny_model, prepared):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server["AWS_ENDPOINT_URL"])
    s3.create_bucket(Bucket="ckpt")
    spec = training_spec(tiny_model, prepared, "s3://ckpt/runs", name="lora-z2",
                         strategy={"kind": "deepspeed", "zero_stage": 2})
    proc = run("jobs.train", spec, env=s3_server)
    assert_learns(step_metrics(proc), 10)
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="ckpt", Prefix="runs/lora-z2/")["Contents"]}
    for step in ("step_00000005", "step_00000010"):
        assert f"runs/lora-z2/{step}/training_state.json" in keys
        assert any(k.startswith(f"runs/lora-z2/{step}/state/") for k in keys)  # DeepSpeed's own files
    state = json.loads(s3.get_object(Bucket="ckpt", Key="runs/lora-z2/step_00000010/training_state.json")["Body"].read())
    assert state["global_step"] == 10


def test_lora_zero3_two_workers(tiny_model, prepared, tmp_path):
    spec = training_spec(tiny_model, prepared, str(tmp_path / "ckpt"), name="lora-z3",
                         strategy={"kind": "deepspeed", "zero_stage": 3})
    assert_learns(step_metrics(run("jobs.train", spec)), 10)
    assert (tmp_path / "ckpt/lora-z3/step_00000010/training_state.json").exists()


def test_full_finetune_ddp_two_workers(tiny_model, prepared, tmp_path):
    spec = training_spec(tiny_model, prepared, str(tmp_path / "ckpt"), name="full-ddp", method="full",
                         optim={"lr": 0.002, "warmup_ratio": 0.0}, strategy={"kind": "ddp"})
    assert_learns(step_metrics(run("jobs.train", spec)), 10)
    assert (tmp_path / "ckpt/full-ddp/step_00000010/ddp_state.pt").exists()


def test_datasets_mix_by_weight(tiny_model, prepared, tmp_path):
    import ray

    from jobs import ray_runtime
    from jobs.train import datasets
    from jobs.train_spec import check_datasets, load_training_spec

    spec = load_training_spec(training_spec(tiny_model, prepared, str(tmp_path), datasets=[
        {"uri": str(prepared), "weight": 2.0}, {"uri": str(prepared), "weight": 0.5}]))
    manifests = check_datasets(spec)
    rows = manifests[0]["packing"]["rows"]["train"]
    ray_runtime.init(num_cpus=2)
    try:
        data, planned = datasets(spec, manifests)
        mixed = data["train"].count()
    finally:
        ray.shutdown()
    assert planned == 2 * rows + rows // 2
    # Weight 2.0: every row twice; weight 0.5: a seeded Bernoulli(0.5) sample of the rows.
    assert 2 * rows + 0.3 * rows <= mixed <= 2 * rows + 0.7 * rows
