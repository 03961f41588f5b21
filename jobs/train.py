"""Stage 2: fine-tune on prepared datasets with Ray Train (DeepSpeed ZeRO or DDP, LoRA or full).

    python -m jobs.train --spec configs/training/cpu-smoke.yaml [--dry-run]
    ray job submit -- python -m jobs.train --spec /abs/path/spec.yaml

Before any worker starts, the spec is checked against this cluster (GPU-only features) and the
datasets against the model (tokenizer SHA-256). A run lives under `checkpoint.storage/name`:
its checkpoints (`step_NNNNNNNN/`), `metrics.jsonl`, and at the end `export/` (the adapter and
the merged model, ready to serve). A rerun with the same name resumes from its latest checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import posixpath
import sys
import tempfile
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

from jobs import ray_runtime, storage, tokenizer_files
from jobs.spec import SpecError
from jobs.templates import serving_template
from jobs.train_loop import train_loop
from jobs.train_spec import TrainingSpec, check_datasets, check_environment, load_training_spec

log = logging.getLogger("raysft.train")


def total_steps(spec: TrainingSpec, train_rows: int) -> int:
    """Optimizer steps: max_steps, or epochs over the rows every worker can fill whole micro-batches with."""
    if spec.max_steps:
        return spec.max_steps
    per_step = spec.batch.micro_batch_size * spec.batch.grad_accum * spec.scaling.num_workers
    steps = spec.epochs * (train_rows // per_step)
    if steps == 0:
        raise SpecError([f"batch: {train_rows} training rows fill no optimizer step of {per_step} rows "
                         "(micro_batch_size x grad_accum x num_workers): lower them or add data"])
    return steps


def planned_train_rows(spec: TrainingSpec, manifests: list[dict[str, Any]]) -> int:
    return sum(int(m["packing"]["rows"]["train"] * ref.weight) for m, ref in zip(manifests, spec.datasets, strict=True))


# Splits up to this size (as Arrow arrays, all datasets together) are read once by the driver
# and held in the object store. Streamed from storage, every epoch and every evaluation would
# start read tasks again: seconds each, for data that fits in memory many times over.
IN_MEMORY_MAX_BYTES = 256 << 20


def split_bytes(manifest: dict[str, Any], split: str) -> int:
    """What a prepared split takes in memory: its tokens times the int32 columns (token-sized
    ones; `seq_lens` is a few ints a row)."""
    return manifest["tokens"]["by_split"][split]["all"] * 4 * len(manifest["columns"])


def datasets(spec: TrainingSpec, manifests: list[dict[str, Any]],
             in_memory_max_bytes: int = IN_MEMORY_MAX_BYTES) -> dict[str, Any]:
    """Ray Datasets of the train and val splits, datasets mixed by weight: each whole unit of
    weight repeats every row, the fraction adds a seeded Bernoulli sample. A small split is
    materialized: epochs then split blocks already in the object store."""
    splits: dict[str, list] = {"train": [], "val": []}
    in_memory = {split: sum(split_bytes(m, split) for m in manifests) <= in_memory_max_bytes for split in splits}
    for ref, manifest in zip(spec.datasets, manifests, strict=True):
        fs, base = storage.filesystem(ref.uri)
        for split in splits:
            if manifest["packing"]["rows"][split] == 0:
                continue
            if in_memory[split]:
                ds = ray.data.from_arrow(pq.read_table(f"{base}/{split}", filesystem=fs))
            else:
                ds = ray.data.read_parquet(f"{base}/{split}", filesystem=fs)
            whole, frac = int(ref.weight), ref.weight - int(ref.weight)
            splits[split].extend([ds] * whole + ([ds.random_sample(frac, seed=spec.seed)] if frac else []))
    # The same rows in the same order on every run, here as in the workers' ingest.
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    mixed = {}
    for name, parts in splits.items():
        if parts:
            ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
            mixed[name] = ds.materialize() if in_memory[name] else ds
            log.info("train: %s split %s", name, "held in memory" if in_memory[name] else "streamed from storage")
    return mixed


@dataclass(frozen=True)
class RunInputs:
    """What the driver works out once and hands to every worker."""

    chat_template: str | None  # None: the tokenizer's own
    stop_ids: list[int]  # end of turn, then eos
    pad_id: int


def run_inputs(spec: TrainingSpec, manifests: list[dict[str, Any]]) -> RunInputs:
    tokenizer = tokenizer_files.load(tokenizer_files.fetch(spec.model.uri))
    # The model is served with the first dataset's chat template (the others' text differs only
    # if they were prepared with other templates, which the note in docs/training-spec.md covers).
    first = manifests[0]
    eot_id = tokenizer.convert_tokens_to_ids(first["template"]["eot"])
    stops = list(dict.fromkeys(i for i in (eot_id, tokenizer.eos_token_id) if i is not None))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return RunInputs(serving_template(first, tokenizer), stops, pad)


def build_trainer(spec: TrainingSpec, manifests: list[dict[str, Any]], inputs: RunInputs,
                  in_memory_max_bytes: int = IN_MEMORY_MAX_BYTES):
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    data = datasets(spec, manifests, in_memory_max_bytes)
    steps = total_steps(spec, planned_train_rows(spec, manifests))
    fs, path = storage.filesystem(spec.checkpoint.storage)
    resources = {"CPU": spec.scaling.cpus_per_worker} | ({"GPU": spec.scaling.gpus_per_worker} if spec.scaling.use_gpu else {})
    # The same batches in the same order on every run: what makes a resumed run exact.
    ingest = DataConfig.default_ingest_options()
    ingest.preserve_order = True
    has_val = "val" in data
    log.info("train: %d steps, %d workers, run %s", steps, spec.scaling.num_workers, spec.run_uri)
    return TorchTrainer(
        train_loop,
        train_loop_config={"spec": spec.model_dump_json(), "total_steps": steps, "pad_id": inputs.pad_id,
                           "chat_template": inputs.chat_template, "stop_ids": inputs.stop_ids,
                           "run_uri": spec.run_uri, "has_val": has_val},
        scaling_config=ScalingConfig(num_workers=spec.scaling.num_workers, use_gpu=spec.scaling.use_gpu,
                                     resources_per_worker=resources),
        datasets=data,
        dataset_config=DataConfig(execution_options=ingest),
        run_config=RunConfig(
            name=spec.name, storage_path=path, storage_filesystem=fs,
            # Keep the best by eval loss; Ray Train always keeps the latest as well.
            checkpoint_config=CheckpointConfig(num_to_keep=spec.checkpoint.keep,
                                               checkpoint_score_attribute="eval_loss" if has_val else None,
                                               checkpoint_score_order="min"),
            failure_config=FailureConfig(max_failures=spec.max_failures)),
    )


def prepare_spec(spec: TrainingSpec, cluster_gpus: float) -> tuple[TrainingSpec, list[dict[str, Any]]]:
    """Check the spec against the cluster and its datasets against the model; returns the spec
    with local paths made absolute (Ray workers do not run in the driver's directory)."""
    data = spec.model_dump(mode="json")
    data["model"]["uri"] = storage.absolute(data["model"]["uri"])
    data["checkpoint"]["storage"] = storage.absolute(data["checkpoint"]["storage"])
    if data["checkpoint"]["resume"] not in ("latest", "none"):
        data["checkpoint"]["resume"] = storage.absolute(data["checkpoint"]["resume"])
    for ref in data["datasets"]:
        ref["uri"] = storage.absolute(ref["uri"])
    spec = TrainingSpec.model_validate(data)
    check_environment(spec, cluster_gpus)
    manifests = check_datasets(spec)
    if spec.checkpoint.resume == "none" and checkpoints_of(spec):
        raise SpecError([f"checkpoint.resume: none, but run {spec.name!r} already has checkpoints under "
                         f"{spec.run_uri}: choose a new name, or resume: latest to continue it"])
    return spec, manifests


def checkpoints_of(spec: TrainingSpec) -> list[str]:
    """The checkpoint directories a run of this name already has."""
    fs, path = storage.filesystem(spec.run_uri)
    found = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(posixpath.basename(i.path) for i in found
                  if i.type == pafs.FileType.Directory and posixpath.basename(i.path).startswith("step_"))


def train(spec: TrainingSpec, num_cpus: int | None = None, in_memory_max_bytes: int = IN_MEMORY_MAX_BYTES):
    """Check, then run the trainer to the end (its workers export the result); returns Ray Train's Result."""
    # A local cluster needs CPUs beyond the workers' own: Ray Data's read tasks feed them, and
    # with none left over the workers wait for data forever.
    workers_cpus = math.ceil(spec.scaling.num_workers * spec.scaling.cpus_per_worker)
    ray_runtime.init(num_cpus or max(os.cpu_count() or 1, workers_cpus + 2))
    spec, manifests = prepare_spec(spec, ray.cluster_resources().get("GPU", 0))
    inputs = run_inputs(spec, manifests)
    return build_trainer(spec, manifests, inputs, in_memory_max_bytes).fit()


def dry_run(spec: TrainingSpec) -> dict[str, Any]:
    import torch
    from transformers import AutoConfig

    from jobs.train_plan import plan

    # No cluster is started for a plan: the GPUs are this machine's, or the cluster's with RAY_ADDRESS.
    if os.environ.get("RAY_ADDRESS"):
        ray_runtime.init()
        gpus = ray.cluster_resources().get("GPU", 0)
    else:
        gpus = torch.cuda.device_count()
    spec, manifests = prepare_spec(spec, gpus)
    run_inputs(spec, manifests)  # the tokenizer loads and knows the end-of-turn token
    with tempfile.TemporaryDirectory(prefix="raysft-plan-") as tmp:
        storage.materialize_files(storage.read_dir_files(spec.model.uri, {"config.json"}), tmp)
        config = AutoConfig.from_pretrained(tmp, trust_remote_code=spec.model.trust_remote_code)
    return plan(spec, config, manifests, total_steps(spec, planned_train_rows(spec, manifests)))


def report(result, spec: TrainingSpec) -> str:
    """The end of a run, for people: final metrics, where things are, one generated answer."""
    metrics, run = result.metrics or {}, storage.absolute(spec.run_uri)
    lines = [f"training finished: step {metrics.get('step', '-')}, loss {metrics.get('loss', math.nan):.4f}, "
             f"eval_loss {metrics.get('eval_loss', math.nan):.4f}, perplexity {metrics.get('perplexity', math.nan):.2f}, "
             f"token_accuracy {metrics.get('token_accuracy', math.nan):.3f}",
             f"checkpoint: {result.checkpoint.path if result.checkpoint else None}",
             f"metrics:    {run}/metrics.jsonl",
             f"export:     {run}/export"]
    for generation in metrics.get("generations", [])[:1]:
        lines.append(f"prompt:     {generation['prompt']}\nanswer:     {generation['answer']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", required=True, help="training spec: a YAML/JSON file or inline JSON")
    parser.add_argument("--dry-run", action="store_true", help="validate and print the plan; train nothing")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray cluster (ignored with RAY_ADDRESS)")
    parser.add_argument("--in-memory-max-bytes", type=int, default=IN_MEMORY_MAX_BYTES,
                        help="splits up to this size are read once and held in memory (0: always stream)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        spec = load_training_spec(args.spec)
        if args.dry_run:
            print(json.dumps(dry_run(spec), indent=2))
            return 0
        result = train(spec, args.num_cpus, args.in_memory_max_bytes)
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report(result, spec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
