"""Pure: the order training reads its rows in, a fresh seeded one every epoch, datasets interleaved
by weight across the whole epoch.

Rows are numbered across the datasets one after the other (dataset k's rows start at the sum of
the sizes before it). An epoch takes `int(size * weight)` rows of each dataset: every row once per
whole unit of weight, plus a seeded sample without replacement for the fraction (a new sample
each epoch), so weights below and above 1 keep their meaning and the count is exact. Each
dataset's rows are shuffled, then the datasets are interleaved evenly: the i-th of a dataset's m
rows goes at position (i + jitter) / m of the epoch, so in any stretch of N rows each dataset
holds its share of N, give or take 1 + k x its share rows for k datasets (two rows for two equal
datasets), from the first step to the last. Worker r of w reads
positions r, r + w, r + 2w, ...: every optimizer step's global batch is a contiguous stretch. An
epoch whose rows do not fill its last step is completed with its own first rows (as PyTorch's
DistributedSampler pads), so every row trains every epoch and every step is full.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# A training split streamed from storage (too large to hold) is read with its blocks in a seeded
# random order and shuffled by each worker within a buffer of this many packed rows, with a seed
# that changes every epoch: rows further apart than the buffer in block order keep their order.
SHUFFLE_BUFFER_ROWS = 4096


def epoch_rows(sizes: Sequence[int], weights: Sequence[float]) -> int:
    """Rows one epoch reads, all datasets together."""
    return sum(int(size * weight) for size, weight in zip(sizes, weights, strict=True))


def epoch_order(sizes: Sequence[int], weights: Sequence[float], seed: int, epoch: int) -> np.ndarray:
    """Global row numbers in the order this epoch reads them (see the module docstring)."""
    rng = np.random.default_rng([seed, epoch])
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    rows, keys = [], []
    for k, (size, weight) in enumerate(zip(sizes, weights, strict=True)):
        take = int(size * weight)
        if take == 0:
            continue
        whole, extra = divmod(take, size)
        picked = np.concatenate([np.tile(np.arange(size), whole), rng.choice(size, extra, replace=False)])
        rows.append(offsets[k] + rng.permutation(picked))
        keys.append((np.arange(take) + rng.random()) / take)
    if not rows:
        return np.zeros(0, np.int64)
    rows_all, keys_all = np.concatenate(rows), np.concatenate(keys)
    return rows_all[np.argsort(keys_all, kind="stable")].astype(np.int64)


def steps_per_epoch(rows: int, rows_per_step: int) -> int:
    return -(-rows // rows_per_step)


def worker_rows(order: np.ndarray, rank: int, world: int, rows_per_step: int) -> np.ndarray:
    """This worker's rows of an epoch: every `world`-th from `rank`, after the order is completed
    to whole steps of `rows_per_step` rows (all workers together) with its own first rows."""
    if len(order) == 0:
        return order
    padded = steps_per_epoch(len(order), rows_per_step) * rows_per_step
    order = np.resize(order, padded)  # repeats the order from its start
    return order[rank::world]
