"""A tenant's uploaded files: stored under its prefix of the artifact store
(`tenants/<tenant>/files/<id>/<name>`), recorded only once the whole file is stored, and named in
dataset specs as `uri: file:<id>`."""

from __future__ import annotations

from sqlalchemy import func, select

from jobs.common.spec import SpecError
from service import store, uploads
from service.core.context import Core
from service.core.errors import NotFound


def directory(core: Core, tenant: str, file_id: str) -> str:
    """Where an uploaded file is stored: `tenants/<tenant>/files/<id>/`."""
    return core.policy.resolve(f"{core.policy.tenant_root(tenant)}/files/{file_id}")


def register(core: Core, tenant: str, file_id: str, stored: uploads.Stored, purpose: str | None = None) -> store.File:
    """Record a stored upload; if that fails, remove what was stored (no object without its record)."""
    row = store.File(id=file_id, tenant_id=tenant, filename=stored.filename, bytes=stored.bytes,
                     sha256=stored.sha256, uri=stored.uri, purpose=purpose)
    try:
        with core.sessions() as session:
            session.add(row)
            session.commit()
    except Exception:
        uploads.remove(directory(core, tenant, file_id))
        raise
    return row


def page(core: Core, tenant: str, limit: int, offset: int = 0, after: str | None = None,
         purpose: str | None = None) -> tuple[list[store.File], int]:
    """The tenant's files, newest first: `limit` of them from `offset`, or after the file `after`."""
    mine = select(store.File).where(store.File.tenant_id == tenant)
    if purpose is not None:
        mine = mine.where(store.File.purpose == purpose)
    with core.sessions() as session:
        total = session.scalar(select(func.count()).select_from(mine.subquery()))
        if after is not None and (cursor := store.tenant_file(session, tenant, after)) is not None:
            mine = mine.where((store.File.created_at < cursor.created_at)
                              | ((store.File.created_at == cursor.created_at) & (store.File.id > cursor.id)))
        rows = session.scalars(mine.order_by(store.File.created_at.desc(), store.File.id).limit(limit).offset(offset))
        return list(rows), int(total or 0)


def get(core: Core, tenant: str, file_id: str) -> store.File:
    with core.sessions() as session:
        if (row := store.tenant_file(session, tenant, file_id)) is None:
            raise NotFound(f"no file {file_id}")
        return row


def delete(core: Core, tenant: str, file_id: str) -> store.File:
    """Delete a file and its record. Jobs already submitted keep their specs, which name the stored
    path: a job that has not read it yet will fail to."""
    with core.sessions() as session:
        if (row := store.tenant_file(session, tenant, file_id)) is None:
            raise NotFound(f"no file {file_id}")
        uploads.remove(directory(core, tenant, file_id))
        session.delete(row)
        session.commit()
        return row


def uri(core: Core, tenant: str, file_id: str) -> str:
    """What a spec's `file:<id>` stands for."""
    with core.sessions() as session:
        row = store.tenant_file(session, tenant, file_id)
    if row is None:
        raise SpecError([f"no file {file_id} for this tenant: `raysft files list` shows yours"])
    return row.uri
