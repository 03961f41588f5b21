"""A job's progress, latest metrics and artifacts, read from what its Ray job writes: the
dataset's manifest, the training's metrics.jsonl and run directory. Called by the reconcile
loop, which caches the result in the job record, so API reads never touch storage."""

from __future__ import annotations

import json
import posixpath
from typing import Any

import pyarrow.fs as pafs

from jobs import storage
from jobs.train_spec import run_uri


def _read_json_lines(uri: str) -> list[dict[str, Any]]:
    fs, path = storage.filesystem(uri)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return []
    return [json.loads(line) for line in storage.read_bytes(fs, path).decode().splitlines() if line.strip()]


def _exists(uri: str) -> bool:
    fs, path = storage.filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def _checkpoints(run_dir: str) -> list[str]:
    fs, path = storage.filesystem(run_dir)
    found = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    names = sorted(posixpath.basename(i.path) for i in found if i.type == pafs.FileType.Directory)
    return [posixpath.join(run_dir, n) for n in names if n.startswith("step_")]


def dataset(spec: dict[str, Any]) -> dict[str, Any]:
    output = spec["output"]
    manifest_uri = posixpath.join(output, "manifest.json")
    if not _exists(manifest_uri):
        return {"stage": "prepare", "artifacts": {}}
    fs, path = storage.filesystem(manifest_uri)
    manifest = json.loads(storage.read_bytes(fs, path))
    counts = manifest["counts"]
    return {"stage": "prepare", "percent": 100.0 if manifest["status"] == "succeeded" else None,
            "rows": counts["rows_read"], "accepted": counts["accepted"], "rejected": counts["rejected_total"],
            "tokens": manifest["tokens"]["all"], "packing_efficiency": manifest["packing"]["efficiency"],
            "artifacts": {"dataset": output, "manifest": manifest_uri,
                          "rejects": posixpath.join(output, "rejects/rejects.jsonl")}}


def run_dir(spec: dict[str, Any]) -> str:
    """The run directory of a stored training spec, by the rule `jobs.train` writes it with."""
    return run_uri(spec["checkpoint"]["storage"], spec["name"])


def training(spec: dict[str, Any]) -> dict[str, Any]:
    run = run_dir(spec)
    history = _read_json_lines(posixpath.join(run, "metrics.jsonl"))
    artifacts: dict[str, Any] = {"checkpoints": _checkpoints(run)}
    if history:
        artifacts["metrics"] = posixpath.join(run, "metrics.jsonl")
    for name in ("adapter", "model"):
        if _exists(posixpath.join(run, "export", name)):
            artifacts[f"export_{name}"] = posixpath.join(run, "export", name)
    if not history:
        return {"stage": "train", "step": 0, "artifacts": artifacts}
    last = history[-1]
    step, total = last["step"], last.get("total_steps")
    result = {"stage": "train", "step": step, "total_steps": total,
              "percent": round(100 * step / total, 2) if total else None,
              "tokens_per_s": last.get("tokens_per_s"), "trainable_tokens_per_s": last.get("trainable_tokens_per_s"),
              "eta_s": round((total - step) * last["step_time_s"], 1) if total and "step_time_s" in last else None,
              "metrics": last, "artifacts": artifacts}
    return result


def read(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return dataset(spec) if kind == "dataset" else training(spec)


def pipeline(dataset_progress: dict[str, Any], training_progress: dict[str, Any] | None) -> dict[str, Any]:
    """A pipeline's progress: preparation counts as the first 10%, training as the rest."""
    if training_progress is None:
        return {**dataset_progress, "percent": 10.0 if dataset_progress.get("percent") == 100.0 else 0.0}
    percent = training_progress.get("percent")
    artifacts = {**dataset_progress.get("artifacts", {}), **training_progress.get("artifacts", {})}
    return {**training_progress, "percent": 10.0 + 0.9 * percent if percent is not None else 10.0,
            "artifacts": artifacts}
