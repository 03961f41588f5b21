"""Preparation on Ray Data, for inputs too large for one process. Tasks read and parse every
file (`stages.parse_file`), then render, tokenize and mask batches (`stages.add_tokens`, with a
`stages.RenderTokenize` built once per worker process); the tokenized blocks stay in the object
store (spilling to disk past its size), and every later step runs over them as Ray Data tasks
(`RayRows`). The driver holds block references and summaries, never rows. Imported only when
used: a small job never pays for importing Ray."""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import ray

from jobs.common import ray_runtime, tokenizer_files
from jobs.prepare.rows import LocalRows
from jobs.prepare.spec import DatasetSpec
from jobs.prepare.stages import RenderTokenize, add_tokens, parse_file

if TYPE_CHECKING:
    from jobs.prepare.inputs import Inputs, Options
    from jobs.prepare.rows import BatchFn

log = logging.getLogger("raysft.prepare")
PROGRESS_EVERY_S = 2.0

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


def _apply(batch: pa.Table, fn: BatchFn, kwargs: ray.ObjectRef) -> pa.Table:
    # Arguments go through the object store once per step; NumPy arrays in them are read in place.
    return fn(batch, **ray.get(kwargs))


@ray.remote
def _partition(block: pa.Table, column: str, partitions: int) -> tuple[pa.Table, ...]:
    target = block.column(column).to_numpy() % partitions
    return tuple(block.filter(pa.array(target == p)) for p in range(partitions))


@ray.remote
def _reduce(fn: BatchFn, column: str, schema: pa.Schema, kwargs: dict[str, Any], *parts: pa.Table) -> pa.Table:
    parts = tuple(p for p in parts if p.num_rows)
    return LocalRows(pa.concat_tables(parts)).per_group(column, fn, schema, **kwargs) if parts else schema.empty_table()


class RayRows:
    """Rows as Ray Data blocks in the object store; each step a Ray Data operation or a shuffle."""

    def __init__(self, ds: ray.data.Dataset, partitions: int):
        self.ds, self.partitions = ds, partitions

    def map(self, fn: BatchFn, **kwargs: Any) -> RayRows:
        return RayRows(self.ds.map_batches(_apply, fn_kwargs={"fn": fn, "kwargs": ray.put(kwargs)},
                                           batch_format="pyarrow", batch_size=None, zero_copy_batch=True),
                       self.partitions)

    def per_group(self, column: str, fn: BatchFn, schema: pa.Schema, **kwargs: Any) -> pa.Table:
        """A hash shuffle on Ray tasks: each block is cut into a fixed number of partitions by
        `column` as it is produced, and each partition is grouped by one task. (Ray Data's own
        shuffle starts and stops aggregator actors: about 8 s per shuffle on 2 CPUs, whatever the
        size, which is most of a small job.)"""
        kwargs_ref, pieces = ray.put(kwargs), []
        for bundle in self.ds.iter_internal_ref_bundles():
            for ref in bundle.block_refs:
                pieces.append(_partition.options(num_returns=self.partitions).remote(ref, column, self.partitions))
        reduced = [_reduce.remote(fn, column, schema, kwargs_ref, *(p[i] for p in pieces)) for i in range(self.partitions)]
        return pa.concat_tables(ray.get(reduced))

    def collect(self, schema: pa.Schema) -> pa.Table:
        tables = [t for t in self.ds.iter_batches(batch_format="pyarrow", batch_size=None) if t.num_rows]
        return pa.concat_tables([t.select(schema.names).cast(schema) for t in tables]) if tables else schema.empty_table()


def tokenized_rows(spec: DatasetSpec, inputs: Inputs, options: Options) -> tuple[RayRows, int]:
    """Read, parse, render, tokenize and mask every file on Ray Data; the blocks stay in the
    object store. Returns them and the number of rows read."""
    ray_runtime.init(options.num_cpus)
    datasets, file_index = [], 0
    for i, (source, (fs, paths)) in enumerate(zip(spec.sources, inputs.files, strict=True)):
        first = file_index

        def parse(row: dict[str, Any], i=i, source=source, first=first, paths=paths) -> list[dict[str, Any]]:
            return parse_file(row["path"], row["bytes"], first + paths.index(row["path"]), i, source, spec)

        datasets.append(ray.data.read_binary_files(paths, filesystem=fs, include_paths=True).flat_map(parse))
        file_index += len(paths)
    ds = datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]
    # A file is read and parsed by one task, then tokenized in batches. With fewer files than
    # CPUs, split the parsed rows so every CPU gets tokenizing work.
    cpus = ray_runtime.cluster_cpus()
    blocks = options.blocks or (2 * cpus if file_index < cpus else None)
    if blocks:
        ds = ds.repartition(blocks)
    ds = ds.map_batches(
        tokenize_batch,
        fn_kwargs={"spec_json": spec.model_dump_json(), "tok_ref": ray.put(inputs.tokenizer_files)},
        batch_size=options.batch_size,
        batch_format="pyarrow",
    )
    # Keep the blocks, not the rows: the driver holds references and counts.
    refs, rows, started, last = [], 0, time.monotonic(), 0.0
    for bundle in ds.iter_internal_ref_bundles():
        refs.extend(bundle.block_refs)
        rows += bundle.num_rows() or 0
        if (now := time.monotonic()) - last >= PROGRESS_EVERY_S:
            log.info("prepare: processed %d rows (%.0f rows/s)", rows, rows / max(now - started, 1e-9))
            last = now
    log.info("prepare: processed %d rows in %.1fs", rows, time.monotonic() - started)
    partitions = max(2 * cpus, 4)
    return RayRows(ray.data.from_arrow_refs(refs) if refs else ray.data.from_items([]), partitions), rows
