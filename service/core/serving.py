"""Chats with trained models, served on the Ray cluster by Ray Serve (`jobs.serve.app`): one
application per base model, deployed through Serve's REST API (the same token-protected dashboard
as the job API) with replicas that scale to zero when idle; a fine-tuned adapter is named per
request. The control plane resolves what a tenant may talk to, keeps the limits (tokens per answer,
chats at once per tenant), and relays the answer as it is generated. Serve's HTTP proxy has no
authentication of its own, so each application is deployed with a token (`proxy_token`) that its
replicas require of every request: only the control plane's get an answer."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx

from jobs.common import run_layout
from jobs.common.contract import read_manifest
from service import job_outputs
from service.core.errors import NotFound, TooManyJobs
from service.settings import Settings
from service.store import Job, Kind, Status

APP_PREFIX = "raysft-chat-"
IMPORT_PATH = "jobs.serve.app:build"  # fixed: nothing from a request names code
ADAPTER_METHODS = {"lora", "qlora"}


class ServingUnavailable(Exception):
    """Ray Serve could not be reached or the model's application did not start."""


@dataclass(frozen=True)
class Target:
    """What answers: a base model (its application) and, for a fine-tune, its adapter."""

    base: str
    dtype: str
    adapter: str | None
    stop_tokens: tuple[str, ...]

    @property
    def app(self) -> str:
        return APP_PREFIX + hashlib.sha256(f"{self.base}|{self.dtype}".encode()).hexdigest()[:12]


def target(job: Job, base_only: bool = False) -> Target:
    """A succeeded training's (or pipeline's) model: its base with the exported adapter, or the
    merged full fine-tune; `base_only`: the model it started from, to compare against."""
    if job.kind not in (Kind.TRAINING, Kind.PIPELINE) or job.status is not Status.SUCCEEDED:
        raise NotFound(f"job {job.id} has no model to talk to: only a SUCCEEDED training or pipeline has one")
    spec = job.training_spec
    run = job_outputs.run_dir(spec)
    stops = tuple(dict.fromkeys(t for d in spec["datasets"] for t in read_manifest(d["uri"]).template.stop_tokens))
    base, dtype = spec["model"]["uri"], spec["model"]["dtype"]
    if base_only:
        return Target(base, dtype, None, stops)
    if spec["method"] in ADAPTER_METHODS:
        return Target(base, dtype, run_layout.export_uri(run, "adapter"), stops)
    return Target(run_layout.export_uri(run, "model"), dtype, None, stops)


def proxy_token(ray_token: str | None) -> str | None:
    """What the control plane shows Serve's replicas: derived from the Ray cluster's token, so every
    replica of the service agrees on it and the Ray token itself is never handed out (whoever reads
    a deployment's arguments holds the Ray token already). None where Ray runs without a token."""
    if not ray_token:
        return None
    return hmac.new(ray_token.encode(), b"raysft serve proxy", hashlib.sha256).hexdigest()


def application(target: Target, settings: Settings, token: str | None) -> dict[str, Any]:
    """The Serve application of a target's base model, as Serve's REST API takes it."""
    idle = settings.serve_idle_s
    return {"name": target.app, "route_prefix": f"/{target.app}", "import_path": IMPORT_PATH,
            "args": {"base": target.base, "dtype": target.dtype} | ({"token": token} if token else {}),
            "deployments": [{"name": "ChatModel", "max_ongoing_requests": 8,
                             "ray_actor_options": {"num_cpus": settings.serve_cpus, "num_gpus": settings.serve_gpus},
                             "autoscaling_config": {"min_replicas": 0, "initial_replicas": 1,
                                                    "max_replicas": settings.serve_max_replicas,
                                                    "target_ongoing_requests": 1, "upscale_delay_s": 0,
                                                    "downscale_delay_s": idle, "downscale_to_zero_delay_s": idle}}]}


@dataclass
class Serving:
    """The control plane's side of serving: Serve's REST API and HTTP proxy, and the limits."""

    ray_address: str
    settings: Settings
    chats: dict[str, int] = field(default_factory=dict)  # tenant -> chats answering now (this replica)
    ready: set[str] = field(default_factory=set)  # applications seen RUNNING
    token: str | None = field(default_factory=lambda: proxy_token(os.environ.get("RAY_AUTH_TOKEN")))

    @property
    def proxy(self) -> str:
        """Serve's HTTP proxy: `serve_address`, else the Ray head's host on Serve's port."""
        if self.settings.serve_address:
            return self.settings.serve_address.rstrip("/")
        return f"http://{urlsplit(self.ray_address).hostname}:{self.settings.serve_port}"

    def _client(self):
        from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

        return ServeSubmissionClient(self.ray_address)

    def deploy(self, target: Target, timeout_s: float) -> None:
        """Make sure the base model's application is deployed, with this service's token, and
        running: every other application there is deployed again as it is (Serve's REST API
        replaces the whole set)."""
        if target.app in self.ready:
            return
        try:
            client = self._client()
            apps = client.get_serve_details().get("applications") or {}
            wanted = application(target, self.settings, self.token)
            # One deployed with other arguments is replaced: by an earlier raysft without a token,
            # its replicas answer anyone who reaches the proxy; under a rotated Ray token, they
            # would refuse this service.
            if ((apps.get(target.app) or {}).get("deployed_app_config") or {}).get("args") != wanted["args"]:
                others = [a["deployed_app_config"] for name, a in apps.items()
                          if name != target.app and a.get("deployed_app_config")]
                client.deploy_applications({
                    "http_options": {"host": self.settings.serve_host, "port": self.settings.serve_port},
                    "applications": [*others, wanted]})
            deadline = time.monotonic() + timeout_s
            while (status := client.get_serve_details().get("applications", {}).get(target.app, {}).get("status")) != "RUNNING":
                if status == "DEPLOY_FAILED" or time.monotonic() > deadline:
                    raise ServingUnavailable(f"the model's application is {status or 'not deployed'} after "
                                             f"{timeout_s:.0f} s: see Ray Serve's logs on the head")
                time.sleep(0.5)
        except ServingUnavailable:
            raise
        except Exception as e:  # the SDK raises plain exceptions for a head that is down
            raise ServingUnavailable(f"Ray Serve at {self.ray_address}: {str(e)[:300]}") from e
        self.ready.add(target.app)

    async def answer(self, tenant: str, target: Target, messages: list[dict[str, str]],
                     sampling: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """The answer's JSON lines as the replica generates them: {"delta"} pieces, then
        {"finish_reason", "usage"}. At most `serve_tenant_max_chats` at once per tenant."""
        if self.chats.get(tenant, 0) >= self.settings.serve_tenant_max_chats:
            raise TooManyJobs(f"tenant {tenant} has {self.chats[tenant]} chats answering (the limit is "
                              f"{self.settings.serve_tenant_max_chats}); send again when one is done", retry_after_s=1)
        await asyncio.to_thread(self.deploy, target, self.settings.serve_start_timeout_s)
        body = {"messages": messages, "adapter": target.adapter, "stop_tokens": list(target.stop_tokens),
                "sampling": sampling}
        self.chats[tenant] = self.chats.get(tenant, 0) + 1
        try:
            timeout = httpx.Timeout(10, read=self.settings.serve_start_timeout_s)  # a cold start loads the model
            async with httpx.AsyncClient(timeout=timeout) as client, \
                    client.stream("POST", f"{self.proxy}/{target.app}", json=body,
                                  headers={"Authorization": f"Bearer {self.token}"} if self.token else None) as response:
                if response.status_code != 200:
                    text = (await response.aread()).decode(errors="replace")[:300]
                    if response.status_code == 404:
                        self.ready.discard(target.app)  # removed since: deployed again next time
                    raise ServingUnavailable(f"Ray Serve answered {response.status_code}: {text}")
                async for line in response.aiter_lines():
                    if line.strip():
                        yield json.loads(line)
        except httpx.HTTPError as e:
            raise ServingUnavailable(f"Ray Serve at {self.proxy}: {e}") from e
        finally:
            self.chats[tenant] -= 1
