"""Preparation on Ray, for inputs too large for one process. One task per file (or part of a
file) reads, parses, renders, tokenizes and masks its rows (`stages.tokenize_file`, with a
`stages.RenderTokenize` built once per worker process); the tokenized blocks stay in the object
store (spilling to disk past its size), and every later step runs over them as Ray tasks
(`RayRows`). The driver holds block references and summaries, never rows. Imported only when
used: a small job never pays for importing Ray.

Plain tasks rather than Ray Data: every step here is one task per block, which Ray Data's
streaming executor ran too, at the cost of starting an executor per step (about a second each
on 2 CPUs) and of back-pressure that held the tokenizing tasks back while files were parsed."""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import ray

from jobs.common import ray_runtime, storage, tokenizer_files
from jobs.prepare.rows import LocalRows
from jobs.prepare.spec import DatasetSpec
from jobs.prepare.stages import RenderTokenize, tokenize_file

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


@ray.remote(num_returns=2)
def _tokenize_part(fs: Any, path: str, file_index: int, source_index: int, spec_json: str,
                   tok: list[ray.ObjectRef], batch_size: int, part: tuple[int, int]) -> tuple[pa.Table | None, int]:
    """`tokenize_file` in a Ray task, with the worker's cached stage (the tokenizer's reference
    comes in a list, so Ray passes the reference and only a new worker fetches the files): the
    table, and its row count for the driver."""
    table = tokenize_file(path, storage.read_bytes(fs, path), file_index, source_index, _stage(spec_json, tok[0]),
                          batch_size, part)
    return table, table.num_rows if table is not None else 0


Steps = tuple[tuple["BatchFn", ray.ObjectRef], ...]


def _apply(block: pa.Table, steps: Steps) -> pa.Table:
    # Arguments go through the object store once per step; NumPy arrays in them are read in place.
    for fn, kwargs in steps:
        block = fn(block, **ray.get(kwargs))
    return block


_run = ray.remote(_apply)


@ray.remote
def _partition(block: pa.Table, steps: Steps, column: str, partitions: int) -> tuple[pa.Table, ...]:
    block = _apply(block, steps)
    target = block.column(column).to_numpy() % partitions
    return tuple(block.filter(pa.array(target == p)) for p in range(partitions))


@ray.remote
def _reduce(fn: BatchFn, column: str, schema: pa.Schema, kwargs: dict[str, Any], *parts: pa.Table) -> pa.Table:
    parts = tuple(p for p in parts if p.num_rows)
    return LocalRows(pa.concat_tables(parts)).per_group(column, fn, schema, **kwargs) if parts else schema.empty_table()


class RayRows:
    """Rows as blocks in the object store. `map` only records its step: the steps run in the task
    that consumes a block (`per_group`, `collect`), or once for all later uses (`cached`)."""

    def __init__(self, blocks: list[ray.ObjectRef], partitions: int, steps: Steps = ()):
        self.blocks, self.partitions, self.steps = blocks, partitions, steps

    def map(self, fn: BatchFn, **kwargs: Any) -> RayRows:
        return RayRows(self.blocks, self.partitions, (*self.steps, (fn, ray.put(kwargs))))

    def cached(self) -> RayRows:
        if not self.steps:
            return self
        return RayRows([_run.remote(block, self.steps) for block in self.blocks], self.partitions)

    def per_group(self, column: str, fn: BatchFn, schema: pa.Schema, **kwargs: Any) -> pa.Table:
        """A hash shuffle: each block is cut into a fixed number of partitions by `column` as its
        steps produce it, and each partition is grouped by one task."""
        pieces = [_partition.options(num_returns=self.partitions).remote(block, self.steps, column, self.partitions)
                  for block in self.blocks]
        kwargs_ref = ray.put(kwargs)
        reduced = [_reduce.remote(fn, column, schema, kwargs_ref, *(p[i] for p in pieces)) for i in range(self.partitions)]
        return pa.concat_tables(ray.get(reduced))

    def collect(self, schema: pa.Schema) -> pa.Table:
        tables = [t for t in ray.get([_run.remote(block, self.steps) for block in self.blocks]) if t.num_rows]
        return pa.concat_tables([t.select(schema.names).cast(schema) for t in tables]) if tables else schema.empty_table()


def tokenized_rows(spec: DatasetSpec, inputs: Inputs, options: Options) -> tuple[RayRows, int]:
    """Read, parse, render, tokenize and mask every file in Ray tasks; the tokenized blocks stay
    in the object store. Returns them and the number of rows read."""
    ray_runtime.init(options.num_cpus)
    files = inputs.numbered_files()
    cpus = ray_runtime.cluster_cpus()
    # One task per file, or per part of a file when there are fewer files than tasks wanted:
    # every CPU gets work, and no CPU is left alone with a long last file.
    parts = max(1, -(-(options.blocks or 2 * cpus) // len(files)))
    log.info("prepare: tokenizing %d files in %d Ray tasks on %d CPUs", len(files), len(files) * parts, cpus)
    spec_json, tok_ref = spec.model_dump_json(), ray.put(inputs.tokenizer_files)
    pending = {}
    for file_index, (source_index, fs, path) in enumerate(files):
        for k in range(parts):
            table, count = _tokenize_part.remote(fs, path, file_index, source_index, spec_json, [tok_ref],
                                                 options.batch_size, (k, parts))
            pending[count] = table
    # Keep the blocks, not the rows: the driver holds references and counts.
    blocks, rows, started, last = [], 0, time.monotonic(), 0.0
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        table = pending.pop(done[0])
        if count := ray.get(done[0]):
            blocks.append(table)
            rows += count
        if (now := time.monotonic()) - last >= PROGRESS_EVERY_S:
            log.info("prepare: processed %d rows (%.0f rows/s)", rows, rows / max(now - started, 1e-9))
            last = now
    log.info("prepare: processed %d rows in %.1fs", rows, time.monotonic() - started)
    return RayRows(blocks, partitions=max(2 * cpus, 4)), rows
