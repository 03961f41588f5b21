"""The OpenAI fine-tuning API's terms in raysft's: a create request becomes a pipeline (prepare the
job's files, then train), and a pipeline is reported back as a `fine_tuning.job`, its events and
checkpoints. Pure functions, tested on their own (`tests/unit/service/test_fine_tuning.py`); what
reads the database and storage is `service.core.fine_tuning`'s.

How OpenAI's hyperparameters map (each "auto" keeps the base model's configured default):
- `n_epochs` → `epochs` (and no `max_steps`);
- `batch_size` → the global batch, micro_batch_size × grad_accum × num_workers: split over the
  workers, then into the largest micro-batch up to the configured one that divides it. Rows are
  packed (`packing` of the base model's dataset defaults), so a batch counts packed sequences;
- `learning_rate_multiplier` → `optim.lr` = the configured learning rate × the multiplier.
"""

from __future__ import annotations

import csv
import io
import math
import re
from datetime import datetime
from typing import Any, Literal

from pydantic import Field, field_validator

from jobs.common.overrides import set_fields
from jobs.common.spec import SpecError, SpecModel, validate
from jobs.train.spec import BatchSpec, OptimSpec
from service.settings import FineTunableModel
from service.store import Job, Kind, Status

Auto = Literal["auto"]
FILE_PREFIX, JOB_PREFIX, CHECKPOINT_PREFIX, EVENT_PREFIX = "file-", "ftjob-", "ftckpt-", "ftevent-"


class Hyperparameters(SpecModel):
    batch_size: Auto | int = Field("auto", description="Sequences per optimizer step, over all workers.")
    learning_rate_multiplier: Auto | float = Field("auto", description="Times the base model's configured rate.")
    n_epochs: Auto | int = Field("auto", description="Passes over the training file.")

    @field_validator("batch_size", "n_epochs")
    @classmethod
    def _positive(cls, value: Auto | int) -> Auto | int:
        if value != "auto" and not 1 <= value <= 1024:
            raise ValueError("must be 'auto' or between 1 and 1024")
        return value

    @field_validator("learning_rate_multiplier")
    @classmethod
    def _multiplier(cls, value: Auto | float) -> Auto | float:
        if value != "auto" and not 0 < value <= 100:
            raise ValueError("must be 'auto' or above 0 and at most 100")
        return value


class Supervised(SpecModel):
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)


class Method(SpecModel):
    type: Literal["supervised"] = Field(description="Only supervised fine-tuning: raysft trains no DPO or RL.")
    supervised: Supervised | None = None


class FineTuningRequest(SpecModel):
    """POST /openai/v1/fine_tuning/jobs. Everything raysft cannot honour is refused, not ignored."""

    model: str = Field(description="A base model the operator configured (GET /openai/v1/models).")
    training_file: str = Field(description="An uploaded file: JSON Lines of {\"messages\": [...]} rows.")
    validation_file: str | None = Field(None, description="Held out whole as the validation split.")
    suffix: str | None = Field(None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$",
                               description="Up to 64 letters, digits, '.', '_', '-', put in the model's name.")
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    metadata: dict[str, str] | None = Field(None, max_length=16)
    hyperparameters: Hyperparameters | None = Field(None, description="Deprecated by OpenAI for method; either.")
    method: Method | None = None
    integrations: list[Any] | None = Field(None, description="Refused when not empty: report_to is raysft's own.")

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value and any(len(k) > 64 or len(v) > 512 for k, v in value.items()):
            raise ValueError("keys are at most 64 characters and values at most 512")
        return value

    @field_validator("integrations")
    @classmethod
    def _no_integrations(cls, value: list[Any] | None) -> list[Any] | None:
        if value:
            raise ValueError("raysft does not run OpenAI's integrations: leave them out (a base model's "
                             "training defaults can set tracking.report_to)")
        return value

    def chosen(self) -> Hyperparameters:
        """The hyperparameters, wherever the request put them (both places is refused)."""
        in_method = self.method.supervised.hyperparameters if self.method and self.method.supervised else None
        if self.hyperparameters is not None and in_method is not None:
            raise SpecError(["hyperparameters: given twice; set them in method.supervised.hyperparameters only"])
        return in_method or self.hyperparameters or Hyperparameters()


def parse_request(body: dict[str, Any], models: dict[str, FineTunableModel]) -> tuple[FineTuningRequest, FineTunableModel]:
    request = validate(FineTuningRequest, body)
    if request.model not in models:
        offered = ", ".join(sorted(models)) or "none: the operator configures RAYSFT_OPENAI_MODELS"
        raise SpecError([f"model: {request.model!r} cannot be fine-tuned here; base models: {offered}"])
    return request, models[request.model]


def base_lr(base: FineTunableModel) -> float:
    return (base.training.get("optim") or {}).get("lr", OptimSpec.model_fields["lr"].default)


def batch_fields(batch_size: int, base: FineTunableModel) -> dict[str, Any]:
    """`batch_size` as the training spec's batch: split over the workers, then into the largest
    micro-batch up to the configured one that divides each worker's share."""
    workers = (base.training.get("scaling") or {}).get("num_workers", 1)
    if batch_size % workers:
        raise SpecError([f"hyperparameters.batch_size: {batch_size} does not split over the {workers} workers "
                         f"this model trains on; use a multiple of {workers}"])
    per_worker = batch_size // workers
    largest = (base.training.get("batch") or {}).get("micro_batch_size", BatchSpec.model_fields["micro_batch_size"].default)
    micro = max(d for d in range(1, min(largest, per_worker) + 1) if per_worker % d == 0)
    return {"batch.micro_batch_size": micro, "batch.grad_accum": per_worker // micro}


def pipeline_body(request: FineTuningRequest, base: FineTunableModel, job_name: str) -> dict[str, Any]:
    """The pipeline spec (`POST /v1/pipelines`'s body) that carries out a fine-tuning request."""
    chosen = request.chosen()
    sources = [{"uri": f"file:{file_id(request.training_file)}", "format": "messages"}]
    if request.validation_file:
        sources.append({"uri": f"file:{file_id(request.validation_file)}", "format": "messages", "split": "val"})
    dataset = {"template": "tokenizer"} | base.dataset | {"name": job_name, "sources": sources,
                                                          "tokenizer": base.uri}
    fields: dict[str, Any] = {"name": job_name, "model.uri": base.uri}
    if request.seed is not None:
        fields["seed"] = request.seed
    if chosen.n_epochs != "auto":
        fields |= {"epochs": chosen.n_epochs, "max_steps": None}
    if chosen.learning_rate_multiplier != "auto":
        fields["optim.lr"] = base_lr(base) * chosen.learning_rate_multiplier
    if chosen.batch_size != "auto":
        fields |= batch_fields(chosen.batch_size, base)
    return {"dataset": dataset, "training": set_fields(base.training, fields)}


METADATA_KEY = re.compile(r"metadata\[(.*)\]")


def metadata_filter(params: list[tuple[str, str]]) -> dict[str, str] | Literal["null"] | None:
    """OpenAI's filter of a job list, from its query: `metadata[k]=v` for each key that must hold
    that value (a dict), or `metadata=null` for the jobs without metadata ("null"); None: no filter
    (neither, or an empty object)."""
    pairs = {match[1]: value for name, value in params if (match := METADATA_KEY.fullmatch(name))}
    plain = [value for name, value in params if name == "metadata"]
    if plain and (pairs or plain != ["null"]):
        raise SpecError(["metadata: filter with metadata[key]=value for each key that must hold that value, "
                         "or metadata=null for jobs without metadata; not both"])
    return "null" if plain else pairs or None


def file_id(openai_id: str) -> str:
    return openai_id.removeprefix(FILE_PREFIX)


def job_id(openai_id: str) -> str:
    return openai_id.removeprefix(JOB_PREFIX)


def model_name(base: str, tenant: str, suffix: str | None, pipeline_id: str) -> str:
    """OpenAI's naming of a fine-tuned model: ft:<base>:<organization>:<suffix>:<job>."""
    return f"ft:{base}:{tenant}:{suffix or ''}:{pipeline_id}"


def unix(moment: datetime | None) -> int | None:
    return None if moment is None else int(moment.timestamp())


def status(pipeline: Job, children: list[Job]) -> str:
    """OpenAI's status of a pipeline: validating_files while its files are prepared, queued until
    the training starts, then running, and how it ended (a LOST job failed)."""
    if pipeline.status is Status.SUCCEEDED:
        return "succeeded"
    if pipeline.status is Status.CANCELLED:
        return "cancelled"
    if pipeline.status.is_terminal:
        return "failed"
    training = next((c for c in children if c.kind is Kind.TRAINING), None)
    if training is None:
        return "validating_files"
    return "running" if training.status is Status.RUNNING else "queued"


def hyperparameters(training_spec: dict[str, Any], base_rate: float) -> dict[str, Any]:
    """What the job trains with, in OpenAI's terms (every "auto" resolved)."""
    batch, scaling = training_spec["batch"], training_spec["scaling"]
    return {"n_epochs": training_spec.get("epochs") or 1,
            "batch_size": batch["micro_batch_size"] * batch["grad_accum"] * scaling["num_workers"],
            "learning_rate_multiplier": round(training_spec["optim"]["lr"] / base_rate, 6)}


def checkpoint_metrics(row: dict[str, Any]) -> dict[str, float]:
    """A metrics row in the names OpenAI's checkpoints and metric events use."""
    names = {"step": "step", "loss": "train_loss", "eval_loss": "valid_loss", "token_accuracy": "valid_mean_token_accuracy"}
    return {theirs: row[ours] for ours, theirs in names.items() if isinstance(row.get(ours), int | float)
            and math.isfinite(row[ours])}


# OpenAI's result file of a succeeded job: its metrics by step, as CSV.
RESULTS_FILENAME, RESULTS_PURPOSE = "step_metrics.csv", "fine-tune-results"
RESULTS_COLUMNS = ("step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy")


def results_csv(history: list[dict[str, Any]]) -> bytes:
    """The result file: a row per logged step (not the base model's step 0), in OpenAI's columns.
    Validation figures are there at evaluated steps; raysft measures no training accuracy, so that
    column stays empty."""
    out = io.StringIO()
    writer = csv.DictWriter(out, RESULTS_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(checkpoint_metrics(row) for row in history if row.get("step", 0) >= 1)
    return out.getvalue().encode()


def events(job: Job, children: list[Job], history: list[dict[str, Any]], checkpoint_steps: list[int],
           model: str | None) -> list[dict[str, Any]]:
    """The job's `fine_tuning.job.event`s, oldest first: its stages from the records, one metrics
    event per logged step, one per checkpoint, and how it ended."""
    dataset = next((c for c in children if c.kind is Kind.DATASET), None)
    training = next((c for c in children if c.kind is Kind.TRAINING), None)
    found: list[tuple[float, str, str, dict | None, str]] = []  # time, level, message, data, type

    def add(moment, message, level="info", data=None, kind="message"):
        if moment is not None:
            found.append((moment if isinstance(moment, int | float) else moment.timestamp(), level, message, data, kind))

    add(job.created_at, f"Created fine-tuning job: {JOB_PREFIX}{job.id}")
    add(job.created_at, f"Validating training file: {job.fine_tuning['training_file']}")
    if dataset is not None and dataset.status is Status.SUCCEEDED:
        rows = (dataset.progress or {}).get("rows")
        add(dataset.finished_at, "Files validated, moving job to queued state"
            + (f" ({rows} rows read)" if rows is not None else ""))
    if training is not None and training.started_at is not None:
        add(training.started_at, "Fine-tuning job started")
    for row in history:
        if row.get("step") and "loss" in row:
            data = checkpoint_metrics(row) | {"total_steps": row.get("total_steps")}
            add(row.get("time"), f"Step {row['step']}/{row.get('total_steps')}: training loss={row['loss']:.4f}"
                + (f", validation loss={row['eval_loss']:.4f}" if "eval_loss" in row else ""), data=data, kind="metrics")
    times = {row["step"]: row.get("time") for row in history if "step" in row}
    for step in checkpoint_steps:
        add(times.get(step), f"Checkpoint created at step {step}")
    if job.status is Status.SUCCEEDED:
        add(job.finished_at, f"New fine-tuned model created: {model}")
        add(job.finished_at, "The job has successfully completed")
    elif job.status is Status.CANCELLED:
        add(job.finished_at, "Fine-tuning job cancelled")
    elif job.status.is_terminal:
        add(job.finished_at, f"Fine-tuning job failed: {job.error}", level="error")
    found.sort(key=lambda e: e[0])  # stable: events of one moment keep the order they were added in
    return [{"id": f"{EVENT_PREFIX}{job.id}-{i}", "object": "fine_tuning.job.event", "created_at": int(moment),
             "level": level, "message": message, "data": data, "type": kind}
            for i, (moment, level, message, data, kind) in enumerate(found)]
