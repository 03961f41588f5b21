"""A run's metrics history as JSON lines beside its checkpoints: `{storage}/{name}/metrics.jsonl`.

The control plane and people read it while the run goes on. Object stores cannot append, so the
file is rewritten whole: at most every `interval_s`, and whenever an entry is marked important
(evaluations, checkpoints, the end). On resume, entries after the resumed step are dropped, since
those steps run again. Each entry also goes to the run's experiment trackers (`jobs.train.tracking`).
"""

from __future__ import annotations

import json
import time
from typing import Any

import pyarrow.fs as pafs

from jobs.common import run_layout, storage
from jobs.train.tracking import Trackers


class MetricsLog:
    def __init__(self, run_uri: str, resume_step: int, interval_s: float = 10.0, trackers: Trackers | None = None):
        self.fs, self.path = storage.filesystem(run_layout.metrics_uri(run_uri))
        self.interval_s = interval_s
        self.trackers = trackers
        self.entries = [e for e in self._read() if e.get("step", 0) <= resume_step]
        self.written_at: float | None = None  # never: the first entry is written at once

    def _read(self) -> list[dict[str, Any]]:
        if self.fs.get_file_info(self.path).type != pafs.FileType.File:
            return []
        text = storage.read_bytes(self.fs, self.path).decode()
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def add(self, entry: dict[str, Any], important: bool = False) -> None:
        self.entries.append(entry | {"time": round(time.time(), 3)})
        if self.trackers is not None:
            self.trackers.log(self.entries[-1])
        if important or self.written_at is None or time.monotonic() - self.written_at >= self.interval_s:
            self.flush()

    def flush(self) -> None:
        data = "".join(json.dumps(e) + "\n" for e in self.entries).encode()
        storage.write_bytes(self.fs, self.path, data)
        self.written_at = time.monotonic()
        if self.trackers is not None:
            self.trackers.flush()

    def close(self) -> None:
        """The last write, and the trackers' runs ended."""
        self.flush()
        if self.trackers is not None:
            self.trackers.close()
