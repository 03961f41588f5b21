"""Pure: the global steps of preparation (`max_samples`, exact de-duplication, sampling weights
and the train/val split) as functions over batches of tokenized rows.

Every row carries `order`: its file's index in (source, path) order, shifted left 32 bits, plus its
row number in the file, so comparing orders compares (source, file, line). Each decision depends
only on the row itself (its key and the spec's seed) or on small tables worked out once from
per-file and per-bucket summaries (`row_limits`, `duplicate_losers`). Any batching, any number of
CPUs and any retried task therefore give the same result, in one process or on Ray.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jobs.common.contract import IGNORE_INDEX, SPLITS
from jobs.prepare.filters import unit_interval
from jobs.prepare.spec import DatasetSpec, SourceSplit
from jobs.prepare.stages import OK, ROW_BITS


def file_of(orders: np.ndarray) -> np.ndarray:
    return orders >> ROW_BITS


# ---------------------------------------------------------------- max_samples


def file_row_counts(batch: pa.Table) -> pa.Table:
    """Rows per input file in this batch (summed by the caller over batches)."""
    files, counts = np.unique(file_of(batch.column("order").to_numpy()), return_counts=True)
    return pa.table({"file": pa.array(files, pa.int64()), "rows": pa.array(counts, pa.int64())})


def row_limits(spec: DatasetSpec, file_sources: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, dict[int, int]]:
    """How many leading rows of each file to keep: the first `max_samples` rows of each source
    in file order. Returns the per-file limits and the rows left out per source."""
    keep = counts.copy()
    skipped = {}
    for i, source in enumerate(spec.sources):
        if source.max_samples is None:
            continue
        files = np.flatnonzero(file_sources == i)
        before = np.cumsum(counts[files]) - counts[files]
        keep[files] = np.clip(source.max_samples - before, 0, counts[files])
        if n := int(counts[files].sum() - keep[files].sum()):
            skipped[i] = n
    return keep, skipped


def within_limits(batch: pa.Table, limits: np.ndarray | None) -> pa.Table:
    if limits is None:
        return batch
    orders = batch.column("order").to_numpy()
    return batch.filter(pa.array((orders & ((1 << ROW_BITS) - 1)) < limits[file_of(orders)]))


# ---------------------------------------------------------------- de-duplication


def signatures(batch: pa.Table, limits: np.ndarray | None, buckets: int) -> pa.Table:
    """The small part of each usable row de-duplication needs, with a hash bucket of its key:
    equal keys share a bucket, so buckets are de-duplicated independently."""
    rows = within_limits(batch.select(["key", "order", "path", "line", "reason"]), limits)  # not the tokens
    rows = rows.filter(pc.equal(rows.column("reason"), OK)).select(["key", "order", "path", "line"])
    bucket = [int(key[:8], 16) % buckets for key in rows.column("key").to_pylist()]
    return rows.append_column("bucket", pa.array(bucket, pa.int64()))


LOSERS_SCHEMA = pa.schema([("order", pa.int64()), ("detail", pa.string())])


def duplicate_losers(sigs: pa.Table) -> pa.Table:
    """Every row whose key an earlier row (by order) already has, with that first row's place."""
    n = sigs.num_rows
    if n == 0:
        return LOSERS_SCHEMA.empty_table()
    sigs = sigs.take(pc.sort_indices(sigs, sort_keys=[("key", "ascending"), ("order", "ascending")]))
    keys = sigs.column("key").combine_chunks()
    first = np.ones(n, dtype=bool)
    first[1:] = ~pc.equal(keys.slice(1), keys.slice(0, n - 1)).to_numpy(zero_copy_only=False)
    winner = np.maximum.accumulate(np.where(first, np.arange(n), 0))
    losers = np.flatnonzero(~first)
    paths = sigs.column("path").take(winner[losers]).to_pylist()
    lines = sigs.column("line").take(winner[losers]).to_pylist()
    return pa.table({"order": sigs.column("order").take(losers).cast(pa.int64()),
                     "detail": pa.array([f"same as {p}:{line}" for p, line in zip(paths, lines, strict=True)],
                                        pa.string())}, schema=LOSERS_SCHEMA)


# ---------------------------------------------------------------- each row's fate


def decide(batch: pa.Table, spec: DatasetSpec, limits: np.ndarray | None, losers: pa.Table | None) -> pa.Table:
    """Each row within the limits with its final `reason` and `detail` (duplicates and
    down-sampled rows added), and for accepted rows their `split` (0 train, 1 val) and `copies`."""
    rows = within_limits(batch, limits)
    reasons, details = rows.column("reason").to_pylist(), rows.column("detail").to_pylist()
    duplicate = np.zeros(rows.num_rows, dtype=bool)
    if losers is not None and losers.num_rows:
        loser_orders = losers.column("order").to_numpy()  # sorted by the caller
        at = np.minimum(np.searchsorted(loser_orders, rows.column("order").to_numpy()), len(loser_orders) - 1)
        duplicate = loser_orders[at] == rows.column("order").to_numpy()
        loser_details = losers.column("detail")
    split, copies = np.zeros(rows.num_rows, np.int8), np.zeros(rows.num_rows, np.int16)
    rules = spec.split_rules()
    for i, (src, key) in enumerate(zip(rows.column("source").to_pylist(), rows.column("key").to_pylist(), strict=True)):
        if reasons[i] != OK:
            continue
        if duplicate[i]:
            reasons[i], details[i] = "duplicate", loser_details[int(at[i])].as_py()
            continue
        weight = spec.sources[src].weight
        copies[i] = int(weight) + (unit_interval(spec.seed, "weight", key) < weight - int(weight))
        if copies[i] == 0:
            reasons[i], details[i] = "downsampled", f"weight {weight}"
            continue
        # Split by conversation, so copies of a row never straddle train and val.
        split[i] = rules[src] is SourceSplit.VAL or (
            rules[src] is SourceSplit.AUTO and unit_interval(spec.seed, "split", key) < spec.val_ratio)
    return rows.drop_columns(["reason", "detail"]).append_column(
        "reason", pa.array(reasons, pa.string())).append_column(
        "detail", pa.array(details, pa.string())).append_column(
        "split", pa.array(split)).append_column("copies", pa.array(copies))


# ---------------------------------------------------------------- what the driver sums


SHOWN = 2  # samples the data card shows
SUMMARY_SCHEMA = pa.schema([
    ("rejected", pa.map_(pa.string(), pa.int64())), ("accepted", pa.int64()), ("truncated", pa.int64()),
    ("samples", pa.list_(pa.int64())), ("tokens", pa.list_(pa.int64())),  # per split, copies included
    ("lengths", pa.list_(pa.int64())),  # histogram: samples (copies included) of each length
    ("shown", pa.list_(pa.list_(pa.int64()))),  # candidates for the data card: [-turns, length, order]
])


def summarize(decided: pa.Table, capacity: int) -> pa.Table:
    """One row of counts for a batch, whatever its size: rejects by reason, samples and tokens
    per split, a histogram of sample lengths, and the batch's best candidates for the data card
    (most trained runs, then shortest, then first). Sums of these are exact for the whole data."""
    ok = pc.equal(decided.column("reason"), OK)
    accepted = decided.select(["labels", "order", "sample_lens", "split", "copies", "truncated"]).filter(ok)
    labels = accepted.column("labels").combine_chunks()
    lengths = pc.list_value_length(labels).to_numpy(zero_copy_only=False)
    trained = pc.list_flatten(labels).to_numpy() != IGNORE_INDEX
    starts = np.cumsum(lengths) - lengths
    # A trained run starting anywhere but at a sample's first token: what the data card ranks by.
    run_start = np.zeros(len(trained), dtype=bool)
    run_start[1:] = trained[1:] & ~trained[:-1]
    run_start[starts] = False
    row_of_start = np.searchsorted(starts, np.flatnonzero(run_start), side="right") - 1
    turns = np.bincount(row_of_start, minlength=len(lengths))
    orders = accepted.column("order").to_numpy()
    best = np.lexsort((orders, lengths, -turns))[:SHOWN]
    # Counted per sample: a row may hold several (`reasoning: keep`), each copied by the row's weight.
    sample_lens = accepted.column("sample_lens").combine_chunks()
    per_row = pc.list_value_length(sample_lens).to_numpy(zero_copy_only=False).astype(np.int64)
    sizes = pc.list_flatten(sample_lens).to_numpy().astype(np.int64)
    split = np.repeat(accepted.column("split").to_numpy(zero_copy_only=False).astype(np.int64), per_row)
    copies = np.repeat(accepted.column("copies").to_numpy(zero_copy_only=False).astype(np.int64), per_row)
    return pa.table({
        "rejected": [list(Counter(decided.filter(pc.invert(ok)).column("reason").to_pylist()).items())],
        "accepted": [accepted.num_rows],
        "truncated": [int(pc.sum(accepted.column("truncated")).as_py() or 0)],
        "samples": [np.bincount(split, weights=copies, minlength=len(SPLITS)).astype(np.int64)],
        "tokens": [np.bincount(split, weights=copies * sizes, minlength=len(SPLITS)).astype(np.int64)],
        "lengths": [np.bincount(sizes, weights=copies, minlength=capacity + 1).astype(np.int64)],
        "shown": [[[-int(turns[i]), int(lengths[i]), int(orders[i])] for i in best]],
    }, schema=SUMMARY_SCHEMA)


@dataclass
class Tally:
    """Every batch's `summarize`, summed: the same whatever the batches were."""

    rejected: Counter = field(default_factory=Counter)
    accepted: int = 0
    truncated: int = 0
    samples: dict[str, int] = field(default_factory=dict)  # per split, copies included
    tokens: dict[str, int] = field(default_factory=dict)
    lengths: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # histogram
    shown: list[int] = field(default_factory=list)  # orders of the data card's samples


def _sum_lists(summaries: pa.Table, column: str) -> np.ndarray:
    """The element-wise sum of a column of equal-length lists."""
    values = pc.list_flatten(summaries.column(column).combine_chunks()).to_numpy()
    return values.reshape(summaries.num_rows, -1).sum(axis=0) if summaries.num_rows else values


def tally(summaries: pa.Table) -> Tally:
    out = Tally(Counter())
    for pairs in summaries.column("rejected").to_pylist():
        for reason, rows in pairs:
            out.rejected[reason] += rows
    out.accepted = int(pc.sum(summaries.column("accepted")).as_py() or 0)
    out.truncated = int(pc.sum(summaries.column("truncated")).as_py() or 0)
    out.samples, out.tokens = ({split: int(n) for split, n in zip(SPLITS, _sum_lists(summaries, c), strict=True)}
                               for c in ("samples", "tokens"))
    out.lengths = _sum_lists(summaries, "lengths")
    candidates = sorted(tuple(c) for shown in summaries.column("shown").to_pylist() for c in shown)
    out.shown = [order for _, _, order in candidates[:SHOWN]]
    return out
