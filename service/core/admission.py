"""What a job must pass before it is recorded: its Idempotency-Key, the tenant's limit of active
jobs, and the cluster's size."""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

from sqlalchemy import func, select

from jobs.common.spec import SpecError
from jobs.train.spec import ScalingSpec
from service.core.context import Core
from service.core.errors import Conflict, TooManyJobs
from service.store import Job, Kind, Status

# A slot frees when a job ends, and no Ray job starts and ends in much under this: clients told
# to come back sooner only add load (in the soak test, 40 waiting clients sent 40 requests a
# second that could only be refused).
ACTIVE_LIMIT_RETRY_S = 5


def request_hash(kind: Kind, body: dict[str, Any], force: bool = False) -> str:
    request = {"kind": kind.value, "body": body} | ({"force": True} if force else {})  # hashes as before without it
    return hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()


def by_key(core: Core, tenant: str, key: str) -> Job | None:
    """The job created earlier with this Idempotency-Key."""
    with core.sessions() as session:
        return session.scalar(select(Job).where(Job.tenant_id == tenant, Job.idempotency_key == key))


def same_request(job: Job, digest: str) -> Job:
    if job.request_hash != digest:
        raise Conflict(f"Idempotency-Key already used for job {job.id} with a different request body")
    return job


def active_jobs(core: Core, tenant: str) -> int:
    """Queued or running jobs of a tenant; a pipeline's children count with their pipeline."""
    with core.sessions() as session:
        return session.scalar(select(func.count()).select_from(Job).where(
            Job.tenant_id == tenant, Job.parent_id.is_(None), Job.status.in_((Status.QUEUED, Status.RUNNING))))


def check_active_limit(core: Core, tenant: str, adding: int = 1) -> None:
    """TooManyJobs when `adding` jobs would take the tenant past `tenant_max_active_jobs`."""
    limit = core.settings.tenant_max_active_jobs
    if (active := active_jobs(core, tenant)) + adding <= limit:
        return
    if adding == 1:
        message = f"tenant {tenant} has {active} jobs queued or running (the limit is {limit}); submit again when one ends"
    else:
        message = (f"tenant {tenant} has {active} jobs queued or running and the sweep adds {adding} (the limit is "
                   f"{limit}); submit it when enough have ended, or with fewer runs")
    # The reconcile loop sees a job end within an interval or two.
    raise TooManyJobs(message,
                      retry_after_s=max(ACTIVE_LIMIT_RETRY_S, math.ceil(2 * core.settings.reconcile_interval_s)))


def check_capacity(core: Core, scaling: ScalingSpec) -> None:
    """Refuse now what the cluster can never run, instead of leaving it pending forever."""
    problems = []
    cpus = scaling.num_workers * scaling.cpus_per_worker
    gpus = scaling.num_workers * scaling.gpus_per_worker if scaling.use_gpu else 0
    for name, wanted, most in (("GPUs", gpus, core.settings.cluster_max_gpus),
                               ("CPUs", cpus, core.settings.cluster_max_cpus)):
        if most is not None and wanted > most:
            problems.append(f"scaling: {wanted:g} {name} wanted (num_workers x {name[:3].lower()}s_per_worker) but "
                            f"the cluster can have at most {most:g}: lower num_workers or the per-worker {name}")
    if problems:
        raise SpecError(problems)
