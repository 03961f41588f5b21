import numpy as np
import pytest

from jobs.prepare.packing import bfd_bins, fill_ratio, pack_row


def check_bins(lengths, bins, capacity):
    placed = sorted(i for b in bins for i in b)
    assert placed == list(range(len(lengths)))  # every sample exactly once, never split
    assert all(sum(lengths[i] for i in b) <= capacity for b in bins)


def test_bfd_is_best_fit():
    lengths = [6, 5, 4, 3, 2]
    bins = bfd_bins(lengths, 10)
    check_bins(lengths, bins, 10)
    # 6 opens bin 0 (free 4), 5 opens bin 1 (free 5), 4 best-fits bin 0 exactly, 3 and 2 fill bin 1.
    assert bins == [[0, 2], [1, 3, 4]]


def test_bfd_random_is_valid_deterministic_and_tight():
    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 400, size=3000).tolist()
    bins = bfd_bins(lengths, 512)
    check_bins(lengths, bins, 512)
    assert bins == bfd_bins(list(lengths), 512)
    lower_bound = -(-sum(lengths) // 512)
    assert len(bins) <= lower_bound * 1.02


def test_bfd_rejects_oversized_samples():
    with pytest.raises(ValueError, match="outside"):
        bfd_bins([5, 11], 10)


def test_pack_row_positions_and_seq_lens():
    a = (np.array([1, 2, 3], np.int32), np.array([-100, 2, 3], np.int32))
    b = (np.array([4, 5], np.int32), np.array([-100, 5], np.int32))
    row = pack_row([a, b])
    assert row["input_ids"].tolist() == [1, 2, 3, 4, 5]
    assert row["labels"].tolist() == [-100, 2, 3, -100, 5]
    assert row["position_ids"].tolist() == [0, 1, 2, 0, 1]
    assert row["seq_lens"].tolist() == [3, 2]
    assert fill_ratio([5, 8], 8) == pytest.approx(13 / 16)
