import numpy as np
import pyarrow as pa
import pytest

from jobs.prepare.packing import assemble_rows, bfd_layout, layout, pack_row
from jobs.prepare.stages import list_array


def bins(row_of, slot_of):
    """Item indices per row, in their order in the row."""
    out = [[] for _ in range(int(row_of.max()) + 1)]
    for i in np.lexsort((slot_of, row_of)).tolist():
        out[row_of[i]].append(i)
    return out


def check_bins(lengths, packed, capacity):
    placed = sorted(i for b in packed for i in b)
    assert placed == list(range(len(lengths)))  # every sample exactly once, never split
    assert all(sum(lengths[i] for i in b) <= capacity for b in packed)


def test_bfd_is_best_fit():
    lengths = [6, 5, 4, 3, 2]
    packed = bins(*bfd_layout(np.array(lengths), 10))
    check_bins(lengths, packed, 10)
    # 6 opens row 0 (free 4), 5 opens row 1 (free 5), 4 best-fits row 0 exactly, 3 and 2 fill row 1.
    assert packed == [[0, 2], [1, 3, 4]]


def test_bfd_random_is_valid_deterministic_and_tight():
    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 400, size=3000)
    row_of, slot_of = bfd_layout(lengths, 512)
    check_bins(lengths.tolist(), bins(row_of, slot_of), 512)
    again = bfd_layout(lengths.copy(), 512)
    assert (again[0] == row_of).all() and (again[1] == slot_of).all()
    lower_bound = -(-int(lengths.sum()) // 512)
    assert row_of.max() + 1 <= lower_bound * 1.02


def test_bfd_rejects_oversized_samples():
    with pytest.raises(ValueError, match="sample 1 has length 11, outside"):
        bfd_layout(np.array([5, 11]), 10)


def test_no_packing_is_one_sample_per_row():
    row_of, slot_of = layout(np.array([3, 9, 1]), bfd=False, capacity=10)
    assert row_of.tolist() == [0, 1, 2] and slot_of.tolist() == [0, 0, 0]


def test_pack_row_positions_and_seq_lens():
    a = (np.array([1, 2, 3], np.int32), np.array([-100, 2, 3], np.int32))
    b = (np.array([4, 5], np.int32), np.array([-100, 5], np.int32))
    row = pack_row([a, b])
    assert row["input_ids"].tolist() == [1, 2, 3, 4, 5]
    assert row["labels"].tolist() == [-100, 2, 3, -100, 5]
    assert row["position_ids"].tolist() == [0, 1, 2, 0, 1]
    assert row["seq_lens"].tolist() == [3, 2]


def test_assembled_rows_equal_pack_row_whatever_the_order_samples_arrive_in():
    rng = np.random.default_rng(1)
    samples = [(rng.integers(0, 100, n).astype(np.int32), rng.integers(-100, 100, n).astype(np.int32))
               for n in rng.integers(1, 60, size=200)]
    row_of, slot_of = bfd_layout(np.array([len(ids) for ids, _ in samples]), 128)
    shuffled = rng.permutation(len(samples))
    table = pa.table({"row": row_of[shuffled], "slot": slot_of[shuffled],
                      "input_ids": list_array([samples[i][0] for i in shuffled]),
                      "labels": list_array([samples[i][1] for i in shuffled])})
    rows = assemble_rows(table)
    expected = [pack_row([samples[i] for i in b]) for b in bins(row_of, slot_of)]
    assert rows.num_rows == len(expected)
    for col in ("input_ids", "labels", "position_ids", "seq_lens"):
        assert rows.column(col).to_pylist() == [r[col].tolist() for r in expected], col


def test_packed_rows_are_written_in_a_seeded_random_order_not_longest_first(tmp_path):
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    from jobs.prepare.outputs import SAMPLES_SCHEMA, write_part

    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 60, 400)
    ids = [np.full(n, i, np.int32) for i, n in enumerate(lengths)]
    samples = pa.table({"group": np.zeros(len(ids), np.int64), "order": np.arange(len(ids), dtype=np.int64),
                        "input_ids": list_array(ids), "labels": list_array(ids)}, schema=SAMPLES_SCHEMA)

    def written(seed, name):
        write_part(samples, pafs.LocalFileSystem(), str(tmp_path / name), bfd=True, capacity=64, seed=seed)
        return pq.read_table(tmp_path / name / "train/part-00000.parquet")

    first, again, other = written(1, "a"), written(1, "b"), written(2, "c")
    assert first.equals(again)
    rows = [sorted(r) for r in first.column("seq_lens").to_pylist()]
    assert sorted(map(tuple, rows)) == sorted(map(tuple, (sorted(r) for r in other.column("seq_lens").to_pylist())))
    assert first.column("seq_lens").to_pylist() != other.column("seq_lens").to_pylist()
    # Best-fit-decreasing opens rows longest sample first: written as laid out, the first rows would
    # hold the longest samples.
    firsts = [max(r) for r in rows]
    assert firsts != sorted(firsts, reverse=True)
