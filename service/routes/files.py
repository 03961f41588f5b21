"""Files, `/v1/files`: a tenant's data uploaded into its prefix of the artifact store, named in
dataset specs as `uri: file:<id>`. The upload streams to the store as it arrives
(`service.uploads`); the record is added only once the whole file is stored. Another tenant's file
is a 404."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Query, Request, status
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from service import store, uploads
from service.core import files
from service.core.context import Core
from service.deps import CoreDep, TenantDep
from service.schemas import COMMON_RESPONSES, FileOut, FilePage, Message, file_out

router = APIRouter(prefix="/v1", tags=["files"], responses=COMMON_RESPONSES)
NOT_FOUND = {404: {"model": Message, "description": "No such file for this tenant"}}
UPLOAD_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file"], "additionalProperties": False,
    "properties": {"file": {"type": "string", "format": "binary", "description": "The file (JSONL, JSON, CSV, "
                                                                                 "Parquet or text)."}}}}}}}
# OpenAPI links: what an upload leads to (schemathesis' stateful runs follow them).
FILE_LINKS = {name: {"operationId": operation, "parameters": {"file_id": "$response.body#/id"}}
              for name, operation in (("GetFile", "getFile"), ("DeleteFile", "deleteFile"))}


async def receive(request: Request, core: Core, tenant: str,
                  text_fields: frozenset[str] = frozenset()) -> tuple[str, uploads.Stored]:
    """Stream a multipart upload into the tenant's files (not yet recorded): its new id and what
    was stored. The native upload's and the OpenAI surface's."""
    file_id = store.new_id()
    try:
        return file_id, await uploads.receive(request, files.directory(core, tenant, file_id), text_fields)
    except uploads.UploadError as e:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, {"problems": [f"<body>: {e}"]}) from None
    except ClientDisconnect:  # the client is gone (what it sent is removed): nobody reads an answer
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "the upload broke off") from None


@router.post("/files", status_code=status.HTTP_201_CREATED, response_model=FileOut, operation_id="uploadFile",
             openapi_extra=UPLOAD_BODY, responses={201: {"description": "Stored", "links": FILE_LINKS},
                                                   413: {"model": Message, "description": "Over the upload limit"}})
async def upload_file(request: Request, core: CoreDep, tenant: TenantDep) -> FileOut:
    """Upload a file (`multipart/form-data`, one part named `file`), at most
    `RAYSFT_MAX_UPLOAD_BYTES`. `curl -H "Authorization: Bearer $KEY" -F file=@data.jsonl .../v1/files`"""
    file_id, stored = await receive(request, core, tenant)
    return file_out(await run_in_threadpool(files.register, core, tenant, file_id, stored))


@router.get("/files", response_model=FilePage, operation_id="listFiles")
def list_files(core: CoreDep, tenant: TenantDep, limit: int = Query(50, ge=1, le=500),
               offset: int = Query(0, ge=0, le=10**9)) -> FilePage:
    """The tenant's files, newest first."""
    rows, total = files.page(core, tenant, limit, offset)
    return FilePage(items=[file_out(r) for r in rows], total=total, limit=limit, offset=offset)


@router.get("/files/{file_id}", response_model=FileOut, operation_id="getFile", responses=NOT_FOUND)
def get_file(core: CoreDep, tenant: TenantDep, file_id: str) -> FileOut:
    return file_out(files.get(core, tenant, file_id))


@router.delete("/files/{file_id}", response_model=FileOut, operation_id="deleteFile", responses=NOT_FOUND)
def delete_file(core: CoreDep, tenant: TenantDep, file_id: str) -> FileOut:
    """Delete a file and its record. Jobs already submitted keep their specs, which name the stored
    path: a job that has not read it yet will fail to."""
    return file_out(files.delete(core, tenant, file_id))
