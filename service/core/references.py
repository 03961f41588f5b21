"""What a spec's `job:<id>` stands for: a succeeded preparation's output, or a succeeded
training's export, of the same tenant."""

from __future__ import annotations

from jobs.common import run_layout
from jobs.common.spec import SpecError
from service import job_outputs
from service.core.context import Core
from service.store import Job, Kind, Status


def dataset_output(core: Core, tenant: str, job_id: str) -> str:
    with core.sessions() as session:
        job = session.get(Job, job_id)
    if job is None or job.tenant_id != tenant or job.kind is not Kind.DATASET:
        raise SpecError([f"no dataset job {job_id!r}"])
    if job.status is not Status.SUCCEEDED:
        raise SpecError([f"dataset job {job_id} is {job.status.value}: train once it has SUCCEEDED"])
    return job.spec["output"]


def training_export(core: Core, tenant: str, job_id: str, name: str) -> str:
    """Where a succeeded training (or pipeline) of this tenant exported its `name` (model, adapter)."""
    with core.sessions() as session:
        job = session.get(Job, job_id)
    if job is None or job.tenant_id != tenant or job.kind not in (Kind.TRAINING, Kind.PIPELINE):
        raise SpecError([f"no training job {job_id!r}"])
    if job.status is not Status.SUCCEEDED:
        raise SpecError([f"training job {job_id} is {job.status.value}: evaluate once it has SUCCEEDED"])
    return run_layout.export_uri(job_outputs.run_dir(job.training_spec), name)

