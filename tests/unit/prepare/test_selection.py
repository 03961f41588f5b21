"""Driver-side global steps on a hand-made table of parsed + tokenized rows (no Ray needed)."""

import numpy as np
import pyarrow as pa

from jobs.prepare.selection import limit_samples, row_order, select_samples
from jobs.prepare.spec import load_spec
from jobs.prepare.stages import list_array


def rows_table(rows):
    """rows: (source, path, line, key, reason); every usable row gets 3 tokens, 2 trained."""
    ids = [np.array([1, 2, 3], np.int32) if r[4] == "" else np.empty(0, np.int32) for r in rows]
    labels = [np.array([-100, 2, 3], np.int32) if r[4] == "" else np.empty(0, np.int32) for r in rows]
    return pa.table({
        "source": pa.array([r[0] for r in rows], pa.int64()),
        "path": [r[1] for r in rows], "line": pa.array([r[2] for r in rows], pa.int64()),
        "raw": ["{}"] * len(rows), "key": [r[3] for r in rows],
        "reason": [r[4] for r in rows], "detail": [""] * len(rows),
        "input_ids": list_array(ids), "labels": list_array(labels), "truncated": [False] * len(rows),
    })


def spec(**source_options):
    return load_spec({"name": "t", "sources": [{"uri": "a.jsonl"}, {"uri": "b.jsonl", **source_options}],
                      "tokenizer": "tok", "output": "out", "val_ratio": 0})


def test_order_is_source_file_line_whatever_the_arrival_order():
    table = rows_table([(1, "b", 2, "k4", ""), (0, "a2", 1, "k3", ""), (0, "a1", 9, "k2", ""), (0, "a1", 3, "k1", "")])
    assert [table["key"][int(i)].as_py() for i in row_order(table)] == ["k1", "k2", "k3", "k4"]


def test_duplicates_keep_the_first_in_order_and_rejects_keep_their_reason():
    table = rows_table([(0, "a", 2, "same", ""), (0, "a", 1, "same", ""), (0, "a", 3, "", "invalid_json")])
    sel = select_samples(spec(), table, row_order(table))
    assert sel.accepted == 1 and len(sel.samples["train"]) == 1
    assert [(r["uid"], r["reason"]) for r in sel.rejects] == [(0, "duplicate"), (2, "invalid_json")]
    assert sel.rejects[0]["detail"] == "same as a:1"


def test_weights_copy_and_downsample_deterministically():
    many = [(1, "b", i, f"k{i}", "") for i in range(400)]
    table = rows_table(many)
    order = row_order(table)
    up = select_samples(spec(weight=2.0), table, order)
    assert up.accepted == 400 and len(up.samples["train"]) == 800
    down = select_samples(spec(weight=0.25), table, order)
    kept = len(down.samples["train"])
    assert 60 < kept < 140 and kept + len(down.rejects) == 400
    assert {r["reason"] for r in down.rejects} == {"downsampled"}
    again = select_samples(spec(weight=0.25), table, order)
    assert [r["uid"] for r in again.rejects] == [r["uid"] for r in down.rejects]


def test_split_is_by_conversation_and_stable():
    table = rows_table([(0, "a", i, f"k{i}", "") for i in range(1000)])
    s = load_spec({"name": "t", "sources": [{"uri": "a.jsonl", "weight": 3.0}], "tokenizer": "tok",
                   "output": "out", "val_ratio": 0.1})
    sel = select_samples(s, table, row_order(table))
    assert 60 < len(sel.samples["val"]) / 3 < 140  # ~10% of conversations, each with its 3 copies
    assert len(sel.samples["val"]) % 3 == 0 and len(sel.samples["train"]) % 3 == 0


def test_max_samples_keeps_the_first_rows_of_a_source():
    table = rows_table([(1, "b2", 1, "x", ""), (1, "b1", 2, "y", ""), (1, "b1", 1, "z", ""), (0, "a", 1, "w", "")])
    order, skipped = limit_samples(spec(max_samples=2), table, row_order(table))
    assert [table["key"][int(i)].as_py() for i in order] == ["w", "z", "y"]
    assert skipped == {1: 1}
