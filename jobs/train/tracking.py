"""Experiment tracking: rank 0 sends each entry of the run's metrics history (`metrics.jsonl`) to
the trackers the spec names, and the spec as parameters.

- **MLflow** (`mlflow-skinny`): the tracking server in `MLFLOW_TRACKING_URI` (its credentials,
  `MLFLOW_TRACKING_TOKEN` or `MLFLOW_TRACKING_USERNAME`/`PASSWORD`, read by MLflow itself), or
  without one a SQLite store beside the run, `{run}/mlflow.db` (local runs only). A resumed run
  continues the same MLflow run (found by its `raysft.run` tag).
- **TensorBoard**: event files in `{run}/tensorboard/`, written locally and copied there when the
  history is flushed (object stores cannot append).
- **Weights & Biases** (`pip install raysft[wandb]`, `WANDB_API_KEY`): the project is
  `tracking.project`.

Where trackers report and with what credentials is the nodes' environment, set by the operator
(the chart's `ray.jobSecrets`): a spec chooses trackers, never endpoints or secrets.
"""

from __future__ import annotations

import os
import posixpath
import tempfile
from pathlib import Path
from typing import Any

from jobs.common import storage
from jobs.train.spec import Tracker, TrainingSpec

RUN_TAG = "raysft.run"
PARAM_VALUE_CHARS = 500  # MLflow refuses longer parameter values on some stores


def numeric(entry: dict[str, Any]) -> dict[str, float]:
    """The metrics of a history entry that trackers plot: numbers, not the step or bookkeeping."""
    skip = {"step", "total_steps", "epoch", "time"}
    return {k: float(v) for k, v in entry.items()
            if k not in skip and isinstance(v, int | float) and not isinstance(v, bool)}


def flat_params(spec: TrainingSpec) -> dict[str, str]:
    """The spec as `section.field` parameters."""
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            out[prefix] = str(value)[:PARAM_VALUE_CHARS]

    walk("", spec.model_dump(mode="json"))
    return out


def mlflow_uri(run_uri: str) -> str:
    """The operator's MLflow server, else a SQLite store beside the (local: preflight checks) run:
    MLflow's own local backend (its plain file store is in maintenance mode and refused by default)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(run_uri, 'mlflow.db').absolute()}"


class MlflowTracker:
    def __init__(self, spec: TrainingSpec, run_uri: str):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=mlflow_uri(run_uri))
        experiment = self.client.get_experiment_by_name(spec.tracking.project)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(spec.tracking.project)
        found = self.client.search_runs([experiment_id], filter_string=f"tags.`{RUN_TAG}` = '{run_uri}'", max_results=1)
        if found:  # a resumed run continues where it was
            self.run_id = found[0].info.run_id
        else:
            self.run_id = self.client.create_run(experiment_id, run_name=spec.name, tags={RUN_TAG: run_uri}).info.run_id
            from mlflow.entities import Param

            params = [Param(k, v) for k, v in flat_params(spec).items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters a batch
                self.client.log_batch(self.run_id, params=params[i:i + 100])

    def log(self, entry: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        millis = int(entry.get("time", 0) * 1000)
        metrics = [Metric(k, v, millis, entry["step"]) for k, v in numeric(entry).items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def flush(self) -> None:
        pass  # every batch is sent as it is logged

    def close(self) -> None:
        self.client.set_terminated(self.run_id, "FINISHED")


class TensorBoardTracker:
    def __init__(self, run_uri: str):
        from tensorboardX import SummaryWriter

        self.local = Path(tempfile.mkdtemp(prefix="raysft-tensorboard-"))
        self.target = posixpath.join(run_uri, "tensorboard")
        self.writer = SummaryWriter(logdir=str(self.local), flush_secs=3600)

    def log(self, entry: dict[str, Any]) -> None:
        for key, value in numeric(entry).items():
            self.writer.add_scalar(key, value, entry["step"], walltime=entry.get("time"))

    def flush(self) -> None:
        self.writer.flush()
        fs, path = storage.filesystem(self.target)
        for event_file in self.local.iterdir():
            storage.write_bytes(fs, posixpath.join(path, event_file.name), event_file.read_bytes())

    def close(self) -> None:
        self.flush()
        self.writer.close()


class WandbTracker:
    def __init__(self, spec: TrainingSpec, run_uri: str):
        import wandb

        # The run's id follows from its directory, so a resumed run continues the same W&B run.
        run_id = storage.absolute(run_uri).replace("/", "-").replace(":", "")[-64:]
        self.run = wandb.init(project=spec.tracking.project, name=spec.name, id=run_id, resume="allow",
                              config=spec.model_dump(mode="json"))

    def log(self, entry: dict[str, Any]) -> None:
        self.run.log(numeric(entry), step=entry["step"])

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.run.finish()


class Trackers:
    """Every tracker the spec names, behind one interface: `log` each history entry, `flush`
    when the history is written, `close` at the end."""

    def __init__(self, spec: TrainingSpec, run_uri: str):
        makers = {Tracker.MLFLOW: lambda: MlflowTracker(spec, run_uri),
                  Tracker.TENSORBOARD: lambda: TensorBoardTracker(run_uri),
                  Tracker.WANDB: lambda: WandbTracker(spec, run_uri)}
        self.trackers = [makers[t]() for t in spec.tracking.report_to]

    def log(self, entry: dict[str, Any]) -> None:
        for tracker in self.trackers:
            tracker.log(entry)

    def flush(self) -> None:
        for tracker in self.trackers:
            tracker.flush()

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
