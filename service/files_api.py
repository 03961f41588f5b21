"""Files, `/v1/files`: a tenant's data uploaded into its prefix of the artifact store
(`tenants/<tenant>/files/<id>/<name>`), named in dataset specs as `uri: file:<id>`. The upload
streams to the store as it arrives (`service.uploads`); the record is added only once the whole
file is stored. Another tenant's file is a 404."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, HTTPException, Query, Request, status
from pydantic import BaseModel, Field
from sqlalchemy import func, select
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from service import store, uploads
from service.api import COMMON_RESPONSES, Message, utc
from service.deps import ControlDep, TenantDep

router = APIRouter(prefix="/v1", tags=["files"], responses=COMMON_RESPONSES)
NOT_FOUND = {404: {"model": Message, "description": "No such file for this tenant"}}
UPLOAD_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file"], "additionalProperties": False,
    "properties": {"file": {"type": "string", "format": "binary", "description": "The file (JSONL, JSON, CSV, "
                                                                                 "Parquet or text)."}}}}}}}


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


def register(control, tenant: str, file_id: str, stored: uploads.Stored) -> store.File:
    row = store.File(id=file_id, tenant_id=tenant, filename=stored.filename, bytes=stored.bytes,
                     sha256=stored.sha256, uri=stored.uri)
    try:
        with control.sessions() as session:
            session.add(row)
            session.commit()
    except Exception:
        uploads.remove(control.file_directory(tenant, file_id))  # no object without its record
        raise
    return row


# OpenAPI links: what an upload leads to (schemathesis' stateful runs follow them).
FILE_LINKS = {name: {"operationId": operation, "parameters": {"file_id": "$response.body#/id"}}
              for name, operation in (("GetFile", "getFile"), ("DeleteFile", "deleteFile"))}


@router.post("/files", status_code=status.HTTP_201_CREATED, response_model=FileOut, operation_id="uploadFile",
             openapi_extra=UPLOAD_BODY, responses={201: {"description": "Stored", "links": FILE_LINKS},
                                                   413: {"model": Message, "description": "Over the upload limit"}})
async def upload_file(request: Request, control: ControlDep, tenant: TenantDep) -> FileOut:
    """Upload a file (`multipart/form-data`, one part named `file`), at most
    `RAYSFT_MAX_UPLOAD_BYTES`. `curl -H "Authorization: Bearer $KEY" -F file=@data.jsonl .../v1/files`"""
    file_id = store.new_id()
    try:
        stored = await uploads.receive(request, control.file_directory(tenant, file_id))
    except uploads.UploadError as e:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, {"problems": [f"<body>: {e}"]}) from None
    except ClientDisconnect:  # the client is gone (what it sent is removed): nobody reads an answer
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "the upload broke off") from None
    return file_out(await run_in_threadpool(register, control, tenant, file_id, stored))


@router.get("/files", response_model=FilePage, operation_id="listFiles")
def list_files(control: ControlDep, tenant: TenantDep, limit: int = Query(50, ge=1, le=500),
               offset: int = Query(0, ge=0, le=10**9)) -> FilePage:
    """The tenant's files, newest first."""
    with control.sessions() as session:
        mine = select(store.File).where(store.File.tenant_id == tenant)
        total = session.scalar(select(func.count()).select_from(mine.subquery()))
        rows = session.scalars(mine.order_by(store.File.created_at.desc(), store.File.id).limit(limit).offset(offset))
        return FilePage(items=[file_out(r) for r in rows], total=total or 0, limit=limit, offset=offset)


@router.get("/files/{file_id}", response_model=FileOut, operation_id="getFile", responses=NOT_FOUND)
def get_file(control: ControlDep, tenant: TenantDep, file_id: str) -> FileOut:
    with control.sessions() as session:
        if (row := store.tenant_file(session, tenant, file_id)) is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no file {file_id}")
        return file_out(row)


@router.delete("/files/{file_id}", response_model=FileOut, operation_id="deleteFile", responses=NOT_FOUND)
def delete_file(control: ControlDep, tenant: TenantDep, file_id: str) -> FileOut:
    """Delete a file and its record. Jobs already submitted keep their specs, which name the stored
    path: a job that has not read it yet will fail to."""
    with control.sessions() as session:
        if (row := store.tenant_file(session, tenant, file_id)) is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no file {file_id}")
        uploads.remove(control.file_directory(tenant, file_id))
        session.delete(row)
        session.commit()
        return file_out(row)
