"""Experiment tracking: the metrics history sent to a real MLflow store (MLflow's own local SQLite
backend) and to TensorBoard event files, read back and compared entry by entry; a resumed run
continuing its MLflow run; and trackers the image or the nodes cannot serve refused before any
step, with the fix."""

from __future__ import annotations

import struct
import time

import pytest
from tensorboardX.proto.event_pb2 import Event

from jobs.train.metrics_log import MetricsLog
from jobs.train.preflight import tracking_problems
from jobs.train.spec import load_training_spec
from jobs.train.tracking import RUN_TAG, Trackers, flat_params, mlflow_uri, numeric

HISTORY = [{"step": 2, "total_steps": 6, "epoch": 0, "failures": 0, "loss": 2.5, "lr": 0.01, "tokens_per_s": 900.0},
           {"step": 4, "total_steps": 6, "epoch": 0, "failures": 0, "loss": 2.0, "lr": 0.005, "tokens_per_s": 950.0,
            "eval_loss": 2.2, "perplexity": 9.03, "generations": [{"prompt": "p", "answer": "a"}]},
           {"step": 6, "total_steps": 6, "epoch": 1, "failures": 0, "loss": 1.5, "lr": 0.0, "tokens_per_s": 1000.0}]


def spec(storage, report_to, **overrides):
    return load_training_spec({"name": "tracked", "model": {"uri": "m", "dtype": "fp32"}, "datasets": [{"uri": "d"}],
                               "checkpoint": {"storage": str(storage)},
                               "tracking": {"report_to": report_to, "project": "house-style"}} | overrides)


def event_scalars(directory) -> dict[str, list[tuple[int, float]]]:
    """TensorBoard's record format read by hand: length, its CRC, the Event, its CRC."""
    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(directory.iterdir()):
        data, at = path.read_bytes(), 0
        while at < len(data):
            (length,) = struct.unpack_from("<Q", data, at)
            event = Event.FromString(data[at + 12:at + 12 + length])
            at += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_history_entries_reach_mlflow_and_tensorboard_as_metrics_jsonl_has_them(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    training = spec(tmp_path / "checkpoints", ["mlflow", "tensorboard"])
    log = MetricsLog(training.run_uri, resume_step=0, trackers=Trackers(training, training.run_uri))
    for entry in HISTORY:
        log.add(entry, important=entry["step"] == 4)
    log.close()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_uri(training.run_uri))
    assert mlflow_uri(training.run_uri) == f"sqlite:///{tmp_path}/checkpoints/tracked/mlflow.db"
    experiment = client.get_experiment_by_name("house-style")
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "tracked" and run.info.status == "FINISHED" and run.data.tags[RUN_TAG] == training.run_uri
    assert run.data.params["optim.lr"] == str(training.optim.lr) and run.data.params["model.uri"] == "m"
    for key in ("loss", "lr", "tokens_per_s", "eval_loss", "perplexity", "failures"):
        expected = [(e["step"], e[key]) for e in HISTORY if key in e]
        assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)] == expected, key
    assert "generations" not in run.data.metrics and "step" not in run.data.metrics

    scalars = event_scalars(tmp_path / "checkpoints/tracked/tensorboard")
    assert scalars["loss"] == [(2, 2.5), (4, 2.0), (6, 1.5)]
    assert scalars["eval_loss"] == [(4, pytest.approx(2.2))] and "epoch" not in scalars

    # A resumed run (same run directory) continues the same MLflow run.
    resumed = Trackers(training, training.run_uri)
    resumed.log({"step": 8, "loss": 1.0, "time": 1.0})
    resumed.close()
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id])] == [run.info.run_id]
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == [2, 4, 6, 8]


def test_numbers_only_and_the_spec_flattened():
    assert numeric(HISTORY[1] | {"time": 5.0}) == {"failures": 0.0, "loss": 2.0, "lr": 0.005, "tokens_per_s": 950.0,
                                                  "eval_loss": 2.2, "perplexity": 9.03}
    params = flat_params(spec("/c", []))
    assert params["lora.r"] == "16" and params["checkpoint.storage"] == "/c" and params["tracking.report_to"] == "[]"


def test_trackers_the_image_or_the_nodes_cannot_serve_are_refused_with_the_fix():
    none_installed = lambda module: False  # noqa: E731
    problems = tracking_problems(spec("s3://bucket/runs", ["mlflow", "wandb"]), none_installed, env={})
    assert problems == [
        "tracking.report_to: mlflow needs mlflow-skinny in the image (pip install mlflow-skinny)",
        "tracking.report_to: mlflow with no MLFLOW_TRACKING_URI on the nodes writes a SQLite store beside the run, "
        "which needs a local checkpoint.storage: ask the operator for an MLflow server",
        "tracking.report_to: wandb needs the wandb package in the image (pip install raysft[wandb])",
        "tracking.report_to: wandb needs WANDB_API_KEY on the nodes (the operator's secret: the chart's "
        "ray.jobSecrets), or WANDB_MODE=offline"]
    served = {"MLFLOW_TRACKING_URI": "http://mlflow:5000", "WANDB_API_KEY": "k"}
    assert tracking_problems(spec("s3://bucket/runs", ["mlflow", "wandb"]), lambda m: True, served) == []
    assert tracking_problems(spec("/local", ["mlflow", "tensorboard"]), lambda m: True, env={}) == []


def wandb_history(run_file) -> list[dict]:
    """The history records of an offline W&B run: its `.wandb` file is a LevelDB-style log (32 KiB
    blocks of records with a 7-byte header, after a 7-byte file header) of `Record` protos."""
    import json

    from wandb.proto.wandb_internal_pb2 import Record

    data, at, block, pending, history = run_file.read_bytes(), 7, 32768, b"", []
    while at + 7 <= len(data):
        if block - at % block < 7:  # the rest of a block too short for a header is padding
            at += block - at % block
            continue
        length, kind = struct.unpack_from("<HB", data, at + 4)
        if at + 7 + length > len(data):
            break  # a record still being written
        chunk, at = data[at + 7:at + 7 + length], at + 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = Record.FromString(pending + chunk)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
        elif kind in (2, 3):  # its first or a middle piece
            pending += chunk
    return history


def test_history_entries_reach_weights_and_biases_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    training = spec(tmp_path / "checkpoints", ["wandb"])
    assert tracking_problems(training, lambda m: True, {"WANDB_MODE": "offline"}) == []
    trackers = Trackers(training, training.run_uri)
    for entry in HISTORY:
        trackers.log(entry)
    trackers.close()
    [run_file] = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    deadline = time.monotonic() + 30
    while len(logged := wandb_history(run_file)) < len(HISTORY) and time.monotonic() < deadline:
        time.sleep(0.2)  # W&B's core process may still be writing its log when `finish` returns
    assert [(h["_step"], h["loss"]) for h in logged] == [(2, 2.5), (4, 2.0), (6, 1.5)]
    assert logged[1]["eval_loss"] == 2.2 and "generations" not in logged[1] and "epoch" not in logged[1]
