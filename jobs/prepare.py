"""Stage 1: conversation datasets -> tokenized, masked, packed Parquet with a manifest.

    python -m jobs.prepare --spec configs/datasets/demo.yaml
    ray job submit -- python -m jobs.prepare --spec '{"name": ...}'

Ray Data does the per-row work in one streaming pass: tasks read and parse every file row by
row (`stages.parse_file`), then render, tokenize and mask (`stages.RenderTokenize`, built once
per worker process). Small inputs run the same functions in the driver instead: for a few
megabytes, starting Ray workers (each imports transformers and loads the tokenizer) costs more
than the work. The global steps that need every row at once (de-duplication,
sampling weights, the split, whole-dataset packing) run on the driver over rows ordered by
(source, file, line), which makes the output independent of block sizes and CPU counts.
Every row read ends up in the output or in `rejects/` with its reason; the counts are checked.
"""

from __future__ import annotations

import argparse
import json
import logging
import posixpath
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jobs import manifest as mf
from jobs import storage, tokenizer_files
from jobs.filters import unit_interval
from jobs.manifest import SPLITS, TOKEN_COLUMNS
from jobs.packing import bfd_bins, pack_row, single_bins
from jobs.spec import DatasetSpec, Dedup, Packing, SpecError, load_spec
from jobs.stages import OK, RenderTokenize, parse_file
from jobs.tokenize import IGNORE_INDEX

log = logging.getLogger("raysft.prepare")
PROGRESS_EVERY_S = 2.0


class RejectRatioExceeded(RuntimeError):
    """Too many invalid rows: the job fails, after writing the rejects and a failed manifest."""


@dataclass(frozen=True)
class Options:
    """How to run, not what to produce: none of these change the output."""

    num_cpus: int | None = None  # size of a local cluster, when the job starts one for Ray Data
    # Inputs up to this size are read and tokenized in this process, without Ray Data: about
    # two seconds of tokenizing on one core, less than Ray workers take to start.
    in_process_max_bytes: int = 4 << 20
    batch_size: int = 256  # rows per tokenizer call
    blocks: int | None = None  # repartition parsed rows into this many blocks (default: one per file)
    rows_per_file: int = 8192  # Parquet rows per output file


# ---------------------------------------------------------------- validation before any work


@dataclass
class Inputs:
    tokenizer_files: dict[str, bytes]
    tokenizer: Any
    eot: str  # the end-of-turn text of the template, trained after every reply
    files: list[tuple[Any, list[str]]]  # per source: (filesystem, paths)
    total_bytes: int  # the size of every file together


def resolve_inputs(spec: DatasetSpec) -> Inputs:
    """Load the tokenizer, check the template and find every source file; report all problems at once."""
    problems: list[str] = []
    files, tokenizer, eot, total_bytes = [], None, "", 0
    try:
        tok_files = tokenizer_files.fetch(spec.tokenizer)
        tokenizer = tokenizer_files.load(tok_files)
    except Exception as e:  # any reason the tokenizer cannot be read is a spec problem here
        tok_files = {}
        problems.append(f"tokenizer: cannot load {spec.tokenizer!r}: {e}")
    if tokenizer is not None:
        try:
            eot = RenderTokenize(spec, tokenizer).template.eot
        except ValueError as e:
            problems.append(f"template: {e}")
    for i, source in enumerate(spec.sources):
        try:
            fs, paths = storage.expand(source.uri)
        except Exception as e:
            problems.append(f"sources.{i}.uri: cannot list {source.uri!r}: {e}")
            continue
        if not paths:
            problems.append(f"sources.{i}.uri: no files match {source.uri!r}")
        files.append((fs, paths))
        total_bytes += sum(info.size for info in fs.get_file_info(paths))
    if problems:
        raise SpecError(problems)
    return Inputs(tok_files, tokenizer, eot, files, total_bytes)


# ---------------------------------------------------------------- the per-row pass


def add_tokens(batch: pa.Table, stage: RenderTokenize) -> pa.Table:
    """Render + tokenize + mask the usable rows of a batch of parsed rows.

    Rows already rejected while parsing pass through untouched; a row rejected here (too long,
    nothing to train, template error) gets its reason. The messages column is dropped."""
    reasons = batch.column("reason").to_pylist()
    details = batch.column("detail").to_pylist()
    todo = [i for i, r in enumerate(reasons) if r == OK]
    cols = stage.columns(batch.column("messages").take(todo).to_pylist())
    empty = np.empty(0, np.int32)
    ids, labels, truncated = [empty] * len(reasons), [empty] * len(reasons), [False] * len(reasons)
    for j, i in enumerate(todo):
        ids[i], labels[i], truncated[i] = cols["input_ids"][j], cols["labels"][j], cols["truncated"][j]
        reasons[i], details[i] = cols["reason"][j], cols["detail"][j]
    return batch.drop_columns(["messages", "reason", "detail"]).append_column(
        "reason", pa.array(reasons, pa.string())).append_column(
        "detail", pa.array(details, pa.string())).append_column(
        "input_ids", list_array(ids)).append_column(
        "labels", list_array(labels)).append_column(
        "truncated", pa.array(truncated, pa.bool_()))


def list_array(arrays: list[np.ndarray]) -> pa.Array:
    """int32 arrays as one Arrow list column, built from offsets without a per-element loop."""
    offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
    np.cumsum([len(a) for a in arrays], out=offsets[1:])
    values = pa.array((np.concatenate(arrays) if arrays else np.empty(0)).astype(np.int32, copy=False))
    if offsets[-1] < 2**31:
        return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), values)
    return pa.LargeListArray.from_arrays(pa.array(offsets), values)  # past 2^31 values in one column


def read_and_tokenize(spec: DatasetSpec, inputs: Inputs, options: Options) -> pa.Table:
    """One streaming pass: read and parse each file -> render + tokenize + mask, on Ray Data or,
    for small inputs, in this process (the same functions, so the same rows).

    Returns every row read, in no particular order, with its tokens or reject reason."""
    if inputs.total_bytes <= options.in_process_max_bytes:
        log.info("prepare: %d input bytes, at most %d: tokenizing in this process", inputs.total_bytes,
                 options.in_process_max_bytes)
        batches = in_process_batches(spec, inputs, options)
    else:
        from jobs.prepare_ray import ray_data_batches  # Ray only where it is used: small jobs skip its import

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


def row_order(rows: pa.Table) -> np.ndarray:
    """Row indices in (source, file, line) order: every global decision walks rows in this order.

    Sorting indices rather than the table avoids moving the token lists around."""
    keys = [("source", "ascending"), ("path", "ascending"), ("line", "ascending")]
    return pc.sort_indices(rows.select(["source", "path", "line"]), sort_keys=keys).to_numpy()


# ---------------------------------------------------------------- driver-side global steps


def limit_samples(spec: DatasetSpec, rows: pa.Table, order: np.ndarray) -> tuple[np.ndarray, dict[int, int]]:
    """Keep the first `max_samples` rows of each source (in file and line order)."""
    sources = rows.column("source").to_numpy()[order]
    keep = np.ones(len(order), dtype=bool)
    skipped = {}
    for i, source in enumerate(spec.sources):
        idx = np.flatnonzero(sources == i)
        if source.max_samples is not None and len(idx) > source.max_samples:
            keep[idx[source.max_samples:]] = False
            skipped[i] = int(len(idx) - source.max_samples)
    return order[keep], skipped


@dataclass
class Selection:
    rejects: list[dict[str, Any]]  # {"uid", "reason", "detail"} in row order; uid = index in `rows`
    samples: dict[str, list[tuple[np.ndarray, np.ndarray]]]  # split -> (input_ids, labels), copies included
    accepted: int = 0
    truncated: int = 0


def select_samples(spec: DatasetSpec, rows: pa.Table, order: np.ndarray) -> Selection:
    """Rejects, then de-duplication, sampling weights and the split, in row order (deterministic)."""
    sel = Selection([], {s: [] for s in SPLITS})
    ids_col, labels_col = rows.column("input_ids").combine_chunks(), rows.column("labels").combine_chunks()
    ids_values, offsets = ids_col.values.to_numpy(), ids_col.offsets.to_numpy()
    labels_values = labels_col.values.to_numpy()
    seen: dict[str, int] = {}
    source_, key_, reason_, detail_, truncated_, path_, line_ = (
        rows.column(c).to_pylist() for c in ("source", "key", "reason", "detail", "truncated", "path", "line"))
    for uid in order.tolist():
        src, key, reason, detail = source_[uid], key_[uid], reason_[uid], detail_[uid]
        if reason != OK:
            sel.rejects.append({"uid": uid, "reason": reason, "detail": detail})
            continue
        if spec.dedup is Dedup.EXACT:
            if key in seen:
                sel.rejects.append({"uid": uid, "reason": "duplicate", "detail": f"same as {seen[key]}"})
                continue
            seen[key] = f"{path_[uid]}:{line_[uid]}"
        weight = spec.sources[src].weight
        copies = int(weight) + (unit_interval(spec.seed, "weight", key) < weight - int(weight))
        if copies == 0:
            sel.rejects.append({"uid": uid, "reason": "downsampled", "detail": f"weight {weight}"})
            continue
        # Split by conversation, so copies of a row never straddle train and val.
        split = "val" if unit_interval(spec.seed, "split", key) < spec.val_ratio else "train"
        lo, hi = offsets[uid], offsets[uid + 1]
        sel.samples[split].extend([(ids_values[lo:hi], labels_values[lo:hi])] * copies)
        sel.accepted += 1
        sel.truncated += bool(truncated_[uid])
    return sel


def pack_split(samples: list[tuple[np.ndarray, np.ndarray]], spec: DatasetSpec) -> list[dict[str, np.ndarray]]:
    lengths = [len(ids) for ids, _ in samples]
    bins = bfd_bins(lengths, spec.max_seq_length) if spec.packing is Packing.BFD else single_bins(len(samples))
    return [pack_row([samples[i] for i in b]) for b in bins]


# ---------------------------------------------------------------- writing


def write_split(fs: Any, base: str, split: str, packed: list[dict[str, np.ndarray]], rows_per_file: int) -> list[str]:
    written = []
    for n, start in enumerate(range(0, len(packed), rows_per_file)):
        chunk = packed[start:start + rows_per_file]
        table = pa.table({col: list_array([r[col] for r in chunk]) for col in TOKEN_COLUMNS})
        name = f"{split}/part-{n:05d}.parquet"
        fs.create_dir(posixpath.join(base, split), recursive=True)
        pq.write_table(table, posixpath.join(base, name), filesystem=fs)
        written.append(name)
    return written


def write_rejects(fs: Any, base: str, rejects: list[dict[str, Any]]) -> None:
    body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects)
    storage.write_bytes(fs, posixpath.join(base, "rejects", "rejects.jsonl"), body.encode())


# ---------------------------------------------------------------- the job


def prepare(spec: DatasetSpec, options: Options = Options()) -> dict[str, Any]:
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
    write_rejects(fs, base, _reject_records(spec, rows, sel.rejects))

    invalid = mf.invalid_count(rejected)
    failed = invalid > spec.max_reject_ratio * rows_read
    packed = {s: [] if failed else pack_split(sel.samples[s], spec) for s in SPLITS}
    files = [] if failed else [f for s in SPLITS for f in write_split(fs, base, s, packed[s], options.rows_per_file)]

    manifest = mf.build(spec, inputs, rows_read, skipped, sel, rejected, packed, files,
                         "failed" if failed else "succeeded", time.monotonic() - started)
    if not failed:
        examples = [mf.mark_trained(inputs.tokenizer, ids, labels) for ids, labels in _showcase(sel)]
        storage.write_bytes(fs, posixpath.join(base, "DATA_CARD.md"), mf.data_card(manifest, examples).encode())
    # The manifest is written last: its presence marks a complete output.
    storage.write_bytes(fs, posixpath.join(base, "manifest.json"), json.dumps(manifest, indent=2).encode())
    if failed:
        invalid_reasons = Counter({r: n for r, n in rejected.items() if r not in mf.POLICY_REASONS})
        raise RejectRatioExceeded(
            f"{invalid} of {rows_read} rows invalid ({invalid / rows_read:.1%}) > max_reject_ratio "
            f"{spec.max_reject_ratio:.1%}. Top reasons: {mf.top_reasons(invalid_reasons)}. "
            f"Every rejected row is in {spec.output.rstrip('/')}/rejects/rejects.jsonl; "
            "fix the data or raise max_reject_ratio.")
    log.info("prepare: done in %.1fs", time.monotonic() - started)
    return manifest


def _showcase(sel: Selection) -> list[tuple[np.ndarray, np.ndarray]]:
    """Two samples for the data card: those with the most trained runs (multi-turn shows best)."""
    pool = (sel.samples["train"] + sel.samples["val"])[:2000]
    def turns(sample):
        trained = sample[1] != IGNORE_INDEX
        return int((trained[1:] & ~trained[:-1]).sum())
    return sorted(pool, key=lambda s: (-turns(s), len(s[0])))[:2]


def _reject_records(spec: DatasetSpec, rows: pa.Table, rejects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in rejects:  # already in (source, file, line) order
        uid = r["uid"]
        source = rows["source"][uid].as_py()
        out.append({"source": spec.sources[source].uri, "path": rows["path"][uid].as_py(),
                    "line": rows["line"][uid].as_py(), "reason": r["reason"], "detail": r["detail"],
                    "raw": rows["raw"][uid].as_py()})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", required=True, help="dataset spec: a YAML/JSON file or inline JSON")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray cluster (ignored with RAY_ADDRESS)")
    parser.add_argument("--batch-size", type=int, default=Options.batch_size, help="rows per tokenizer call")
    parser.add_argument("--blocks", type=int, default=None, help="repartition parsed rows into N blocks before tokenizing")
    parser.add_argument("--rows-per-file", type=int, default=Options.rows_per_file, help="Parquet rows per file")
    parser.add_argument("--in-process-max-bytes", type=int, default=Options.in_process_max_bytes,
                        help="inputs up to this size skip Ray Data and run in this process (0: always Ray Data)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    options = Options(num_cpus=args.num_cpus, batch_size=args.batch_size, blocks=args.blocks,
                      rows_per_file=args.rows_per_file, in_process_max_bytes=args.in_process_max_bytes)
    try:
        spec = load_spec(args.spec)
        manifest = prepare(spec, options)
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RejectRatioExceeded as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(mf.summary(manifest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
