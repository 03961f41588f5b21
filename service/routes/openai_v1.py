"""The OpenAI-compatible surface, `/openai/v1`: files, fine-tuning jobs (with their events and
checkpoints), models and chat completions with them, in the shapes the official `openai` package reads, so that
`OpenAI(base_url=".../openai/v1", api_key=KEY)` works against raysft. The same tenants, keys,
limits, records and jobs as the native API; errors come as OpenAI's `error` objects
(`routes.errors`). What the terms mean in raysft: `service.fine_tuning`."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request, status
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from jobs.common import storage
from service import chat, store, uploads
from service import fine_tuning as ft
from service.core import files, jobs
from service.core import fine_tuning as tuning
from service.deps import CoreDep, IdempotencyKey, SpecBody, TenantDep
from service.routes.chats import respond
from service.routes.files import receive
from service.schemas import OPENAI_ERRORS

router = APIRouter(prefix="/openai/v1", tags=["openai"], responses=OPENAI_ERRORS)
PURPOSE = "fine-tune"  # the only files raysft takes: training and validation data
Limit = Annotated[int, Query(ge=1, le=100)]
After = Annotated[str | None, Query(max_length=80, description="The id of the last item of the previous page.")]
READ_CHUNK = 1 << 20


def file_object(row: store.File) -> dict[str, Any]:
    return {"id": f"{ft.FILE_PREFIX}{row.id}", "object": "file", "bytes": row.bytes, "created_at": ft.unix(row.created_at),
            "filename": row.filename, "purpose": row.purpose or PURPOSE, "status": "processed", "expires_at": None,
            "status_details": None}


@router.post("/files", summary="Upload a file: multipart `file` and `purpose=fine-tune` (files.create)")
async def create_file(request: Request, core: CoreDep, tenant: TenantDep) -> dict[str, Any]:
    file_id, stored = await receive(request, core, tenant, text_fields=frozenset({"purpose"}))
    if (purpose := stored.fields.get("purpose")) != PURPOSE:
        await run_in_threadpool(uploads.remove, files.directory(core, tenant, file_id))
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, {"problems": [
            f"purpose: {purpose!r} is not taken here; raysft stores files for purpose {PURPOSE!r}"]})
    return file_object(await run_in_threadpool(files.register, core, tenant, file_id, stored, PURPOSE))


@router.get("/files", summary="The tenant's files, newest first (files.list)")
def list_files(core: CoreDep, tenant: TenantDep, limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
               after: After = None, purpose: str | None = Query(None, max_length=32)) -> dict[str, Any]:
    rows, _ = files.page(core, tenant, limit + 1, after=ft.file_id(after) if after else None, purpose=purpose)
    return tuning.listing([file_object(r) for r in rows[:limit]], has_more=len(rows) > limit)


@router.get("/files/{file_id}", summary="One file (files.retrieve)")
def get_file(core: CoreDep, tenant: TenantDep, file_id: str) -> dict[str, Any]:
    return file_object(files.get(core, tenant, ft.file_id(file_id)))


@router.delete("/files/{file_id}", summary="Delete a file (files.delete)")
def delete_file(core: CoreDep, tenant: TenantDep, file_id: str) -> dict[str, Any]:
    row = files.delete(core, tenant, ft.file_id(file_id))
    return {"id": f"{ft.FILE_PREFIX}{row.id}", "object": "file", "deleted": True}


@router.get("/files/{file_id}/content", summary="A file's bytes, streamed from the store (files.content)")
def file_content(core: CoreDep, tenant: TenantDep, file_id: str) -> StreamingResponse:
    row = files.get(core, tenant, ft.file_id(file_id))
    fs, path = storage.filesystem(row.uri)

    def chunks():  # Starlette runs a plain iterator in its thread pool
        with fs.open_input_stream(path) as f:
            while chunk := f.read(READ_CHUNK):
                yield chunk

    return StreamingResponse(chunks(), media_type="application/octet-stream",
                             headers={"Content-Length": str(row.bytes)})


@router.post("/fine_tuning/jobs", summary="Fine-tune a base model on uploaded files (fine_tuning.jobs.create)")
def create_job(core: CoreDep, tenant: TenantDep, body: SpecBody, key: IdempotencyKey = None) -> dict[str, Any]:
    return tuning.create(core, tenant, body, key)


@router.get("/fine_tuning/jobs", summary="The tenant's fine-tuning jobs, newest first (fine_tuning.jobs.list)",
            description="Filtered by metadata as OpenAI's: `metadata[k]=v` for each key that must hold that value, "
                        "or `metadata=null` for the jobs created without metadata.")
def list_jobs(request: Request, core: CoreDep, tenant: TenantDep, after: After = None,
              limit: Limit = 20) -> dict[str, Any]:
    return tuning.page(core, tenant, after, limit, ft.metadata_filter(request.query_params.multi_items()))


@router.get("/fine_tuning/jobs/{job_id}", summary="One fine-tuning job (fine_tuning.jobs.retrieve)")
def get_job(core: CoreDep, tenant: TenantDep, job_id: str) -> dict[str, Any]:
    return tuning.job_object(core, tuning.get(core, tenant, job_id))


@router.post("/fine_tuning/jobs/{job_id}/cancel", summary="Cancel a fine-tuning job (fine_tuning.jobs.cancel)")
def cancel_job(core: CoreDep, tenant: TenantDep, job_id: str) -> dict[str, Any]:
    job = tuning.get(core, tenant, job_id)
    return tuning.job_object(core, jobs.cancel(core, tenant, job.id))


@router.get("/fine_tuning/jobs/{job_id}/events", summary="A job's events, newest first (fine_tuning.jobs.list_events)")
def job_events(core: CoreDep, tenant: TenantDep, job_id: str, after: After = None, limit: Limit = 20) -> dict[str, Any]:
    return tuning.events(core, tuning.get(core, tenant, job_id), after, limit)


@router.get("/fine_tuning/jobs/{job_id}/checkpoints",
            summary="A job's checkpoints, newest first (fine_tuning.jobs.checkpoints.list)")
def job_checkpoints(core: CoreDep, tenant: TenantDep, job_id: str, after: After = None,
                    limit: Limit = 10) -> dict[str, Any]:
    return tuning.checkpoints(core, tuning.get(core, tenant, job_id), after, limit)


@router.get("/models", summary="The base models the tenant may fine-tune and its fine-tuned models (models.list)")
def list_models(core: CoreDep, tenant: TenantDep) -> dict[str, Any]:
    return {"object": "list", "data": tuning.models(core, tenant)}


@router.get("/models/{model:path}", summary="One model (models.retrieve)")
def get_model(core: CoreDep, tenant: TenantDep, model: str) -> dict[str, Any]:
    return tuning.find_model(core, tenant, model)


@router.post("/chat/completions", summary="Chat with a base or fine-tuned model, whole or streamed (chat.completions.create)")
async def chat_completions(core: CoreDep, tenant: TenantDep, body: SpecBody):
    request = chat.parse(body)
    target = await asyncio.to_thread(tuning.chat_target, core, tenant, request.model)
    return await respond(core, tenant, request, target, request.model)
