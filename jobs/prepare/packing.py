"""Pure: best-fit-decreasing packing of samples into rows of at most `capacity` tokens.

Every sample lands whole in exactly one row (none is split). Each packed row stores
`position_ids` restarting at 0 for each sample and `seq_lens`, so the trainer can keep
attention within samples.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def bfd_layout(lengths: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """Best-fit-decreasing: the row of each item and its place in that row; deterministic.

    Items go longest first (ties by index) into the row whose free space is the smallest that
    still fits, appended after the items already there. Free-space classes are tracked in a
    bitmask, so finding the best row is a shift and a lowest-set-bit, not a scan over rows. Only
    lengths go in: the driver lays out millions of samples without holding a token of them.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and (lengths.max() > capacity or lengths.min() <= 0):
        bad = int(np.flatnonzero((lengths > capacity) | (lengths <= 0))[0])
        raise ValueError(f"sample {bad} has length {int(lengths[bad])}, outside 1..{capacity}")
    row_of = np.empty(len(lengths), dtype=np.int32)
    slot_of = np.empty(len(lengths), dtype=np.int32)
    filled: list[int] = []  # items per row so far
    by_free: dict[int, list[int]] = {}  # free space -> rows with exactly that much free
    nonempty = 0  # bit f set <=> by_free[f] is non-empty
    order = np.lexsort((np.arange(len(lengths)), -lengths))
    for i, size in _in_chunks(order, lengths[order]):
        fitting = nonempty >> size
        if fitting:
            free = size + (fitting & -fitting).bit_length() - 1
            stack = by_free[free]
            row = stack.pop()
            if not stack:
                nonempty &= ~(1 << free)
        else:
            free, row = capacity, len(filled)
            filled.append(0)
        row_of[i], slot_of[i] = row, filled[row]
        filled[row] += 1
        if (left := free - size) > 0:
            by_free.setdefault(left, []).append(row)
            nonempty |= 1 << left
    return row_of, slot_of


def _in_chunks(*arrays: np.ndarray, chunk: int = 1 << 16):
    """Zip arrays as Python ints a chunk at a time: a list of every item would cost ~36 bytes each."""
    for start in range(0, len(arrays[0]), chunk):
        yield from zip(*(a[start:start + chunk].tolist() for a in arrays), strict=True)


def layout(lengths: np.ndarray, bfd: bool, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """Where each sample goes: best-fit-decreasing into rows of `capacity`, or one per row."""
    if bfd:
        return bfd_layout(lengths, capacity)
    return np.arange(len(lengths), dtype=np.int32), np.zeros(len(lengths), dtype=np.int32)


def pack_row(samples: Sequence[tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
    """Concatenate (input_ids, labels) samples into one row with position_ids and seq_lens."""
    return {
        "input_ids": np.concatenate([ids for ids, _ in samples]),
        "labels": np.concatenate([labels for _, labels in samples]),
        "position_ids": np.concatenate([np.arange(len(ids), dtype=np.int32) for ids, _ in samples]),
        "seq_lens": np.asarray([len(ids) for ids, _ in samples], dtype=np.int32),
    }


def assemble_rows(samples: pa.Table) -> pa.Table:
    """Packed rows (`TOKEN_COLUMNS`) from samples tagged with their `row` and `slot`: the samples
    of a row are concatenated in slot order, rows in row order, without a loop over rows."""
    samples = samples.take(pc.sort_indices(samples, sort_keys=[("row", "ascending"), ("slot", "ascending")]))
    ids, labels = samples.column("input_ids").combine_chunks(), samples.column("labels").combine_chunks()
    lengths = pc.list_value_length(ids).to_numpy(zero_copy_only=False).astype(np.int64)
    rows = samples.column("row").to_numpy()
    row_starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]]) if len(rows) else np.zeros(0, np.int64)
    sample_offsets = np.r_[row_starts, len(rows)]  # samples of row r: sample_offsets[r]:sample_offsets[r + 1]
    token_offsets = np.r_[0, np.cumsum(lengths)][sample_offsets]
    total = int(lengths.sum())
    positions = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(lengths) - lengths, lengths)

    def column(values: np.ndarray, offsets: np.ndarray) -> pa.Array:
        return offsets_list(offsets, pa.array(values.astype(np.int32, copy=False)))

    return pa.table({
        "input_ids": column(pc.list_flatten(ids).to_numpy(), token_offsets),
        "labels": column(pc.list_flatten(labels).to_numpy(), token_offsets),
        "position_ids": column(positions, token_offsets),
        "seq_lens": column(lengths, sample_offsets),
    })


def offsets_list(offsets: np.ndarray, values: pa.Array) -> pa.Array:
    """A list column from offsets, 64-bit only past 2^31 values."""
    if len(offsets) and offsets[-1] >= 2**31:
        return pa.LargeListArray.from_arrays(pa.array(offsets.astype(np.int64)), values)
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), values)
