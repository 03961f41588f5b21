"""The driver of `jobs.evaluate`: check, score on Ray workers, report.

Each worker is a Ray task that loads the model (and adapter), scores every `world`-th row of the
split with `jobs.train.evaluate`'s sums (the ones training reports), and with an adapter scores
the same rows again with it disabled: the base model's figures. The first worker also answers the
prompts. The driver adds the sums up, so the figures are the same for any number of workers.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from dataclasses import astuple, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import ray

from jobs.common import model_source, ray_runtime, storage
from jobs.common.contract import TOKEN_COLUMNS, Manifest, ManifestError, read_manifest
from jobs.common.spec import SpecError
from jobs.evaluate.spec import REPORT_FILE, EvaluationSpec
from jobs.train.evaluate import EvalSums
from jobs.train.preflight import model_tokenizer_sha256

log = logging.getLogger("raysft.evaluate")


@dataclass(frozen=True)
class Shard:
    """What one worker is handed."""

    spec: EvaluationSpec
    rank: int
    world: int
    chat_template: str | None  # the dataset's (None: the tokenizer's own)
    stop_tokens: tuple[str, ...]  # what ends a reply, as the dataset was prepared (besides eos)


def check(spec: EvaluationSpec) -> Manifest | None:
    """The dataset's manifest, after checking that the model exists and tokenized it."""
    model_sha = model_tokenizer_sha256(spec.model.uri)
    if spec.dataset is None:
        return None
    try:
        manifest = read_manifest(spec.dataset)
    except (OSError, ManifestError) as e:
        raise SpecError([f"dataset: no readable manifest.json under {spec.dataset!r} ({e}): run jobs.prepare first"]) from None
    problems = []
    if not manifest.succeeded:
        problems.append(f"dataset: preparation of {spec.dataset!r} did not succeed (status {manifest.status!r})")
    if manifest.tokenizer.sha256 != model_sha:
        problems.append(f"dataset: tokenized with tokenizer {manifest.tokenizer.sha256}, but the model's tokenizer is "
                        f"{model_sha}: prepare it again with tokenizer: {spec.model.uri}")
    if not manifest.rows(spec.split.value):
        problems.append(f"split: the dataset's {spec.split.value} split is empty: score the other, or prepare with "
                        "val_ratio > 0 (or a split: val source)")
    if problems:
        raise SpecError(problems)
    return manifest


def with_absolute_paths(spec: EvaluationSpec) -> EvaluationSpec:
    """Local paths made absolute: Ray workers do not run in the driver's directory."""
    model = spec.model.uri if model_source.hf_id(spec.model.uri) else storage.absolute(spec.model.uri)
    return spec.model_copy(update={
        "model": spec.model.model_copy(update={"uri": model}), "output": storage.absolute(spec.output),
        **{field: storage.absolute(uri) for field in ("adapter", "dataset") if (uri := getattr(spec, field))}})


def score(shard: Shard) -> dict[str, Any]:
    """One worker: its rows' sums (and the base model's, with an adapter), and on the first
    worker the answers to the prompts."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoModelForCausalLM

    from jobs.train.console import quiet_progress_bars
    from jobs.train.driver import stop_ids
    from jobs.train.evaluate import evaluation_sums, generate_answers
    from jobs.train.loop import load_tokenizer, local_model_dir
    from jobs.train.packed_batch import collate, on_device
    from jobs.train.spec import torch_dtype

    spec = shard.spec
    device = torch.device("cuda", torch.cuda.current_device()) if spec.scaling.use_gpu else torch.device("cpu")
    quiet_progress_bars()
    with tempfile.TemporaryDirectory(prefix="raysft-evaluate-") as scratch:
        model_dir = local_model_dir(spec.model.uri, Path(scratch) / "base")
        tokenizer = load_tokenizer(model_dir, shard.chat_template)
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch_dtype(spec.model.dtype), attn_implementation=spec.model.attn_implementation.value,
            use_safetensors=True, trust_remote_code=spec.model.trust_remote_code)
        if spec.adapter is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, local_model_dir(spec.adapter, Path(scratch) / "adapter"))
    model = model.to(device).eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batches = []
    if spec.dataset is not None:
        fs, base = storage.filesystem(spec.dataset)
        table = pq.read_table(f"{base}/{spec.split.value}", filesystem=fs, columns=list(TOKEN_COLUMNS))
        mine = table.take(list(range(shard.rank, table.num_rows, shard.world)))
        columns = {c: [np.asarray(v) for v in mine.column(c).to_pylist()] for c in TOKEN_COLUMNS}
        rows = [{c: columns[c][i] for c in TOKEN_COLUMNS} for i in range(mine.num_rows)]
        size = spec.micro_batch_size
        batches = [on_device(collate(rows[i:i + size], pad, spec.model.attn_implementation), device)
                   for i in range(0, len(rows), size)]
    stops = stop_ids(tokenizer, list(shard.stop_tokens))
    engine = SimpleNamespace(module=model, sharded=False)

    def figures() -> tuple[tuple[float, ...], list[dict[str, str]]]:
        answers = generate_answers(engine, tokenizer, spec.generation, stops, spec.seed, shard.rank)
        return astuple(evaluation_sums(model, batches)), answers

    out: dict[str, Any] = {}
    out["sums"], out["generations"] = figures()
    if spec.adapter is not None:
        with model.disable_adapter():
            out["base_sums"], out["base_generations"] = figures()
    return out


def evaluate_model(spec: EvaluationSpec, num_cpus: int | None = None) -> dict[str, Any]:
    """Check, score on Ray workers, and write the report (`evaluation.json` under `spec.output`); returns it."""
    started = time.perf_counter()
    spec = with_absolute_paths(spec)
    manifest = check(spec)
    rows = manifest.rows(spec.split.value) if manifest else 0
    world = max(1, min(spec.scaling.num_workers, rows))  # no worker without rows to score
    ray_runtime.init(num_cpus or max(os.cpu_count() or 1, math.ceil(world * spec.scaling.cpus_per_worker)))
    template = manifest.template if manifest else None
    task = ray.remote(score).options(num_cpus=spec.scaling.cpus_per_worker,
                                     num_gpus=spec.scaling.gpus_per_worker if spec.scaling.use_gpu else 0)
    log.info("evaluate: %d rows of %s on %d worker(s)", rows, spec.dataset or "no dataset", world)
    shards = [Shard(spec, rank, world, template.chat_template if template else None,
                    tuple(template.stop_tokens or [template.eot]) if template else ()) for rank in range(world)]
    results = ray.get([task.remote(shard) for shard in shards])
    report = {"name": spec.name, "model": spec.model.uri, "adapter": spec.adapter, "dataset": spec.dataset,
              "split": spec.split.value if spec.dataset else None, "rows": rows, "workers": world,
              "metrics": sum((EvalSums(*r["sums"]) for r in results), EvalSums()).metrics(),
              "generations": results[0]["generations"]}
    if spec.adapter is not None:
        report["base_metrics"] = sum((EvalSums(*r["base_sums"]) for r in results), EvalSums()).metrics()
        report["base_generations"] = results[0]["base_generations"]
    report["seconds"] = round(time.perf_counter() - started, 2)
    fs, path = storage.filesystem(spec.output)
    storage.write_bytes(fs, f"{path}/{REPORT_FILE}", (json.dumps(report, indent=2) + "\n").encode())
    return report
