"""Models and tokenizers named by Hugging Face id resolve through huggingface_hub's cache, here a
cache built on disk in the library's own layout, offline: no test reaches the network."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from support import REPO
from support.jobs import job_env, training_spec

pytestmark = pytest.mark.integration
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub(tmp_path, tiny_model):
    """HF_HOME with raysft/tiny (the scaffold model) cached at `main`, and the hub offline."""
    repo = tmp_path / "hf/hub/models--raysft--tiny"
    shutil.copytree(tiny_model, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs/main").write_text(COMMIT)
    return {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}


def run(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, env=job_env(env), capture_output=True, text=True, timeout=300)


def test_a_dataset_and_a_training_name_models_by_hugging_face_id(hub, example_spec, tiny_model, prepared, tmp_path):
    resolved = run(["-c", "from jobs.common import model_source; print(model_source.resolve('hf://raysft/tiny@main'))"], hub)
    assert resolved.stdout.strip().endswith(f"models--raysft--tiny/snapshots/{COMMIT}"), resolved.stderr[-2000:]

    spec = example_spec("demo", tmp_path / "out", tokenizer="hf://raysft/tiny")
    proc = run(["-m", "jobs.prepare", "--spec", json.dumps(spec)], hub)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((tmp_path / "out/manifest.json").read_text())
    assert manifest["tokenizer"]["uri"] == "hf://raysft/tiny"
    assert manifest["tokenizer"]["sha256"] == json.loads((prepared / "manifest.json").read_text())["tokenizer"]["sha256"]

    # A bare org/name (no such local path): the training's model, checked against the data, planned.
    plan = run(["-m", "jobs.train", "--dry-run", "--spec",
                json.dumps(training_spec(tiny_model, prepared, tmp_path / "ckpt", model={"uri": "raysft/tiny", "dtype": "fp32"}))], hub)
    assert plan.returncode == 0, plan.stderr[-3000:]
    assert json.loads(plan.stdout)["parameters"]["total"] > 0


def test_a_model_the_node_cannot_get_exits_2_saying_how_to_provide_it(hub, tiny_model, prepared, tmp_path):
    spec = training_spec(tiny_model, prepared, tmp_path / "ckpt", model={"uri": "hf://raysft/absent", "dtype": "fp32"})
    proc = run(["-m", "jobs.train", "--dry-run", "--spec", json.dumps(spec)], hub)
    assert proc.returncode == 2
    assert "model.uri: 'hf://raysft/absent' is neither a local path nor a Hugging Face model" in proc.stderr
    assert "HF_HUB_OFFLINE is set" in proc.stderr and "huggingface-cli download raysft/absent" in proc.stderr
    assert "python -m jobs.import_model" in proc.stderr and "Traceback" not in proc.stderr


@pytest.fixture
def hub_dataset(hub, tmp_path):
    """raysft/chats cached at `main` in the Hub's dataset layout: train and test splits as Parquet
    (data/<split>-NNNNN-of-NNNNN.parquet), a `formal` subset as JSON Lines, and a README."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in (REPO / "configs/data/messages.jsonl").read_text().splitlines()]
    snapshot = tmp_path / "hf/hub/datasets--raysft--chats/snapshots" / COMMIT
    (snapshot / "data").mkdir(parents=True)
    (snapshot / "formal").mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:50]), snapshot / "data/train-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(rows[50:60]), snapshot / "data/test-00000-of-00001.parquet")
    (snapshot / "formal/train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[60:]))
    (snapshot / "README.md").write_text("---\nlicense: mit\n---\n")
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs/main").write_text(COMMIT)
    return hub


def test_a_dataset_on_the_hub_is_read_from_its_cache_by_split_and_subset(hub_dataset, tiny_model, tmp_path):
    spec = {"name": "from-hub", "tokenizer": str(tiny_model), "output": str(tmp_path / "out"), "packing": "none",
            "sources": [{"uri": "hf://datasets/raysft/chats"},  # the train split by default
                        {"uri": "hf://datasets/raysft/chats@main", "subset": "formal"},
                        {"uri": "hf://datasets/raysft/chats", "hub_split": "test", "split": "val"}]}
    proc = run(["-m", "jobs.prepare", "--spec", json.dumps(spec)], hub_dataset)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((tmp_path / "out/manifest.json").read_text())
    rows = len((REPO / "configs/data/messages.jsonl").read_text().splitlines())
    assert manifest["counts"]["rows_read"] == rows and manifest["counts"]["rejected_total"] == 0
    assert manifest["counts"]["samples"] == {"train": rows - 10, "val": 10}
    assert manifest["split_origins"]["val"] == ["hf://datasets/raysft/chats (all)"]

    # A path in the repository names the files outright, here read by Ray tasks (each reads
    # its file from its node's Hub cache); an absent split is a spec problem with its fix.
    by_path = spec | {"output": str(tmp_path / "by-path"),
                      "sources": [{"uri": "hf://datasets/raysft/chats/data/test-*.parquet"}]}
    proc = run(["-m", "jobs.prepare", "--spec", json.dumps(by_path), "--in-process-max-bytes", "0"], hub_dataset)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "by-path/manifest.json").read_text())["counts"]["rows_read"] == 10
    absent = spec | {"sources": [{"uri": "hf://datasets/raysft/chats", "hub_split": "validation"},
                                 {"uri": "hf://datasets/raysft/absent"}]}
    proc = run(["-m", "jobs.prepare", "--spec", json.dumps(absent)], hub_dataset)
    assert proc.returncode == 2
    assert "sources.0.uri" in proc.stderr and "no data files for split 'validation'" in proc.stderr
    assert "sources.1.uri" in proc.stderr and "huggingface-cli download --repo-type dataset raysft/absent" in proc.stderr
