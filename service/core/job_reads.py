"""What a job produced, read where it lives: its Ray log (or the copy kept beside its outputs), a
training's metrics history, a preparation's manifest and rejects."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from jobs.common import storage
from jobs.common.contract import ManifestError
from service import job_outputs
from service.core import jobs
from service.core.context import Core
from service.core.errors import NotFound
from service.core.submission import log_copy_uri
from service.ray_jobs import RayUnavailable, UnknownToRay
from service.store import Job, Kind


def ray_job(core: Core, job: Job) -> Job:
    """The job whose Ray job stands for `job` (its logs, its metrics): a pipeline's latest child."""
    if job.kind is not Kind.PIPELINE:
        return job
    children = jobs.children(core, job)
    if not children:
        raise NotFound("the pipeline has not started a job yet")
    return children[-1]


def dataset_job(core: Core, job: Job) -> Job:
    """The job whose output is a prepared dataset: a dataset job, or a pipeline's preparation."""
    if job.kind is Kind.DATASET:
        return job
    if job.kind in (Kind.TRAINING, Kind.EVALUATION):
        raise NotFound(f"a {job.kind.value} prepares no dataset: its spec names the datasets it reads")
    for child in jobs.children(core, job):
        if child.kind is Kind.DATASET:
            return child
    raise NotFound("the pipeline has not started its preparation yet")


def dataset_report(core: Core, job: Job) -> dict[str, Any]:
    """A preparation's manifest and reject examples, read from its output."""
    job = dataset_job(core, job)
    try:
        return job_outputs.dataset_report(job.spec)
    except FileNotFoundError:
        raise NotFound("the preparation has not written its manifest yet") from None
    except ManifestError as e:
        raise NotFound(str(e)) from None


def metrics_history(core: Core, job: Job) -> list[dict[str, Any]]:
    """A training's metrics history, read from its run directory; empty for a dataset job."""
    job = ray_job(core, job)
    return job_outputs.metrics_history(job.spec) if job.kind is Kind.TRAINING else []


def saved_log(core: Core, job: Job) -> str | None:
    """The last copy of a job's log, or None."""
    fs, path = storage.filesystem(log_copy_uri(core, job))
    try:
        return storage.read_bytes(fs, path).decode(errors="replace")
    except FileNotFoundError:
        return None


def log_text(core: Core, job: Job) -> str:
    """The job's Ray log; once Ray lost it (a head restart) or is down, the copy kept beside the
    outputs. Raises UnknownToRay or RayUnavailable when there is neither."""
    job = ray_job(core, job)
    if not job.submitted:
        return ""
    try:
        return core.ray.logs(job.submission_id)
    except (UnknownToRay, RayUnavailable):
        if (text := saved_log(core, job)) is None:
            raise
        return text


async def follow_log(core: Core, job: Job) -> AsyncIterator[str]:
    """The Ray log as it grows, until the job ends or Ray goes away (said in the stream)."""
    job = ray_job(core, job)
    if not job.submitted:
        return
    try:
        async for chunk in core.ray.follow(job.submission_id):
            yield chunk
    except RayUnavailable as e:
        yield f"\n[raysft] log stream ended: {e}\n"
