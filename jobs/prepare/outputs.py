"""Pure (but for the writes): packing and writing a prepared dataset. Samples go to partitions of
a split by a hash of their order (`emit_samples`); each partition is packed, assembled and
written as one file by one task (`write_part`), the rejects per input file (`reject_rows`,
`write_rejects`), in parallel on Ray or in turn in one process. Partition counts and file names
depend only on the data, never on how it was batched or on the cluster.
The manifest (`jobs.prepare.manifest`) is written after these, last."""

from __future__ import annotations

import json
import posixpath
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from jobs.common import storage
from jobs.common.contract import IGNORE_INDEX, REJECTS_DIR, SPLITS
from jobs.prepare.packing import assemble_rows, layout, offsets_list
from jobs.prepare.selection import file_of
from jobs.prepare.stages import OK

SPLIT_BITS = 32  # an output file's group: split index, then its partition
# Samples of a split are packed in partitions of about this many tokens, each by one task and into
# one Parquet file: the assembling task holds ~100 MB, and packing needs no list of every sample.
TOKENS_PER_PARTITION = 8 << 20


def partition_counts(tokens: dict[str, int]) -> list[int]:
    """Partitions per split: a function of the data alone, never of the cluster."""
    return [max(1, -(-tokens[split] // TOKENS_PER_PARTITION)) for split in SPLITS]


def partition_of(orders: np.ndarray, partitions: np.ndarray) -> np.ndarray:
    """A row's partition: its order scrambled (Fibonacci hashing), so partitions mix every file."""
    mixed = (orders.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(33)
    return (mixed % partitions.astype(np.uint64)).astype(np.int64)


SAMPLES_SCHEMA = pa.schema([("group", pa.int64()), ("order", pa.int64()),
                            ("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32()))])


def emit_samples(decided: pa.Table, partitions: list[int]) -> pa.Table:
    """Every accepted row as its samples (sampling-weight copies), each tagged with its output
    file (`group`: split, partition)."""
    accepted = decided.select(["split", "order", "copies", "sample_lens", "input_ids", "labels"]).filter(
        pc.equal(decided.column("reason"), OK))
    split = accepted.column("split").to_numpy(zero_copy_only=False).astype(np.int64)
    orders = accepted.column("order").to_numpy()
    copies = accepted.column("copies").to_numpy(zero_copy_only=False).astype(np.int64)
    group = (split << SPLIT_BITS) | partition_of(orders, np.asarray(partitions)[split])
    # A row's samples (several under `reasoning: keep`) become list entries of their own.
    sample_lens = accepted.column("sample_lens").combine_chunks()
    row_of = np.repeat(np.arange(accepted.num_rows), pc.list_value_length(sample_lens).to_numpy(zero_copy_only=False))
    offsets = np.r_[0, np.cumsum(pc.list_flatten(sample_lens).to_numpy().astype(np.int64))]
    samples = pa.table({name: offsets_list(offsets, pc.list_flatten(accepted.column(name).combine_chunks()))
                        for name in ("input_ids", "labels")})
    take = np.repeat(np.arange(len(row_of)), copies[row_of])
    # Accepted rows have at least one copy: as many copies as samples means one each, and no copying.
    tokens = samples if len(take) == len(row_of) else samples.take(take)
    return pa.table({"group": group[row_of][take], "order": orders[row_of][take],
                     "input_ids": tokens.column("input_ids"), "labels": tokens.column("labels")}, schema=SAMPLES_SCHEMA)


def write_part(samples: pa.Table, fs: Any, base: str, bfd: bool, capacity: int, seed: int) -> pa.Table:
    """Pack one partition's samples (in order, best-fit-decreasing or one per row), assemble its
    rows and write them as `split/part-NNNNN.parquet`, in a seeded random order: packing lays
    rows out longest first, and nothing downstream may depend on that."""
    group = samples.column("group")[0].as_py()
    split, part = SPLITS[group >> SPLIT_BITS], group & ((1 << SPLIT_BITS) - 1)
    samples = samples.take(pc.sort_indices(samples, sort_keys=[("order", "ascending")]))
    lengths = pc.list_value_length(samples.column("input_ids").combine_chunks()).to_numpy(zero_copy_only=False)
    row, slot = layout(lengths, bfd, capacity)
    permuted = np.random.default_rng([seed, group]).permutation(int(row.max()) + 1 if len(row) else 0)
    table = assemble_rows(samples.append_column("row", pa.array(permuted[row].astype(np.int32)))
                          .append_column("slot", pa.array(slot)))
    name = f"{split}/part-{part:05d}.parquet"
    fs.create_dir(posixpath.join(base, split), recursive=True)
    pq.write_table(table, posixpath.join(base, name), filesystem=fs)
    return part_summary(split, name, table)


PARTS_SCHEMA = pa.schema([("split", pa.string()), ("name", pa.string()), ("rows", pa.int64()),
                          ("samples", pa.int64()), ("tokens", pa.int64()), ("trainable", pa.int64()),
                          ("zero_trainable_rows", pa.int64())])


def part_summary(split: str, name: str, rows: pa.Table) -> pa.Table:
    """What the manifest needs of one file of packed rows."""
    labels = rows.column("labels").combine_chunks()
    trained = pc.list_flatten(labels).to_numpy() != IGNORE_INDEX
    lengths = pc.list_value_length(labels).to_numpy(zero_copy_only=False).astype(np.int64)
    per_row = np.add.reduceat(trained, np.cumsum(lengths) - lengths) if len(lengths) else np.zeros(0, np.int64)
    samples = int(pc.sum(pc.list_value_length(rows.column("seq_lens").combine_chunks())).as_py() or 0)
    return pa.table({"split": [split], "name": [name], "rows": [rows.num_rows], "samples": [samples],
                     "tokens": [int(lengths.sum())], "trainable": [int(trained.sum())],
                     "zero_trainable_rows": [int((per_row == 0).sum())]}, schema=PARTS_SCHEMA)


REJECTS_SCHEMA = pa.schema([("file", pa.int64()), ("order", pa.int64()), ("source", pa.string()),
                            ("path", pa.string()), ("line", pa.int64()), ("reason", pa.string()),
                            ("detail", pa.string()), ("raw", pa.string())])


def reject_rows(decided: pa.Table, uris: list[str]) -> pa.Table:
    """Each rejected row with where it came from and its raw text."""
    rows = decided.filter(pc.not_equal(decided.column("reason"), OK))
    orders = rows.column("order").to_numpy().astype(np.int64)
    return pa.table({"file": file_of(orders), "order": orders,
                     "source": [uris[s] for s in rows.column("source").to_pylist()],
                     **{c: rows.column(c) for c in ("path", "line", "reason", "detail", "raw")}}, schema=REJECTS_SCHEMA)


REJECT_FILES_SCHEMA = pa.schema([("name", pa.string()), ("rows", pa.int64())])


def write_rejects(rejects: pa.Table, fs: Any, base: str) -> pa.Table:
    """The rejects of one input file, in line order, as `rejects/part-NNNNN.jsonl` (the file's
    index): the parts in name order list every reject in (source, file, line) order."""
    rejects = rejects.take(pc.sort_indices(rejects, sort_keys=[("order", "ascending")]))
    fields = ("source", "path", "line", "reason", "detail", "raw")
    body = "".join(json.dumps(dict(zip(fields, values, strict=True)), ensure_ascii=False) + "\n"
                   for values in zip(*(rejects.column(f).to_pylist() for f in fields), strict=True))
    name = f"{REJECTS_DIR}/part-{rejects.column('file')[0].as_py():05d}.jsonl"
    storage.write_bytes(fs, posixpath.join(base, name), body.encode())
    return pa.table({"name": [name], "rows": [rejects.num_rows]}, schema=REJECT_FILES_SCHEMA)


def pick_rows(decided: pa.Table, orders: list[int]) -> pa.Table:
    """The tokens of the rows with these orders (the data card's examples)."""
    rows = decided.filter(pc.is_in(decided.column("order"), pa.array(orders, pa.int64())))
    return rows.select(["order", "input_ids", "labels"])
