"""Where a training run keeps its files, in one place for the job that writes them and the
service that reads them:

    {checkpoint.storage}/{name}/
      step_00000010/                    a checkpoint, named by its optimizer step
      checkpoint_manager_snapshot.json  Ray Train's record of registered checkpoints
      metrics.jsonl                     the metrics history
      export/adapter/, export/model/    what the run leaves ready to serve
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass

import pyarrow.fs as pafs

from jobs.common import storage

CHECKPOINT_PREFIX = "step_"
METRICS_FILE = "metrics.jsonl"
EXPORT_DIR = "export"
EXPORTED_MODELS = ("adapter", "model")
# Ray Train writes it after each checkpoint it registers (every rank uploaded); a checkpoint
# directory without an entry there may be half written.
RAY_TRAIN_SNAPSHOT = "checkpoint_manager_snapshot.json"


def run_uri(checkpoint_storage: str, name: str) -> str:
    """Where a run lives: its checkpoints, metrics history and export."""
    return posixpath.join(checkpoint_storage.rstrip("/"), name)


def checkpoint_dir_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def checkpoint_step(dir_name: str) -> int | None:
    """The optimizer step a checkpoint directory holds, or None for any other name."""
    digits = dir_name.removeprefix(CHECKPOINT_PREFIX)
    return int(digits) if dir_name.startswith(CHECKPOINT_PREFIX) and digits.isdigit() else None


def metrics_uri(run: str) -> str:
    return posixpath.join(run, METRICS_FILE)


def export_uri(run: str, model: str | None = None) -> str:
    """The run's export directory, or one exported model in it (`adapter`, `model`)."""
    return posixpath.join(run, EXPORT_DIR, *([model] if model else []))


def checkpoints(run: str) -> list[str]:
    """The URIs of the checkpoint directories a run has, oldest first (registered or not)."""
    fs, path = storage.filesystem(run)
    found = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    names = sorted(posixpath.basename(i.path) for i in found
                   if i.type == pafs.FileType.Directory and checkpoint_step(posixpath.basename(i.path)) is not None)
    return [posixpath.join(run, n) for n in names]


@dataclass(frozen=True)
class Registered:
    """The checkpoints Ray Train has registered: the latest, and the best by eval loss."""

    latest: str | None = None
    latest_step: int | None = None
    best: str | None = None
    best_eval_loss: float | None = None


def registered(run: str) -> Registered:
    """Read from Ray Train's snapshot; nothing registered (or the snapshot mid-rewrite) reads as none."""
    fs, path = storage.filesystem(posixpath.join(run, RAY_TRAIN_SNAPSHOT))
    try:
        state = json.loads(storage.read_bytes(fs, path))
    except (FileNotFoundError, ValueError):
        return Registered()
    latest = state.get("latest_checkpoint_result")
    scored = [r for r in state.get("checkpoint_results", []) if r.get("metrics", {}).get("eval_loss") is not None]
    best = min(scored, key=lambda r: r["metrics"]["eval_loss"], default=None)
    return Registered(
        latest=posixpath.join(run, latest["checkpoint_dir_name"]) if latest else None,
        latest_step=checkpoint_step(latest["checkpoint_dir_name"]) if latest else None,
        best=posixpath.join(run, best["checkpoint_dir_name"]) if best else None,
        best_eval_loss=best["metrics"]["eval_loss"] if best else None)
