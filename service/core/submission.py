"""Handing recorded jobs to Ray. A job is written (QUEUED, with its Ray submission id) before Ray
is called, so a crash between the two leaves a record the reconcile loop submits; Ray refuses a
second job with the same submission id and the service adopts the first."""

from __future__ import annotations

import json
import logging

from sqlalchemy import select

from jobs.common import storage
from service import specs
from service.core.context import Core
from service.ray_jobs import RayUnavailable
from service.store import Job, Kind, Status

log = logging.getLogger("raysft.service")


def spec_uri(core: Core, job: Job) -> str:
    return f"{specs.job_dir(core.policy, job.tenant_id, job.id)}/spec.json"


def log_copy_uri(core: Core, job: Job) -> str:
    return f"{specs.job_dir(core.policy, job.tenant_id, job.id)}/job.log"


def submit_pending(core: Core, job_id: str) -> None:
    """Write the spec file and submit to Ray (it and any QUEUED children not yet submitted).
    If Ray cannot be reached the job stays QUEUED and the reconcile loop tries again."""
    with core.sessions() as session:
        jobs = session.scalars(select(Job).where(
            ((Job.id == job_id) | (Job.parent_id == job_id)), Job.kind != Kind.PIPELINE,
            Job.submitted.is_(False), Job.status == Status.QUEUED)).all()
        for job in jobs:
            uri = spec_uri(core, job)
            fs, path = storage.filesystem(uri)
            storage.write_bytes(fs, path, json.dumps(job.spec, indent=2).encode())
            try:
                core.ray.submit(job.kind, storage.absolute(uri), job.submission_id,
                                {"raysft_job_id": job.id, "raysft_tenant": job.tenant_id}, force=job.force)
            except RayUnavailable as e:
                log.warning("job %s not submitted yet: %s", job.id, e)
                continue
            job.submitted = True
            session.commit()
