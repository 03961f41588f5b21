"""The training job on real Ray Train workers: DeepSpeed ZeRO-2/3 with LoRA and DDP full
fine-tuning on the scaffold model, checkpoints on a loopback S3 server, and the exported models
loaded by plain transformers/peft in a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from support.jobs import job_env, run, step_metrics, training_spec

pytestmark = pytest.mark.integration


def assert_learns(metrics: dict[int, dict], steps: int) -> None:
    assert sorted(metrics) == list(range(1, steps + 1))
    first, last = metrics[1]["loss"], sum(metrics[s]["loss"] for s in range(steps - 2, steps + 1)) / 3
    assert last < first - 0.02, (first, last)
    assert metrics[steps]["eval_loss"] > 0 and 0 <= metrics[steps]["token_accuracy"] <= 1
    assert all(m["trainable_tokens_per_s"] > 0 and m["grad_norm"] is not None for m in metrics.values())
    # The running totals count what the rates measured: each step (logged alone) adds its own tokens.
    for step in range(1, steps + 1):
        m, before = metrics[step], metrics.get(step - 1, {"tokens_seen": 0, "trainable_tokens_seen": 0})
        assert m["tokens_seen"] - before["tokens_seen"] == pytest.approx(m["tokens_per_s"] * m["step_time_s"], rel=1e-4)
        assert (m["trainable_tokens_seen"] - before["trainable_tokens_seen"]
                == pytest.approx(m["trainable_tokens_per_s"] * m["step_time_s"], rel=1e-4))
        assert 0 < m["trainable_tokens_seen"] < m["tokens_seen"]


# Runs in a fresh interpreter: nothing of raysft is imported, only transformers and peft.
LOAD_AND_GENERATE = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model_dir, base_dir, adapter_dir = sys.argv[1:4]
tokenizer = AutoTokenizer.from_pretrained(model_dir)
text = tokenizer.apply_chat_template([{"role": "user", "content": "How long should I rest a steak?"}],
                                     tokenize=False, add_generation_prompt=True)
ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
out = {"prompt_tokens": ids.shape[1], "prompt": text,
       "generated": model.generate(ids, max_new_tokens=8, do_sample=False).shape[1] - ids.shape[1]}
with torch.no_grad():
    logits = model(ids).logits
    out["differs_from_base"] = (logits - base(ids).logits).abs().max().item()
    if adapter_dir != "-":
        from peft import PeftModel
        adapted = PeftModel.from_pretrained(base, adapter_dir).eval()
        out["adapter_vs_merged"] = (adapted(ids).logits - logits).abs().max().item()
        out["adapter_generated"] = adapted.generate(input_ids=ids, max_new_tokens=8, do_sample=False).shape[1] - ids.shape[1]
print(json.dumps(out))
"""


def load_in_fresh_process(export_dir, base_dir, adapter: bool) -> dict:
    proc = subprocess.run([sys.executable, "-c", LOAD_AND_GENERATE, str(export_dir / "model"), str(base_dir),
                           str(export_dir / "adapter") if adapter else "-"],
                          env=job_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def assert_exported(export_dir, base_dir, adapter: bool) -> None:
    """The export loads with plain transformers (and peft), generates, uses the training chat
    template, and carries the training: its logits differ from the base model's."""
    for model in ("model", "adapter") if adapter else ("model",):
        check = subprocess.run(["sha256sum", "--check", "--quiet", "SHA256SUMS"], cwd=export_dir / model)
        assert check.returncode == 0
    result = load_in_fresh_process(export_dir, base_dir, adapter)
    assert result["generated"] > 0
    assert result["prompt"] == "<|im_start|>user\nHow long should I rest a steak?<|im_end|>\n<|im_start|>assistant\n"
    assert result["differs_from_base"] > 1e-3
    if adapter:
        assert result["adapter_vs_merged"] < 1e-4 and result["adapter_generated"] > 0


def test_lora_zero2_two_workers_checkpoints_to_s3(s3_server, tiny_model, prepared):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server["AWS_ENDPOINT_URL"])
    s3.create_bucket(Bucket="ckpt")
    spec = training_spec(tiny_model, prepared, "s3://ckpt/runs", name="lora-z2",
                         strategy={"kind": "deepspeed", "zero_stage": 2})
    # The data streams from storage here, as large datasets do (the other runs hold it in memory).
    proc = run("jobs.train", spec, env=s3_server, args=("--in-memory-max-bytes", "0"))
    assert "train split streamed" in proc.stderr
    assert_learns(step_metrics(proc.stdout + proc.stderr), 10)
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="ckpt", Prefix="runs/lora-z2/")["Contents"]}
    for step in ("step_00000005", "step_00000010"):
        assert f"runs/lora-z2/{step}/training_state.json" in keys
        assert any(k.startswith(f"runs/lora-z2/{step}/state/") for k in keys)  # DeepSpeed's own files
    state = json.loads(s3.get_object(Bucket="ckpt", Key="runs/lora-z2/step_00000010/training_state.json")["Body"].read())
    assert (state["global_step"], state["epoch"], state["world_size"], len(state["rng"])) == (10, 0, 2, 2)
    history = s3.get_object(Bucket="ckpt", Key="runs/lora-z2/metrics.jsonl")["Body"].read().decode().splitlines()
    assert [json.loads(line)["step"] for line in history] == list(range(1, 11))
    for name in ("adapter/adapter_model.safetensors", "model/model.safetensors", "model/tokenizer.json"):
        assert f"runs/lora-z2/export/{name}" in {o["Key"] for o in s3.list_objects_v2(Bucket="ckpt", Prefix="runs/lora-z2/export/")["Contents"]}


def test_lora_zero3_two_workers_and_its_adapter_evaluated_as_a_job(tiny_model, prepared, tmp_path):
    spec = training_spec(tiny_model, prepared, str(tmp_path / "ckpt"), name="lora-z3",
                         strategy={"kind": "deepspeed", "zero_stage": 3})
    proc = run("jobs.train", spec)
    metrics = step_metrics(proc.stdout + proc.stderr)
    assert_learns(metrics, 10)
    assert (tmp_path / "ckpt/lora-z3/step_00000010/adapter_model.safetensors").exists()
    assert_exported(tmp_path / "ckpt/lora-z3/export", tiny_model, adapter=True)  # gathered from ZeRO-3 shards

    # jobs.evaluate on the exported adapter, its rows shared by 2 workers, scores the validation
    # split as training's last evaluation did; the base model (adapter off) scores worse.
    evaluation = {"name": "z3-eval", "model": {"uri": str(tiny_model), "dtype": "fp32"},
                  "adapter": str(tmp_path / "ckpt/lora-z3/export/adapter"), "dataset": str(prepared),
                  "generation": {"prompts": ["How long should I rest a steak?"], "max_new_tokens": 4},
                  "scaling": {"num_workers": 2}, "output": str(tmp_path / "eval")}
    evaluated = run("jobs.evaluate", evaluation)
    printed = evaluated.stdout
    assert "Loading weights" not in printed + evaluated.stderr  # no progress bars
    report = json.loads((tmp_path / "eval/evaluation.json").read_text())
    assert report["rows"] == json.loads((prepared / "manifest.json").read_text())["packing"]["rows"]["val"]
    for key in ("eval_loss", "token_accuracy", "sequence_accuracy"):
        assert report["metrics"][key] == pytest.approx(metrics[10][key], abs=1e-4), key
    assert report["base_metrics"]["eval_loss"] > report["metrics"]["eval_loss"]
    assert [g["prompt"] for g in report["generations"] + report["base_generations"]] == evaluation["generation"]["prompts"] * 2
    assert "eval_loss" in printed and "base" in printed


def test_full_finetune_ddp_two_workers(tiny_model, prepared, tmp_path):
    spec = training_spec(tiny_model, prepared, str(tmp_path / "ckpt"), name="full-ddp", method="full",
                         optim={"lr": 0.002, "warmup_ratio": 0.0}, strategy={"kind": "ddp"})
    proc = run("jobs.train", spec)
    output = proc.stdout + proc.stderr
    assert_learns(step_metrics(output), 10)
    # Each line rank 0 writes reaches the job's log once (Ray Train's own `print` would log it twice).
    assert [output.count(f'{{"step": {step},') for step in range(1, 11)] == [1] * 10
    assert output.count("exported model to") == 1
    # A job's log is read afterwards: no progress bars redrawn with carriage returns (Ray Data's
    # on every evaluation pass, transformers' on every model load and save), no torch warning.
    assert "\r" not in output and "Running Dataset" not in output and "Loading weights" not in output
    assert "NumPy array is not writable" not in output
    # Its private cluster has no State API; Ray Train's cleaner would say so every second.
    assert "Failed to query Ray Train Controller actor state" not in proc.stderr
    assert (tmp_path / "ckpt/full-ddp/step_00000010/ddp_state.pt").exists()
    assert_exported(tmp_path / "ckpt/full-ddp/export", tiny_model, adapter=False)


def test_datasets_mix_by_weight_held_in_memory_or_streamed(tiny_model, prepared, tmp_path):
    import ray

    from jobs.common import ray_runtime
    from jobs.train.data_order import epoch_order
    from jobs.train.driver import datasets
    from jobs.train.plan import planned_train_rows
    from jobs.train.preflight import check_datasets
    from jobs.train.spec import load_training_spec

    spec = load_training_spec(training_spec(tiny_model, prepared, str(tmp_path), datasets=[
        {"uri": str(prepared), "weight": 2.0}, {"uri": str(prepared), "weight": 0.5}]))
    manifests = check_datasets(spec)
    rows = manifests[0].rows("train")
    ray_runtime.init(num_cpus=2)
    try:
        held, streamed = datasets(spec, manifests), datasets(spec, manifests, in_memory_max_bytes=0)
        # Held: each dataset's rows once, one after the other; every epoch's order picks from them.
        assert held.train is None and held.train_sizes == [rows, rows] and held.train_table.num_rows == 2 * rows
        assert held.val is None and held.val_table.num_rows == 2 * manifests[0].rows("val")
        assert streamed.val_table is None and streamed.val.count() == 2 * manifests[0].rows("val")
        # Streamed: weight 2.0 reads every row twice, weight 0.5 a seeded Bernoulli(0.5) sample.
        assert streamed.train_table is None
        assert 2 * rows + 0.3 * rows <= streamed.train.count() <= 2 * rows + 0.7 * rows
    finally:
        ray.shutdown()
    assert planned_train_rows(spec, manifests) == 2 * rows + rows // 2
    assert len(epoch_order(held.train_sizes, [2.0, 0.5], spec.seed, 0)) == 2 * rows + rows // 2


def test_dry_run_prints_the_plan_and_trains_nothing(tiny_model, prepared, tmp_path):
    spec = training_spec(tiny_model, prepared, str(tmp_path / "ckpt"), name="plan", max_steps=None, epochs=2)
    proc = subprocess.run([sys.executable, "-m", "jobs.train", "--spec", json.dumps(spec), "--dry-run"],
                          env=job_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = json.loads(proc.stdout)
    rows = json.loads((prepared / "manifest.json").read_text())["packing"]["rows"]["train"]
    assert plan["steps"] == 2 * -(-rows // 8) and plan["rows_per_step"] == 8  # micro 2 x accum 2 x 2 workers
    assert plan["parameters"]["trainable"] == 27648 and plan["memory_gib_per_worker"]["device_total"] > 0
    assert not (tmp_path / "ckpt").exists()
