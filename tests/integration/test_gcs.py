"""gs:// end to end against Google Cloud Storage's JSON API served on loopback by an emulator
(`gcp-storage-emulator`, reached as Google's own clients reach one: STORAGE_EMULATOR_HOST): the
model, the tokenizer and the sources read from GCS, the prepared dataset written there, and a
training's checkpoints and export written there and read back."""

from __future__ import annotations

import json

import pytest
from support import REPO
from support.jobs import run, step_metrics, training_spec

from jobs.common import run_layout, storage
from service.local_ray import free_port

# A preparation and a 2-worker training through the emulator (about a minute on 2 cores).
pytestmark = [pytest.mark.integration, pytest.mark.slow]
BUCKET = "raysft"


@pytest.fixture
def gcs(monkeypatch):
    from gcp_storage_emulator.server import create_server

    port = free_port()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
    server.start()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")  # the jobs inherit it
    yield
    server.stop()


def upload(local, uri: str) -> None:
    fs, base = storage.filesystem(uri)
    for path in [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file()):
        target = base if local.is_file() else f"{base}/{path.relative_to(local)}"
        storage.write_bytes(fs, target, path.read_bytes())


def test_sources_models_outputs_and_checkpoints_on_gcs(gcs, tiny_model, tmp_path):
    upload(tiny_model, f"gs://{BUCKET}/models/tiny")
    upload(REPO / "configs/data/messages.jsonl", f"gs://{BUCKET}/data/messages.jsonl")
    prepared = f"gs://{BUCKET}/prepared/messages"
    run("jobs.prepare", {"name": "gcs", "sources": [{"uri": f"gs://{BUCKET}/data/*.jsonl", "format": "messages"}],
                         "tokenizer": f"gs://{BUCKET}/models/tiny", "max_seq_length": 512, "output": prepared})
    fs, base = storage.filesystem(prepared)
    manifest = json.loads(storage.read_bytes(fs, f"{base}/manifest.json"))
    assert manifest["status"] == "succeeded" and manifest["counts"]["rows_read"] == 70

    spec = training_spec(f"gs://{BUCKET}/models/tiny", prepared, f"gs://{BUCKET}/runs", name="gcs-lora",
                         max_steps=4, strategy={"kind": "ddp"},
                         checkpoint={"storage": f"gs://{BUCKET}/runs", "every_steps": 2, "keep": 2})
    steps = step_metrics(run("jobs.train", spec).stdout)
    assert sorted(steps) == [1, 2, 3, 4]
    fs, runs = storage.filesystem(f"gs://{BUCKET}/runs/gcs-lora")
    assert fs.get_file_info(f"{runs}/{run_layout.checkpoint_dir_name(4)}/adapter_model.safetensors").size > 0
    exported = storage.read_dir_files(f"gs://{BUCKET}/runs/gcs-lora/export/adapter")
    assert "adapter_model.safetensors" in exported and "adapter_config.json" in exported
    history = storage.read_bytes(fs, f"{runs}/metrics.jsonl").decode().splitlines()
    assert [json.loads(line)["step"] for line in history] == [1, 2, 3, 4]
