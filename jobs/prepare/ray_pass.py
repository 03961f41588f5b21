"""The Ray Data pass of `jobs.prepare`, for inputs too large for one process: tasks read and
parse every file (`stages.parse_file`), then render, tokenize and mask batches
(`stages.add_tokens`, with a `stages.RenderTokenize` built once per worker process). Imported
only when used: a small job never pays for importing Ray."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import ray

from jobs.common import ray_runtime, tokenizer_files
from jobs.prepare.spec import DatasetSpec
from jobs.prepare.stages import RenderTokenize, add_tokens, parse_file

if TYPE_CHECKING:
    from collections.abc import Iterator

    from jobs.prepare.inputs import Inputs, Options


# One render+tokenize stage per worker process and spec: Ray reuses worker processes across tasks,
# so the tokenizer is loaded once per worker, like an actor, without pinning CPUs the way an
# actor pool does (actors holding every CPU starve the read tasks that feed them).
_STAGES: dict[tuple[str, str], RenderTokenize] = {}


def _stage(spec_json: str, tok_ref: ray.ObjectRef) -> RenderTokenize:
    key = (spec_json, tok_ref.hex())
    if key not in _STAGES:
        # Ray already runs one tokenizing task per CPU: Rust-side threads would only contend.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        _STAGES.clear()
        _STAGES[key] = RenderTokenize(DatasetSpec.model_validate_json(spec_json), tokenizer_files.load(ray.get(tok_ref)))
    return _STAGES[key]


def tokenize_batch(batch: pa.Table, spec_json: str, tok_ref: ray.ObjectRef) -> pa.Table:
    """`add_tokens` in a Ray Data task, with the worker's cached stage."""
    return add_tokens(batch, _stage(spec_json, tok_ref))


def ray_data_batches(spec: DatasetSpec, inputs: Inputs, options: Options) -> Iterator[pa.Table]:
    """A task per file reads and parses it; tasks render, tokenize and mask batches."""
    ray_runtime.init(options.num_cpus)
    datasets = []
    for i, (source, (fs, paths)) in enumerate(zip(spec.sources, inputs.files, strict=True)):
        def parse(row: dict[str, Any], i=i, source=source) -> list[dict[str, Any]]:
            return parse_file(row["path"], row["bytes"], i, source, spec)

        datasets.append(ray.data.read_binary_files(paths, filesystem=fs, include_paths=True).flat_map(parse))
    ds = datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]
    # A file is read and parsed by one task, then tokenized in batches. With fewer files than
    # CPUs, split the parsed rows so every CPU gets tokenizing work.
    cpus = ray_runtime.cluster_cpus()
    n_files = sum(len(paths) for _, paths in inputs.files)
    blocks = options.blocks or (2 * cpus if n_files < cpus else None)
    if blocks:
        ds = ds.repartition(blocks)
    ds = ds.map_batches(
        tokenize_batch,
        fn_kwargs={"spec_json": spec.model_dump_json(), "tok_ref": ray.put(inputs.tokenizer_files)},
        batch_size=options.batch_size,
        batch_format="pyarrow",
    )
    return ds.iter_batches(batch_format="pyarrow", batch_size=None)
