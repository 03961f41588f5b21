"""Benchmark of the training stage: `jobs.train` against a bare PyTorch loop, packed against padded.

    python benchmarks/train.py [--steps 100] [--gpu-steps 30] [--checkpoints 4] [--checkpoint-only | --cpu-only]

One run, one machine, the scaffold model and the demo data (each row repeated so no epoch ends
inside the measurement), LoRA r=8, micro-batch 2 x accumulation 2, one thread per process:
  1. trainable tokens/s of `jobs.train` with 1 Ray Train worker (DDP, DeepSpeed ZeRO-2, FSDP2),
     read from the run's metrics.jsonl after the first logging window (warm-up);
  2. the same model, data, batches and loss in a bare single-process PyTorch loop (no Ray, no
     data pipeline, rows already in memory), after the same warm-up;
  3. the bare loop on packed rows against one sample per row padded to the micro-batch's
     longest: real (non-padding) tokens/s.
  4. seconds of training blocked per checkpoint, `checkpoint.upload: sync` against `async`: the
     wall time of the loop's checkpoint call on rank 0 (writing the files locally, then reporting
     them; the upload too when sync), which the loop logs as `checkpoint_blocked_s` in
     metrics.jsonl. The CPU smoke run's shape (2 workers, ZeRO-2), checkpoints every 5 steps to a
     moto S3 server on loopback, so an upload goes through the S3 API as on a cluster; the final
     checkpoint always uploads before the export, so it is not counted.
With a GPU it also measures a ~0.5B Qwen2-shaped model built from its config (random weights,
bf16, synthetic packed rows of 2048 tokens), LoRA and full: tokens/s per GPU and MFU.
The JSON it prints is what docs/benchmarks.md records.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jobs import scaffold_model  # noqa: E402
from jobs.common import run_layout, tokenizer_files  # noqa: E402
from jobs.train.engines.base import lr_lambda  # noqa: E402
from jobs.train.packed_batch import collate, micro_batch_loss, trained_tokens  # noqa: E402
from jobs.train.spec import load_training_spec  # noqa: E402

MICRO, ACCUM, REPEAT, LOG_EVERY = 2, 2, 8, 10
ENGINES = (("ddp", {"kind": "ddp"}), ("deepspeed_zero2", {"kind": "deepspeed", "zero_stage": 2}),
           ("fsdp", {"kind": "fsdp"}))
CHECKPOINT_EVERY = 5
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}


def prepare(model: Path, out: Path, packing: str) -> Path:
    spec = yaml.safe_load((REPO / "configs/datasets/demo.yaml").read_text())
    for source in spec["sources"]:
        source["uri"] = str(REPO / source["uri"])
    spec |= {"tokenizer": str(model), "output": str(out), "packing": packing}
    subprocess.run([sys.executable, "-m", "jobs.prepare", "--spec", json.dumps(spec)], cwd=REPO, check=True,
                   capture_output=True)
    return out


def train_rows(prepared: Path) -> list[dict[str, np.ndarray]]:
    table = pq.read_table(prepared / "train")
    columns = {c: table.column(c).to_pylist() for c in ("input_ids", "labels", "position_ids", "seq_lens")}
    rows = [{c: np.asarray(columns[c][i]) for c in columns} for i in range(table.num_rows)]
    return rows * REPEAT  # the order jobs.train reads a dataset of weight REPEAT in


def training_spec(model: Path, prepared: Path, storage: Path, name: str, strategy: dict, steps: int) -> dict:
    return {"name": name, "model": {"uri": str(model), "dtype": "fp32"},
            "datasets": [{"uri": str(prepared), "weight": REPEAT}], "method": "lora",
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0}, "strategy": strategy,
            "optim": {"lr": 0.001, "warmup_ratio": 0.0}, "batch": {"micro_batch_size": MICRO, "grad_accum": ACCUM},
            "max_steps": steps + LOG_EVERY, "log_every_steps": LOG_EVERY,
            "scaling": {"num_workers": 1, "cpus_per_worker": 1},
            "checkpoint": {"storage": str(storage), "every_steps": steps + LOG_EVERY, "keep": 1},
            "eval": {"every_steps": steps + LOG_EVERY}, "export": {"merge_lora": False}}


def run_jobs_train(spec: dict, env: dict | None = None) -> None:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | (env or {})
    subprocess.run([sys.executable, "-m", "jobs.train", "--spec", json.dumps(spec)], cwd=REPO, env=env, check=True,
                   capture_output=True)


def jobs_train(spec: dict, storage: Path) -> dict:
    """Run jobs.train; trainable tokens/s over every logging window after the first."""
    run_jobs_train(spec)
    windows = [json.loads(line) for line in (storage / spec["name"] / "metrics.jsonl").read_text().splitlines()][1:]
    seconds = sum(w["step_time_s"] * LOG_EVERY for w in windows)
    trainable = sum(w["trainable_tokens_per_s"] * w["step_time_s"] * LOG_EVERY for w in windows)
    return {"trainable_tokens_per_s": round(trainable / seconds), "steps": LOG_EVERY * len(windows)}


def bare_loop(model, rows: list[dict[str, np.ndarray]], steps: int, warmup: int, pad_id: int, device: str,
              block_mask: bool = True, lr: float = 0.001) -> dict:
    """Plain PyTorch: the same collate, loss and AdamW schedule, rows in memory, one process."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    spec = load_training_spec({"name": "b", "model": {"uri": "m"}, "datasets": [{"uri": "d"}],
                               "optim": {"lr": lr, "warmup_ratio": 0.0}, "checkpoint": {"storage": "s"}})
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(spec, warmup + steps))
    per_step = MICRO * ACCUM
    trainable = tokens = 0
    started = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            if device == "cuda":
                torch.cuda.synchronize()
            started, trainable, tokens = time.perf_counter(), 0, 0
        chunk = [rows[(step * per_step + i) % len(rows)] for i in range(per_step)]
        group = [collate(chunk[i:i + MICRO], pad_id, block_mask) for i in range(0, per_step, MICRO)]
        group = [{k: v.to(device) for k, v in b.items()} for b in group]
        step_tokens = sum(trained_tokens(b) for b in group)
        for b in group:
            micro_batch_loss(model, b, step_tokens).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        trainable += step_tokens
        tokens += sum(int(r["seq_lens"].sum()) for r in chunk)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return {"trainable_tokens_per_s": round(trainable / seconds), "real_tokens_per_s": round(tokens / seconds),
            "step_time_s": round(seconds / steps, 4)}


def lora_model(model_dir: Path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(42)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                                            task_type="CAUSAL_LM"))


def cpu_benchmark(steps: int) -> dict:
    torch.set_num_threads(1)  # what a Ray Train worker with cpus_per_worker: 1 gets (OMP_NUM_THREADS=1)
    with tempfile.TemporaryDirectory(prefix="raysft-bench-") as tmp:
        root = Path(tmp)
        scaffold_model.scaffold(root / "model")
        packed = prepare(root / "model", root / "packed", "bfd")
        padded = prepare(root / "model", root / "padded", "none")
        pad_id = tokenizer_files.load(tokenizer_files.fetch(str(root / "model"))).pad_token_id
        results: dict = {"steps": steps, "micro_batch_size": MICRO, "grad_accum": ACCUM, "threads": 1}
        for name, strategy in ENGINES:
            spec = training_spec(root / "model", packed, root / "ckpt", f"bench-{name}", strategy, steps)
            results[f"jobs_train_{name}"] = jobs_train(spec, root / "ckpt")
        packed_rows, padded_rows = train_rows(packed), train_rows(padded)
        results["bare_loop_packed"] = bare_loop(lora_model(root / "model"), packed_rows, steps, LOG_EVERY, pad_id, "cpu")
        # Padded rows hold one sample each, so a step holds fewer samples: count real tokens per second.
        results["bare_loop_padded"] = bare_loop(lora_model(root / "model"), padded_rows, steps, LOG_EVERY, pad_id, "cpu")
    bare = results["bare_loop_packed"]["trainable_tokens_per_s"]
    for name, _ in ENGINES:
        results[f"ratio_jobs_train_{name}_vs_bare"] = round(results[f"jobs_train_{name}"]["trainable_tokens_per_s"] / bare, 3)
    results["ratio_packed_vs_padded_real_tokens"] = round(
        results["bare_loop_packed"]["real_tokens_per_s"] / results["bare_loop_padded"]["real_tokens_per_s"], 3)
    return results


def checkpoint_spec(model: Path, prepared: Path, name: str, upload: str, checkpoints: int) -> dict:
    """The CPU smoke run's shape; reports only at checkpoints, each more than Ray Train's 2 s poll
    apart, so a sync report never waits for the previous one to be taken."""
    steps = CHECKPOINT_EVERY * (checkpoints + 1)
    return {"name": name, "model": {"uri": str(model), "dtype": "fp32"}, "datasets": [{"uri": str(prepared)}],
            "method": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
            "strategy": {"kind": "deepspeed", "zero_stage": 2}, "optim": {"lr": 0.01, "warmup_ratio": 0.0},
            "batch": {"micro_batch_size": MICRO, "grad_accum": ACCUM}, "max_steps": steps, "log_every_steps": steps,
            "scaling": {"num_workers": 2, "cpus_per_worker": 1},
            "checkpoint": {"storage": "s3://bench/runs", "every_steps": CHECKPOINT_EVERY, "keep": 2, "upload": upload},
            "eval": {"every_steps": CHECKPOINT_EVERY}, "export": {"merge_lora": False}}


def checkpoint_benchmark(checkpoints: int) -> dict:
    """Seconds of training blocked per checkpoint (rank 0's `checkpoint_blocked_s`), sync against
    async upload, to S3 on loopback."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # the server's line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
           "AWS_REGION": "us-east-1"}
    s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=env["AWS_REGION"],
                      aws_access_key_id="bench", aws_secret_access_key="bench")
    s3.create_bucket(Bucket="bench")
    results: dict = {"workers": 2, "strategy": "deepspeed_zero2", "checkpoint_every_steps": CHECKPOINT_EVERY,
                     "storage": "moto S3 server on loopback"}
    try:
        with tempfile.TemporaryDirectory(prefix="raysft-bench-") as tmp:
            root = Path(tmp)
            scaffold_model.scaffold(root / "model")
            prepared = prepare(root / "model", root / "packed", "bfd")
            for upload in ("sync", "async"):
                name = f"ckpt-{upload}"
                run_jobs_train(checkpoint_spec(root / "model", prepared, name, upload, checkpoints), env)
                history = s3.get_object(Bucket="bench", Key=f"runs/{name}/metrics.jsonl")["Body"].read().decode()
                blocked = [e["checkpoint_blocked_s"] for e in map(json.loads, history.splitlines())
                           if "checkpoint_blocked_s" in e][:-1]  # the final one always uploads before the export
                results[upload] = {"blocked_s_mean": round(sum(blocked) / len(blocked), 3),
                                   "blocked_s": [round(b, 3) for b in blocked]}
            final = f"runs/ckpt-async/{run_layout.checkpoint_dir_name(CHECKPOINT_EVERY * (checkpoints + 1))}/"
            objects = s3.list_objects_v2(Bucket="bench", Prefix=final).get("Contents", [])
            results["checkpoint_files"], results["checkpoint_bytes"] = len(objects), sum(o["Size"] for o in objects)
    finally:
        server.stop()
    results["blocked_saved_s"] = round(results["sync"]["blocked_s_mean"] - results["async"]["blocked_s_mean"], 3)
    return results


def gpu_benchmark(steps: int) -> dict:
    """A ~0.5B Qwen2-shaped model from its config (random weights), bf16, packed rows of 2048."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Qwen2Config

    from jobs.prepare.packing import pack_row

    config = Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, max_position_embeddings=4096, tie_word_embeddings=True)
    try:
        import flash_attn  # noqa: F401

        attention = "flash_attention_2"
    except ImportError:
        attention = "sdpa"
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(64):  # four samples of 512 tokens per 2048-token row, replies trained
        samples = []
        for _ in range(4):
            ids = rng.integers(10, config.vocab_size, 512)
            labels = np.where(np.arange(512) >= 256, ids, -100)
            samples.append((ids, labels))
        rows.append(pack_row(samples))
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    out: dict = {"device": name, "attention": attention, "seq_len": 2048}
    for method in ("lora", "full"):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation=attention).cuda()
        n_params = sum(p.numel() for p in model.parameters())
        if method == "lora":
            model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
        if method == "full":
            model.gradient_checkpointing_enable()
        result = bare_loop(model, rows, steps, 5, 0, "cuda", block_mask=attention != "flash_attention_2", lr=1e-5)
        # Forward 2N and backward 4N FLOPs per token for full training; LoRA skips the frozen weights' gradients (~4N).
        flops_per_token = (6 if method == "full" else 4) * n_params
        result["params"] = n_params
        if peak:
            result["mfu"] = round(result["real_tokens_per_s"] * flops_per_token / (peak * 1e12), 4)
        out[method] = result
        del model
        torch.cuda.empty_cache()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="measured optimizer steps (after a warm-up window)")
    parser.add_argument("--gpu-steps", type=int, default=30)
    parser.add_argument("--checkpoints", type=int, default=4, help="checkpoints measured per upload mode")
    parser.add_argument("--checkpoint-only", action="store_true", help="measure only checkpoint blocking (~2 min)")
    parser.add_argument("--cpu-only", action="store_true", help="measure only the engines and the bare loop on CPU")
    args = parser.parse_args()
    if args.cpu_only:
        print(json.dumps({"cpu": cpu_benchmark(args.steps)}, indent=2))
        return 0
    if args.checkpoint_only:
        print(json.dumps({"checkpoint": checkpoint_benchmark(args.checkpoints)}, indent=2))
        return 0
    results = {"cpu": cpu_benchmark(args.steps), "checkpoint": checkpoint_benchmark(args.checkpoints)}
    results["gpu"] = gpu_benchmark(args.gpu_steps) if torch.cuda.is_available() else "skipped: no CUDA device"
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
