"""Chatting with a trained model: `POST /v1/jobs/{id}/chat` (the dashboard's "Try it", with the
base model beside it), and the answer both it and the OpenAI surface's chat completions send,
whole or as server-sent events. The model runs on the Ray cluster (`service.core.serving`)."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse, Response, StreamingResponse

from service import chat
from service.core import jobs, serving
from service.core.context import Core
from service.deps import CoreDep, SpecBody, TenantDep
from service.schemas import COMMON_RESPONSES

router = APIRouter(prefix="/v1", tags=["chat"], responses=COMMON_RESPONSES)


async def respond(core: Core, tenant: str, request: chat.ChatRequest, target: serving.Target, model: str) -> Response:
    """The answer, as one `chat.completion` or streamed. Its first piece is awaited before any byte
    is sent, so that a refusal (limits, the model's application failing to start) is an HTTP status."""
    lines = core.serving.answer(tenant, target, request.conversation(), request.sampling(core.settings.serve_max_tokens))
    first = await anext(lines)

    async def replayed():
        yield first
        async for line in lines:
            yield line

    if request.stream:
        usage = request.stream_options is not None and request.stream_options.include_usage
        return StreamingResponse(chat.events(model, replayed(), usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    return JSONResponse(await chat.collected(model, replayed()))


@router.post("/jobs/{job_id}/chat", operation_id="chatWithJob",
             summary="Chat with a succeeded training's model (or, with base=true, the model it started from)")
async def chat_with_job(core: CoreDep, tenant: TenantDep, job_id: str, body: SpecBody,
                        base: bool = Query(False, description="The base model, to compare against.")) -> Any:
    """The body is OpenAI's chat completion request without `model`: `messages`, `max_tokens`,
    `temperature`, `top_p`, `seed`, `stop`, `stream`."""
    request = chat.parse(body, need_model=False)
    job = await asyncio.to_thread(jobs.get, core, tenant, job_id)
    target = await asyncio.to_thread(serving.target, job, base)
    return await respond(core, tenant, request, target, f"{job_id}{':base' if base else ''}")
