"""Chat completions in OpenAI's terms: the request (validated; what raysft cannot honour is
refused, never ignored), and the answer as a `chat.completion` or, streamed, as
`chat.completion.chunk` server-sent events. Pure: `service.core.serving` produces the answer."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from pydantic import Field, field_validator

from jobs.common.spec import SpecError, SpecModel, validate


class Message(SpecModel):
    role: Literal["system", "user", "assistant"]
    content: str = Field(description="Text; content parts (images, audio) are refused: the models are text-only.")
    name: str | None = Field(None, description="Accepted; chat templates have no place for it.")


class StreamOptions(SpecModel):
    include_usage: bool = Field(False, description="A last chunk with the token counts.")


class ChatRequest(SpecModel):
    """POST /openai/v1/chat/completions (and, without `model`, POST /v1/jobs/{id}/chat)."""

    model: str = Field("", description="A base model offered for fine-tuning, a fine-tuned model, or one of its "
                       "checkpoints (`...:ckpt-step-<n>`).")
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="Tokens the answer may have (at most serve_max_tokens).")
    max_completion_tokens: int | None = Field(None, ge=1, description="The same, OpenAI's newer name.")
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = Field(None, description="Up to 4 strings that end the answer (not sent).")
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, description="Answers per request: only 1.")
    user: str | None = Field(None, max_length=256, description="Accepted: an end-user id for your own records.")

    @field_validator("n")
    @classmethod
    def _one(cls, value: int) -> int:
        if value != 1:
            raise ValueError("raysft answers once per request: send n=1 (or several requests)")
        return value

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and (len(value) > 4 or not all(value)):
            raise ValueError("at most 4 stop strings, none empty")
        return value

    def sampling(self, most_tokens: int) -> dict[str, Any]:
        """What the replica samples with (jobs.serve.generation.Sampling's fields)."""
        wanted = self.max_completion_tokens or self.max_tokens or most_tokens
        if wanted > most_tokens:
            raise SpecError([f"max_tokens: {wanted} is over this service's limit of {most_tokens} "
                             "(serve_max_tokens): ask for fewer"])
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return {"max_tokens": wanted, "temperature": self.temperature, "top_p": self.top_p, "seed": self.seed,
                "stop": stops}

    def conversation(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.content} for m in self.messages]


def parse(body: dict[str, Any], need_model: bool = True) -> ChatRequest:
    request = validate(ChatRequest, body)
    if need_model and not request.model:
        raise SpecError(["model: required: a base model, or a fine-tuned model's name (GET /openai/v1/models)"])
    return request


def completion(model: str, text: str, finish_reason: str, usage: dict[str, int]) -> dict[str, Any]:
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": model, "system_fingerprint": None,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                         "finish_reason": finish_reason, "logprobs": None}], "usage": usage}


async def collected(model: str, lines: AsyncIterator[dict[str, Any]]) -> dict[str, Any]:
    """The whole answer as one `chat.completion`."""
    text, last = [], {}
    async for line in lines:
        if "delta" in line:
            text.append(line["delta"])
        else:
            last = line
    return completion(model, "".join(text), last.get("finish_reason", "stop"), last.get("usage", {}))


async def events(model: str, lines: AsyncIterator[dict[str, Any]], include_usage: bool) -> AsyncIterator[str]:
    """The answer as OpenAI's server-sent events: the assistant's role, its text as it comes, the
    finish reason, the token counts when asked for, then `[DONE]`."""
    chunk_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(delta: dict[str, Any], finish_reason: str | None = None, usage: dict | None = None) -> str:
        choices = [] if usage is not None else [{"index": 0, "delta": delta, "finish_reason": finish_reason,
                                                 "logprobs": None}]
        body = {"id": chunk_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "system_fingerprint": None, "choices": choices} | ({"usage": usage} if usage is not None else {})
        return f"data: {json.dumps(body)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    async for line in lines:
        if "delta" in line:
            yield chunk({"content": line["delta"]})
        else:
            yield chunk({}, line.get("finish_reason", "stop"))
            if include_usage:
                yield chunk({}, usage=line.get("usage", {}))
    yield "data: [DONE]\n\n"
