"""The reconcile loop's pass: keeps job records in step with Ray, submits what is recorded but not
yet submitted, marks jobs Ray no longer knows as LOST, advances pipelines, and caches progress and
a copy of each log so that reads never wait on storage or Ray."""

from __future__ import annotations

import contextlib
import logging
import time
from datetime import UTC

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from jobs.common import storage
from service import job_outputs
from service.core import fine_tuning, jobs
from service.core.context import Core
from service.core.submission import log_copy_uri, submit_pending
from service.ray_jobs import RayUnavailable, UnknownToRay
from service.store import Job, Kind, Status, now

log = logging.getLogger("raysft.service")
LOG_COPY_BYTES = 4 << 20  # the tail of a job's log kept beside its outputs


def reconcile_once(core: Core) -> None:
    with core.sessions() as session:
        active = session.scalars(select(Job).where(Job.status.in_([Status.QUEUED, Status.RUNNING]))).all()
        ids = [(j.id, j.kind, j.submitted) for j in active]
    for job_id, kind, submitted in ids:
        if kind is Kind.PIPELINE:
            continue
        if not submitted:
            submit_pending(core, job_id)
            continue
        try:
            _reconcile_job(core, job_id)
        except RayUnavailable as e:
            _ray_down(core, e)
            return
    core.ray_down_since = None
    for job_id, kind, _ in ids:
        if kind is Kind.PIPELINE:
            advance_pipeline(core, job_id)


def _reconcile_job(core: Core, job_id: str) -> None:
    with core.sessions() as session:
        job = session.get(Job, job_id)
        try:
            ray_job = core.ray.status(job.submission_id)
        except UnknownToRay:
            job.finish(Status.LOST, "Ray no longer knows this job: the cluster was restarted or its job "
                                    "history was lost; resubmit it (a training resumes from its checkpoints)")
            session.commit()
            return
        if ray_job.status is Status.RUNNING and job.started_at is None:
            job.started_at = now()
        if ray_job.status is not Status.QUEUED:
            job.progress = job_outputs.read(job.kind.value, job.spec, job.created_at,
                                            ray_job.status is Status.SUCCEEDED)
            _copy_log(core, job, last=ray_job.status.is_terminal)
        if (waited := _waiting_s(job, ray_job.status)) > core.settings.start_deadline_s:
            with contextlib.suppress(UnknownToRay):
                core.ray.stop(job.submission_id)
            job.finish(Status.FAILED, f"not started after {waited:.0f} s (start_deadline_s): the cluster has "
                                      "no room for it; lower its scaling, or add nodes, and resubmit")
        elif ray_job.status.is_terminal:
            job.finish(ray_job.status, None if ray_job.status is Status.SUCCEEDED else ray_job.message[-2000:])
        else:
            job.status = ray_job.status
        session.commit()


def _waiting_s(job: Job, ray_status: Status) -> float:
    """How long a job has waited to start: Ray has not started its driver, or a training has no
    step yet (Ray Train waits for its workers' resources with the driver running)."""
    no_step = job.kind is Kind.TRAINING and not (job.progress or {}).get("step")
    if ray_status is Status.QUEUED or (ray_status is Status.RUNNING and no_step):
        created = job.created_at.replace(tzinfo=UTC) if job.created_at.tzinfo is None else job.created_at
        return (now() - created).total_seconds()
    return 0.0


def _copy_log(core: Core, job: Job, last: bool) -> None:
    """Keep a copy of the Ray log beside the job's outputs (every `log_copy_interval_s`, and once
    more at the end): Ray's copy is gone when its head restarts."""
    if not last and time.monotonic() - core.log_copied_at.get(job.id, 0.0) < core.settings.log_copy_interval_s:
        return
    try:
        text = core.ray.logs(job.submission_id)[-LOG_COPY_BYTES:]
        fs, path = storage.filesystem(log_copy_uri(core, job))
        storage.write_bytes(fs, path, text.encode())
    except Exception as e:  # a missed copy must not stop reconciling: the next pass copies again
        log.warning("job %s: log not copied: %s", job.id, e)
        return
    core.log_copied_at[job.id] = time.monotonic()
    if last:
        core.log_copied_at.pop(job.id)


def _ray_down(core: Core, error: Exception) -> None:
    """Ray unreachable: jobs keep their status for a while (a restart is short), then are LOST."""
    core.ray_down_since = core.ray_down_since or time.monotonic()
    down = time.monotonic() - core.ray_down_since
    log.warning("Ray unreachable for %.0f s: %s", down, error)
    if down < core.settings.ray_unreachable_lost_s:
        return
    with core.sessions() as session:
        for job in session.scalars(select(Job).where(Job.status.in_([Status.QUEUED, Status.RUNNING]),
                                                     Job.submitted.is_(True))):
            job.finish(Status.LOST, f"Ray unreachable for {down:.0f} s: {str(error)[:300]}")
        session.commit()


def advance_pipeline(core: Core, pipeline_id: str) -> None:
    """Dataset first; training once it has SUCCEEDED; the pipeline ends with its last child."""
    with core.sessions() as session:
        pipeline = session.get(Job, pipeline_id)
        children = {c.kind: c for c in session.scalars(select(Job).where(Job.parent_id == pipeline_id))}
        dataset, training = children.get(Kind.DATASET), children.get(Kind.TRAINING)
        submit, succeeded = None, False  # succeeded: a fine-tuning job (OpenAI's) that ends now
        if dataset.status is Status.SUCCEEDED and training is None:
            training = jobs.child(pipeline, Kind.TRAINING, pipeline.spec["training"])
            session.add(training)
            submit = training.id
        current = training or dataset
        if current.status is Status.RUNNING and pipeline.status is Status.QUEUED:
            pipeline.status, pipeline.started_at = Status.RUNNING, pipeline.started_at or now()
        failed = next((c for c in (dataset, training) if c is not None and c.status.is_terminal
                       and c.status is not Status.SUCCEEDED), None)
        if failed is not None:
            pipeline.finish(failed.status, f"{failed.kind.value} job {failed.id} {failed.status.value}: {failed.error}")
        elif training is not None and training.status is Status.SUCCEEDED:
            succeeded = pipeline.status is not Status.SUCCEEDED and pipeline.fine_tuning is not None
            pipeline.finish(Status.SUCCEEDED)
        pipeline.progress = job_outputs.pipeline(dataset.progress or {}, training.progress if training else None)
        try:
            session.commit()
        except IntegrityError:  # another replica's pass created the training first, and submits it
            return
    if submit is not None:
        submit_pending(core, pipeline_id)
    if succeeded:
        try:
            fine_tuning.write_results(core, pipeline_id)
        except Exception as e:  # the job has succeeded all the same; its result_files stay empty
            log.warning("job %s: result file not written: %s", pipeline_id, e)
