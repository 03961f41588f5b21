"""Jobs: created idempotently (validated, admitted, recorded, then submitted), grouped in sweeps,
listed, read and cancelled. The database is the source of truth; `reconcile` keeps it in step
with Ray."""

from __future__ import annotations

import functools
from datetime import timedelta
from typing import Any, Literal

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from jobs.common.spec import SpecError
from service import specs, sweeps
from service.core import admission, files, references
from service.core.context import Core
from service.core.errors import NotFound
from service.core.submission import submit_pending
from service.ray_jobs import UnknownToRay
from service.store import Job, Kind, Status, metadata_matches, new_id, now


def create(core: Core, tenant: str, kind: Kind, body: dict[str, Any], idempotency_key: str | None,
           force: bool = False, **columns: Any) -> Job:
    """Validate, record, then submit. `force`: a dataset job or a pipeline's preparation prepares
    again instead of reusing an earlier output; `columns`: more of the record (what the OpenAI
    surface keeps). Raises SpecError (422), Conflict (422) or TooManyJobs (429)."""
    idempotency_key = idempotency_key or None  # an empty header is no key (it would match only itself)
    digest = admission.request_hash(kind, body, force)
    if idempotency_key and (existing := admission.by_key(core, tenant, idempotency_key)) is not None:
        return admission.same_request(existing, digest)
    admission.check_active_limit(core, tenant)
    job_id = new_id()
    spec = build(core, tenant, kind, body, job_id)
    with core.sessions() as session:
        job = Job(id=job_id, tenant_id=tenant, kind=kind, status=Status.QUEUED, spec=spec, request_hash=digest,
                  idempotency_key=idempotency_key, force=force,
                  submission_id=f"raysft-{job_id}" if kind is not Kind.PIPELINE else None,
                  evaluates=specs.evaluated_job(body) if kind is Kind.EVALUATION else None, **columns)
        session.add(job)
        if kind is Kind.PIPELINE:
            session.add(child(job, Kind.DATASET, spec["dataset"]))
        try:
            session.commit()
        except IntegrityError:  # a concurrent request with the same key won the insert
            session.rollback()
            existing = admission.by_key(core, tenant, idempotency_key) if idempotency_key else None
            if existing is None:
                raise
            return admission.same_request(existing, digest)
    submit_pending(core, job.id)
    return get(core, tenant, job.id)


def create_sweep(core: Core, tenant: str, body: dict[str, Any], idempotency_key: str | None) -> list[Job]:
    """One training per run of a sweep (`service.sweeps`), validated and recorded together, then
    submitted; the first job carries the Idempotency-Key for the whole sweep."""
    documents = sweeps.run_documents(body)
    idempotency_key = idempotency_key or None
    digest = admission.request_hash(Kind.TRAINING, body)
    if idempotency_key and (existing := admission.by_key(core, tenant, idempotency_key)) is not None:
        job = admission.same_request(existing, digest)
        return sweep(core, tenant, job.sweep_id) if job.sweep_id else [job]
    admission.check_active_limit(core, tenant, adding=len(documents))
    ids, built, problems = [new_id() for _ in documents], [], []
    for i, (document, job_id) in enumerate(zip(documents, ids, strict=True)):
        try:
            built.append(build(core, tenant, Kind.TRAINING, document, job_id))
        except SpecError as e:
            problems += [f"runs.{i}.{p}" for p in e.problems]
    if problems:
        raise SpecError(problems)
    sweep_id, created = new_id(), now()
    with core.sessions() as session:
        for i, (job_id, spec) in enumerate(zip(ids, built, strict=True)):
            session.add(Job(id=job_id, tenant_id=tenant, kind=Kind.TRAINING, status=Status.QUEUED, spec=spec,
                            request_hash=digest, idempotency_key=idempotency_key if i == 0 else None,
                            submission_id=f"raysft-{job_id}", sweep_id=sweep_id,
                            created_at=created + timedelta(microseconds=i)))  # the runs' order
        try:
            session.commit()
        except IntegrityError:  # a concurrent request with the same key won the insert
            session.rollback()
            if idempotency_key is None:
                raise
            return create_sweep(core, tenant, body, idempotency_key)
    for job_id in ids:
        submit_pending(core, job_id)
    return sweep(core, tenant, sweep_id)


def sweep(core: Core, tenant: str, sweep_id: str) -> list[Job]:
    """A sweep's trainings, in the order of its runs."""
    with core.sessions() as session:
        jobs = list(session.scalars(select(Job).where(Job.tenant_id == tenant, Job.sweep_id == sweep_id)
                                    .order_by(Job.created_at)))
    if not jobs:
        raise NotFound(f"no sweep {sweep_id}")
    return jobs


def build(core: Core, tenant: str, kind: Kind, body: dict[str, Any], job_id: str) -> dict[str, Any]:
    """The job's spec as it is recorded and submitted: validated, `file:` and `job:` references
    resolved, paths placed in the tenant's prefix. Raises SpecError with every problem."""
    file_uri = functools.partial(files.uri, core, tenant)
    dataset_output = functools.partial(references.dataset_output, core, tenant)
    trusted = core.settings.trusted_remote_code_models
    if kind is Kind.DATASET:
        return specs.dataset_spec(body, core.policy, tenant, job_id, file_uri).model_dump(mode="json")
    if kind is Kind.TRAINING:
        spec = specs.training_spec(body, core.policy, tenant, job_id, dataset_output, trusted)
        admission.check_capacity(core, spec.scaling)
        return spec.model_dump(mode="json")
    if kind is Kind.EVALUATION:
        spec = specs.evaluation_spec(body, core.policy, tenant, job_id, dataset_output,
                                     functools.partial(references.training_export, core, tenant), trusted)
        admission.check_capacity(core, spec.scaling)
        return spec.model_dump(mode="json")
    problems = [f"{k}: required" for k in ("dataset", "training") if not isinstance(body.get(k), dict)]
    if problems:
        raise SpecError(problems)
    dataset = _prefixed("dataset", lambda: specs.dataset_spec(body["dataset"], core.policy, tenant, job_id, file_uri))
    training_body = {**body["training"], "datasets": [{"uri": dataset.output}]}
    training = _prefixed("training", lambda: specs.training_spec(training_body, core.policy, tenant, job_id,
                                                                 dataset_output, trusted))
    _prefixed("training", lambda: admission.check_capacity(core, training.scaling))
    return {"dataset": dataset.model_dump(mode="json"), "training": training.model_dump(mode="json")}


def _prefixed(name: str, build_part):
    try:
        return build_part()
    except SpecError as e:
        raise SpecError([f"{name}.{p}" for p in e.problems]) from None


def child(parent: Job, kind: Kind, spec: dict[str, Any]) -> Job:
    """A pipeline's dataset or training job."""
    child_id = new_id()
    return Job(id=child_id, tenant_id=parent.tenant_id, kind=kind, status=Status.QUEUED, spec=spec,
               request_hash=parent.request_hash, parent_id=parent.id, submission_id=f"raysft-{child_id}",
               force=parent.force and kind is Kind.DATASET)


def get(core: Core, tenant: str, job_id: str) -> Job:
    with core.sessions() as session:
        job = session.get(Job, job_id)
    if job is None or job.tenant_id != tenant:
        raise NotFound(f"no job {job_id}")
    return job


def children(core: Core, job: Job) -> list[Job]:
    if job.kind is not Kind.PIPELINE:  # only pipelines have children: no query for the rest
        return []
    with core.sessions() as session:
        return list(session.scalars(select(Job).where(Job.parent_id == job.id).order_by(Job.created_at)))


def page(core: Core, tenant: str, kind: Kind | None = None, status: Status | None = None, limit: int = 50,
         offset: int = 0, evaluates: str | None = None, after: str | None = None,
         fine_tuning: bool = False, metadata: dict[str, str] | Literal["null"] | None = None) -> tuple[list[Job], int]:
    """The tenant's jobs, newest first (a pipeline's children with their pipeline): `limit` of them
    from `offset`, or after the job `after`; `fine_tuning`: only those created through the OpenAI
    surface, and of those, with `metadata`, the ones it matches (`store.metadata_matches`)."""
    query = select(Job).where(Job.tenant_id == tenant, Job.parent_id.is_(None))
    if evaluates is not None:
        query = query.where(Job.evaluates == evaluates)
    if kind is not None:
        query = query.where(Job.kind == kind)
    if fine_tuning:
        query = query.where(Job.fine_tuning.is_not(None))
    if metadata is not None:
        query = query.where(metadata_matches(metadata))
    if status is not None:
        query = query.where(Job.status == status)
    with core.sessions() as session:
        total = session.scalar(select(func.count()).select_from(query.subquery()))
        if after is not None and (cursor := session.get(Job, after)) is not None and cursor.tenant_id == tenant:
            query = query.where((Job.created_at < cursor.created_at)
                                | ((Job.created_at == cursor.created_at) & (Job.id > cursor.id)))
        rows = session.scalars(query.order_by(Job.created_at.desc(), Job.id).limit(limit).offset(offset)).all()
    return list(rows), int(total or 0)


def cancel(core: Core, tenant: str, job_id: str) -> Job:
    """Stop the job (and a pipeline's children) on Ray and mark it CANCELLED; ended jobs stay as they are."""
    job = get(core, tenant, job_id)
    with core.sessions() as session:
        targets = session.scalars(select(Job).where((Job.id == job.id) | (Job.parent_id == job.id))).all()
        for target in targets:
            if target.status.is_terminal:
                continue
            if target.submitted:
                try:
                    core.ray.stop(target.submission_id)
                except UnknownToRay:
                    pass
            target.finish(Status.CANCELLED, "cancelled by request")
        session.commit()
    return get(core, tenant, job_id)
