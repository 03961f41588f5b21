"""Stage 2: fine-tune on prepared datasets with Ray Train (DeepSpeed ZeRO or DDP, LoRA or full).

    python -m jobs.train --spec configs/training/cpu-smoke.yaml
    ray job submit -- python -m jobs.train --spec /abs/path/spec.yaml

Before any worker starts, the spec is checked against this cluster (GPU-only features) and the
datasets against the model (tokenizer SHA-256). Checkpoints live under
`checkpoint.storage/name`; a rerun with the same name resumes from the latest one.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from typing import Any

import ray

from jobs import ray_runtime, storage, tokenizer_files
from jobs.spec import SpecError
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


def datasets(spec: TrainingSpec, manifests: list[dict[str, Any]]) -> tuple[dict[str, Any], int]:
    """Ray Datasets of the train and val splits (datasets mixed by weight) and the train row count."""
    splits: dict[str, list] = {"train": [], "val": []}
    rows = 0
    for ref, manifest in zip(spec.datasets, manifests, strict=True):
        fs, base = storage.filesystem(ref.uri)
        for split in splits:
            if manifest["packing"]["rows"][split] == 0:
                continue
            ds = ray.data.read_parquet(f"{base}/{split}", filesystem=fs)
            whole, frac = int(ref.weight), ref.weight - int(ref.weight)
            parts = [ds] * whole + ([ds.random_sample(frac, seed=spec.seed)] if frac else [])
            splits[split].extend(parts)
        rows += int(manifest["packing"]["rows"]["train"] * ref.weight)
    out = {name: (parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]) for name, parts in splits.items() if parts}
    return out, rows


def build_trainer(spec: TrainingSpec, manifests: list[dict[str, Any]]):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    data, rows = datasets(spec, manifests)
    steps = total_steps(spec, rows)
    tokenizer = tokenizer_files.load(tokenizer_files.fetch(spec.model.uri))
    fs, path = storage.filesystem(spec.checkpoint.storage)
    resources = {"CPU": spec.scaling.cpus_per_worker} | ({"GPU": spec.scaling.gpus_per_worker} if spec.scaling.use_gpu else {})
    log.info("train: %d steps over %d packed rows, %d workers", steps, rows, spec.scaling.num_workers)
    return TorchTrainer(
        train_loop,
        train_loop_config={"spec": spec.model_dump_json(), "total_steps": steps,
                           "pad_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id},
        scaling_config=ScalingConfig(num_workers=spec.scaling.num_workers, use_gpu=spec.scaling.use_gpu,
                                     resources_per_worker=resources),
        datasets=data,
        run_config=RunConfig(
            name=spec.name, storage_path=path, storage_filesystem=fs,
            checkpoint_config=CheckpointConfig(num_to_keep=spec.checkpoint.keep),
            failure_config=FailureConfig(max_failures=spec.max_failures)),
    )


def train(spec: TrainingSpec, num_cpus: int | None = None):
    """Check, then run the trainer to the end; returns Ray Train's Result."""
    import torch

    if not storage.is_remote(spec.model.uri):  # workers may not share the driver's working directory
        spec = spec.model_copy(update={"model": spec.model.model_copy(update={"uri": os.path.abspath(spec.model.uri)})})
    check_environment(spec, torch.cuda.is_available())
    manifests = check_datasets(spec)
    # A local cluster needs CPUs beyond the workers' own: Ray Data's read tasks feed them, and
    # with none left over the workers wait for data forever.
    workers_cpus = math.ceil(spec.scaling.num_workers * spec.scaling.cpus_per_worker)
    ray_runtime.init(num_cpus or max(os.cpu_count() or 1, workers_cpus + 2))
    return build_trainer(spec, manifests).fit()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", required=True, help="training spec: a YAML/JSON file or inline JSON")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray cluster (ignored with RAY_ADDRESS)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        result = train(load_training_spec(args.spec), args.num_cpus)
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    metrics = result.metrics or {}
    print(f"training finished: step {metrics.get('step', '-')}, loss {metrics.get('loss', math.nan):.4f}, "
          f"eval_loss {metrics.get('eval_loss', math.nan):.4f}; checkpoint {result.checkpoint.path if result.checkpoint else None}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
