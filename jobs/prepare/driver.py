"""The driver of `jobs.prepare`: conversation datasets -> tokenized, masked, packed Parquet with a manifest.

One streaming pass reads and parses every file row by row, then renders, tokenizes and masks
(`stages`): on Ray Data (`ray_pass`) for large inputs, in this process for small ones, where
starting Ray workers (each imports transformers and loads the tokenizer) costs more than the
work. The global steps that need every row at once (`selection`: max_samples, de-duplication,
sampling weights, the split; then whole-dataset packing) run here over rows ordered by
(source, file, line), which makes the output independent of block sizes and CPU counts.
Every row read ends up in the output or in `rejects/` with its reason; the counts are checked.
"""

from __future__ import annotations

import logging
import posixpath
import time
from collections import Counter
from collections.abc import Iterator

import pyarrow as pa

from jobs.common import storage
from jobs.common.contract import DATA_CARD_FILE, MANIFEST_FILE, REJECTS_FILE, SPLITS, Manifest
from jobs.common.spec import SpecError
from jobs.prepare import manifest as mf
from jobs.prepare.inputs import Inputs, Options, resolve_inputs
from jobs.prepare.outputs import reject_records, showcase, write_rejects, write_split
from jobs.prepare.packing import pack_samples
from jobs.prepare.selection import limit_samples, row_order, select_samples
from jobs.prepare.spec import DatasetSpec, Packing
from jobs.prepare.stages import RenderTokenize, add_tokens, parse_file

log = logging.getLogger("raysft.prepare")
PROGRESS_EVERY_S = 2.0


class RejectRatioExceeded(RuntimeError):
    """Too many invalid rows: the job fails, after writing the rejects and a failed manifest."""


def read_and_tokenize(spec: DatasetSpec, inputs: Inputs, options: Options) -> pa.Table:
    """One streaming pass: read and parse each file -> render + tokenize + mask, on Ray Data or,
    for small inputs, in this process (the same functions, so the same rows).

    Returns every row read, in no particular order, with its tokens or reject reason."""
    if inputs.total_bytes <= options.in_process_max_bytes:
        log.info("prepare: %d input bytes, at most %d: tokenizing in this process", inputs.total_bytes,
                 options.in_process_max_bytes)
        batches = in_process_batches(spec, inputs, options)
    else:
        from jobs.prepare.ray_pass import ray_data_batches  # Ray only where it is used: small jobs skip its import

        batches = ray_data_batches(spec, inputs, options)
    tables, done, started, last = [], 0, time.monotonic(), 0.0
    for table in batches:
        tables.append(table)
        done += table.num_rows
        if (now := time.monotonic()) - last >= PROGRESS_EVERY_S:
            log.info("prepare: processed %d rows (%.0f rows/s)", done, done / max(now - started, 1e-9))
            last = now
    log.info("prepare: processed %d rows in %.1fs", done, time.monotonic() - started)
    tables = [t for t in tables if t.num_rows]
    if not tables:
        raise SpecError(["sources: the files hold no rows"])
    return pa.concat_tables(tables, promote_options="permissive")


def in_process_batches(spec: DatasetSpec, inputs: Inputs, options: Options) -> Iterator[pa.Table]:
    """File by file, batch by batch, with the tokenizer `resolve_inputs` loaded."""
    stage = RenderTokenize(spec, inputs.tokenizer)
    for i, (source, (fs, paths)) in enumerate(zip(spec.sources, inputs.files, strict=True)):
        for path in paths:
            rows = parse_file(path, storage.read_bytes(fs, path), i, source, spec)
            for start in range(0, len(rows), options.batch_size):
                yield add_tokens(pa.Table.from_pylist(rows[start:start + options.batch_size]), stage)


def prepare(spec: DatasetSpec, options: Options = Options()) -> Manifest:
    """Run stage 1 end to end and return the manifest (also written to `output/manifest.json`)."""
    inputs = resolve_inputs(spec)
    started = time.monotonic()

    rows = read_and_tokenize(spec, inputs, options)
    order, skipped = limit_samples(spec, rows, row_order(rows))
    sel = select_samples(spec, rows, order)
    rejected = Counter(r["reason"] for r in sel.rejects)
    rows_read = len(order)
    if sel.accepted + len(sel.rejects) != rows_read:
        raise RuntimeError(f"row accounting broken: {sel.accepted} accepted + {len(sel.rejects)} rejected "
                           f"!= {rows_read} read")

    fs, base = storage.filesystem(spec.output)
    for sub in (*SPLITS, "rejects"):
        storage.clear_dir(fs, posixpath.join(base, sub))
    write_rejects(fs, base, reject_records(spec, rows, sel.rejects))

    invalid = mf.invalid_count(rejected)
    failed = invalid > spec.max_reject_ratio * rows_read
    bfd = spec.packing is Packing.BFD
    packed = {s: [] if failed else pack_samples(sel.samples[s], bfd, spec.max_seq_length) for s in SPLITS}
    files = [] if failed else [f for s in SPLITS for f in write_split(fs, base, s, packed[s], options.rows_per_file)]

    examples = [] if failed else [mf.trained_segments(inputs.tokenizer, ids, labels) for ids, labels in showcase(sel)]
    manifest = mf.build(spec, inputs, rows_read, skipped, sel, rejected, packed, files, failed,
                        time.monotonic() - started, examples)
    if not failed:
        storage.write_bytes(fs, posixpath.join(base, DATA_CARD_FILE), mf.data_card(spec, manifest).encode())
    # The manifest is written last: its presence marks a complete output.
    storage.write_bytes(fs, posixpath.join(base, MANIFEST_FILE), manifest.to_json().encode())
    if failed:
        invalid_reasons = Counter({r: n for r, n in rejected.items() if r not in mf.POLICY_REASONS})
        raise RejectRatioExceeded(
            f"{invalid} of {rows_read} rows invalid ({invalid / rows_read:.1%}) > max_reject_ratio "
            f"{spec.max_reject_ratio:.1%}. Top reasons: {mf.top_reasons(invalid_reasons)}. "
            f"Every rejected row is in {posixpath.join(spec.output, REJECTS_FILE)}; "
            "fix the data or raise max_reject_ratio.")
    log.info("prepare: done in %.1fs", time.monotonic() - started)
    return manifest
