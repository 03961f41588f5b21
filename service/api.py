"""The REST API, `/v1`: routes that translate HTTP to `Control` calls and back; whatever reads
the database, storage or Ray is Control's. Every job belongs to the caller's tenant; another
tenant's job is a 404, never a 403 (its existence is not disclosed)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, status
from fastapi.responses import PlainTextResponse, StreamingResponse
from pydantic import BaseModel, Field

from jobs.common.spec import SpecError
from service.control import Conflict, NotFound, TooManyJobs
from service.deps import ControlDep, IdempotencyKey, SpecBody, TenantDep
from service.ray_jobs import RayUnavailable, UnknownToRay
from service.store import Job, Kind, Status


class Problems(BaseModel):
    problems: list[str] = Field(description="Every problem, each with its field path and the fix.")


class ProblemResponse(BaseModel):
    detail: Problems


class Message(BaseModel):
    detail: str


# What any route may answer besides its own responses (the admin routes share it).
COMMON_RESPONSES = {
    422: {"model": ProblemResponse, "description": "Invalid request"},
    429: {"model": Message, "description": "The tenant's request rate or active-job limit; see Retry-After",
          "headers": {"Retry-After": {"schema": {"type": "integer"}, "description": "Seconds to wait"}}},
    503: {"model": Message, "description": "The database (or Ray, where needed) is unavailable; see Retry-After"}}
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


class Progress(BaseModel):
    stage: str | None = Field(None, description="prepare | train | evaluate")
    percent: float | None = None
    step: int | None = None
    total_steps: int | None = None
    rows: int | None = Field(None, description="Rows read by the preparation.")
    reused: bool | None = Field(None, description="A preparation that found its output already prepared from "
                                "the same spec, input files and tokenizer, and returned it instead of preparing "
                                "again (submit with `force=true` to prepare again).")
    tokens_per_s: float | None = None
    trainable_tokens_per_s: float | None = None
    eta_s: float | None = Field(None, description="Seconds left at the current step time.")


class JobOut(BaseModel):
    id: str
    kind: Kind
    status: Status
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    progress: Progress
    metrics: dict[str, Any] | None = Field(None, description="The latest metrics (trainings); an evaluation's "
                                           "figures, the base model's beside them, and its answers.")
    artifacts: dict[str, Any] = Field(default_factory=dict, description="Outputs that exist: manifest, "
                                      "checkpoints, metrics, exported model and adapter.")
    children: list[str] = Field(default_factory=list, description="A pipeline's dataset and training job ids.")
    sweep_id: str | None = Field(None, description="The sweep that created this training (GET /v1/sweeps/{id}).")
    evaluates: str | None = Field(None, description="The training (or pipeline) an evaluation scores, where its spec "
                                  "named it `job:<id>`.")
    spec: dict[str, Any]


class SweepOut(BaseModel):
    id: str
    jobs: list[JobOut] = Field(description="One training per run, in the order of the runs.")


class JobPage(BaseModel):
    items: list[JobOut]
    total: int
    limit: int
    offset: int


def utc(moment: datetime | None) -> datetime | None:
    """Stored times are UTC; SQLite hands them back without the zone, which RFC 3339 requires."""
    return moment.replace(tzinfo=UTC) if moment is not None and moment.tzinfo is None else moment


def job_out(job: Job, children: list[Job] = ()) -> JobOut:
    cached = job.progress or {}
    return JobOut(id=job.id, kind=job.kind, status=job.status, error=job.error, created_at=utc(job.created_at),
                  started_at=utc(job.started_at), finished_at=utc(job.finished_at),
                  progress=Progress.model_validate({k: v for k, v in cached.items() if k in Progress.model_fields}),
                  metrics=cached.get("metrics"), artifacts=cached.get("artifacts", {}),
                  children=[c.id for c in children], sweep_id=job.sweep_id, evaluates=job.evaluates,
                  spec=job.spec)


# An output already prepared from the same spec, input files and tokenizer is reused (reported as
# `progress.reused`): only an explicit `output` can name one, as a job's own directory is new.
Force = Annotated[bool, Query(description="Prepare again even if the output was already prepared from the same spec, "
                                          "input files and tokenizer (by default that output is reused).")]


def _create(control, tenant: str, kind: Kind, body: dict[str, Any], key: str | None, force: bool = False) -> JobOut:
    job = _refusing(lambda: control.create(tenant, kind, body, key, force))
    return job_out(job, control.children(job))


def _refusing(create):
    """What `create` made, or its refusal as the HTTP answer: 422 with every problem, 429 at the limit."""
    try:
        return create()
    except SpecError as e:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, {"problems": e.problems}) from None
    except Conflict as e:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, {"problems": [f"Idempotency-Key: {e}"]}) from None
    except TooManyJobs as e:
        raise HTTPException(status.HTTP_429_TOO_MANY_REQUESTS, str(e),
                            headers={"Retry-After": str(e.retry_after_s)}) from None


@router.post("/datasets", status_code=status.HTTP_202_ACCEPTED, response_model=JobOut, openapi_extra=SPEC_BODY_DOC,
             responses=CREATED,
             summary="Prepare a dataset (runs jobs.prepare)")
def create_dataset(control: ControlDep, tenant: TenantDep, body: SpecBody, key: IdempotencyKey = None,
                   force: Force = False) -> JobOut:
    return _create(control, tenant, Kind.DATASET, body, key, force)


@router.post("/trainings", status_code=status.HTTP_202_ACCEPTED, response_model=JobOut, openapi_extra=SPEC_BODY_DOC,
             responses=CREATED,
             summary="Train (runs jobs.train); a dataset may be named `job:<dataset job id>`")
def create_training(control: ControlDep, tenant: TenantDep, body: SpecBody, key: IdempotencyKey = None) -> JobOut:
    return _create(control, tenant, Kind.TRAINING, body, key)


@router.post("/evaluations", status_code=status.HTTP_202_ACCEPTED, response_model=JobOut, openapi_extra=SPEC_BODY_DOC,
             responses=CREATED,
             summary="Evaluate a model (runs jobs.evaluate); `dataset`, `adapter` and `model.uri` may be `job:<id>`")
def create_evaluation(control: ControlDep, tenant: TenantDep, body: SpecBody, key: IdempotencyKey = None) -> JobOut:
    return _create(control, tenant, Kind.EVALUATION, body, key)


@router.post("/pipelines", status_code=status.HTTP_202_ACCEPTED, response_model=JobOut, openapi_extra=SPEC_BODY_DOC,
             responses=CREATED,
             summary="Prepare, then train on the result: {dataset: ..., training: ...}")
def create_pipeline(control: ControlDep, tenant: TenantDep, body: SpecBody, key: IdempotencyKey = None,
                    force: Force = False) -> JobOut:
    return _create(control, tenant, Kind.PIPELINE, body, key, force)


@router.post("/sweeps", status_code=status.HTTP_202_ACCEPTED, response_model=SweepOut, openapi_extra=SPEC_BODY_DOC,
             summary="One training per run: {training: <training spec>, runs: [{path.to.field: value}, ...]}")
def create_sweep(control: ControlDep, tenant: TenantDep, body: SpecBody, key: IdempotencyKey = None) -> SweepOut:
    jobs = _refusing(lambda: control.create_sweep(tenant, body, key))
    return SweepOut(id=jobs[0].sweep_id or jobs[0].id, jobs=[job_out(j) for j in jobs])


@router.get("/sweeps/{sweep_id}", response_model=SweepOut, operation_id="getSweep")
def get_sweep(control: ControlDep, tenant: TenantDep, sweep_id: str) -> SweepOut:
    try:
        jobs = control.sweep(tenant, sweep_id)
    except NotFound:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no sweep {sweep_id}") from None
    return SweepOut(id=sweep_id, jobs=[job_out(j) for j in jobs])


@router.get("/jobs", response_model=JobPage)
def list_jobs(control: ControlDep, tenant: TenantDep, kind: Kind | None = None, status_: Status | None = Query(None, alias="status"),
              limit: int = Query(50, ge=1, le=500), offset: int = Query(0, ge=0, le=10**9),
              evaluates: str | None = Query(None, max_length=32, description="Only the evaluations of this training job.")
              ) -> JobPage:
    jobs, total = control.list(tenant, kind, status_, limit, offset, evaluates)
    return JobPage(items=[job_out(j) for j in jobs], total=total, limit=limit, offset=offset)


def _job(control, tenant: str, job_id: str) -> Job:
    try:
        return control.get(tenant, job_id)
    except NotFound:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no job {job_id}") from None


@router.get("/jobs/{job_id}", response_model=JobOut, operation_id="getJob")
def get_job(control: ControlDep, tenant: TenantDep, job_id: str) -> JobOut:
    job = _job(control, tenant, job_id)
    return job_out(job, control.children(job))


@router.post("/jobs/{job_id}/cancel", response_model=JobOut, operation_id="cancelJob")
def cancel_job(control: ControlDep, tenant: TenantDep, job_id: str) -> JobOut:
    _job(control, tenant, job_id)
    try:
        job = control.cancel(tenant, job_id)
    except RayUnavailable as e:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, f"Ray unreachable: {e}") from None
    return job_out(job, control.children(job))


@router.get("/jobs/{job_id}/metrics", operation_id="jobMetrics")
def job_metrics(control: ControlDep, tenant: TenantDep, job_id: str) -> list[dict[str, Any]]:
    """The metrics history of a training (or a pipeline's training), one entry per logging step."""
    job = _job(control, tenant, job_id)
    try:
        return control.metrics_history(job)
    except NotFound as e:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(e)) from None


class DatasetReport(BaseModel):
    manifest: dict[str, Any] = Field(description="The preparation's manifest: counts, rejects by reason, token and "
                                     "length figures, packing, and rendered examples split into trained and "
                                     "untrained segments.")
    rejects: dict[str, list[dict[str, Any]]] = Field(
        description="A few rejected rows of each reason: source, path, line, detail and the raw row.")


@router.get("/jobs/{job_id}/dataset", response_model=DatasetReport, operation_id="jobDataset")
def job_dataset(control: ControlDep, tenant: TenantDep, job_id: str) -> DatasetReport:
    """What a dataset job (or a pipeline's preparation) produced; 404 until its manifest exists."""
    job = _job(control, tenant, job_id)
    try:
        return DatasetReport.model_validate(control.dataset_report(job))
    except NotFound as e:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(e)) from None


@router.get("/jobs/{job_id}/logs", response_class=PlainTextResponse, operation_id="jobLogs",
            responses={200: {"content": {"text/plain": {}}}})
async def job_logs(control: ControlDep, tenant: TenantDep, job_id: str, tail: int = Query(1000, ge=1, le=100_000),
                   follow: bool = False):
    job = _job(control, tenant, job_id)
    try:
        if follow:
            control.ray_job(job)  # a pipeline that has not started a job is a 404 before the stream opens
            return StreamingResponse(control.follow_log(job), media_type="text/plain")
        text = await asyncio.to_thread(control.log_text, job)
    except NotFound as e:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(e)) from None
    except UnknownToRay:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "Ray no longer has this job's logs") from None
    except RayUnavailable as e:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, f"Ray unreachable: {e}") from None
    return PlainTextResponse("\n".join(text.splitlines()[-tail:]))
