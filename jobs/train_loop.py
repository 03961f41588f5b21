"""The per-worker training loop, top to bottom: setup, train, cleanup.

Runs inside Ray Train workers (`jobs.train` builds the TorchTrainer). Each optimizer step takes
`grad_accum` micro-batches of packed rows from this worker's shard, counts the trainable tokens
of the whole step across all workers, and back-propagates each micro-batch's share of the step's
token mean. Metrics go to `ray.train.report` every step; every `checkpoint.every_steps` steps
(and at the end) the engine state and `training_state.json` go with them.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from jobs import storage
from jobs.manifest import TOKEN_COLUMNS
from jobs.packed_batch import IGNORE_INDEX, collate, micro_batch_loss, token_loss_sum, trained_tokens
from jobs.train_engines import make_engine
from jobs.train_spec import DType, Method, TrainingSpec

DTYPES = {DType.FP32: torch.float32, DType.BF16: torch.bfloat16, DType.FP16: torch.float16}


# ---------------------------------------------------------------- setup


def load_model(spec: TrainingSpec, model_dir: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=DTYPES[spec.model.dtype], attn_implementation=spec.model.attn_implementation.value,
        use_safetensors=True, trust_remote_code=spec.model.trust_remote_code)
    if spec.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if spec.method is Method.FULL:
        return model
    from peft import LoraConfig, get_peft_model

    lora = spec.lora
    return get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                            target_modules=lora.target_modules, task_type="CAUSAL_LM"))


def local_model_dir(uri: str, scratch: Path) -> str:
    if not storage.is_remote(uri):
        return uri
    return str(storage.materialize_files(storage.read_dir_files(uri), scratch / "model"))


def _rows(batch: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    return [{k: batch[k][i] for k in TOKEN_COLUMNS}
            for i in range(len(batch["input_ids"]))]


def _all_reduce_sum(value: float) -> float:
    tensor = torch.tensor([value], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return float(tensor.item())


# ---------------------------------------------------------------- the loop


def train_loop(config: dict[str, Any]) -> None:
    import ray.train

    # Setup: spec, seed, model (+ LoRA), engine, and where a previous attempt stopped.
    spec = TrainingSpec.model_validate_json(config["spec"])
    total_steps, pad_id = config["total_steps"], config["pad_id"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(spec.seed)  # identical initialisation (LoRA too) on every worker
    scratch = Path(tempfile.mkdtemp(prefix="raysft-train-"))
    engine = make_engine(spec, load_model(spec, local_model_dir(spec.model.uri, scratch)), total_steps)
    step = 0
    if (checkpoint := resume_checkpoint(spec)) is not None:
        with checkpoint.as_directory() as directory:
            engine.load(Path(directory))
            step = json.loads((Path(directory) / "training_state.json").read_text())["global_step"]
    micro, accum = spec.batch.micro_batch_size, spec.batch.grad_accum
    shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")

    # Train: one optimizer step per `accum` micro-batches, until `total_steps`.
    epoch = 0
    while step < total_steps:
        batches = shard.iter_batches(batch_size=micro, batch_format="numpy", drop_last=True)
        skip = (step * accum) if epoch == 0 else 0  # resume: this epoch's micro-batches already seen
        group: list[dict[str, torch.Tensor]] = []
        for i, batch in enumerate(batches):
            if i < skip:
                continue
            group.append(collate(_rows(batch), pad_id))
            if len(group) < accum:
                continue
            started = time.perf_counter()
            local_tokens = sum(trained_tokens(b) for b in group)
            step_tokens = int(_all_reduce_sum(local_tokens))
            loss_total, grad_norm = 0.0, None
            for j, b in enumerate(group):
                loss = micro_batch_loss(engine.forward, b, step_tokens, world)
                grad_norm = engine.backward(loss, boundary=j == len(group) - 1)
                loss_total += loss.item() / world
            loss_value = _all_reduce_sum(loss_total)
            step += 1
            seconds = time.perf_counter() - started
            metrics = {"step": step, "epoch": epoch, "loss": loss_value, "lr": engine.lr(),
                       "grad_norm": grad_norm, "step_time_s": seconds,
                       "trainable_tokens_per_s": step_tokens / seconds,
                       "tokens_per_s": _all_reduce_sum(sum(int(b["input_ids"].numel()) for b in group)) / seconds}
            if step % spec.eval.every_steps == 0 or step == total_steps:
                metrics |= evaluate(engine, val_shard, micro, pad_id)
            group = []
            if step % spec.checkpoint.every_steps == 0 or step == total_steps:
                save_and_report(engine, spec, step, epoch, metrics, rank)
            else:
                ray.train.report(metrics)
            if rank == 0:
                print(json.dumps({k: round(v, 6) if isinstance(v, float) else v for k, v in metrics.items()}), flush=True)
            if step >= total_steps:
                break
        epoch += 1


def resume_checkpoint(spec: TrainingSpec):
    """`latest`: Ray Train's latest committed checkpoint of this run (also after a worker restart);
    `none`: start from the base model; a URI: that checkpoint directory."""
    import ray.train

    if spec.checkpoint.resume == "latest":
        return ray.train.get_checkpoint()
    if spec.checkpoint.resume == "none":
        return None
    fs, path = storage.filesystem(spec.checkpoint.resume)
    return ray.train.Checkpoint(path=path, filesystem=fs)


def evaluate(engine, val_shard, micro: int, pad_id: int) -> dict[str, float]:
    """Token-weighted loss, perplexity and next-token accuracy over this worker's validation shard, reduced."""
    engine.module.eval()
    loss_sum = correct = count = 0.0
    with torch.no_grad():
        for batch in val_shard.iter_batches(batch_size=micro, batch_format="numpy"):
            b = collate(_rows(batch), pad_id)
            logits = engine.forward(input_ids=b["input_ids"], position_ids=b["position_ids"],
                                    attention_mask=b["attention_mask"]).logits
            s, n = token_loss_sum(logits, b["labels"])
            trained = b["labels"][:, 1:] != IGNORE_INDEX
            correct += float((logits[:, :-1].argmax(-1)[trained] == b["labels"][:, 1:][trained]).sum())
            loss_sum, count = loss_sum + float(s), count + n
    engine.module.train()
    loss_sum, correct, count = (_all_reduce_sum(x) for x in (loss_sum, correct, count))
    if count == 0:
        return {}
    eval_loss = loss_sum / count
    return {"eval_loss": eval_loss, "perplexity": float(np.exp(min(eval_loss, 50))), "token_accuracy": correct / count}


def save_and_report(engine, spec: TrainingSpec, step: int, epoch: int, metrics: dict[str, Any], rank: int) -> None:
    """Write the engine state and training_state.json, then report them as one Ray Train checkpoint."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix="raysft-ckpt-") as tmp:
        directory = Path(tmp)
        wrote = engine.save(directory)
        if rank == 0:
            state = {"global_step": step, "epoch": epoch, "metrics": metrics}
            (directory / "training_state.json").write_text(json.dumps(state, indent=2))
            (directory / "spec.json").write_text(spec.model_dump_json(indent=2))
        checkpoint = ray.train.Checkpoint.from_directory(tmp) if (wrote or rank == 0) else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"step_{step:08d}")
