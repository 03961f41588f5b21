"""The driver of `jobs.prepare`: conversation datasets -> tokenized, masked, packed Parquet with a manifest.

One streaming pass reads and parses every file row by row, then renders, tokenizes and masks
(`stages`): in Ray tasks (`ray_pass`) for large inputs, in this process (`rows.LocalRows`) for
small ones, where starting Ray workers (each imports transformers and loads the tokenizer) costs
more than the work. The global steps then run over those rows wherever they are, as the same pure
batch functions: `max_samples` from per-file row counts, exact de-duplication by hash bucket of
small signatures, sampling weights and the split per row (`selection`), then samples packed per
partition of about 8 M tokens, each assembled and written as one file by one task, and rejects
per input file (`outputs`). This process holds per-file counts, the duplicates and summaries of
a fixed size, never a row or a list of every sample.
Every row read ends up in the output or in `rejects/` with its reason; the counts are checked.
"""

from __future__ import annotations

import logging
import posixpath
import resource
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pyarrow as pa

from jobs.common import storage
from jobs.common.contract import DATA_CARD_FILE, MANIFEST_FILE, REJECTS_DIR, SPLITS, Manifest
from jobs.common.spec import SpecError
from jobs.prepare import manifest as mf
from jobs.prepare.cache import cache_key, cached_manifest
from jobs.prepare.inputs import Inputs, Options, locate_inputs, resolve_inputs
from jobs.prepare.outputs import (
    PARTS_SCHEMA,
    REJECT_FILES_SCHEMA,
    emit_samples,
    partition_counts,
    pick_rows,
    reject_rows,
    write_part,
    write_rejects,
)
from jobs.prepare.rows import LocalRows, Rows
from jobs.prepare.selection import (
    LOSERS_SCHEMA,
    SUMMARY_SCHEMA,
    decide,
    duplicate_losers,
    file_row_counts,
    row_limits,
    signatures,
    summarize,
    tally,
)
from jobs.prepare.spec import DatasetSpec, Dedup, Packing
from jobs.prepare.stages import RenderTokenize, tokenize_file

log = logging.getLogger("raysft.prepare")


@contextmanager
def step(name: str) -> Iterator[None]:
    """Log how long a global step took and the driver's peak memory so far: where a slow or large
    preparation spends its time and memory."""
    started = time.monotonic()
    yield
    log.info("prepare: %s in %.1fs (driver peak RSS %.0f MiB)", name, time.monotonic() - started, peak_rss_mib())


def peak_rss_mib() -> float:
    """This process's peak resident memory: /proc's VmHWM where there is one, since `ru_maxrss`
    survives an exec, and a driver started by a large process would report that one's peak."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20 if sys.platform == "darwin" else 1 << 10)


class RejectRatioExceeded(RuntimeError):
    """Too many invalid rows: the job fails, after writing the rejects and a failed manifest."""


def tokenized_rows(spec: DatasetSpec, inputs: Inputs, options: Options) -> tuple[Rows, int]:
    """Every row read, with its tokens or reject reason: in Ray tasks or, for small inputs, in
    this process (the same functions, so the same rows). Returns them and how many were read."""
    if inputs.total_bytes > options.in_process_max_bytes:
        from jobs.prepare.ray_pass import tokenized_rows as on_ray  # Ray only where it is used

        return on_ray(spec, inputs, options)
    log.info("prepare: %d input bytes, at most %d: tokenizing in this process", inputs.total_bytes,
             options.in_process_max_bytes)
    stage = RenderTokenize(spec, inputs.tokenizer)
    tables = [tokenize_file(path, storage.read_bytes(fs, path), file_index, source_index, stage, options.batch_size)
              for file_index, (source_index, fs, path) in enumerate(inputs.numbered_files())]
    tables = [t for t in tables if t is not None]
    read = sum(t.num_rows for t in tables)
    log.info("prepare: processed %d rows", read)
    return LocalRows(pa.concat_tables(tables, promote_options="permissive") if tables else pa.table({})), read


def file_sources(inputs: Inputs) -> np.ndarray:
    """The source of each input file, files numbered in (source, path) order."""
    return np.concatenate([np.full(len(paths), i) for i, (_, paths) in enumerate(inputs.files)])


def prepare(spec: DatasetSpec, options: Options = Options()) -> Manifest:
    """Run stage 1 end to end and return the manifest (also written to `output/manifest.json`),
    or return an earlier output's manifest when it was prepared from the same spec, input files
    and tokenizer (`cache`), found before anything is loaded."""
    located = locate_inputs(spec)
    if (reused := cached_manifest(spec, located, options)) is not None:
        return reused
    inputs = resolve_inputs(spec, located)
    started = time.monotonic()
    fs, base = storage.filesystem(spec.output)
    # An output being replaced is no longer complete: should this run break off, no manifest may
    # vouch for the files it left half-written.
    storage.delete_file(fs, posixpath.join(base, MANIFEST_FILE))
    with step("read, parsed, tokenized"):
        rows, read = tokenized_rows(spec, inputs, options)
    if not read:
        raise SpecError(["sources: the files hold no rows"])

    limits, skipped = None, {}
    if any(source.max_samples for source in spec.sources):
        with step("max_samples: rows per file counted"):
            counts = rows.map(file_row_counts).collect(pa.schema([("file", pa.int64()), ("rows", pa.int64())]))
            per_file = np.zeros(sum(len(paths) for _, paths in inputs.files), np.int64)
            np.add.at(per_file, counts.column("file").to_numpy(), counts.column("rows").to_numpy())
            limits, skipped = row_limits(spec, file_sources(inputs), per_file)
    losers = None
    if spec.dedup is Dedup.EXACT:
        with step("de-duplication"):
            losers = rows.map(signatures, limits=limits, buckets=64).per_group("bucket", duplicate_losers, LOSERS_SCHEMA)
            losers = losers.sort_by("order")  # decide() looks orders up by binary search
    # Four steps read each row's fate: decide it once. Nothing else refers to the tokenized rows:
    # each block is freed once decided, so the object store holds the data once.
    decided = rows.map(decide, spec=spec, limits=limits, losers=losers).cached()
    del rows
    with step("weights, split and summaries"):
        totals = tally(decided.map(summarize, capacity=spec.max_seq_length).collect(SUMMARY_SCHEMA))
    rows_read = totals.accepted + sum(totals.rejected.values())
    if rows_read != read - sum(skipped.values()):
        raise RuntimeError(f"row accounting broken: {totals.accepted} accepted + {sum(totals.rejected.values())} "
                           f"rejected != {read} read - {sum(skipped.values())} beyond max_samples")

    for sub in (*SPLITS, REJECTS_DIR):
        storage.clear_dir(fs, posixpath.join(base, sub))
    with step("rejects written"):
        reject_files = decided.map(reject_rows, uris=[s.uri for s in spec.sources]).per_group(
            "file", write_rejects, REJECT_FILES_SCHEMA, fs=fs, base=base)
    if (written := sum(reject_files.column("rows").to_pylist())) != sum(totals.rejected.values()):
        raise RuntimeError(f"row accounting broken: {written} rejects written, {sum(totals.rejected.values())} counted")

    invalid = mf.invalid_count(totals.rejected)
    failed = invalid > spec.max_reject_ratio * rows_read
    parts, examples = PARTS_SCHEMA.empty_table(), []
    if not failed:
        with step("packed, assembled and written"):
            parts = decided.map(emit_samples, partitions=partition_counts(totals.tokens)).per_group(
                "group", write_part, PARTS_SCHEMA, fs=fs, base=base, bfd=spec.packing is Packing.BFD,
                capacity=spec.max_seq_length, seed=spec.seed)
        parts = parts.sort_by([("split", "ascending"), ("name", "ascending")])  # train, then val
        if (written := sum(parts.column("samples").to_pylist())) != sum(totals.samples.values()):
            raise RuntimeError(f"row accounting broken: {written} samples written, {sum(totals.samples.values())} counted")
        shown = totals.shown
        picked = decided.map(pick_rows, orders=shown).collect(pa.schema(
            [("order", pa.int64()), ("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32()))]))
        by_order = dict(zip(picked.column("order").to_pylist(), range(picked.num_rows), strict=True))
        examples = [mf.trained_segments(inputs.tokenizer, np.asarray(picked.column("input_ids")[by_order[o]].as_py()),
                                        np.asarray(picked.column("labels")[by_order[o]].as_py())) for o in shown]
    manifest = mf.build(spec, inputs, rows_read, skipped, totals, parts, failed, time.monotonic() - started, examples,
                        cache_key(spec, located))
    if not failed:
        storage.write_bytes(fs, posixpath.join(base, DATA_CARD_FILE), mf.data_card(spec, manifest).encode())
    # The manifest is written last: its presence marks a complete output.
    storage.write_bytes(fs, posixpath.join(base, MANIFEST_FILE), manifest.to_json().encode())
    if failed:
        invalid_reasons = Counter({r: n for r, n in totals.rejected.items() if r not in mf.POLICY_REASONS})
        raise RejectRatioExceeded(
            f"{invalid} of {rows_read} rows invalid ({invalid / rows_read:.1%}) > max_reject_ratio "
            f"{spec.max_reject_ratio:.1%}. Top reasons: {mf.top_reasons(invalid_reasons)}. "
            f"Every rejected row is in {posixpath.join(spec.output, REJECTS_DIR)}/; "
            "fix the data or raise max_reject_ratio.")
    log.info("prepare: done in %.1fs", time.monotonic() - started)
    return manifest
