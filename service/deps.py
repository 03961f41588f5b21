"""Request dependencies: the control plane's core, the caller's tenant, and a spec body."""

from __future__ import annotations

import json
import math
from typing import Annotated, Any

import yaml
from fastapi import Depends, Header, HTTPException, Request, status
from starlette.concurrency import run_in_threadpool

from service.core.context import Core


def get_core(request: Request) -> Core:
    return request.app.state.core


CoreDep = Annotated[Core, Depends(get_core)]


async def current_tenant(request: Request, core: CoreDep,
                         authorization: Annotated[str | None, Header()] = None) -> str:
    """Bearer API key → tenant, within the tenant's request rate. Keys are stored hashed; an
    unknown key is a 401 like a missing one. A key seen lately is answered from memory here, on
    the event loop; only a database lookup takes a worker thread (a hop each way, which under
    load costs more than the lookup)."""
    scheme, _, key = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not key:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing bearer API key",
                            headers={"WWW-Authenticate": "Bearer"})
    key = key.strip()
    tenant = core.keys.known_tenant(key) or await run_in_threadpool(core.keys.tenant_for_key, key)
    if tenant is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "unknown API key", headers={"WWW-Authenticate": "Bearer"})
    if wait_s := request.app.state.request_rate.take(tenant):
        raise HTTPException(status.HTTP_429_TOO_MANY_REQUESTS, f"tenant {tenant}: request rate limit; retry later",
                            headers={"Retry-After": str(math.ceil(wait_s))})
    return tenant


TenantDep = Annotated[str, Depends(current_tenant)]


async def spec_body(request: Request) -> dict[str, Any]:
    """The request body as a mapping: JSON, or YAML (safe-loaded) with a YAML content type."""
    raw = await request.body()
    try:
        if "yaml" in request.headers.get("content-type", ""):
            data = yaml.safe_load(raw)
        else:
            data = json.loads(raw or b"null")
    except (ValueError, yaml.YAMLError) as e:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT,
                            {"problems": [f"<body>: not valid JSON/YAML: {str(e)[:200]}"]}) from None
    if not isinstance(data, dict):
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, {"problems": ["<body>: must be an object (a spec)"]})
    return data


SpecBody = Annotated[dict[str, Any], Depends(spec_body)]
IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", max_length=255)]
