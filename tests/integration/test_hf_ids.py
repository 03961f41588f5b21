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
