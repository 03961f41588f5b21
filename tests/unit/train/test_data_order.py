"""The order training reads rows in: a fresh seeded permutation every epoch, datasets interleaved
by weight across the whole epoch, read by the workers as contiguous stretches."""

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jobs.train.data_order import epoch_order, epoch_rows, steps_per_epoch, worker_rows
from jobs.train.loop import held_batches


def dataset_of(rows: np.ndarray, sizes) -> np.ndarray:
    return np.searchsorted(np.cumsum(sizes), rows, side="right")


def test_every_epoch_is_a_fresh_seeded_permutation():
    first, second = epoch_order([50, 30], [1, 1], seed=7, epoch=0), epoch_order([50, 30], [1, 1], seed=7, epoch=1)
    assert sorted(first) == sorted(second) == list(range(80))  # every row once
    assert not np.array_equal(first, second)
    assert np.array_equal(first, epoch_order([50, 30], [1, 1], seed=7, epoch=0))  # resumable: same seed, same order
    assert not np.array_equal(first, epoch_order([50, 30], [1, 1], seed=8, epoch=0))
    assert not np.array_equal(first, np.sort(first))


def test_weights_below_and_above_one_take_exact_counts_and_a_new_sample_each_epoch():
    sizes, weights = [40, 40], [2.5, 0.25]
    orders = [epoch_order(sizes, weights, seed=1, epoch=e) for e in range(3)]
    for order in orders:
        assert len(order) == epoch_rows(sizes, weights) == 100 + 10
        a, b = order[order < 40], order[order >= 40]
        counts = np.bincount(a, minlength=40)
        assert set(counts) == {2, 3} and (counts == 3).sum() == 20  # every row twice, half of them a third time
        assert len(set(b)) == len(b) == 10  # a sample without replacement
    assert len({tuple(sorted(o[o >= 40])) for o in orders}) > 1


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(1, 300), min_size=2, max_size=4),
       weights=st.lists(st.sampled_from([0.3, 0.5, 1.0, 1.5, 2.0, 3.0]), min_size=4, max_size=4),
       seed=st.integers(0, 2**31), window=st.integers(8, 64))
def test_every_stretch_of_rows_holds_each_dataset_in_proportion(sizes, weights, seed, window):
    weights = weights[:len(sizes)]
    order = epoch_order(sizes, weights, seed, epoch=3)
    which = dataset_of(order, sizes)
    share = np.array([int(n * w) for n, w in zip(sizes, weights, strict=True)]) / len(order)
    for start in range(0, len(order) - window + 1, max(1, window // 2)):
        counts = np.bincount(which[start:start + window], minlength=len(sizes))
        # Each dataset's keys are evenly spaced: a stretch is off its share by at most 1 + k x share (k datasets).
        assert np.all(np.abs(counts - window * share) <= 1 + len(sizes) * share + 1e-9), (start, counts, window * share)


def test_workers_read_whole_steps_of_every_row_in_order():
    order = epoch_order([33, 20], [1, 1], seed=3, epoch=0)  # 53 rows; steps of 3 workers x 2 rows
    parts = [worker_rows(order, rank, 3, rows_per_step=6) for rank in range(3)]
    assert {len(p) for p in parts} == {18}  # 9 steps: the last completed with the epoch's first row
    interleaved = np.stack(parts, axis=1).ravel()  # step by step, in order
    assert np.array_equal(interleaved, np.concatenate([order, order[:1]]))
    assert set(interleaved) == set(range(53))  # every row trains every epoch


def test_what_workers_consume_interleaves_two_datasets_from_the_first_step():
    """The mixture the issue measured: two datasets of weight 1, listed A then B. Workers read
    the held table as training does; every window of 8 rows of the global stream (what one
    optimizer step of 2 workers x 2 rows x 2 micro-batches sees) holds both in proportion."""
    sizes = [220, 220]
    table = pa.table({"source": np.repeat([0, 1], sizes), "row": np.arange(440)})
    for epoch in range(2):
        per_worker = [list(held_batches(table, sizes, [1.0, 1.0], 42, epoch, 0, rank, 2, micro=2))
                      for rank in range(2)]
        steps = [np.concatenate([b["source"] for rank in range(2) for b in per_worker[rank][i:i + 2]])
                 for i in range(0, len(per_worker[0]) - 1, 2)]
        assert all(abs(int(step.sum()) - 4) <= 2 for step in steps)  # B's share of each step's 8 rows: 4 +- 2
        consumed = np.concatenate([b["row"] for batches in per_worker for b in batches])
        assert sorted(consumed) == list(range(440))


def test_an_epoch_is_whole_steps_over_every_row():
    assert [steps_per_epoch(rows, 8) for rows in (1, 8, 9, 84)] == [1, 1, 2, 11]
    table = pa.table({"row": np.arange(84)})
    batches = [list(held_batches(table, [84], [1.0], 0, 0, 0, rank, 2, micro=2, accum=2)) for rank in range(2)]
    assert {len(b) for b in batches} == {22}  # 11 steps of 2 micro-batches on each worker
    assert set(np.concatenate([b["row"] for worker in batches for b in worker])) == set(range(84))


def test_resuming_mid_epoch_reads_exactly_the_rest():
    table = pa.table({"row": np.arange(100)})
    whole = [b["row"].tolist() for b in held_batches(table, [100], [1.0], 5, 1, 0, 0, 1, micro=4)]
    rest = [b["row"].tolist() for b in held_batches(table, [100], [1.0], 5, 1, 7, 0, 1, micro=4)]
    assert rest == whole[7:]


@pytest.mark.parametrize("weights", [[1.0], [0.5, 2.0]])
def test_an_empty_dataset_adds_nothing(weights):
    sizes = [0] * (len(weights) - 1) + [10]
    assert len(epoch_order(sizes, weights, 0, 0)) == epoch_rows(sizes, weights)
