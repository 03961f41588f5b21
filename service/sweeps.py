"""Sweeps: one training spec and a list of runs, each a mapping of field paths to values
(`{"optim.lr": 2e-4}`, set as `--set` sets them), become one training job per run. They are
validated together (every run's problems at once), recorded together under one sweep id, and
compared side by side on the dashboard. Pure: what the service records is `service.core.jobs`'s."""

from __future__ import annotations

from typing import Any

from jobs.common.overrides import set_fields
from jobs.common.spec import SpecError

MAX_RUNS = 64


def run_documents(body: Any) -> list[dict[str, Any]]:
    """Each run's training document: the spec with the run's fields set and its name numbered
    (`lora-1`, `lora-2`, ...), so runs never share a run directory."""
    if not isinstance(body, dict):
        raise SpecError(["the body is {training: <training spec>, runs: [{path: value, ...}, ...]}"])
    training, runs = body.get("training"), body.get("runs")
    problems = [f"{key}: unknown field: a sweep is {{training, runs}}" for key in body if key not in ("training", "runs")]
    if not isinstance(training, dict):
        problems.append("training: required, a training spec")
    if not isinstance(runs, list) or not 1 <= len(runs) <= MAX_RUNS or not all(isinstance(r, dict) for r in runs):
        problems.append(f"runs: required, a list of 1 to {MAX_RUNS} mappings of field paths to values "
                        "(e.g. [{optim.lr: 1.0e-4}, {optim.lr: 2.0e-4}])")
    if problems:
        raise SpecError(problems)
    documents = []
    for i, run in enumerate(runs):
        try:
            document = set_fields(training, run)
        except SpecError as e:
            problems += [f"runs.{i}.{p}" for p in e.problems]
            continue
        document["name"] = f"{training.get('name', 'sweep')}-{i + 1}"
        documents.append(document)
    if problems:
        raise SpecError(problems)
    return documents
