"""What a job's outputs say about it: progress, latest metrics and artifacts, read from what its
Ray job writes (the dataset's manifest; the training's metrics history and run directory, laid
out by `jobs.common.run_layout`). Called by the reconcile loop, which caches the result in the
job record, so API reads never touch storage."""

from __future__ import annotations

import json
import posixpath
from datetime import UTC, datetime
from typing import Any

import pyarrow.fs as pafs

from jobs.common import run_layout, storage
from jobs.common.contract import MANIFEST_FILE, REJECTS_DIR, Manifest, ManifestError, read_manifest
from jobs.evaluate.spec import REPORT_FILE
from jobs.train.spec import TrainingSpec


def _exists(uri: str) -> bool:
    fs, path = storage.filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def run_dir(spec: dict[str, Any]) -> str:
    """The run directory of a stored training spec, by the rule `jobs.train` writes it with."""
    return TrainingSpec.model_validate(spec).run_uri


def metrics_history(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """A training's metrics.jsonl, one entry per logging step; empty before the first."""
    fs, path = storage.filesystem(run_layout.metrics_uri(run_dir(spec)))
    if fs.get_file_info(path).type != pafs.FileType.File:
        return []
    return [json.loads(line) for line in storage.read_bytes(fs, path).decode().splitlines() if line.strip()]


def written_before(manifest: Manifest, moment: datetime) -> bool:
    """Whether a manifest was written before `moment` (a job's creation), so by an earlier job.
    Its time is whole seconds, so `moment` is cut to seconds too: a manifest of the same second
    counts as the job's own. (It is the clock of the node that wrote it: a cluster's clock
    minutes behind the service's would pass a fresh output for a reused one.)"""
    moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment  # SQLite drops the zone
    return datetime.fromisoformat(manifest.created_at) < moment.replace(microsecond=0)


def dataset(spec: dict[str, Any], created_at: datetime, succeeded: bool) -> dict[str, Any]:
    """A preparation's progress, from the manifest at its output. A manifest older than the job
    is an earlier job's: the output reused (`reused`) once the job has succeeded without writing
    another; until then it says nothing about this job, which may yet prepare again."""
    output = spec["output"]
    try:
        manifest = read_manifest(output)
    except (FileNotFoundError, ManifestError):
        return {"stage": "prepare", "artifacts": {}}
    reused = written_before(manifest, created_at)
    if reused and not succeeded:
        return {"stage": "prepare", "artifacts": {}}
    counts = manifest.counts
    return {"stage": "prepare", "percent": 100.0 if manifest.succeeded else None, "reused": reused,
            "rows": counts.rows_read, "accepted": counts.accepted, "rejected": counts.rejected_total,
            "tokens": manifest.tokens.all, "packing_efficiency": manifest.packing.efficiency,
            "artifacts": {"dataset": output, "manifest": posixpath.join(output, MANIFEST_FILE),
                          "rejects": posixpath.join(output, REJECTS_DIR)}}


REJECT_EXAMPLES = 3  # raw rows shown per reject reason
REJECTS_SCAN_BYTES = 64 << 20  # how far into the rejects file a report looks for them
RAW_CHARS = 2000  # of each raw row shown


def reject_examples(output: str, reasons: set[str]) -> dict[str, list[dict[str, Any]]]:
    """The first few rejected rows of each reason, read from the start of the rejects files (one
    per input file, in name order) until every reason has its share or `REJECTS_SCAN_BYTES` are
    read (the files can be far larger)."""
    fs, directory = storage.filesystem(posixpath.join(output, REJECTS_DIR))
    examples: dict[str, list[dict[str, Any]]] = {}
    try:
        parts = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(directory)) if i.path.endswith(".jsonl"))
    except FileNotFoundError:
        return examples
    read = 0

    def wanted() -> bool:
        return read < REJECTS_SCAN_BYTES and any(len(examples.get(r, ())) < REJECT_EXAMPLES for r in reasons)

    for path in parts:
        if not wanted():
            break
        with fs.open_input_stream(path) as stream:
            pending = b""
            while wanted():
                chunk = stream.read(1 << 20)
                if not chunk:
                    break
                read += len(chunk)
                *lines, pending = (pending + chunk).split(b"\n")
                for line in lines:
                    record = json.loads(line)
                    shown = examples.setdefault(record["reason"], [])
                    if len(shown) < REJECT_EXAMPLES:
                        shown.append(record | {"raw": (record.get("raw") or "")[:RAW_CHARS]})
    return examples


def dataset_report(spec: dict[str, Any]) -> dict[str, Any]:
    """What a preparation wrote, for people: its manifest (counts, lengths, packing, rendered
    examples with their trained spans) and a few raw rows of each reject reason. FileNotFoundError
    until the manifest exists."""
    output = spec["output"]
    manifest = read_manifest(output)
    return {"manifest": manifest.model_dump(mode="json"),
            "rejects": reject_examples(output, set(manifest.counts.rejected))}


def training(spec: dict[str, Any]) -> dict[str, Any]:
    run = run_dir(spec)
    history = metrics_history(spec)
    artifacts: dict[str, Any] = {"checkpoints": run_layout.checkpoints(run)}
    registered = run_layout.registered(run)
    if registered.latest:
        artifacts["checkpoint_latest"] = registered.latest
    if registered.best:
        artifacts["checkpoint_best"] = registered.best
    if history:
        artifacts["metrics"] = run_layout.metrics_uri(run)
    for name in run_layout.EXPORTED_MODELS:
        if _exists(run_layout.export_uri(run, name)):
            artifacts[f"export_{name}"] = run_layout.export_uri(run, name)
    if not history:
        return {"stage": "train", "step": 0, "artifacts": artifacts}
    last = history[-1]
    step, total = last["step"], last.get("total_steps")
    return {"stage": "train", "step": step, "total_steps": total,
            "percent": round(100 * step / total, 2) if total else None,
            "tokens_per_s": last.get("tokens_per_s"), "trainable_tokens_per_s": last.get("trainable_tokens_per_s"),
            "tokens_seen": last.get("tokens_seen"),
            "eta_s": round((total - step) * last["step_time_s"], 1) if total and "step_time_s" in last else None,
            "metrics": last, "artifacts": artifacts}


def evaluation(spec: dict[str, Any]) -> dict[str, Any]:
    """An evaluation's report, once written: its figures (the base model's beside them) and answers."""
    uri = posixpath.join(spec["output"], REPORT_FILE)
    fs, path = storage.filesystem(uri)
    try:
        report = json.loads(storage.read_bytes(fs, path))
    except FileNotFoundError:
        return {"stage": "evaluate", "artifacts": {}}
    return {"stage": "evaluate", "percent": 100.0, "rows": report["rows"],
            "metrics": {key: report[key] for key in ("metrics", "base_metrics", "generations", "base_generations")
                        if key in report},
            "artifacts": {"evaluation": uri}}


def read(kind: str, spec: dict[str, Any], created_at: datetime, succeeded: bool) -> dict[str, Any]:
    """A job's progress from its outputs; `created_at` and `succeeded` (its Ray job's status) tell
    a preparation's own manifest from an earlier one (`dataset`)."""
    if kind == "dataset":
        return dataset(spec, created_at, succeeded)
    return evaluation(spec) if kind == "evaluation" else training(spec)


def pipeline(dataset_progress: dict[str, Any], training_progress: dict[str, Any] | None) -> dict[str, Any]:
    """A pipeline's progress: preparation counts as the first 10%, training as the rest."""
    if training_progress is None:
        return {**dataset_progress, "percent": 10.0 if dataset_progress.get("percent") == 100.0 else 0.0}
    percent = training_progress.get("percent")
    artifacts = {**dataset_progress.get("artifacts", {}), **training_progress.get("artifacts", {})}
    return {**training_progress, "percent": 10.0 + 0.9 * percent if percent is not None else 10.0,
            "artifacts": artifacts}
