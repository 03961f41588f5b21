"""Which files of a Hugging Face dataset repository a source reads (pure: no Hub, no cache)."""

import pytest

from jobs.prepare.hub import chosen, parse, split_patterns

REPO_FILES = ["README.md", ".gitattributes", "data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet",
              "data/test-00000-of-00001.parquet", "formal/train.jsonl", "formal/test.jsonl",
              "default/partial-train/0000.parquet", "raw/train.csv", "train_notes.md"]


def test_uris_name_a_repository_a_revision_and_a_path():
    assert parse("hf://datasets/tatsu-lab/alpaca") == ("tatsu-lab/alpaca", None, None)
    assert parse("hf://datasets/org/name@v1.0/data/*.parquet") == ("org/name", "v1.0", "data/*.parquet")
    with pytest.raises(ValueError, match="hf://datasets/org/name"):
        parse("hf://datasets/alpaca")


def test_a_split_is_found_by_the_hubs_conventions_parquet_first():
    assert chosen(REPO_FILES, split_patterns(None, "train")) == [
        "data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet"]
    assert chosen(REPO_FILES, split_patterns(None, "test")) == ["data/test-00000-of-00001.parquet"]
    assert chosen(REPO_FILES, split_patterns("formal", "test")) == ["formal/test.jsonl"]
    assert chosen(REPO_FILES, split_patterns("default", "train")) == ["default/partial-train/0000.parquet"]
    assert chosen(REPO_FILES, split_patterns(None, "validation")) == []
    # Without Parquet files for a split, its other data files are read (never README or notes).
    assert chosen(["README.md", "train.jsonl", "train_notes.md"], split_patterns(None, "train")) == ["train.jsonl"]
