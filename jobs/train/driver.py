"""The driver of `jobs.train`: check, build the Ray Train `TorchTrainer`, run it.

Before any worker starts, the spec is checked against this cluster and the datasets against the
model (`preflight`). The datasets become Ray Datasets mixed by weight; the workers run
`jobs.train.loop.train_loop`, which checkpoints under the run directory (`jobs.common.run_layout`)
and, at the end, exports the model.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from jobs.common import model_source, ray_runtime, storage, tokenizer_files
from jobs.common.contract import SPLITS, Manifest
from jobs.train.loop import HeldSplit, LoopConfig, RunInputs, train_loop
from jobs.train.plan import plan, planned_train_rows, total_steps
from jobs.train.preflight import preflight
from jobs.train.spec import TrainingSpec

log = logging.getLogger("raysft.train")


# Splits up to this size (as Arrow arrays, all datasets together) are read once by the driver
# and held in the object store. Streamed from storage, every epoch and every evaluation would
# start read tasks again: seconds each, for data that fits in memory many times over.
IN_MEMORY_MAX_BYTES = 256 << 20


@dataclass
class Splits:
    """The data the workers read. A training split that fits `in_memory_max_bytes` is one Arrow
    table, the datasets' rows one after the other, that every worker reads in `data_order`'s
    order (a fresh one each epoch, datasets interleaved by weight). A larger one is streamed from
    storage: its blocks in a seeded random order, datasets mixed by weight (whole copies, and a
    seeded Bernoulli sample for a fraction), shuffled by each worker within `data_order.SHUFFLE_BUFFER_ROWS`."""

    train_table: pa.Table | None = None
    train_sizes: list[int] = field(default_factory=list)  # rows of each dataset in train_table
    train: Any = None  # a Ray Dataset, when streamed
    val_table: pa.Table | None = None  # every dataset's validation rows, when held
    val: Any = None  # a Ray Dataset of them, when too large to hold: Ray Train splits it among the workers


def datasets(spec: TrainingSpec, manifests: list[Manifest],
             in_memory_max_bytes: int = IN_MEMORY_MAX_BYTES) -> Splits:
    """The train and val splits of the prepared datasets (see `Splits`). A validation split that
    fits is one Arrow table, as a held training split is: no Ray Data execution starts for it,
    here or at any evaluation."""
    in_memory = {split: sum(m.split_bytes(split) for m in manifests) <= in_memory_max_bytes for split in SPLITS}
    out, streamed, val = Splits(), [], []
    for ref, manifest in zip(spec.datasets, manifests, strict=True):
        fs, base = storage.filesystem(ref.uri)
        if in_memory["train"]:
            out.train_sizes.append(manifest.rows("train"))
            tables = [pq.read_table(f"{base}/train", filesystem=fs)] if manifest.rows("train") else []
            out.train_table = pa.concat_tables(([out.train_table] if out.train_table else []) + tables)
        elif manifest.rows("train"):
            ds = ray.data.read_parquet(f"{base}/train", filesystem=fs)
            whole, frac = int(ref.weight), ref.weight - int(ref.weight)
            streamed.extend([ds] * whole + ([ds.random_sample(frac, seed=spec.seed)] if frac else []))
        if manifest.rows("val"):
            val.append(pq.read_table(f"{base}/val", filesystem=fs) if in_memory["val"]
                       else ray.data.read_parquet(f"{base}/val", filesystem=fs))
    # The same rows in the same order on every run, here as in the workers' ingest.
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    if streamed:
        out.train = (streamed[0].union(*streamed[1:]) if len(streamed) > 1 else streamed[0]).randomize_block_order(
            seed=spec.seed)
    if val and in_memory["val"]:
        out.val_table = pa.concat_tables(val)
    elif val:
        out.val = val[0].union(*val[1:]) if len(val) > 1 else val[0]
    log.info("train: train split %s, val split %s", "held in memory" if in_memory["train"] else "streamed from storage",
             "held in memory" if in_memory["val"] else "streamed from storage")
    return out


def run_inputs(spec: TrainingSpec, manifests: list[Manifest]) -> RunInputs:
    tokenizer = tokenizer_files.load(tokenizer_files.fetch(spec.model.uri))
    # The model is served with the first dataset's chat template (the others' text differs only
    # if they were prepared with other templates, which the note in docs/training-spec.md covers).
    first = manifests[0]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return RunInputs(first.template.chat_template,
                     tuple(stop_ids(tokenizer, first.template.stop_tokens or [first.template.eot])), pad)


def stop_ids(tokenizer: Any, stop_tokens: list[str]) -> list[int]:
    """Where generation stops (evaluation, and the export's generation config): every token that
    ends a reply the model was trained on, then eos when that differs."""
    ids = [tokenizer.convert_tokens_to_ids(token) for token in stop_tokens]
    return list(dict.fromkeys(i for i in (*ids, tokenizer.eos_token_id) if i is not None))


def build_trainer(spec: TrainingSpec, manifests: list[Manifest], inputs: RunInputs,
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
    log.info("train: %d steps, %d workers, run %s", steps, spec.scaling.num_workers, spec.run_uri)
    # A training split held in memory goes to every worker once, through the object store (a
    # node's workers share one copy); each reads its rows of each epoch's order from it.
    held = None if data.train_table is None else HeldSplit(ray.put(data.train_table), tuple(data.train_sizes),
                                                           tuple(ref.weight for ref in spec.datasets))
    loop = LoopConfig(spec, steps, inputs, held, None if data.val_table is None else ray.put(data.val_table),
                      val_streamed=data.val is not None)
    return TorchTrainer(
        train_loop,
        train_loop_config={"loop": loop},
        scaling_config=ScalingConfig(num_workers=spec.scaling.num_workers, use_gpu=spec.scaling.use_gpu,
                                     resources_per_worker=resources),
        datasets={name: ds for name, ds in (("train", data.train), ("val", data.val)) if ds is not None},
        # Ray Train splits each streamed split among the workers in equal shares, dropping the rows
        # that do not divide (negligible in a split too large to hold). A held validation split
        # goes whole to every worker instead, which evaluates its share: a 3-row split on 2
        # workers is scored on 3 rows, not 2.
        dataset_config=DataConfig(execution_options=ingest),
        run_config=RunConfig(
            name=spec.name, storage_path=path, storage_filesystem=fs,
            # Keep the best by eval loss; Ray Train always keeps the latest as well.
            checkpoint_config=CheckpointConfig(num_to_keep=spec.checkpoint.keep,
                                               checkpoint_score_attribute="eval_loss" if loop.has_val else None,
                                               checkpoint_score_order="min"),
            failure_config=FailureConfig(max_failures=spec.max_failures)),
    )


def train(spec: TrainingSpec, num_cpus: int | None = None, in_memory_max_bytes: int = IN_MEMORY_MAX_BYTES):
    """Check, then run the trainer to the end (its workers export the result); returns Ray Train's Result."""
    # A local cluster needs CPUs beyond the workers' own: Ray Data's read tasks feed them, and
    # with none left over the workers wait for data forever.
    workers_cpus = math.ceil(spec.scaling.num_workers * spec.scaling.cpus_per_worker)
    ray_runtime.init(num_cpus or max(os.cpu_count() or 1, workers_cpus + 2))
    spec, manifests = preflight(spec, ray.cluster_resources().get("GPU", 0))
    inputs = run_inputs(spec, manifests)
    return build_trainer(spec, manifests, inputs, in_memory_max_bytes).fit()


def dry_run(spec: TrainingSpec) -> dict[str, Any]:
    import torch
    from transformers import AutoConfig

    # No cluster is started for a plan: the GPUs are this machine's, or the cluster's with RAY_ADDRESS.
    if os.environ.get("RAY_ADDRESS"):
        ray_runtime.init()
        gpus = ray.cluster_resources().get("GPU", 0)
    else:
        gpus = torch.cuda.device_count()
    spec, manifests = preflight(spec, gpus)
    run_inputs(spec, manifests)  # the tokenizer loads and knows the end-of-turn token
    with tempfile.TemporaryDirectory(prefix="raysft-plan-") as tmp:
        storage.materialize_files(storage.read_dir_files(model_source.resolve(spec.model.uri), {"config.json"}), tmp)
        config = AutoConfig.from_pretrained(tmp, trust_remote_code=spec.model.trust_remote_code)
    return plan(spec, config, manifests, total_steps(spec, planned_train_rows(spec, manifests)))


