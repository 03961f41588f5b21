"""Building the manifest from what each preparation step produced: every count and token total
follows from the summed summaries and the packed rows, and the result is the typed contract that
training reads back."""

from collections import Counter

import numpy as np
import pytest
from support.prepared import build_manifest

from jobs.common import tokenizer_files
from jobs.common.contract import IGNORE_INDEX, parse_manifest
from jobs.prepare import manifest as mf
from jobs.prepare.inputs import Inputs
from jobs.prepare.spec import DatasetSpec
from jobs.prepare.templates import build_template


def sample(n: int, trained: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.arange(10, 10 + n, dtype=np.int32)
    labels = np.where(np.arange(n) >= n - trained, ids, IGNORE_INDEX).astype(np.int32)
    return ids, labels


@pytest.fixture
def built(tiny_model, tokenizer):
    spec = DatasetSpec.model_validate({"name": "m", "sources": [{"uri": "a.jsonl"}, {"uri": "b.jsonl", "max_samples": 3}],
                                       "tokenizer": str(tiny_model), "output": "out", "max_seq_length": 16})
    files = tokenizer_files.fetch(str(tiny_model))
    inputs = Inputs(files, tokenizer, build_template(spec.template, tokenizer), files=[], total_bytes=0)
    samples = {"train": [sample(10, 4), sample(6, 6), sample(5, 2)], "val": [sample(4, 1)]}
    manifest = build_manifest(spec, inputs, samples, Counter({"duplicate": 1, "too_long": 1}), rows_read=6,
                              skipped={1: 2}, truncated=1, seconds=1.234)
    return spec, manifest, files


def test_counts_and_tokens_follow_from_the_summaries_and_packed_rows(built):
    spec, manifest, files = built
    c = manifest.counts
    assert (c.rows_read, c.accepted, c.rejected_total, c.invalid, c.duplicates, c.truncated, c.dropped) == (6, 4, 2, 1, 1, 1, 1)
    assert c.accepted + c.rejected_total == c.rows_read
    assert c.rows_beyond_max_samples == {"b.jsonl": 2} and c.samples == {"train": 3, "val": 1}
    assert manifest.tokens.by_split["train"].all == 21 and manifest.tokens.by_split["train"].trainable == 12
    assert manifest.tokens.all == 25 and manifest.tokens.trainable == 13
    assert manifest.packing.rows == {"train": 2, "val": 1}  # 10+6 fill one row of 16, 5 the next
    assert manifest.packing.efficiency == pytest.approx(25 / (3 * 16))
    assert manifest.sample_length == {"p50": 6, "p90": 10, "p99": 10, "min": 4, "max": 10}
    assert manifest.tokenizer.sha256 == tokenizer_files.sha256(files)
    assert manifest.template.eot == "<|im_end|>" and manifest.template.name == "chatml"
    assert manifest.template.eot_source == "template"
    assert "<|im_start|>assistant" in manifest.template.chat_template  # what the model is served with
    assert manifest.succeeded and manifest.spec_hash == spec.spec_hash() and manifest.seconds == 1.23


def test_the_written_manifest_reads_back_as_the_same_contract(built):
    _, manifest, _ = built
    assert parse_manifest(manifest.to_json()) == manifest


def test_data_card_and_summary_show_the_counts(built, tokenizer):
    spec, manifest, _ = built
    ids, labels = sample(6, 2)
    segments = mf.trained_segments(tokenizer, ids, labels)
    assert [s.trained for s in segments] == [False, True]
    assert segments[1].text == tokenizer.decode(ids[4:].tolist())
    assert "".join(s.text for s in segments) == tokenizer.decode(ids.tolist())
    marked = mf.mark_trained(segments)
    assert marked.endswith("⟧") and marked.count("⟦") == 1
    card = mf.data_card(spec, manifest.model_copy(update={"examples": [segments]}))
    assert "| read | 6 |" in card and "| too_long | 1 |" in card and marked in card
    summary = mf.summary(manifest)
    assert "read 6, accepted 4, rejected 2" in summary and "duplicate: 1" in summary


def test_a_failed_preparation_is_marked_so():
    assert mf.invalid_count(Counter({"duplicate": 3, "downsampled": 2, "invalid_json": 1})) == 1
