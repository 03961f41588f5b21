"""`ray job submit -- python -m jobs.prepare` and `jobs.train` against a real local cluster with
token auth (the embedded default's head, `service.local_ray`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support.jobs import training_spec

pytestmark = pytest.mark.integration
from support import REPO

RAY = str(Path(sys.executable).with_name("ray"))


def test_ray_job_submit_runs_prepare_then_train(ray_head, demo_spec, tiny_model, tmp_path):
    address = ray_head.address
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | ray_head.env
    (tmp_path / "spec.json").write_text(json.dumps(demo_spec(tmp_path / "out")))

    unauthenticated = subprocess.run(
        [RAY, "job", "list", "--address", address],
        env={k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN"} | {"HOME": str(tmp_path)},
        capture_output=True, text=True, timeout=120)
    assert unauthenticated.returncode != 0  # token auth is on: no token, no access

    proc = subprocess.run(
        [RAY, "job", "submit", "--address", address, "--submission-id", "prep-1", "--",
         sys.executable, "-m", "jobs.prepare", "--spec", str(tmp_path / "spec.json")],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "succeeded" in proc.stdout and "packing bfd@512" in proc.stdout
    manifest = json.loads((tmp_path / "out/manifest.json").read_text())
    assert manifest["status"] == "succeeded" and manifest["counts"]["rows_read"] == 330

    spec = training_spec(tiny_model, tmp_path / "out", tmp_path / "ckpt", name="submitted", max_steps=4,
                         scaling={"num_workers": 1}, eval={"every_steps": 4},
                         checkpoint={"storage": str(tmp_path / "ckpt"), "every_steps": 4, "keep": 1})
    (tmp_path / "train.json").write_text(json.dumps(spec))
    proc = subprocess.run(
        [RAY, "job", "submit", "--address", address, "--submission-id", "train-1", "--",
         sys.executable, "-m", "jobs.train", "--spec", str(tmp_path / "train.json")],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "training finished: step 4" in proc.stdout
    assert (tmp_path / "ckpt/submitted/export/model/model.safetensors").exists()
