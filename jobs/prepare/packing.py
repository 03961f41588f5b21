"""Pure: best-fit-decreasing packing of samples into rows of at most `capacity` tokens.

Every sample lands whole in exactly one row (none is split). Each packed row stores
`position_ids` restarting at 0 for each sample and `seq_lens`, so the trainer can keep
attention within samples.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def bfd_bins(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into bins; deterministic for equal input.

    Items go longest first (ties by index) into the bin whose free space is the smallest that
    still fits. Free-space classes are tracked in a bitmask, so finding the best bin is a shift
    and a lowest-set-bit, not a scan over bins.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    by_free: dict[int, list[int]] = {}  # free space -> bins with exactly that much free
    nonempty = 0  # bit f set <=> by_free[f] is non-empty
    for i in order:
        size = lengths[i]
        if size > capacity or size <= 0:
            raise ValueError(f"sample {i} has length {size}, outside 1..{capacity}")
        fitting = nonempty >> size
        if fitting:
            free = size + (fitting & -fitting).bit_length() - 1
            stack = by_free[free]
            b = stack.pop()
            if not stack:
                nonempty &= ~(1 << free)
        else:
            free = capacity
            b = len(bins)
            bins.append([])
        bins[b].append(i)
        left = free - size
        if left > 0:
            by_free.setdefault(left, []).append(b)
            nonempty |= 1 << left
    return bins


def single_bins(n: int) -> list[list[int]]:
    """No packing: one sample per row."""
    return [[i] for i in range(n)]


def pack_row(samples: Sequence[tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
    """Concatenate (input_ids, labels) samples into one row with position_ids and seq_lens."""
    return {
        "input_ids": np.concatenate([ids for ids, _ in samples]),
        "labels": np.concatenate([labels for _, labels in samples]),
        "position_ids": np.concatenate([np.arange(len(ids), dtype=np.int32) for ids, _ in samples]),
        "seq_lens": np.asarray([len(ids) for ids, _ in samples], dtype=np.int32),
    }


def fill_ratio(row_lengths: Sequence[int], capacity: int) -> float:
    """Share of token slots (rows x capacity) holding real tokens."""
    return float(sum(row_lengths)) / (len(row_lengths) * capacity) if row_lengths else 0.0


def pack_samples(samples: Sequence[tuple[np.ndarray, np.ndarray]], bfd: bool, capacity: int) -> list[dict[str, np.ndarray]]:
    """Lay samples into rows: best-fit-decreasing into rows of `capacity`, or one per row."""
    bins = bfd_bins([len(ids) for ids, _ in samples], capacity) if bfd else single_bins(len(samples))
    return [pack_row([samples[i] for i in b]) for b in bins]
