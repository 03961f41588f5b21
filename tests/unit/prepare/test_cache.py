"""The preparation cache: the key follows the spec, every input file's size and modification time
and the tokenizer, and nothing else; only a succeeded output with the same key and all its files
is reused, never with `force`, and finding that out loads no tokenizer and reads no input row."""

from __future__ import annotations

import logging
import os
import shutil
import time

import pytest
from support.jobs import stub_manifest

from jobs.common import storage, tokenizer_files
from jobs.common.contract import MANIFEST_FILE
from jobs.common.spec import SpecError
from jobs.prepare import cache
from jobs.prepare.inputs import Options, locate_inputs, resolve_inputs
from jobs.prepare.spec import DatasetSpec

ROW = '{"instruction": "Say hi", "output": "hi"}\n'


@pytest.fixture
def spec(tmp_path, tiny_model) -> DatasetSpec:
    data = tmp_path / "data"
    data.mkdir()
    for name in ("a.jsonl", "b.jsonl"):
        (data / name).write_text(ROW * 3)
    return DatasetSpec.model_validate({"name": "cached", "sources": [{"uri": str(data / "*.jsonl"), "format": "alpaca"}],
                                       "tokenizer": str(tiny_model), "output": str(tmp_path / "out")})


def key(spec: DatasetSpec) -> str:
    return cache.cache_key(spec, locate_inputs(spec))


def prepared(spec: DatasetSpec, **fields) -> None:
    """A complete output at `spec.output`: its Parquet file and a manifest with `fields`."""
    out = storage.filesystem(spec.output)[1]
    os.makedirs(f"{out}/train", exist_ok=True)
    open(f"{out}/train/part-00000.parquet", "wb").close()
    manifest = stub_manifest("abc").model_copy(update={"files": ["train/part-00000.parquet"]} | fields)
    with open(f"{out}/{MANIFEST_FILE}", "w") as f:
        f.write(manifest.to_json())


def test_the_key_is_the_same_for_the_same_spec_files_and_tokenizer(spec):
    again = DatasetSpec.model_validate(spec.model_dump(mode="json"))
    assert key(spec) == key(again) and len(key(spec)) == 64


def test_the_key_changes_with_the_spec(spec):
    assert key(spec) != key(spec.model_copy(update={"seed": 7}))


def test_the_key_changes_with_a_files_size_or_modification_time_or_a_new_file(spec, tmp_path):
    data, keys = tmp_path / "data", [key(spec)]
    a, b = (data / "a.jsonl").stat(), (data / "b.jsonl").stat()
    os.utime(data / "a.jsonl", ns=(a.st_atime_ns, a.st_mtime_ns + 1_000_000_000))  # same bytes, touched
    keys.append(key(spec))
    with open(data / "b.jsonl", "a") as f:
        f.write(ROW)
    os.utime(data / "b.jsonl", ns=(b.st_atime_ns, b.st_mtime_ns))  # grown, modification time kept
    keys.append(key(spec))
    (data / "c.jsonl").write_text(ROW)
    keys.append(key(spec))
    assert len(set(keys)) == 4


def test_the_key_changes_with_the_tokenizer(spec, tiny_model, tmp_path):
    other = shutil.copytree(tiny_model, tmp_path / "other-tokenizer")
    same = spec.model_copy(update={"tokenizer": str(other)})
    config = other / "tokenizer_config.json"
    before = key(same)
    config.write_text(config.read_text().replace("{", '{"model_max_length": 77, ', 1))
    assert key(same) != before
    # the tokenizer by its files' SHA-256, as the manifest records it: not by where it is
    located = locate_inputs(same)
    assert cache.cache_key(spec, located) != key(spec)
    assert tokenizer_files.sha256(located.tokenizer_files) != tokenizer_files.sha256(locate_inputs(spec).tokenizer_files)


def test_a_succeeded_output_with_the_same_key_and_its_files_is_reused(spec):
    assert cache.reusable(spec, key(spec)) is None  # nothing there yet
    prepared(spec, cache_key=key(spec))
    assert cache.reusable(spec, key(spec)).files == ["train/part-00000.parquet"]


@pytest.mark.parametrize("fields", [{"cache_key": "0" * 64}, {"cache_key": None}, {"status": "failed"}],
                         ids=["another key", "written before the cache", "failed"])
def test_another_key_or_a_failed_output_is_not_reused(spec, fields):
    prepared(spec, **({"cache_key": key(spec)} | fields))
    assert cache.reusable(spec, key(spec)) is None


def test_an_output_missing_a_listed_file_or_with_a_broken_manifest_is_not_reused(spec):
    prepared(spec, cache_key=key(spec))
    out = storage.filesystem(spec.output)[1]
    os.remove(f"{out}/train/part-00000.parquet")  # a forced preparation broke off after clearing it
    assert cache.reusable(spec, key(spec)) is None
    with open(f"{out}/{MANIFEST_FILE}", "w") as f:
        f.write('{"format_version": 2, "status": "succ')
    assert cache.reusable(spec, key(spec)) is None


def test_the_reused_output_is_found_without_loading_the_tokenizer_or_reading_a_row(spec, monkeypatch, caplog):
    prepared(spec, cache_key=key(spec), created_at="2026-05-01T10:00:00+00:00")

    read_bytes = storage.read_bytes

    def read_no_input(fs, path):
        assert not path.endswith(".jsonl"), f"the cache check read an input: {path}"
        return read_bytes(fs, path)

    def load(_):
        raise AssertionError("the cache check loaded the tokenizer")

    monkeypatch.setattr(storage, "read_bytes", read_no_input)
    monkeypatch.setattr(tokenizer_files, "load", load)
    with caplog.at_level(logging.INFO, logger="raysft.prepare"):
        manifest = cache.cached_manifest(spec, locate_inputs(spec), Options())
    assert manifest is not None and manifest.cache_key == key(spec)
    assert (f"prepare: reusing {spec.output}: spec, inputs and tokenizer unchanged since 2026-05-01T10:00:00+00:00 "
            "(--force prepares again)") in caplog.text


def test_force_or_a_missing_input_prepares_again(spec, tmp_path):
    prepared(spec, cache_key=key(spec))
    assert cache.cached_manifest(spec, locate_inputs(spec), Options(force=True)) is None
    missing = spec.model_copy(update={"sources": [*spec.sources, spec.sources[0].model_copy(
        update={"uri": str(tmp_path / "gone.jsonl")})]})
    located = locate_inputs(missing)
    assert located.problems == [f"sources.1.uri: no files match {str(tmp_path / 'gone.jsonl')!r}"]
    assert cache.cached_manifest(missing, located, Options()) is None


def test_resolving_what_was_located_lists_the_files_and_sizes_and_reports_every_problem(spec, tmp_path):
    located = locate_inputs(spec)
    inputs = resolve_inputs(spec, located)
    [(_, paths)] = inputs.files
    assert [os.path.basename(p) for p in paths] == ["a.jsonl", "b.jsonl"]
    assert inputs.total_bytes == 2 * len(ROW) * 3 == sum(f.size for f in located.sources[0][1])
    broken = spec.model_copy(update={"tokenizer": str(tmp_path / "no-tokenizer"), "sources": [
        spec.sources[0].model_copy(update={"uri": str(tmp_path / "gone.jsonl")})]})
    with pytest.raises(SpecError) as e:
        resolve_inputs(broken)
    assert [p.split(":")[0] for p in e.value.problems] == ["tokenizer", "sources.0.uri"]


def test_on_s3_objects_are_known_by_their_listing_and_a_rewrite_changes_the_key(s3_server, tiny_model):
    import boto3

    boto3.client("s3").create_bucket(Bucket="bucket")
    fs, _ = storage.filesystem("s3://bucket")
    for name in ("a.jsonl", "b.jsonl"):
        storage.write_bytes(fs, f"bucket/in/{name}", (ROW * 3).encode())
    spec = DatasetSpec.model_validate({"name": "s3", "sources": [{"uri": "s3://bucket/in/", "format": "alpaca"}],
                                       "tokenizer": str(tiny_model), "output": "s3://bucket/out"})
    located = locate_inputs(spec)
    assert [(f.path, f.size) for f in located.sources[0][1]] == [("bucket/in/a.jsonl", 126), ("bucket/in/b.jsonl", 126)]
    first = cache.cache_key(spec, located)
    assert cache.reusable(spec, first) is None  # no output yet
    storage.write_bytes(fs, "bucket/out/train/part-00000.parquet", b"")
    manifest = stub_manifest("abc").model_copy(update={"files": ["train/part-00000.parquet"], "cache_key": first})
    storage.write_bytes(fs, f"bucket/out/{MANIFEST_FILE}", manifest.to_json().encode())
    assert cache.cached_manifest(spec, locate_inputs(spec), Options()) == manifest
    time.sleep(1.1)  # Last-Modified counts whole seconds
    storage.write_bytes(fs, "bucket/in/a.jsonl", (ROW * 3).encode())  # the same bytes, written again
    assert key(spec) != first and cache.cached_manifest(spec, locate_inputs(spec), Options()) is None
