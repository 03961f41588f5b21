"""The native jobs API, `/v1`: datasets, trainings, evaluations, pipelines and sweeps, then each
job's record, logs, metrics and prepared dataset. Every job belongs to the caller's tenant;
another tenant's job is a 404, never a 403 (its existence is not disclosed)."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Query, status
from fastapi.responses import PlainTextResponse, StreamingResponse

from service.core import job_reads, jobs
from service.deps import CoreDep, IdempotencyKey, SpecBody, TenantDep
from service.schemas import COMMON_RESPONSES, DatasetReport, JobOut, JobPage, SweepOut, job_out
from service.store import Kind, Status

router = APIRouter(prefix="/v1", responses=COMMON_RESPONSES)
# OpenAPI links from a created job to what can be done with it: clients (and schemathesis'
# stateful runs) follow them from the 202's `id`.
JOB_LINKS = {name: {"operationId": operation, "parameters": {"job_id": "$response.body#/id"}}
             for name, operation in (("GetJob", "getJob"), ("JobLogs", "jobLogs"), ("JobMetrics", "jobMetrics"),
                                     ("CancelJob", "cancelJob"))}
CREATED = {202: {"description": "Accepted: the job is recorded and submitted", "links": JOB_LINKS}}
SPEC_BODY_DOC = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"type": "object", "additionalProperties": True}},
    "application/yaml": {"schema": {"type": "string"}}}}}
# An output already prepared from the same spec, input files and tokenizer is reused (reported as
# `progress.reused`): only an explicit `output` can name one, as a job's own directory is new.
Force = Annotated[bool, Query(description="Prepare again even if the output was already prepared from the same spec, "
                                          "input files and tokenizer (by default that output is reused).")]


def _created(core, tenant: str, kind: Kind, body: dict[str, Any], key: str | None, force: bool = False) -> JobOut:
    job = jobs.create(core, tenant, kind, body, key, force)
    return job_out(job, jobs.children(core, job))


@router.post("/datasets", status_code=status.HTTP_202_ACCEPTED, response_model=JobOut, openapi_extra=SPEC_BODY_DOC,
             responses=CREATED,
             summary="Prepare a dataset (runs jobs.prepare)")
def create_dataset(core: CoreDep, tenant: TenantDep, body: SpecBody, key: IdempotencyKey = None,
                   force: Force = False) -> JobOut:
    return _created(core, tenant, Kind.DATASET, body, key, force)


@router.post("/trainings", status_code=status.HTTP_202_ACCEPTED, response_model=JobOut, openapi_extra=SPEC_BODY_DOC,
             responses=CREATED,
             summary="Train (runs jobs.train); a dataset may be named `job:<dataset job id>`")
def create_training(core: CoreDep, tenant: TenantDep, body: SpecBody, key: IdempotencyKey = None) -> JobOut:
    return _created(core, tenant, Kind.TRAINING, body, key)


@router.post("/evaluations", status_code=status.HTTP_202_ACCEPTED, response_model=JobOut, openapi_extra=SPEC_BODY_DOC,
             responses=CREATED,
             summary="Evaluate a model (runs jobs.evaluate); `dataset`, `adapter` and `model.uri` may be `job:<id>`")
def create_evaluation(core: CoreDep, tenant: TenantDep, body: SpecBody, key: IdempotencyKey = None) -> JobOut:
    return _created(core, tenant, Kind.EVALUATION, body, key)


@router.post("/pipelines", status_code=status.HTTP_202_ACCEPTED, response_model=JobOut, openapi_extra=SPEC_BODY_DOC,
             responses=CREATED,
             summary="Prepare, then train on the result: {dataset: ..., training: ...}")
def create_pipeline(core: CoreDep, tenant: TenantDep, body: SpecBody, key: IdempotencyKey = None,
                    force: Force = False) -> JobOut:
    return _created(core, tenant, Kind.PIPELINE, body, key, force)


@router.post("/sweeps", status_code=status.HTTP_202_ACCEPTED, response_model=SweepOut, openapi_extra=SPEC_BODY_DOC,
             summary="One training per run: {training: <training spec>, runs: [{path.to.field: value}, ...]}")
def create_sweep(core: CoreDep, tenant: TenantDep, body: SpecBody, key: IdempotencyKey = None) -> SweepOut:
    created = jobs.create_sweep(core, tenant, body, key)
    return SweepOut(id=created[0].sweep_id or created[0].id, jobs=[job_out(j) for j in created])


@router.get("/sweeps/{sweep_id}", response_model=SweepOut, operation_id="getSweep")
def get_sweep(core: CoreDep, tenant: TenantDep, sweep_id: str) -> SweepOut:
    return SweepOut(id=sweep_id, jobs=[job_out(j) for j in jobs.sweep(core, tenant, sweep_id)])


@router.get("/jobs", response_model=JobPage)
def list_jobs(core: CoreDep, tenant: TenantDep, kind: Kind | None = None, status_: Status | None = Query(None, alias="status"),
              limit: int = Query(50, ge=1, le=500), offset: int = Query(0, ge=0, le=10**9),
              evaluates: str | None = Query(None, max_length=32, description="Only the evaluations of this training job.")
              ) -> JobPage:
    found, total = jobs.page(core, tenant, kind, status_, limit, offset, evaluates)
    return JobPage(items=[job_out(j) for j in found], total=total, limit=limit, offset=offset)


@router.get("/jobs/{job_id}", response_model=JobOut, operation_id="getJob")
def get_job(core: CoreDep, tenant: TenantDep, job_id: str) -> JobOut:
    job = jobs.get(core, tenant, job_id)
    return job_out(job, jobs.children(core, job))


@router.post("/jobs/{job_id}/cancel", response_model=JobOut, operation_id="cancelJob")
def cancel_job(core: CoreDep, tenant: TenantDep, job_id: str) -> JobOut:
    job = jobs.cancel(core, tenant, job_id)
    return job_out(job, jobs.children(core, job))


@router.get("/jobs/{job_id}/metrics", operation_id="jobMetrics")
def job_metrics(core: CoreDep, tenant: TenantDep, job_id: str) -> list[dict[str, Any]]:
    """The metrics history of a training (or a pipeline's training), one entry per logging step."""
    return job_reads.metrics_history(core, jobs.get(core, tenant, job_id))


@router.get("/jobs/{job_id}/dataset", response_model=DatasetReport, operation_id="jobDataset")
def job_dataset(core: CoreDep, tenant: TenantDep, job_id: str) -> DatasetReport:
    """What a dataset job (or a pipeline's preparation) produced; 404 until its manifest exists."""
    return DatasetReport.model_validate(job_reads.dataset_report(core, jobs.get(core, tenant, job_id)))


@router.get("/jobs/{job_id}/logs", response_class=PlainTextResponse, operation_id="jobLogs",
            responses={200: {"content": {"text/plain": {}}}})
async def job_logs(core: CoreDep, tenant: TenantDep, job_id: str, tail: int = Query(1000, ge=1, le=100_000),
                   follow: bool = False):
    job = await asyncio.to_thread(jobs.get, core, tenant, job_id)
    if follow:
        job_reads.ray_job(core, job)  # a pipeline that has not started a job is a 404 before the stream opens
        return StreamingResponse(job_reads.follow_log(core, job), media_type="text/plain")
    text = await asyncio.to_thread(job_reads.log_text, core, job)
    return PlainTextResponse("\n".join(text.splitlines()[-tail:]))
