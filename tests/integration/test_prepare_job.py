"""The preparation job end to end on a real local Ray cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jobs.common import ray_runtime, tokenizer_files
from jobs.common.contract import TOKEN_COLUMNS
from jobs.prepare.__main__ import main
from jobs.prepare.driver import prepare
from jobs.prepare.inputs import Options
from jobs.prepare.spec import load_spec

pytestmark = pytest.mark.integration
from support import REPO


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray_runtime.init(num_cpus=2)
    yield
    ray.shutdown()


def read_split(output: Path | str, split: str, filesystem=None):
    import pyarrow.dataset as ds

    return ds.dataset(f"{output}/{split}", format="parquet", filesystem=filesystem).to_table()


def read_rejects(output: Path) -> str:
    """Every reject, the per-input-file parts in name order: (source, file, line) order."""
    return "".join(p.read_text() for p in sorted((output / "rejects").glob("part-*.jsonl")))


def check_rows(table, max_len: int) -> int:
    """Packed rows are consistent; returns the number of samples in them."""
    samples = 0
    for ids, labels, pos, lens in zip(*(table[c].to_pylist() for c in TOKEN_COLUMNS), strict=True):
        assert len(ids) == len(labels) == len(pos) == sum(lens) <= max_len
        assert pos == [p for n in lens for p in range(n)]
        assert any(label != -100 for label in labels)
        starts = np.cumsum([0, *lens[:-1]])
        assert all(labels[s] == -100 for s in starts)  # no sample is predicted from its neighbour
        samples += len(lens)
    return samples


def test_demo_end_to_end(ray_cluster, demo_spec, tiny_model, tmp_path):
    spec = load_spec(demo_spec(tmp_path / "out"))
    manifest = prepare(spec, Options(in_process_max_bytes=0)).model_dump()  # on Ray
    on_disk = json.loads((tmp_path / "out/manifest.json").read_text())
    assert on_disk["spec_hash"] == manifest["spec_hash"] == spec.spec_hash()
    c = manifest["counts"]
    assert c["rows_read"] >= 300
    assert c["accepted"] + c["rejected_total"] == c["rows_read"]
    assert c["invalid"] == 0 and manifest["zero_trainable_rows"] == 0
    assert c["rejected"].get("downsampled", 0) > 0  # text.jsonl has weight 0.5
    assert manifest["tokenizer"]["sha256"] == tokenizer_files.sha256(tokenizer_files.fetch(str(tiny_model)))
    # >= 95% of token slots are real tokens at 512; no sample split; positions consistent.
    assert manifest["packing"]["efficiency"] >= 0.95
    for split in ("train", "val"):
        table = read_split(tmp_path / "out", split)
        assert table.num_rows == manifest["packing"]["rows"][split]
        assert check_rows(table, 512) == c["samples"][split]
    assert c["samples"]["val"] > 0
    rejects = read_rejects(tmp_path / "out").splitlines()
    assert len(rejects) == c["rejected_total"]
    card = (tmp_path / "out/DATA_CARD.md").read_text()
    assert "⟦" in card and "<|im_end|>⟧" in card


BAD_ROWS = [
    (b'{"messages": [{"role": "user", "content": "Good question one?"}, {"role": "assistant", "content": "A good answer."}]}', None),
    (b'{"messages": [{"role": "user", "content": "broken"', "invalid_json"),
    (b'{"messages": [{"role": "user", "content": "caf\xe9"}, {"role": "assistant", "content": "x"}]}', "invalid_utf8"),
    (b'{"conversation": []}', "missing_field"),
    (b'{"messages": "not a list"}', "wrong_type"),
    (b'{"messages": [{"role": "user", "content": 42}, {"role": "assistant", "content": "x"}]}', "wrong_type"),
    (b'{"messages": [{"role": "user", "content": "Hello?"}, {"role": "assistant", "content": "  "}]}', "empty_message"),
    (b'{"messages": [{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "Hello"}]}', "bad_role_order"),
    (('{"messages": [{"role": "user", "content": "Tell me a long story."}, {"role": "assistant", "content": "'
      + "Once upon a time there was a very long story. " * 60 + '"}]}').encode(), "too_long"),
    (b'[1, 2, 3]', "not_an_object"),
    (b'{"messages": [{"role": "user", "content": "Good question two?"}, {"role": "assistant", "content": "Another good answer."}]}', None),
    (b'{"messages": [{"role": "user", "content": "Good question one?"}, {"role": "assistant", "content": "A good answer."}]}', "duplicate"),
]


def bad_input_spec(tiny_model, tmp_path, max_reject_ratio):
    (tmp_path / "bad.jsonl").write_bytes(b"\n".join(row for row, _ in BAD_ROWS) + b"\n")
    return {"name": "bad", "sources": [{"uri": str(tmp_path / "bad.jsonl"), "format": "messages"}],
            "tokenizer": str(tiny_model), "max_seq_length": 256, "val_ratio": 0,
            "max_reject_ratio": max_reject_ratio, "output": str(tmp_path / "out")}


def test_bad_input_loses_nothing(ray_cluster, tiny_model, tmp_path):
    manifest = prepare(load_spec(bad_input_spec(tiny_model, tmp_path, 1.0))).model_dump()
    rejects = [json.loads(line) for line in read_rejects(tmp_path / "out").splitlines()]
    expected = [(line, reason) for line, (_, reason) in enumerate(BAD_ROWS, start=1) if reason]
    assert [(r["line"], r["reason"]) for r in rejects] == expected
    assert all(r["raw"] and r["path"].endswith("bad.jsonl") for r in rejects)
    c = manifest["counts"]
    assert c["rows_read"] == len(BAD_ROWS)
    assert c["samples"]["train"] + len(rejects) == len(BAD_ROWS) == c["accepted"] + c["rejected_total"]
    assert check_rows(read_split(tmp_path / "out", "train"), 256) == 2


def test_reject_ratio_fails_with_top_reasons(ray_cluster, tiny_model, tmp_path, capsys):
    spec = json.dumps(bad_input_spec(tiny_model, tmp_path, 0.05))
    assert main(["--spec", spec]) == 1
    err = capsys.readouterr().err
    assert "max_reject_ratio" in err and "Top reasons: wrong_type: 2" in err and "/rejects/" in err
    assert json.loads((tmp_path / "out/manifest.json").read_text())["status"] == "failed"
    assert not (tmp_path / "out/train").exists()


def test_bad_spec_reports_every_problem(tiny_model, tmp_path, capsys):
    spec = {"name": "x", "sources": [{"uri": str(tmp_path / "none/*.jsonl")}, {"uri": str(tmp_path / "gone.csv")}],
            "tokenizer": str(tmp_path / "no-tokenizer"), "output": str(tmp_path / "o")}
    assert main(["--spec", json.dumps(spec)]) == 2
    err = capsys.readouterr().err
    assert "tokenizer: cannot load" in err
    assert "sources.0.uri: no files match" in err and "sources.1.uri: no files match" in err


def run_job(spec: dict, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | (env or {})
    proc = subprocess.run([sys.executable, "-m", "jobs.prepare", "--spec", json.dumps(spec), *args],
                          cwd=REPO, env=full_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


ON_RAY = ("--in-process-max-bytes", "0")  # the demo data is small enough to skip Ray


@pytest.fixture(scope="module")
def reference_run(demo_spec, tmp_path_factory):
    """The demo spec prepared by the CLI on Ray: a 1-CPU cluster, one task, large batches."""
    out = tmp_path_factory.mktemp("ref") / "out"
    proc = run_job(demo_spec(out), *ON_RAY, "--num-cpus", "1", "--blocks", "1", "--batch-size", "512")
    assert "prepare: processed 330 rows" in proc.stderr  # the progress line
    assert "Ray tasks on 1 CPUs" in proc.stderr
    return out


@pytest.mark.parametrize("args", [
    (*ON_RAY, "--num-cpus", "2", "--blocks", "7", "--batch-size", "16"),
    ("--batch-size", "16"),  # small inputs run in the driver process: the same output
], ids=["ray-2-cpus-7-tasks", "in-process"])
def test_deterministic_across_cpus_block_sizes_and_executors(reference_run, demo_spec, tmp_path, args):
    proc = run_job(demo_spec(tmp_path / "out"), *args)
    assert ("Ray tasks" in proc.stderr) == ("--in-process-max-bytes" in args)
    # Every reject with its path, line and raw text (the data card names the output: not compared).
    assert read_rejects(reference_run) == read_rejects(tmp_path / "out")
    for split in ("train", "val"):
        a, b = read_split(reference_run, split), read_split(tmp_path / "out", split)
        for col in TOKEN_COLUMNS:
            assert a[col].combine_chunks().equals(b[col].combine_chunks()), (split, col)
            left = np.concatenate(a[col].to_numpy(zero_copy_only=False)).tobytes()
            right = np.concatenate(b[col].to_numpy(zero_copy_only=False)).tobytes()
            assert left == right


def test_an_unchanged_preparation_is_reused_and_force_prepares_again(demo_spec, tmp_path, caplog, record_property):
    spec = load_spec(demo_spec(tmp_path / "out"))
    first = prepare(spec)
    started = time.perf_counter()
    with caplog.at_level("INFO", logger="raysft.prepare"):
        again = prepare(spec)
    reuse_s = time.perf_counter() - started
    assert again == first and "reusing" in caplog.text and reuse_s < 2
    record_property("cache_hit_s", round(reuse_s, 3))
    caplog.clear()
    with caplog.at_level("INFO", logger="raysft.prepare"):
        forced = prepare(spec, Options(force=True))
        assert "reusing" not in caplog.text and forced.cache_key == first.cache_key
        # An input rewritten (a newer modification time) is new data: prepared again.
        source = Path(spec.sources[0].uri)
        os.utime(source, (source.stat().st_atime, source.stat().st_mtime + 10))
        try:
            changed = prepare(spec)
        finally:
            os.utime(source, (source.stat().st_atime, source.stat().st_mtime - 10))
    assert "reusing" not in caplog.text and changed.cache_key != first.cache_key
    assert changed.counts == first.counts


def test_a_small_preparation_never_imports_ray(demo_spec, tmp_path):
    """Importing Ray is a fifth of a small job's driver CPU, and the in-process path needs none of it."""
    prepare_then_look = "import sys; from jobs.prepare.__main__ import main; code = main(sys.argv[1:]); print('ray' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", prepare_then_look, "--spec", json.dumps(demo_spec(tmp_path / "out"))],
                          cwd=REPO, env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "tokenizing in this process" in proc.stderr, proc.stderr[-4000:]
    assert proc.stdout.strip().splitlines()[-1] == "False"
    assert json.loads((tmp_path / "out/manifest.json").read_text())["status"] == "succeeded"


def test_s3_sources_tokenizer_and_output(s3_server, reference_run, demo_spec, tiny_model):
    import boto3
    import pyarrow.fs as pafs

    s3 = boto3.client("s3", endpoint_url=s3_server["AWS_ENDPOINT_URL"])
    s3.create_bucket(Bucket="sft")
    for f in (REPO / "configs/data").iterdir():
        s3.upload_file(str(f), "sft", f"raw/{f.name}")
    for f in tiny_model.iterdir():
        s3.upload_file(str(f), "sft", f"models/tiny/{f.name}")
    spec = demo_spec("s3://sft/prepared/demo", tokenizer="s3://sft/models/tiny")
    for source in spec["sources"]:
        source["uri"] = "s3://sft/raw/" + Path(source["uri"]).name
    run_job(spec, *ON_RAY, "--num-cpus", "2", env=s3_server)

    manifest = json.loads(s3.get_object(Bucket="sft", Key="prepared/demo/manifest.json")["Body"].read())
    assert manifest["status"] == "succeeded"
    local = json.loads((reference_run / "manifest.json").read_text())
    assert manifest["counts"] == local["counts"] and manifest["tokenizer"]["sha256"] == local["tokenizer"]["sha256"]
    fs = pafs.S3FileSystem(endpoint_override=s3_server["AWS_ENDPOINT_URL"], region="us-east-1",
                           access_key="testing", secret_key="testing")
    for split in ("train", "val"):
        remote = read_split("sft/prepared/demo", split, filesystem=fs)
        assert remote.select(TOKEN_COLUMNS).equals(read_split(reference_run, split).select(TOKEN_COLUMNS))
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="sft", Prefix="prepared/demo/")["Contents"]}
    assert "prepared/demo/DATA_CARD.md" in keys
    assert sorted(k for k in keys if k.endswith(".jsonl")) == sorted(f"prepared/demo/{p.relative_to(reference_run)}"
                                                                for p in (reference_run / "rejects").iterdir())


@pytest.mark.parametrize("name", ["alpaca-chatml", "multiturn-own-template"])
def test_example_configs_run(ray_cluster, example_spec, tmp_path, name):
    spec = load_spec(example_spec(name, tmp_path / "out"))
    manifest = prepare(spec).model_dump()
    c = manifest["counts"]
    assert manifest["status"] == "succeeded" and manifest["zero_trainable_rows"] == 0
    assert c["accepted"] + c["rejected_total"] == c["rows_read"] > 0
    train = read_split(tmp_path / "out", "train")
    assert check_rows(train, spec.max_seq_length) == c["samples"]["train"]
    if spec.packing.value == "none":
        assert all(len(lens) == 1 for lens in train["seq_lens"].to_pylist())
        assert c["truncated"] > 0  # 256 tokens cut some long multi-turn chats


def test_a_separate_validation_file_is_the_val_split_whole(tiny_model, tmp_path):
    """`split: val` makes a source the validation set as a whole; the `auto` source beside it
    trains whole (no hash share is held out), and the manifest and data card say so."""
    lines = (REPO / "configs/data/messages.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "train.jsonl").write_text("".join(lines[:60]))
    (tmp_path / "validation.jsonl").write_text("".join(lines[60:]))
    spec = load_spec({"name": "with-val", "tokenizer": str(tiny_model), "output": str(tmp_path / "out"),
                      "sources": [{"uri": str(tmp_path / "train.jsonl")},
                                  {"uri": str(tmp_path / "validation.jsonl"), "split": "val"}],
                      "packing": "none", "val_ratio": 0.2})
    manifest = prepare(spec)
    assert manifest.succeeded and manifest.counts.rejected_total == 0, manifest.counts
    assert manifest.counts.samples == {"train": 60, "val": len(lines) - 60}
    val_firsts = {json.loads(line)["messages"][0]["content"] for line in lines[60:]}
    tokenizer = tokenizer_files.load(tokenizer_files.fetch(str(tiny_model)))
    decoded = [tokenizer.decode(ids) for ids in read_split(tmp_path / "out", "val")["input_ids"].to_pylist()]
    assert all(any(first in text for first in val_firsts) for text in decoded)  # every val row is the file's
    assert manifest.split_origins == {"train": [f"{tmp_path / 'train.jsonl'} (all)"],
                                      "val": [f"{tmp_path / 'validation.jsonl'} (all)"]}
    card = (tmp_path / "out/DATA_CARD.md").read_text()
    assert f"| val | {tmp_path / 'validation.jsonl'} (all) |" in card
