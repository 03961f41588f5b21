"""Fine-tuning jobs as OpenAI's API has them (`service.fine_tuning` maps the terms): each is a
pipeline of the tenant, created from the request and read back as a `fine_tuning.job`, with its
events and checkpoints; the tenant's fine-tuned models beside the base models it may tune."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import re
import time
import uuid
from typing import Any, Literal

from sqlalchemy.exc import IntegrityError

from jobs.common import run_layout, storage
from jobs.common.spec import SpecError
from service import fine_tuning as ft
from service import job_outputs, store
from service.core import files, job_reads, jobs, serving
from service.core.context import Core
from service.core.errors import NotFound
from service.store import Job, Kind, Status


def create(core: Core, tenant: str, body: dict[str, Any], idempotency_key: str | None) -> dict[str, Any]:
    """A pipeline that prepares the job's files and trains the base model on them."""
    request, base = ft.parse_request(body, core.settings.openai_models)
    problems = []
    for name in ("training_file", "validation_file"):
        if (openai_id := getattr(request, name)) is None:
            continue
        try:
            files.get(core, tenant, ft.file_id(openai_id))
        except NotFound:
            problems.append(f"{name}: no file {openai_id}: upload it first (files.create with purpose fine-tune)")
    if problems:
        raise SpecError(problems)
    name = "ft-" + re.sub(r"[^A-Za-z0-9._-]", "-", request.suffix or request.model)
    record = {"model": request.model, "training_file": request.training_file,
              "validation_file": request.validation_file, "suffix": request.suffix, "metadata": request.metadata,
              "method": {"type": "supervised"}, "base_lr": ft.base_lr(base)}
    job = jobs.create(core, tenant, Kind.PIPELINE, ft.pipeline_body(request, base, name), idempotency_key,
                      fine_tuning=record)
    return job_object(core, job)


def get(core: Core, tenant: str, openai_id: str) -> Job:
    job = jobs.get(core, tenant, ft.job_id(openai_id))
    if job.fine_tuning is None:  # a native job is not one of the OpenAI surface's
        raise NotFound(f"no fine-tuning job {openai_id}")
    return job


def model(job: Job) -> str:
    record = job.fine_tuning
    return ft.model_name(record["model"], job.tenant_id, record.get("suffix"), job.id)


def job_object(core: Core, job: Job) -> dict[str, Any]:
    """The job as a `fine_tuning.job`."""
    children = jobs.children(core, job)
    record, spec = job.fine_tuning, job.training_spec
    state = ft.status(job, children)
    progress = job.progress or {}
    eta = progress.get("eta_s") if state == "running" else None
    hyperparameters = ft.hyperparameters(spec, record["base_lr"])
    return {"id": f"{ft.JOB_PREFIX}{job.id}", "object": "fine_tuning.job", "created_at": ft.unix(job.created_at),
            "finished_at": ft.unix(job.finished_at) if job.status.is_terminal else None,
            "error": {"code": "job_failed", "message": job.error or "", "param": None} if state == "failed" else None,
            "fine_tuned_model": model(job) if state == "succeeded" else None,
            "hyperparameters": hyperparameters, "model": record["model"], "organization_id": job.tenant_id,
            "result_files": record.get("result_files", []), "seed": spec["seed"], "status": state,
            "trained_tokens": progress.get("tokens_seen") if state == "succeeded" else None,
            "training_file": record["training_file"], "validation_file": record.get("validation_file"),
            "estimated_finish": int(time.time() + eta) if eta is not None else None, "integrations": None,
            "metadata": record.get("metadata"), "user_provided_suffix": record.get("suffix"),
            "method": {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}}}


# Result files are named by their job: uuid5(this, job id).
RESULTS_NAMESPACE = uuid.UUID("6f0c1f4e-3b1d-4c55-9a7e-2d5b8f1c9e07")


def write_results(core: Core, job_id: str) -> None:
    """Store a succeeded job's result file (`ft.results_csv`) as one of its tenant's files, and
    name it in the job's `result_files`. Its id is derived from the job's, so a second replica
    reconciling the same job writes the same object and finds the record already there."""
    with core.sessions() as session:
        job = session.get(Job, job_id)
    file_id = uuid.uuid5(RESULTS_NAMESPACE, job.id).hex
    data = ft.results_csv(job_reads.metrics_history(core, job))
    uri = f"{files.directory(core, job.tenant_id, file_id)}/{ft.RESULTS_FILENAME}"
    fs, path = storage.filesystem(uri)
    storage.write_bytes(fs, path, data)
    with core.sessions() as session, contextlib.suppress(IntegrityError):
        session.add(store.File(id=file_id, tenant_id=job.tenant_id, filename=ft.RESULTS_FILENAME, bytes=len(data),
                               sha256=hashlib.sha256(data).hexdigest(), uri=uri, purpose=ft.RESULTS_PURPOSE))
        job = session.get(Job, job_id)
        job.fine_tuning = {**job.fine_tuning, "result_files": [f"{ft.FILE_PREFIX}{file_id}"]}
        session.commit()


def page(core: Core, tenant: str, after: str | None, limit: int,
         metadata: dict[str, str] | Literal["null"] | None = None) -> dict[str, Any]:
    """The tenant's fine-tuning jobs, newest first, `limit` after the job `after`, those `metadata`
    matches (`ft.metadata_filter`)."""
    found, _ = jobs.page(core, tenant, limit=limit + 1, after=ft.job_id(after) if after else None, fine_tuning=True,
                         metadata=metadata)
    return listing([job_object(core, j) for j in found[:limit]], has_more=len(found) > limit)


def listing(data: list[dict[str, Any]], has_more: bool = False) -> dict[str, Any]:
    return {"object": "list", "data": data, "has_more": has_more,
            "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}


def after_cursor(items: list[dict[str, Any]], after: str | None, limit: int) -> dict[str, Any]:
    """A page of a list held newest first: `limit` items after the one with id `after`."""
    start = next((i + 1 for i, item in enumerate(items) if item["id"] == after), 0) if after else 0
    return listing(items[start:start + limit], has_more=start + limit < len(items))


def _run(job: Job) -> str:
    return job_outputs.run_dir(job.training_spec)


def _trained(core: Core, job: Job) -> tuple[list[dict[str, Any]], list[int]]:
    """The training's metrics history and checkpoint steps, once it has started."""
    if not any(c.kind is Kind.TRAINING for c in jobs.children(core, job)):
        return [], []
    steps = [run_layout.checkpoint_step(uri.rsplit("/", 1)[-1]) for uri in run_layout.checkpoints(_run(job))]
    return job_reads.metrics_history(core, job), steps


def events(core: Core, job: Job, after: str | None, limit: int) -> dict[str, Any]:
    """The job's events, newest first."""
    history, steps = _trained(core, job)
    found = ft.events(job, jobs.children(core, job), history, steps,
                      model(job) if job.status is Status.SUCCEEDED else None)
    return after_cursor(found[::-1], after, limit)


def checkpoints(core: Core, job: Job, after: str | None, limit: int) -> dict[str, Any]:
    """The checkpoints the run keeps, newest first, with the metrics logged at their steps."""
    history, steps = _trained(core, job)
    rows = {row["step"]: row for row in history if "step" in row}
    found = [{"id": f"{ft.CHECKPOINT_PREFIX}{job.id}-{step}", "object": "fine_tuning.job.checkpoint",
              "created_at": int(rows.get(step, {}).get("time") or ft.unix(job.created_at)),
              "fine_tuned_model_checkpoint": f"{model(job)}:ckpt-step-{step}",
              "fine_tuning_job_id": f"{ft.JOB_PREFIX}{job.id}", "step_number": step,
              "metrics": ft.checkpoint_metrics(rows.get(step, {"step": step}))} for step in steps]
    return after_cursor(found[::-1], after, limit)


def models(core: Core, tenant: str) -> list[dict[str, Any]]:
    """The base models the tenant may fine-tune, then its fine-tuned models, newest first."""
    bases = [{"id": name, "object": "model", "created": 0, "owned_by": "raysft"}
             for name in sorted(core.settings.openai_models)]
    tuned, _ = jobs.page(core, tenant, status=Status.SUCCEEDED, limit=1000, fine_tuning=True)
    return bases + [{"id": model(j), "object": "model", "created": ft.unix(j.finished_at), "owned_by": tenant}
                    for j in tuned]


def find_model(core: Core, tenant: str, name: str) -> dict[str, Any]:
    if (found := next((m for m in models(core, tenant) if m["id"] == name), None)) is None:
        raise NotFound(f"no model {name}")
    return found


def chat_target(core: Core, tenant: str, name: str) -> serving.Target:
    """What answers a chat with `name`: a base model offered for fine-tuning, one of the tenant's
    fine-tuned models, or one of their checkpoints (`<model>:ckpt-step-<n>`)."""
    if (base := core.settings.openai_models.get(name)) is not None:
        return serving.Target(base.uri, (base.training.get("model") or {}).get("dtype", "fp32"), None, ())
    parts = name.split(":")
    if len(parts) in (5, 6) and parts[0] == "ft":
        try:
            job = get(core, tenant, parts[4])
        except NotFound:
            job = None
        if job is not None and job.status is Status.SUCCEEDED and ":".join(parts[:5]) == model(job):
            found = serving.target(job)
            if len(parts) == 5:
                return found
            step = parts[5].removeprefix("ckpt-step-")
            if found.adapter is not None and step.isdigit():
                checkpoint = f"{_run(job)}/{run_layout.checkpoint_dir_name(int(step))}"
                if checkpoint in run_layout.checkpoints(_run(job)):
                    return dataclasses.replace(found, adapter=checkpoint)
    raise NotFound(f"no model {name}: GET /openai/v1/models lists yours")
