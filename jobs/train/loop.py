"""The per-worker training loop, top to bottom: setup, train, cleanup.

Runs inside Ray Train workers (`jobs.train` builds the TorchTrainer). Each optimizer step takes
`grad_accum` micro-batches of packed rows from this worker's shard, counts the trainable tokens
of the whole step across all workers, and back-propagates each micro-batch's share of the step's
token mean. Every `log_every_steps` steps the metrics of the steps since then go to the job log and
the run's metrics.jsonl; evaluations and checkpoints also go to `ray.train.report` (Ray Train takes
one report at a time from each worker and polls every 2 s, so reporting every short step would
stall training). Checkpoints upload in the background by default (`checkpoint.upload`): training
goes on once a checkpoint's files are written locally. At the end rank 0 exports the final
checkpoint (`jobs.train.export`).

Resuming is exact: a checkpoint records the step, the epoch, how many micro-batches of the epoch
were consumed (the data cursor) and every rank's RNG state; the data order is deterministic
(`jobs.train` asks Ray Data to preserve it), so a resumed run sees the same batches in the same
order with the same random streams as one that never stopped.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from jobs.common import model_source, run_layout, storage, tokenizer_files
from jobs.common.contract import IGNORE_INDEX, TOKEN_COLUMNS
from jobs.train.checkpoint import Position, restore, write_checkpoint
from jobs.train.console import quiet_progress_bars, say
from jobs.train.data_order import SHUFFLE_BUFFER_ROWS, epoch_order, worker_rows
from jobs.train.engines.base import Engine
from jobs.train.engines.registry import make_engine, weights_dtype
from jobs.train.evaluate import evaluate, generate_answers
from jobs.train.export import export
from jobs.train.metrics_log import MetricsLog
from jobs.train.packed_batch import collate, micro_batch_loss, on_device, static_flex_shapes, trained_tokens
from jobs.train.spec import Attention, CheckpointUpload, ExportCheckpoint, Method, TrainingSpec
from jobs.train.tracking import Trackers

# ---------------------------------------------------------------- setup


@dataclass(frozen=True)
class RunInputs:
    """What the driver reads from the model's tokenizer and the datasets' manifests."""

    chat_template: str | None  # None: the tokenizer's own
    stop_ids: tuple[int, ...]  # end of turn, then eos
    pad_id: int


@dataclass(frozen=True)
class HeldSplit:
    """A training split held in the object store (a node's workers share one copy): every
    dataset's rows one after the other, read in `data_order`'s order for each epoch."""

    table: Any  # a Ray ObjectRef of the pyarrow Table
    sizes: tuple[int, ...]  # rows of each dataset in the table
    weights: tuple[float, ...]


@dataclass(frozen=True)
class LoopConfig:
    """Everything a worker is handed (as Ray Train's `train_loop_config["loop"]`), worked out once
    by the driver: the validated spec travels as it is."""

    spec: TrainingSpec
    total_steps: int
    inputs: RunInputs
    train_held: HeldSplit | None  # None: the training split streams from storage
    val_held: Any = None  # a Ray ObjectRef of the validation split's Table: every worker takes its share
    val_streamed: bool = False  # too large to hold: each worker gets a Ray Train split of it

    @property
    def has_val(self) -> bool:
        return self.val_held is not None or self.val_streamed


def load_model(spec: TrainingSpec, model_dir: str) -> torch.nn.Module:
    """The base model (safetensors only: pickled weights are never loaded), 4-bit NF4 for QLoRA,
    with a LoRA adapter unless the method is full."""
    from transformers import AutoModelForCausalLM

    dtype = weights_dtype(spec)
    quantized = {}
    if spec.method is Method.QLORA:
        from transformers import BitsAndBytesConfig

        # 4-bit weights are placed as they load, on this worker's GPU (Ray Train sets it current).
        q = spec.quantization
        config = (BitsAndBytesConfig(load_in_8bit=True) if q.bits == 8 else
                  BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=q.quant_type,
                                     bnb_4bit_use_double_quant=q.double_quant, bnb_4bit_compute_dtype=dtype))
        quantized = {"quantization_config": config, "device_map": {"": torch.cuda.current_device()}}
    if spec.model.attn_implementation is Attention.FLEX_ATTENTION:
        static_flex_shapes()
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype, attn_implementation=spec.model.attn_implementation.value,
        use_safetensors=True, trust_remote_code=spec.model.trust_remote_code, **quantized)
    if spec.method is Method.QLORA:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=spec.gradient_checkpointing)
    elif spec.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if spec.method is Method.FULL:
        return model
    from peft import LoraConfig, get_peft_model

    lora = spec.lora
    return get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                            target_modules=lora.target_modules, bias=lora.bias, task_type="CAUSAL_LM"))


def local_model_dir(uri: str, scratch: Path) -> str:
    """The model as a local directory: as it is, from this node's Hugging Face cache, or copied from object storage."""
    uri = model_source.resolve(uri)
    if not storage.is_remote(uri):
        return uri
    return str(storage.materialize_files(storage.read_dir_files(uri), scratch / "model"))


def load_tokenizer(model_dir: str, chat_template: str | None) -> Any:
    """The model's tokenizer, carrying the chat template its training data was rendered with."""
    tokenizer = tokenizer_files.load(tokenizer_files.fetch(model_dir))
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def resume_checkpoint(spec: TrainingSpec):
    """The run's own latest registered checkpoint comes first: after a worker-group restart, or when
    a run of the same name is submitted again. A new run starts from the checkpoint URI in
    `checkpoint.resume`, or from the base model (`latest`, `none`)."""
    import ray.train

    if (own := ray.train.get_checkpoint()) is not None or spec.checkpoint.resume_uri is None:
        return own
    fs, path = storage.filesystem(spec.checkpoint.resume_uri)
    return ray.train.Checkpoint(path=path, filesystem=fs)


@contextlib.contextmanager
def checkpoint_directory(checkpoint) -> Iterator[Path]:
    """A checkpoint as a local directory, downloaded once per node. Ray's `as_directory` lets a
    second rank start the same download again while the first reads the files, which then reads
    them half written; here local rank 0 downloads, and every rank waits for it."""
    import hashlib

    import pyarrow.fs as pafs
    import ray.train

    if isinstance(checkpoint.filesystem, pafs.LocalFileSystem):
        yield Path(checkpoint.path)
        return
    local = Path(tempfile.gettempdir()) / f"raysft-resume-{hashlib.sha256(checkpoint.path.encode()).hexdigest()[:16]}"
    leader = ray.train.get_context().get_local_rank() == 0
    if leader:
        shutil.rmtree(local, ignore_errors=True)
        checkpoint.to_directory(str(local))
    dist.barrier()
    try:
        yield local
    finally:
        dist.barrier()  # every rank has read its part
        if leader:
            shutil.rmtree(local, ignore_errors=True)


# ---------------------------------------------------------------- data


def _numpy(table) -> dict[str, np.ndarray]:
    """An Arrow table's rows as Ray Data hands a numpy batch over (list columns: arrays of arrays)."""
    return {column: table.column(column).to_numpy(zero_copy_only=False) for column in table.column_names}


def _rows(batch: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    return [{k: batch[k][r] for k in TOKEN_COLUMNS} for r in range(len(batch["input_ids"]))]


@dataclass
class StepBatches:
    """The micro-batches of one optimizer step on this worker, and what they hold."""

    batches: list[dict[str, torch.Tensor]]
    samples: int = 0
    tokens: int = 0
    trainable: int = 0  # tokens carrying loss: the step's normaliser (summed over workers)


def epoch_batches(held: HeldSplit | None, shard, spec: TrainingSpec, epoch: int, skip: int, rank: int,
                  world: int) -> Iterator[dict[str, np.ndarray]]:
    """This worker's micro-batches of one epoch, after the first `skip`: from the split held in
    memory in this epoch's order (`data_order`), or streamed from this worker's shard, shuffled
    within a buffer whose seed changes every epoch."""
    import ray

    micro = spec.batch.micro_batch_size
    if held is None:
        batches = shard.iter_batches(batch_size=micro, batch_format="numpy", drop_last=True,
                                     local_shuffle_buffer_size=SHUFFLE_BUFFER_ROWS,
                                     local_shuffle_seed=spec.seed + epoch)
        yield from itertools.islice(batches, skip, None)
        return
    table = ray.get(held.table)  # zero-copy from this node's object store
    yield from held_batches(table, list(held.sizes), list(held.weights), spec.seed, epoch, skip, rank, world, micro,
                            spec.batch.grad_accum)


def held_batches(table, sizes: list[int], weights: list[float], seed: int, epoch: int, skip: int, rank: int,
                 world: int, micro: int, accum: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """Micro-batches of a worker's rows of an epoch (whole steps of `accum` micro-batches) from the
    table of every dataset's rows."""
    rows = worker_rows(epoch_order(sizes, weights, seed, epoch), rank, world, world * micro * accum)
    for start in range(skip * micro, len(rows) - micro + 1, micro):
        yield _numpy(table.take(rows[start:start + micro]))


def step_batches(batches: Iterator[dict[str, np.ndarray]], spec: TrainingSpec, pad_id: int,
                 position: Position) -> Iterator[StepBatches]:
    """This epoch's optimizer steps from its micro-batches (the first `position.cursor` already
    skipped); the cursor advances as steps are handed out."""
    pending = StepBatches([])
    for i, batch in enumerate(batches, start=position.cursor):
        rows = _rows(batch)
        pending.batches.append(collate(rows, pad_id, spec.model.attn_implementation))
        pending.trainable += trained_tokens(pending.batches[-1])
        pending.samples += sum(len(r["seq_lens"]) for r in rows)
        pending.tokens += sum(len(r["input_ids"]) for r in rows)
        if len(pending.batches) == spec.batch.grad_accum:
            position.cursor = i + 1
            yield pending
            pending = StepBatches([])


def validation_batches(shard, loop: LoopConfig, pad_id: int, rank: int, world: int,
                       device: torch.device = torch.device("cpu")) -> Iterator[dict[str, torch.Tensor]]:
    """This worker's share of the validation split, read afresh at each evaluation, so a worker
    never holds more of it than the batches in flight, however large the split: its Ray Train
    split when streamed from storage (equal-sized), else its share of the held split
    (`held_share`), read zero-copy from the node's object store."""
    spec = loop.spec
    if loop.val_streamed:
        for batch in shard.iter_batches(batch_size=spec.batch.micro_batch_size, batch_format="numpy"):
            yield on_device(collate(_rows(batch), pad_id, spec.model.attn_implementation), device)
    elif loop.val_held is not None:
        import ray

        for batch in held_share(ray.get(loop.val_held), spec, pad_id, rank, world):
            yield on_device(batch, device)


def held_share(table, spec: TrainingSpec, pad_id: int, rank: int, world: int) -> Iterator[dict[str, torch.Tensor]]:
    """One micro-batch of every `world` of a held validation split, so every row is evaluated
    once. Every worker gets as many batches as the others: with sharded parameters (ZeRO-3, FSDP)
    each forward pass needs every rank, so where the split runs out a worker gets a batch with
    nothing to score."""
    micro = spec.batch.micro_batch_size
    starts = range(0, table.num_rows, micro)
    for first in range(0, len(starts), world):
        group = starts[first:first + world]
        mine = collate(_rows(_numpy(table.slice(group[min(rank, len(group) - 1)], micro))), pad_id,
                       spec.model.attn_implementation)
        if rank >= len(group):
            mine["labels"][:] = IGNORE_INDEX  # a forward pass for the other ranks' sake, scoring nothing
        yield mine


def reduce_device() -> torch.device:
    """Where a collective's tensors must live: NCCL (GPU workers) reduces CUDA tensors only."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(value: float) -> float:
    tensor = torch.tensor([value], dtype=torch.float64, device=reduce_device())
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return float(tensor.item())


# ---------------------------------------------------------------- the loop


def train_loop(config: dict[str, LoopConfig]) -> None:
    import ray.train
    import ray.train.torch

    # Setup: spec, seed, tokenizer, model (+ LoRA), engine, and where a previous attempt stopped.
    loop = config["loop"]
    spec, total_steps, inputs, run_uri = loop.spec, loop.total_steps, loop.inputs, loop.spec.run_uri
    pad_id, stop_ids = inputs.pad_id, list(inputs.stop_ids)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    quiet_progress_bars()
    torch.manual_seed(spec.seed)  # identical initialisation (LoRA too) on every worker
    scratch = Path(tempfile.mkdtemp(prefix="raysft-train-"))
    model_dir = local_model_dir(spec.model.uri, scratch)
    tokenizer = load_tokenizer(model_dir, inputs.chat_template)
    engine = make_engine(spec, load_model(spec, model_dir), total_steps)
    position = Position()
    recovering = ray.train.get_checkpoint() is not None  # the run's own: it is restarting after a failure
    if (checkpoint := resume_checkpoint(spec)) is not None:
        with checkpoint_directory(checkpoint) as directory:
            position = restore(engine, directory, rank, world)
        position.failures = position.failures + 1 if recovering else 0
        if rank == 0:
            say(f"resumed from step {position.global_step} (epoch {position.epoch}, "
                f"micro-batch {position.cursor}) after {position.failures} failure(s)")
    log = MetricsLog(run_uri, position.global_step, trackers=Trackers(spec, run_uri)) if rank == 0 else None
    shard = ray.train.get_dataset_shard("train") if loop.train_held is None else None
    val_shard = ray.train.get_dataset_shard("val") if loop.val_streamed else None

    if spec.eval.at_start and position.global_step == 0:  # the base model, before any step
        metrics = {"step": 0, "total_steps": total_steps, "epoch": 0, "failures": 0}
        metrics |= evaluate(engine, validation_batches(val_shard, loop, pad_id, rank, world, device), all_reduce_sum)
        if spec.eval.prompts:
            metrics["generations"] = generate_answers(engine, tokenizer, spec.eval, stop_ids, spec.seed, rank)
        ray.train.report(metrics, checkpoint_upload_mode=upload_mode(spec))
        if rank == 0:
            log.add(metrics, important=True)
            say(json.dumps(metrics))

    # Train: one optimizer step per `grad_accum` micro-batches, until `total_steps`.
    window, clock, metrics = LogWindow(), time.perf_counter(), {}
    while position.global_step < total_steps:
        batches = epoch_batches(loop.train_held, shard, spec, position.epoch, position.cursor, rank, world)
        for step in step_batches(batches, spec, pad_id, position):
            window.add(train_step(engine, step, world, device), step, time.perf_counter() - clock)
            position.global_step += 1
            n = position.global_step
            save = n % spec.checkpoint.every_steps == 0 or n == total_steps
            answer = n % spec.eval.every_steps == 0 or n == total_steps
            if not (save or answer or n % spec.log_every_steps == 0):
                clock = time.perf_counter()
                continue
            metrics = {"step": n, "total_steps": total_steps, "epoch": position.epoch,
                       "failures": position.failures} | window.metrics(engine.lr(), position) | worker_accelerators(engine)
            if save or answer:  # checkpoints are ranked by eval loss, so each one is evaluated
                metrics |= evaluate(engine, validation_batches(val_shard, loop, pad_id, rank, world, device), all_reduce_sum)
            if answer and spec.eval.prompts:
                metrics["generations"] = generate_answers(engine, tokenizer, spec.eval, stop_ids, spec.seed + n, rank)
            if save:
                started = time.perf_counter()
                save_and_report(engine, tokenizer, spec, position, metrics, rank, final=n == total_steps)
                # What the checkpoint cost training: writing the files, and the upload when sync.
                metrics = metrics | {"checkpoint_blocked_s": time.perf_counter() - started}
            elif answer:
                ray.train.report(metrics, checkpoint_upload_mode=upload_mode(spec))
            if rank == 0:
                log.add(metrics, important=save or answer)
                say(json.dumps({k: round(v, 6) if isinstance(v, float) else v for k, v in metrics.items()}))
            window, clock = LogWindow(), time.perf_counter()  # evaluation and checkpoints are not step time
            if n >= total_steps:
                break
        else:  # the epoch's data ran out before total_steps
            position.epoch, position.cursor = position.epoch + 1, 0

    # Cleanup: rank 0 turns the final (or best) checkpoint into models ready to serve.
    if rank == 0:
        log.close()
        chosen = export_checkpoint(spec, run_uri, ray.train.get_checkpoint(), metrics.get("eval_loss"))
        export(chosen, spec, stop_ids, pad_id, model_dir, run_layout.export_uri(run_uri))
    shutil.rmtree(scratch, ignore_errors=True)


def export_checkpoint(spec: TrainingSpec, run_uri: str, final, final_eval_loss: float | None):
    """The checkpoint `export.checkpoint` asks for: the final one, or the registered one with the
    lowest eval loss when it beats the final one's."""
    import ray.train

    if spec.export.checkpoint is ExportCheckpoint.LATEST or final_eval_loss is None:
        return final
    best = run_layout.registered(run_uri)
    if best.best is None or best.best_eval_loss is None or best.best_eval_loss >= final_eval_loss:
        return final
    say(f"exporting {best.best} (eval loss {best.best_eval_loss:.4f} < final {final_eval_loss:.4f})")
    fs, path = storage.filesystem(best.best)
    return ray.train.Checkpoint(path=path, filesystem=fs)


def train_step(engine: Engine, step: StepBatches, world: int, device: torch.device) -> tuple[float, float | None]:
    """Forward and backward every micro-batch of the step (the engine steps the optimizer at the
    last); returns this worker's share of the step loss and the gradient norm."""
    step_tokens = int(all_reduce_sum(step.trainable))
    loss_share, grad_norm = 0.0, None
    for j, batch in enumerate(step.batches):
        loss = micro_batch_loss(engine.forward, on_device(batch, device), step_tokens, world)
        grad_norm = engine.backward(loss, boundary=j == len(step.batches) - 1)
        loss_share += loss.item() / world
    return loss_share, grad_norm


@dataclass
class LogWindow:
    """The steps since the last report, summed on this worker; `metrics` sums them over workers
    in one collective. Times are wall clock between steps (data loading included)."""

    steps: int = 0
    loss: float = 0.0
    grad_norm: float | None = None
    seconds: float = 0.0
    trainable_tokens: int = 0
    tokens: int = 0
    samples: int = 0

    def add(self, result: tuple[float, float | None], step: StepBatches, seconds: float) -> None:
        self.steps += 1
        self.loss += result[0]
        self.grad_norm = result[1]
        self.seconds += seconds
        self.trainable_tokens += step.trainable
        self.tokens += step.tokens
        self.samples += step.samples

    def metrics(self, lr: float, position: Position) -> dict[str, Any]:
        """The window's figures, summed over workers in one collective. Its tokens are added to the
        running totals in `position`: a checkpoint carries them, so they survive a resume."""
        totals = torch.tensor([self.loss, self.trainable_tokens, self.tokens, self.samples], dtype=torch.float64,
                              device=reduce_device())
        if dist.is_initialized():
            dist.all_reduce(totals)
        loss, trainable, tokens, samples = totals.tolist()
        position.tokens_seen += round(tokens)
        position.trainable_tokens_seen += round(trainable)
        seconds = max(self.seconds, 1e-9)
        return {"loss": loss / self.steps, "lr": lr, "grad_norm": self.grad_norm, "step_time_s": seconds / self.steps,
                "trainable_tokens_per_s": trainable / seconds, "tokens_per_s": tokens / seconds,
                "samples_per_s": samples / seconds, "tokens_seen": position.tokens_seen,
                "trainable_tokens_seen": position.trainable_tokens_seen}


GPU_STATS = ("gpu_peak_allocated_gib", "gpu_peak_reserved_gib", "gpu_utilization_pct")


def worker_accelerators(engine: Engine) -> dict[str, Any]:
    """Every worker's peak accelerator memory since the last report and its utilization (nothing
    on CPU): each worker's under `gpu_workers` (by rank), the largest at the top, the figure that
    runs out first."""
    mine = engine.accelerator()
    if not mine:
        return {}
    workers = [mine]
    if dist.is_initialized():
        values = torch.tensor([mine.get(key, math.nan) for key in GPU_STATS], dtype=torch.float64, device=reduce_device())
        gathered = [torch.empty_like(values) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, values)
        workers = [{key: v for key, v in zip(GPU_STATS, g.tolist(), strict=True) if not math.isnan(v)} for g in gathered]
    return merged_accelerators(workers)


def merged_accelerators(workers: list[dict[str, float]]) -> dict[str, Any]:
    top = {key: max(w[key] for w in workers if key in w) for key in GPU_STATS if any(key in w for w in workers)}
    return top | {"gpu_workers": workers}


def upload_mode(spec: TrainingSpec, final: bool = False):
    """How a report's checkpoint reaches storage. Asynchronous uploads let training go on; reports
    without a checkpoint go the same way, since Ray Train takes each worker's reports in order and
    a synchronous one would wait for the upload before it. The final checkpoint uploads before
    the call returns: the export reads it next."""
    from ray.train import CheckpointUploadMode

    if final or spec.checkpoint.upload is CheckpointUpload.SYNC:
        return CheckpointUploadMode.SYNC
    return CheckpointUploadMode.ASYNC


def save_and_report(engine, tokenizer, spec: TrainingSpec, position: Position, metrics: dict[str, Any],
                    rank: int, final: bool) -> None:
    """Write this rank's part of the checkpoint, then report it: Ray Train uploads every rank's
    files into one directory and registers the checkpoint once all have arrived. Training resumes
    once the files are written; an asynchronous upload reads them in the background, and Ray
    deletes the directory once it has uploaded it (so it is no context-managed temporary)."""
    import ray.train

    directory = Path(tempfile.mkdtemp(prefix="raysft-ckpt-"))
    wrote = write_checkpoint(engine, directory, rank, position, metrics, tokenizer, spec.model_dump_json(indent=2))
    if not wrote:
        shutil.rmtree(directory)
    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory) if wrote else None,
                     checkpoint_dir_name=run_layout.checkpoint_dir_name(position.global_step),
                     checkpoint_upload_mode=upload_mode(spec, final), delete_local_checkpoint_after_upload=True)
