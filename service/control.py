"""What the control plane does with jobs: create (idempotently), submit, cancel, reconcile.

The database is the source of truth. A job is written (QUEUED, with its Ray submission id) before
Ray is called, so a crash between the two leaves a record the reconcile loop submits; Ray refuses
a second job with the same submission id and the service adopts the first. The reconcile loop
keeps records in step with Ray, marks jobs Ray no longer knows as LOST, advances pipelines and
caches progress so GETs never wait on storage or Ray.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from jobs.common import run_layout, storage
from jobs.common.contract import ManifestError
from jobs.common.spec import SpecError
from jobs.train.spec import ScalingSpec
from service import job_outputs, specs, store, sweeps
from service.ray_jobs import RayJobs, RayUnavailable, UnknownToRay
from service.settings import Settings
from service.store import Job, Kind, Status, new_id, now
from service.uris import UriPolicy

log = logging.getLogger("raysft.service")
LOG_COPY_BYTES = 4 << 20  # the tail of a job's log kept beside its outputs
MAX_KNOWN_KEYS = 10_000
# A slot frees when a job ends, and no Ray job starts and ends in much under this: clients told
# to come back sooner only add load (in the soak test, 40 waiting clients sent 40 requests a
# second that could only be refused).
ACTIVE_LIMIT_RETRY_S = 5


class Conflict(Exception):
    """The Idempotency-Key was used before with a different request body."""


class NotFound(Exception):
    pass


class TooManyJobs(Exception):
    """The tenant already has its limit of queued or running jobs."""

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


def request_hash(kind: Kind, body: dict[str, Any], force: bool = False) -> str:
    request = {"kind": kind.value, "body": body} | ({"force": True} if force else {})  # hashes as before without it
    return hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()


@dataclass
class Control:
    sessions: sessionmaker[Session]
    ray: RayJobs
    settings: Settings
    policy: UriPolicy = field(init=False)
    ray_down_since: float | None = None
    log_copied_at: dict[str, float] = field(default_factory=dict)  # job id -> monotonic time
    known_keys: dict[str, tuple[str, float]] = field(default_factory=dict)  # key hash -> (tenant, expiry)

    def __post_init__(self) -> None:
        self.policy = UriPolicy(self.settings.artifact_root, self.settings.data_dir.absolute(),
                                tuple(self.settings.shared_read_prefixes))

    def known_tenant(self, key: str) -> str | None:
        """The tenant of an API key looked up within `key_cache_ttl_s`; no database round trip."""
        tenant, expiry = self.known_keys.get(store.hash_key(key), (None, 0.0))
        return tenant if expiry > time.monotonic() else None

    def tenant_for_key(self, key: str) -> str | None:
        """API key -> tenant. Known keys are remembered for `key_cache_ttl_s`, so most requests
        skip that database round trip, and a key revoked on another replica is refused here once
        that time is up. Unknown keys are looked up every time: a flood of wrong keys cannot fill
        the memory."""
        if (tenant := self.known_tenant(key)) is not None:
            return tenant
        digest = store.hash_key(key)
        with self.sessions() as session:
            tenant = store.tenant_for_key(session, key)
        if tenant is not None:
            if len(self.known_keys) >= MAX_KNOWN_KEYS:
                self.known_keys.clear()
            self.known_keys[digest] = (tenant, time.monotonic() + self.settings.key_cache_ttl_s)
        return tenant

    def revoke_key(self, key_id: str) -> store.ApiKey | None:
        """Revoke a key: refused here at once, by other replicas within `key_cache_ttl_s`."""
        with self.sessions() as session:
            row = store.revoke_api_key(session, key_id)
            if row is not None:
                self.known_keys.pop(row.key_hash, None)
        return row

    # ------------------------------------------------------------ creating

    def create(self, tenant: str, kind: Kind, body: dict[str, Any], idempotency_key: str | None,
               force: bool = False) -> Job:
        """Validate, record, then submit. `force`: a dataset job or a pipeline's preparation
        prepares again instead of reusing an earlier output. Raises SpecError (422) or Conflict (422)."""
        idempotency_key = idempotency_key or None  # an empty header is no key (it would match only itself)
        digest = request_hash(kind, body, force)
        if idempotency_key and (existing := self._by_key(tenant, idempotency_key)) is not None:
            return self._same_request(existing, digest)
        if (active := self._active_jobs(tenant)) >= self.settings.tenant_max_active_jobs:
            # The reconcile loop sees a job end within an interval or two.
            raise TooManyJobs(f"tenant {tenant} has {active} jobs queued or running (the limit is "
                              f"{self.settings.tenant_max_active_jobs}); submit again when one ends",
                              retry_after_s=max(ACTIVE_LIMIT_RETRY_S, math.ceil(2 * self.settings.reconcile_interval_s)))
        job_id = new_id()
        spec = self._build(tenant, kind, body, job_id)
        with self.sessions() as session:
            job = Job(id=job_id, tenant_id=tenant, kind=kind, status=Status.QUEUED, spec=spec, request_hash=digest,
                      idempotency_key=idempotency_key, force=force,
                      submission_id=f"raysft-{job_id}" if kind is not Kind.PIPELINE else None,
                      evaluates=specs.evaluated_job(body) if kind is Kind.EVALUATION else None)
            session.add(job)
            if kind is Kind.PIPELINE:
                session.add(self._child(job, Kind.DATASET, spec["dataset"]))
            try:
                session.commit()
            except IntegrityError:  # a concurrent request with the same key won the insert
                session.rollback()
                existing = self._by_key(tenant, idempotency_key) if idempotency_key else None
                if existing is None:
                    raise
                return self._same_request(existing, digest)
        self.submit_pending(job.id)
        return self.get(tenant, job.id)

    def create_sweep(self, tenant: str, body: dict[str, Any], idempotency_key: str | None) -> list[Job]:
        """One training per run of a sweep (`service.sweeps`), validated and recorded together,
        then submitted; the first job carries the Idempotency-Key for the whole sweep."""
        documents = sweeps.run_documents(body)
        idempotency_key = idempotency_key or None
        digest = request_hash(Kind.TRAINING, body)
        if idempotency_key and (existing := self._by_key(tenant, idempotency_key)) is not None:
            job = self._same_request(existing, digest)
            return self.sweep(tenant, job.sweep_id) if job.sweep_id else [job]
        limit = self.settings.tenant_max_active_jobs
        if (active := self._active_jobs(tenant)) + len(documents) > limit:
            raise TooManyJobs(f"tenant {tenant} has {active} jobs queued or running and the sweep adds {len(documents)} "
                              f"(the limit is {limit}); submit it when enough have ended, or with fewer runs",
                              retry_after_s=max(ACTIVE_LIMIT_RETRY_S, math.ceil(2 * self.settings.reconcile_interval_s)))
        ids, built, problems = [new_id() for _ in documents], [], []
        for i, (document, job_id) in enumerate(zip(documents, ids, strict=True)):
            try:
                built.append(self._build(tenant, Kind.TRAINING, document, job_id))
            except SpecError as e:
                problems += [f"runs.{i}.{p}" for p in e.problems]
        if problems:
            raise SpecError(problems)
        sweep_id, created = new_id(), now()
        with self.sessions() as session:
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
                return self.create_sweep(tenant, body, idempotency_key)
        for job_id in ids:
            self.submit_pending(job_id)
        return self.sweep(tenant, sweep_id)

    def sweep(self, tenant: str, sweep_id: str) -> list[Job]:
        """A sweep's trainings, in the order of its runs."""
        with self.sessions() as session:
            jobs = list(session.scalars(select(Job).where(Job.tenant_id == tenant, Job.sweep_id == sweep_id)
                                        .order_by(Job.created_at)))
        if not jobs:
            raise NotFound(sweep_id)
        return jobs

    def _build(self, tenant: str, kind: Kind, body: dict[str, Any], job_id: str) -> dict[str, Any]:
        files = functools.partial(self._file_uri, tenant)
        if kind is Kind.DATASET:
            return specs.dataset_spec(body, self.policy, tenant, job_id, files).model_dump(mode="json")
        if kind is Kind.TRAINING:
            spec = specs.training_spec(body, self.policy, tenant, job_id, lambda ref: self._dataset_output(tenant, ref),
                                       self.settings.trusted_remote_code_models)
            self._check_capacity(spec.scaling)
            return spec.model_dump(mode="json")
        if kind is Kind.EVALUATION:
            spec = specs.evaluation_spec(body, self.policy, tenant, job_id, lambda ref: self._dataset_output(tenant, ref),
                                         lambda ref, name: self._training_export(tenant, ref, name),
                                         self.settings.trusted_remote_code_models)
            self._check_capacity(spec.scaling)
            return spec.model_dump(mode="json")
        problems = [f"{k}: required" for k in ("dataset", "training") if not isinstance(body.get(k), dict)]
        if problems:
            raise SpecError(problems)
        dataset = self._prefixed("dataset", lambda: specs.dataset_spec(body["dataset"], self.policy, tenant, job_id,
                                                                       files))
        training_body = {**body["training"], "datasets": [{"uri": dataset.output}]}
        training = self._prefixed("training", lambda: specs.training_spec(
            training_body, self.policy, tenant, job_id, lambda ref: self._dataset_output(tenant, ref),
            self.settings.trusted_remote_code_models))
        self._prefixed("training", lambda: self._check_capacity(training.scaling))
        return {"dataset": dataset.model_dump(mode="json"), "training": training.model_dump(mode="json")}

    def file_directory(self, tenant: str, file_id: str) -> str:
        """Where an uploaded file is stored: `tenants/<tenant>/files/<id>/`."""
        return self.policy.resolve(f"{self.policy.tenant_root(tenant)}/files/{file_id}")

    def _file_uri(self, tenant: str, file_id: str) -> str:
        with self.sessions() as session:
            row = store.tenant_file(session, tenant, file_id)
        if row is None:
            raise SpecError([f"no file {file_id} for this tenant: `raysft files list` shows yours"])
        return row.uri

    def _check_capacity(self, scaling: ScalingSpec) -> None:
        """Refuse now what the cluster can never run, instead of leaving it pending forever."""
        problems = []
        cpus = scaling.num_workers * scaling.cpus_per_worker
        gpus = scaling.num_workers * scaling.gpus_per_worker if scaling.use_gpu else 0
        for name, wanted, most in (("GPUs", gpus, self.settings.cluster_max_gpus),
                                   ("CPUs", cpus, self.settings.cluster_max_cpus)):
            if most is not None and wanted > most:
                problems.append(f"scaling: {wanted:g} {name} wanted (num_workers x {name[:3].lower()}s_per_worker) but "
                                f"the cluster can have at most {most:g}: lower num_workers or the per-worker {name}")
        if problems:
            raise SpecError(problems)

    @staticmethod
    def _prefixed(name: str, build):
        try:
            return build()
        except SpecError as e:
            raise SpecError([f"{name}.{p}" for p in e.problems]) from None

    def _child(self, parent: Job, kind: Kind, spec: dict[str, Any]) -> Job:
        child_id = new_id()
        return Job(id=child_id, tenant_id=parent.tenant_id, kind=kind, status=Status.QUEUED, spec=spec,
                   request_hash=parent.request_hash, parent_id=parent.id, submission_id=f"raysft-{child_id}",
                   force=parent.force and kind is Kind.DATASET)

    def _dataset_output(self, tenant: str, job_id: str) -> str:
        with self.sessions() as session:
            job = session.get(Job, job_id)
        if job is None or job.tenant_id != tenant or job.kind is not Kind.DATASET:
            raise SpecError([f"no dataset job {job_id!r}"])
        if job.status is not Status.SUCCEEDED:
            raise SpecError([f"dataset job {job_id} is {job.status.value}: train once it has SUCCEEDED"])
        return job.spec["output"]

    def _training_export(self, tenant: str, job_id: str, name: str) -> str:
        """Where a succeeded training (or pipeline) of this tenant exported its `name` (model, adapter)."""
        with self.sessions() as session:
            job = session.get(Job, job_id)
        if job is None or job.tenant_id != tenant or job.kind not in (Kind.TRAINING, Kind.PIPELINE):
            raise SpecError([f"no training job {job_id!r}"])
        if job.status is not Status.SUCCEEDED:
            raise SpecError([f"training job {job_id} is {job.status.value}: evaluate once it has SUCCEEDED"])
        spec = job.spec["training"] if job.kind is Kind.PIPELINE else job.spec
        return run_layout.export_uri(job_outputs.run_dir(spec), name)

    def _active_jobs(self, tenant: str) -> int:
        """Queued or running jobs of a tenant; a pipeline's children count with their pipeline."""
        with self.sessions() as session:
            return session.scalar(select(func.count()).select_from(Job).where(
                Job.tenant_id == tenant, Job.parent_id.is_(None), Job.status.in_((Status.QUEUED, Status.RUNNING))))

    def _by_key(self, tenant: str, key: str) -> Job | None:
        with self.sessions() as session:
            return session.scalar(select(Job).where(Job.tenant_id == tenant, Job.idempotency_key == key))

    @staticmethod
    def _same_request(job: Job, digest: str) -> Job:
        if job.request_hash != digest:
            raise Conflict(f"Idempotency-Key already used for job {job.id} with a different request body")
        return job

    # ------------------------------------------------------------ submitting

    def spec_uri(self, job: Job) -> str:
        return f"{specs.job_dir(self.policy, job.tenant_id, job.id)}/spec.json"

    def log_copy_uri(self, job: Job) -> str:
        return f"{specs.job_dir(self.policy, job.tenant_id, job.id)}/job.log"

    def submit_pending(self, job_id: str) -> None:
        """Write the spec file and submit to Ray (it and any QUEUED children not yet submitted).
        If Ray cannot be reached the job stays QUEUED and the reconcile loop tries again."""
        with self.sessions() as session:
            jobs = session.scalars(select(Job).where(
                ((Job.id == job_id) | (Job.parent_id == job_id)), Job.kind != Kind.PIPELINE,
                Job.submitted.is_(False), Job.status == Status.QUEUED)).all()
            for job in jobs:
                uri = self.spec_uri(job)
                fs, path = storage.filesystem(uri)
                storage.write_bytes(fs, path, json.dumps(job.spec, indent=2).encode())
                try:
                    self.ray.submit(job.kind, storage.absolute(uri), job.submission_id,
                                    {"raysft_job_id": job.id, "raysft_tenant": job.tenant_id}, force=job.force)
                except RayUnavailable as e:
                    log.warning("job %s not submitted yet: %s", job.id, e)
                    continue
                job.submitted = True
                session.commit()

    # ------------------------------------------------------------ reading

    def get(self, tenant: str, job_id: str) -> Job:
        with self.sessions() as session:
            job = session.get(Job, job_id)
        if job is None or job.tenant_id != tenant:
            raise NotFound(job_id)
        return job

    def children(self, job: Job) -> list[Job]:
        if job.kind is not Kind.PIPELINE:  # only pipelines have children: no query for the rest
            return []
        with self.sessions() as session:
            return list(session.scalars(select(Job).where(Job.parent_id == job.id).order_by(Job.created_at)))

    def list(self, tenant: str, kind: Kind | None, status: Status | None, limit: int, offset: int,
             evaluates: str | None = None) -> tuple[list[Job], int]:
        from sqlalchemy import func

        query = select(Job).where(Job.tenant_id == tenant, Job.parent_id.is_(None))
        if evaluates is not None:
            query = query.where(Job.evaluates == evaluates)
        if kind is not None:
            query = query.where(Job.kind == kind)
        if status is not None:
            query = query.where(Job.status == status)
        with self.sessions() as session:
            total = session.scalar(select(func.count()).select_from(query.subquery()))
            rows = session.scalars(query.order_by(Job.created_at.desc(), Job.id).limit(limit).offset(offset)).all()
        return list(rows), int(total or 0)

    # ------------------------------------------------------------ cancelling

    def cancel(self, tenant: str, job_id: str) -> Job:
        job = self.get(tenant, job_id)
        with self.sessions() as session:
            targets = session.scalars(select(Job).where((Job.id == job.id) | (Job.parent_id == job.id))).all()
            for target in targets:
                if target.status.is_terminal:
                    continue
                if target.submitted:
                    try:
                        self.ray.stop(target.submission_id)
                    except UnknownToRay:
                        pass
                target.finish(Status.CANCELLED, "cancelled by request")
            session.commit()
        return self.get(tenant, job_id)

    # ------------------------------------------------------------ reconciling

    def reconcile_once(self) -> None:
        with self.sessions() as session:
            active = session.scalars(select(Job).where(Job.status.in_([Status.QUEUED, Status.RUNNING]))).all()
            ids = [(j.id, j.kind, j.submitted) for j in active]
        for job_id, kind, submitted in ids:
            if kind is Kind.PIPELINE:
                continue
            if not submitted:
                self.submit_pending(job_id)
                continue
            try:
                self._reconcile_job(job_id)
            except RayUnavailable as e:
                self._ray_down(e)
                return
        self.ray_down_since = None
        for job_id, kind, _ in ids:
            if kind is Kind.PIPELINE:
                self._advance_pipeline(job_id)

    def _reconcile_job(self, job_id: str) -> None:
        with self.sessions() as session:
            job = session.get(Job, job_id)
            try:
                ray_job = self.ray.status(job.submission_id)
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
                self._copy_log(job, last=ray_job.status.is_terminal)
            if (waited := self._waiting_s(job, ray_job.status)) > self.settings.start_deadline_s:
                with contextlib.suppress(UnknownToRay):
                    self.ray.stop(job.submission_id)
                job.finish(Status.FAILED, f"not started after {waited:.0f} s (start_deadline_s): the cluster has "
                                          "no room for it; lower its scaling, or add nodes, and resubmit")
            elif ray_job.status.is_terminal:
                job.finish(ray_job.status, None if ray_job.status is Status.SUCCEEDED else ray_job.message[-2000:])
            else:
                job.status = ray_job.status
            session.commit()

    @staticmethod
    def _waiting_s(job: Job, ray_status: Status) -> float:
        """How long a job has waited to start: Ray has not started its driver, or a training has
        no step yet (Ray Train waits for its workers' resources with the driver running)."""
        no_step = job.kind is Kind.TRAINING and not (job.progress or {}).get("step")
        if ray_status is Status.QUEUED or (ray_status is Status.RUNNING and no_step):
            created = job.created_at.replace(tzinfo=UTC) if job.created_at.tzinfo is None else job.created_at
            return (now() - created).total_seconds()
        return 0.0

    def _copy_log(self, job: Job, last: bool) -> None:
        """Keep a copy of the Ray log beside the job's outputs (every `log_copy_interval_s`, and
        once more at the end): Ray's copy is gone when its head restarts."""
        if not last and time.monotonic() - self.log_copied_at.get(job.id, 0.0) < self.settings.log_copy_interval_s:
            return
        try:
            text = self.ray.logs(job.submission_id)[-LOG_COPY_BYTES:]
            fs, path = storage.filesystem(self.log_copy_uri(job))
            storage.write_bytes(fs, path, text.encode())
        except Exception as e:  # a missed copy must not stop reconciling: the next pass copies again
            log.warning("job %s: log not copied: %s", job.id, e)
            return
        self.log_copied_at[job.id] = time.monotonic()
        if last:
            self.log_copied_at.pop(job.id)

    def saved_log(self, job: Job) -> str | None:
        """The last copy of a job's log, or None."""
        fs, path = storage.filesystem(self.log_copy_uri(job))
        try:
            return storage.read_bytes(fs, path).decode(errors="replace")
        except FileNotFoundError:
            return None

    def ray_job(self, job: Job) -> Job:
        """The job whose Ray job stands for `job` (its logs, its metrics): a pipeline's latest child."""
        if job.kind is not Kind.PIPELINE:
            return job
        children = self.children(job)
        if not children:
            raise NotFound("the pipeline has not started a job yet")
        return children[-1]

    def dataset_job(self, job: Job) -> Job:
        """The job whose output is a prepared dataset: a dataset job, or a pipeline's preparation."""
        if job.kind is Kind.DATASET:
            return job
        if job.kind in (Kind.TRAINING, Kind.EVALUATION):
            raise NotFound(f"a {job.kind.value} prepares no dataset: its spec names the datasets it reads")
        for child in self.children(job):
            if child.kind is Kind.DATASET:
                return child
        raise NotFound("the pipeline has not started its preparation yet")

    def dataset_report(self, job: Job) -> dict[str, Any]:
        """A preparation's manifest and reject examples, read from its output."""
        job = self.dataset_job(job)
        try:
            return job_outputs.dataset_report(job.spec)
        except FileNotFoundError:
            raise NotFound("the preparation has not written its manifest yet") from None
        except ManifestError as e:
            raise NotFound(str(e)) from None

    def metrics_history(self, job: Job) -> list[dict[str, Any]]:
        """A training's metrics history, read from its run directory; empty for a dataset job."""
        job = self.ray_job(job)
        return job_outputs.metrics_history(job.spec) if job.kind is Kind.TRAINING else []

    def log_text(self, job: Job) -> str:
        """The job's Ray log; once Ray lost it (a head restart) or is down, the copy kept beside
        the outputs. Raises UnknownToRay or RayUnavailable when there is neither."""
        job = self.ray_job(job)
        if not job.submitted:
            return ""
        try:
            return self.ray.logs(job.submission_id)
        except (UnknownToRay, RayUnavailable):
            if (text := self.saved_log(job)) is None:
                raise
            return text

    async def follow_log(self, job: Job) -> AsyncIterator[str]:
        """The Ray log as it grows, until the job ends or Ray goes away (said in the stream)."""
        job = self.ray_job(job)
        if not job.submitted:
            return
        try:
            async for chunk in self.ray.follow(job.submission_id):
                yield chunk
        except RayUnavailable as e:
            yield f"\n[raysft] log stream ended: {e}\n"

    def _ray_down(self, error: Exception) -> None:
        """Ray unreachable: jobs keep their status for a while (a restart is short), then are LOST."""
        self.ray_down_since = self.ray_down_since or time.monotonic()
        down = time.monotonic() - self.ray_down_since
        log.warning("Ray unreachable for %.0f s: %s", down, error)
        if down < self.settings.ray_unreachable_lost_s:
            return
        with self.sessions() as session:
            for job in session.scalars(select(Job).where(Job.status.in_([Status.QUEUED, Status.RUNNING]),
                                                         Job.submitted.is_(True))):
                job.finish(Status.LOST, f"Ray unreachable for {down:.0f} s: {str(error)[:300]}")
            session.commit()

    def _advance_pipeline(self, pipeline_id: str) -> None:
        """Dataset first; training once it has SUCCEEDED; the pipeline ends with its last child."""
        with self.sessions() as session:
            pipeline = session.get(Job, pipeline_id)
            children = {c.kind: c for c in session.scalars(select(Job).where(Job.parent_id == pipeline_id))}
            dataset, training = children.get(Kind.DATASET), children.get(Kind.TRAINING)
            submit = None
            if dataset.status is Status.SUCCEEDED and training is None:
                training = self._child(pipeline, Kind.TRAINING, pipeline.spec["training"])
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
                pipeline.finish(Status.SUCCEEDED)
            pipeline.progress = job_outputs.pipeline(dataset.progress or {}, training.progress if training else None)
            try:
                session.commit()
            except IntegrityError:  # another replica's pass created the training first, and submits it
                return
        if submit is not None:
            self.submit_pending(pipeline_id)

    def ready(self) -> dict[str, bool]:
        from sqlalchemy import text

        try:
            with self.sessions() as session:
                session.execute(text("SELECT 1"))
            database = True
        except Exception:
            database = False
        return {"database": database, "ray": self.ray.reachable()}
