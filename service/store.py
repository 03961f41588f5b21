"""The database: the source of truth for tenants, API keys and jobs (SQLAlchemy 2).

SQLite by default, PostgreSQL in production; the schema is created and upgraded by Alembic
(`service/migrations`), never by `create_all`, so both databases run the same migrations.
"""

from __future__ import annotations

import enum
import hashlib
import secrets
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import (
    JSON,
    BigInteger,
    ColumnElement,
    DateTime,
    Enum,
    ForeignKey,
    String,
    Text,
    UniqueConstraint,
    and_,
    create_engine,
    or_,
    select,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

MIGRATIONS = Path(__file__).with_name("migrations")


class Status(enum.StrEnum):
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    LOST = "LOST"

    @property
    def is_terminal(self) -> bool:
        return self not in (Status.QUEUED, Status.RUNNING)


class Kind(enum.StrEnum):
    DATASET = "dataset"
    TRAINING = "training"
    PIPELINE = "pipeline"
    EVALUATION = "evaluation"


def now() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return uuid.uuid4().hex


def hash_key(key: str) -> str:
    """API keys are random 256-bit tokens, so one SHA-256 is enough to store them safely."""
    return hashlib.sha256(key.encode()).hexdigest()


class Base(DeclarativeBase):
    pass


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(64), default="")
    prefix: Mapped[str] = mapped_column(String(16), default="")  # the key's first characters, to tell keys apart
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)
    # Set when the key is looked up in the database: at most once per key cache lifetime per replica.
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class File(Base):
    """An uploaded file, stored at `uri` under its tenant's prefix. The row is added only once the
    whole file is stored, so an interrupted upload leaves nothing registered."""
    __tablename__ = "files"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    filename: Mapped[str] = mapped_column(String(255))
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    uri: Mapped[str] = mapped_column(Text)
    purpose: Mapped[str | None] = mapped_column(String(32))  # `fine-tune` for an OpenAI upload
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (UniqueConstraint("tenant_id", "idempotency_key", name="uq_jobs_tenant_idempotency"),
                      # one dataset and one training per pipeline, however many replicas reconcile it
                      UniqueConstraint("parent_id", "kind", name="uq_jobs_parent_kind"))

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    kind: Mapped[Kind] = mapped_column(Enum(Kind, native_enum=False, length=16))
    status: Mapped[Status] = mapped_column(Enum(Status, native_enum=False, length=16), index=True)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    request_hash: Mapped[str] = mapped_column(String(64))
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    parent_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id"), index=True)
    sweep_id: Mapped[str | None] = mapped_column(String(32), index=True)  # the trainings of one sweep
    evaluates: Mapped[str | None] = mapped_column(String(32), index=True)  # an evaluation's training (job:<id>)
    # The OpenAI fine-tuning request a pipeline came from, as OpenAI reports it back (service.openai).
    fine_tuning: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))
    submission_id: Mapped[str | None] = mapped_column(String(64), unique=True)  # the Ray job's
    submitted: Mapped[bool] = mapped_column(default=False)  # Ray has accepted it
    # A dataset job (or a pipeline's preparation) that prepares again instead of reusing an
    # earlier output of the same spec, inputs and tokenizer: `python -m jobs.prepare --force`.
    force: Mapped[bool] = mapped_column(default=False)
    error: Mapped[str | None] = mapped_column(Text)
    progress: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # cached by the reconcile loop
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now, index=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=now, onupdate=now)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    @property
    def training_spec(self) -> dict[str, Any]:
        """A training's spec, or a pipeline's training part."""
        return self.spec["training"] if self.kind is Kind.PIPELINE else self.spec

    def finish(self, status: Status, error: str | None = None) -> None:
        self.status, self.error, self.finished_at = status, error, now()


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        # One writer at a time, many readers: WAL lets GETs run while the reconcile loop writes.
        # A file database pools a connection for each of the server's worker threads (AnyIO runs
        # 40): with SQLAlchemy's default 5 + 10, requests queue for a connection under load.
        in_memory = make_url(url).database in (None, "", ":memory:")
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30},
                               **({} if in_memory else {"pool_size": 40, "max_overflow": 10}))
        from sqlalchemy import event

        @event.listens_for(engine, "connect")
        def _pragmas(connection, _record):
            cursor = connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


def migrate(url: str) -> None:
    """Bring the schema to the latest Alembic revision."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    command.upgrade(config, "head")


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


# ---------------------------------------------------------------- tenants and keys

# A tenant id names its storage prefix (`tenants/<id>/`) and appears in paths: lowercase DNS-label
# characters only.
TENANT_ID_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,62}[a-z0-9])?$"
KEY_PREFIX_CHARS = 8


class TenantExists(Exception):
    pass


def create_tenant(session: Session, tenant_id: str) -> Tenant:
    """A new tenant, with no key yet. Raises TenantExists."""
    if session.get(Tenant, tenant_id) is not None:
        raise TenantExists(tenant_id)
    tenant = Tenant(id=tenant_id)
    session.add(tenant)
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        raise TenantExists(tenant_id) from None
    return tenant


def create_api_key(session: Session, tenant_id: str, key: str | None = None, name: str = "") -> str:
    """Create the tenant if new and a key for it; returns the key (shown once, stored hashed)."""
    key = key or f"rsk_{secrets.token_urlsafe(32)}"
    try:
        _add_key(session, tenant_id, key, name)
    except IntegrityError:
        session.rollback()  # a replica starting beside this one added the same rows first
        _add_key(session, tenant_id, key, name)
    return key


def _add_key(session: Session, tenant_id: str, key: str, name: str) -> None:
    if session.get(Tenant, tenant_id) is None:
        session.add(Tenant(id=tenant_id))
    if session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key))) is None:
        session.add(ApiKey(tenant_id=tenant_id, key_hash=hash_key(key), name=name, prefix=key[:KEY_PREFIX_CHARS]))
    session.commit()


def api_key(session: Session, key: str) -> ApiKey | None:
    return session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key)))


def revoke_api_key(session: Session, key_id: str) -> ApiKey | None:
    """Revoke a key (once: a second revoke keeps the first time); None if there is no such key."""
    row = session.get(ApiKey, key_id)
    if row is not None and row.revoked_at is None:
        row.revoked_at = now()
        session.commit()
    return row


def tenant_for_key(session: Session, key: str) -> str | None:
    """The tenant of a key that is not revoked, recording its use."""
    row = api_key(session, key)
    if row is None or row.revoked_at is not None:
        return None
    row.last_used_at = now()
    session.commit()
    return row.tenant_id


# ---------------------------------------------------------------- files


def tenant_file(session: Session, tenant_id: str, file_id: str) -> File | None:
    """A tenant's file; another tenant's is None, like a missing one."""
    row = session.get(File, file_id)
    return row if row is not None and row.tenant_id == tenant_id else None


# ---------------------------------------------------------------- fine-tuning jobs


def metadata_matches(wanted: dict[str, str] | Literal["null"]) -> ColumnElement[bool]:
    """Fine-tuning jobs whose metadata holds each wanted key with its value, or ("null") those
    without metadata: created without it, or with `{}`. In SQL (JSON paths both SQLite and
    PostgreSQL have, either reading an object back as its JSON text), so pages stay pages."""
    if wanted == "null":
        metadata = Job.fine_tuning["metadata"].as_string()
        return or_(metadata.is_(None), metadata == "{}")
    return and_(*(Job.fine_tuning[("metadata", key)].as_string() == value for key, value in wanted.items()))
