"""The global steps as pure batch functions, on hand-made tokenized rows (no Ray needed): each
decision is the same whichever batches the rows arrive in."""

import numpy as np
import pyarrow as pa
import pytest

from jobs.prepare.manifest import percentiles
from jobs.prepare.rows import LocalRows
from jobs.prepare.selection import (
    LOSERS_SCHEMA,
    decide,
    duplicate_losers,
    file_row_counts,
    row_limits,
    signatures,
    summarize,
    tally,
)
from jobs.prepare.spec import load_spec
from jobs.prepare.stages import list_array, row_order


def rows_table(rows):
    """rows: (source, file, row, key, reason); every usable row gets 3 tokens, 2 trained."""
    ids = [np.array([1, 2, 3], np.int32) if r[4] == "" else np.empty(0, np.int32) for r in rows]
    labels = [np.array([-100, 2, 3], np.int32) if r[4] == "" else np.empty(0, np.int32) for r in rows]
    return pa.table({
        "source": pa.array([r[0] for r in rows], pa.int64()),
        "order": pa.array([row_order(r[1], r[2]) for r in rows], pa.int64()),
        "path": [f"f{r[1]}" for r in rows], "line": pa.array([r[2] + 1 for r in rows], pa.int64()),
        "raw": ["{}"] * len(rows), "key": [r[3] for r in rows],
        "reason": [r[4] for r in rows], "detail": [""] * len(rows),
        "input_ids": list_array(ids), "labels": list_array(labels), "sample_lens": sample_lens(ids),
        "truncated": [False] * len(rows),
    })


def sample_lens(ids):
    """One sample per usable row, none for a rejected one."""
    return list_array([np.array([len(i)] if len(i) else [], np.int32) for i in ids])


def spec(**source_options):
    return load_spec({"name": "t", "sources": [{"uri": "a.jsonl"}, {"uri": "b.jsonl", **source_options}],
                      "tokenizer": "tok", "output": "out", "val_ratio": 0})


def losers_of(table, buckets=1, limits=None):
    sigs = signatures(table, limits, buckets)
    return LocalRows(sigs).per_group("bucket", duplicate_losers, LOSERS_SCHEMA).sort_by("order")


def run(s, table, buckets=1, limits=None):
    decided = decide(table, s, limits, losers_of(table, buckets, limits))
    return decided, tally(summarize(decided, capacity=16))


def hexkey(n):
    return f"{n:032x}"


def test_duplicates_keep_the_first_in_order_and_rejects_keep_their_reason():
    table = rows_table([(0, 0, 1, hexkey(7), ""), (0, 0, 0, hexkey(7), ""), (0, 0, 2, "", "invalid_json")])
    decided, totals = run(spec(), table)
    assert totals.accepted == 1 and totals.samples["train"] == 1
    assert decided.column("reason").to_pylist() == ["duplicate", "", "invalid_json"]
    assert decided.column("detail")[0].as_py() == "same as f0:1"
    assert dict(totals.rejected) == {"duplicate": 1, "invalid_json": 1}


def test_a_rejected_row_claims_no_key():
    table = rows_table([(0, 0, 0, hexkey(1), "too_long"), (0, 0, 1, hexkey(1), "")])
    decided, _ = run(spec(), table)
    assert decided.column("reason").to_pylist() == ["too_long", ""]


def test_decisions_do_not_depend_on_batches_or_buckets():
    rng = np.random.default_rng(0)
    rows = [(int(f > 2), f, r, hexkey(int(rng.integers(0, 300))), "" if rng.random() > 0.1 else "empty")
            for f in range(5) for r in range(200)]
    table = rows_table([rows[i] for i in rng.permutation(len(rows))])
    s = spec(weight=1.5)
    whole, totals = run(s, table)
    cut = np.sort(rng.choice(np.arange(1, table.num_rows), 6, replace=False))
    batches = [table.slice(a, b - a) for a, b in zip([0, *cut], [*cut, table.num_rows], strict=True)]
    losers = losers_of(table, buckets=7)
    assert losers.equals(losers_of(table, buckets=1))
    pieces = [decide(b, s, None, losers) for b in batches]
    by_order = pa.concat_tables(pieces).sort_by("order")
    assert by_order.select(["order", "reason", "detail", "split", "copies"]).equals(
        whole.sort_by("order").select(["order", "reason", "detail", "split", "copies"]))
    again = tally(pa.concat_tables([summarize(p, capacity=16) for p in pieces]))
    assert (again.rejected, again.accepted, again.samples, again.tokens, again.shown) == (
        totals.rejected, totals.accepted, totals.samples, totals.tokens, totals.shown)
    assert (again.lengths == totals.lengths).all()


def test_weights_copy_and_downsample_deterministically():
    table = rows_table([(1, 1, i, hexkey(i), "") for i in range(400)])
    _, up = run(spec(weight=2.0), table)
    assert up.accepted == 400 and up.samples["train"] == 800 and up.tokens["train"] == 2400
    decided, down = run(spec(weight=0.25), table)
    kept = down.samples["train"]
    assert 60 < kept < 140 and kept + down.rejected["downsampled"] == 400
    again, _ = run(spec(weight=0.25), table)
    assert again.column("reason").equals(decided.column("reason"))


def test_split_is_by_conversation_and_stable():
    table = rows_table([(0, 0, i, hexkey(i), "") for i in range(1000)])
    s = load_spec({"name": "t", "sources": [{"uri": "a.jsonl", "weight": 3.0}], "tokenizer": "tok",
                   "output": "out", "val_ratio": 0.1})
    _, totals = run(s, table)
    val, train = totals.samples["val"], totals.samples["train"]
    assert 60 < val / 3 < 140  # ~10% of conversations, each with its 3 copies
    assert val % 3 == 0 and train % 3 == 0


def test_max_samples_keeps_the_first_rows_of_a_source_in_file_order():
    table = rows_table([(1, 2, 0, hexkey(1), ""), (1, 1, 1, hexkey(2), ""), (1, 1, 0, hexkey(3), ""),
                        (0, 0, 0, hexkey(4), "")])
    counts = file_row_counts(table)
    per_file = np.zeros(3, np.int64)
    per_file[counts.column("file").to_numpy()] = counts.column("rows").to_numpy()
    limits, skipped = row_limits(spec(max_samples=2), np.array([0, 1, 1]), per_file)
    assert limits.tolist() == [1, 2, 0] and skipped == {1: 1}
    decided, totals = run(spec(max_samples=2), table, limits=limits)
    assert sorted(decided.column("key").to_pylist()) == [hexkey(2), hexkey(3), hexkey(4)]
    assert totals.accepted == 3


@pytest.mark.parametrize("labels, shown", [
    ([-100, 2, 3], [2, 0]),  # one trained run each: the shortest first, then the first in order
    ([1, 2, 3], [2, 0]),  # trained from the first token: no run counted
    ([-100, 2, -100, 4], [1, 2]),  # two runs: shown first
])
def test_the_data_card_shows_the_samples_with_the_most_trained_runs(labels, shown):
    table = rows_table([(0, 0, 0, hexkey(1), ""), (0, 0, 1, hexkey(2), ""), (0, 0, 2, hexkey(3), "")])
    ids = [np.arange(n, dtype=np.int32) for n in (3, len(labels), 2)]
    table = table.drop_columns(["input_ids", "labels", "sample_lens"]).append_column(
        "input_ids", list_array(ids)).append_column(
        "labels", list_array([np.array([-100, 2, 3], np.int32), np.array(labels, np.int32),
                              np.array([-100, 5], np.int32)])).append_column("sample_lens", sample_lens(ids))
    _, totals = run(spec(), table)
    assert totals.shown == [row_order(0, row) for row in shown]


def test_length_percentiles_from_the_histogram_equal_numpys():
    rng = np.random.default_rng(3)
    lengths = rng.integers(1, 500, size=777)
    assert percentiles(np.bincount(lengths, minlength=512)) == {
        **{f"p{q}": int(np.percentile(lengths, q, method="nearest")) for q in (50, 90, 99)},
        "min": int(lengths.min()), "max": int(lengths.max())}


def test_a_source_can_be_a_split_of_its_own():
    """`split: val` holds a source out whole; an `auto` source beside it trains whole; `train`
    never gives val a row, while `auto` (with no `val` source) gives it the val_ratio share."""
    table = rows_table([(0, 0, i, hexkey(i), "") for i in range(300)] +
                       [(1, 1, i, hexkey(1000 + i), "") for i in range(50)])

    def splits(*sources, val_ratio=0.2):
        s = load_spec({"name": "t", "tokenizer": "tok", "output": "out", "val_ratio": val_ratio,
                       "sources": [{"uri": f"{n}.jsonl", **options} for n, options in zip("ab", sources, strict=True)]})
        decided, _ = run(s, table)
        return {src: sorted(set(split for sr, split in zip(decided.column("source").to_pylist(),
                                                            decided.column("split").to_pylist(), strict=True)
                                if sr == src)) for src in (0, 1)}

    assert splits({}, {"split": "val"}) == {0: [0], 1: [1]}
    assert splits({"split": "train"}, {"split": "val"}) == {0: [0], 1: [1]}
    assert splits({"split": "train"}, {}) == {0: [0], 1: [0, 1]}
    assert splits({}, {}, val_ratio=0) == {0: [0], 1: [0]}
