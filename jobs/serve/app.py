"""The Ray Serve application that answers chats with trained models: one per base model, which each
replica loads once; a fine-tuned adapter is loaded on first use (at most `max_adapters` kept, the
least recently used dropped) and switched on per request. Replicas scale to zero when idle and
come back on the next request. Deployed by the control plane through Serve's REST API with this
fixed import path (`jobs.serve.app:build`), never code from a request:

    {"import_path": "jobs.serve.app:build", "args": {"base": "s3://models/m", "dtype": "fp32"}, ...}

A request (JSON, from the control plane only: with `args["token"]` set, one without
`Authorization: Bearer <token>` gets 401) is {"messages", "adapter": URI or null,
"stop_tokens", "sampling": {max_tokens, temperature, top_p, seed, stop}}; the answer is JSON Lines:
{"delta": text} as text becomes final, then {"finish_reason", "usage"}."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

from ray import serve
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse

from jobs.serve.generation import Sampling, prompt_ids, stop_ids, stream

MAX_ADAPTERS = 8
# What an idle application keeps before its replicas go: a chat's next message within minutes
# finds the model loaded; a model nobody talks to holds no memory.
IDLE_S = 300.0


@serve.deployment(max_ongoing_requests=8)
class ChatModel:
    def __init__(self, base: str, dtype: str = "fp32", max_adapters: int = MAX_ADAPTERS, token: str | None = None):
        import torch
        from transformers import AutoModelForCausalLM

        from jobs.train.loop import load_tokenizer, local_model_dir
        from jobs.train.spec import DType, torch_dtype

        self.scratch = tempfile.TemporaryDirectory(prefix="raysft-serve-")
        model_dir = local_model_dir(base, Path(self.scratch.name) / "base")
        self.tokenizer = load_tokenizer(model_dir, None)
        self.device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype(DType(dtype)),
                                                          use_safetensors=True).to(self.device).eval()
        # adapter URI -> its name in the model, and the tokenizer it was trained with (its chat
        # template may be one the training chose, not the base model's)
        self.adapters: OrderedDict[str, tuple[str, Any]] = OrderedDict()
        self.max_adapters = max_adapters
        # One generation at a time per replica: the active adapter is the model's state. Requests
        # beyond it wait here (and Serve adds replicas, up to the deployment's maximum).
        self.lock = asyncio.Lock()
        self.authorization = f"Bearer {token}" if token else None

    def _with_adapter(self, uri: str) -> Any:
        """Load an adapter once (dropping the least recently used past `max_adapters`), make it
        active, and return the tokenizer it was trained with."""
        from peft import PeftModel

        from jobs.train.loop import load_tokenizer, local_model_dir

        if uri not in self.adapters:
            name = "a" + hashlib.sha256(uri.encode()).hexdigest()[:16]
            local = local_model_dir(uri, Path(self.scratch.name) / name)
            if not isinstance(self.model, PeftModel):
                self.model = PeftModel.from_pretrained(self.model, local, adapter_name=name).to(self.device).eval()
            else:
                self.model.load_adapter(local, adapter_name=name)
            tokenizer = load_tokenizer(local, None) if (Path(local) / "tokenizer_config.json").exists() else self.tokenizer
            self.adapters[uri] = (name, tokenizer)
            if len(self.adapters) > self.max_adapters:
                _, (dropped, _) = self.adapters.popitem(last=False)
                self.model.delete_adapter(dropped)
        self.adapters.move_to_end(uri)
        name, tokenizer = self.adapters[uri]
        self.model.set_adapter(name)
        return tokenizer

    def _lines(self, body: dict[str, Any]):
        """The answer as JSON Lines, computed in a worker thread (generation blocks)."""
        import contextlib

        sampling = Sampling(**{k: tuple(v) if k == "stop" else v for k, v in body["sampling"].items()})
        if body.get("adapter"):
            tokenizer = self._with_adapter(body["adapter"])
            context = contextlib.nullcontext()
        else:  # the base model: any adapter loaded is switched off for this request
            tokenizer = self.tokenizer
            context = self.model.disable_adapter() if hasattr(self.model, "disable_adapter") else contextlib.nullcontext()
        ids = prompt_ids(tokenizer, body["messages"])
        stops = stop_ids(tokenizer, self.model, body.get("stop_tokens") or [])
        with context:
            deltas = stream(self.model, tokenizer, ids, sampling, stops)
            while True:
                try:
                    yield json.dumps({"delta": next(deltas)}) + "\n"
                except StopIteration as finished:
                    done = finished.value
                    break
        yield json.dumps({"finish_reason": done.finish_reason,
                          "usage": {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
                                    "total_tokens": done.prompt_tokens + done.completion_tokens}}) + "\n"

    async def __call__(self, request: Request) -> Response:
        given = request.headers.get("authorization", "")
        if self.authorization and not hmac.compare_digest(given.encode(), self.authorization.encode()):
            return PlainTextResponse("this model answers the raysft control plane only", status_code=401)
        body = await request.json()

        async def lines():
            async with self.lock:
                produced = self._lines(body)
                try:
                    while (line := await asyncio.to_thread(next, produced, None)) is not None:
                        yield line
                finally:  # a client gone mid-answer: the base model's adapter state is restored now
                    produced.close()

        return StreamingResponse(lines(), media_type="application/jsonl")


def build(args: dict[str, Any]) -> serve.Application:
    """The application for `args["base"]` (Serve's import-path builder)."""
    return ChatModel.bind(args["base"], args.get("dtype", "fp32"), int(args.get("max_adapters", MAX_ADAPTERS)),
                          args.get("token"))
