"""The native API's shapes, in one place: what every route may answer (problems, messages) and
each resource's response model, with the functions that turn records into them."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from service import store
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


class OpenAIErrorDetail(BaseModel):
    message: str = Field(description="Every problem, each with its field and the fix.")
    type: str
    param: str | None = Field(description="The first field at fault.")
    code: str | None


class OpenAIError(BaseModel):
    error: OpenAIErrorDetail


# The OpenAI surface answers every refusal in OpenAI's `error` shape (service.routes.errors).
OPENAI_ERRORS = {code: {"model": OpenAIError, "description": description} for code, description in (
    (400, "The upload broke off"), (401, "No API key, or an unknown one"), (404, "No such resource for this tenant"),
    (413, "Over the body or upload limit"), (422, "Invalid request"),
    (429, "The tenant's request rate or active-job limit; see Retry-After"),
    (503, "The database or Ray is unavailable"))}


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
    tokens_seen: int | None = Field(None, description="Tokens trained on so far, over all workers and epochs "
                                    "(prompts and replies, padding excluded).")
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


class DatasetReport(BaseModel):
    manifest: dict[str, Any] = Field(description="The preparation's manifest: counts, rejects by reason, token and "
                                     "length figures, packing, and rendered examples split into trained and "
                                     "untrained segments.")
    rejects: dict[str, list[dict[str, Any]]] = Field(
        description="A few rejected rows of each reason: source, path, line, detail and the raw row.")


class FileOut(BaseModel):
    id: str
    filename: str = Field(description="The name it was uploaded with.")
    bytes: int
    sha256: str = Field(description="SHA-256 of the content, computed while it streamed in.")
    uri: str = Field(description="Where it is stored; specs name it `file:<id>`.")
    created_at: datetime


class FilePage(BaseModel):
    items: list[FileOut]
    total: int
    limit: int
    offset: int


def file_out(row: store.File) -> FileOut:
    return FileOut(id=row.id, filename=row.filename, bytes=row.bytes, sha256=row.sha256, uri=row.uri,
                   created_at=utc(row.created_at))


class NewTenant(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(pattern=store.TENANT_ID_PATTERN, description="Lowercase letters, digits and '-', at most "
                    "64 characters: it names the tenant's storage prefix, tenants/<id>/.")


class TenantOut(BaseModel):
    id: str
    created_at: datetime
    active_keys: int = Field(description="Keys not revoked.")


class NewKey(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field("", max_length=64, description="What the key is for (a person, a CI system).")


class KeyOut(BaseModel):
    id: str
    tenant: str
    name: str
    prefix: str = Field(description="The key's first characters, to tell keys apart.")
    created_at: datetime
    last_used_at: datetime | None = Field(description="Last looked up; exact to the key cache's lifetime.")
    revoked_at: datetime | None


class CreatedKey(KeyOut):
    key: str = Field(description="The key itself: shown this once, stored only hashed.")


def key_out(row: store.ApiKey) -> KeyOut:
    return KeyOut(id=row.id, tenant=row.tenant_id, name=row.name, prefix=row.prefix, created_at=utc(row.created_at),
                  last_used_at=utc(row.last_used_at), revoked_at=utc(row.revoked_at))
