"""The FastAPI application: wiring only (routes in `service.routes`, behaviour in
`service.core`, middleware in `service.middleware`).

    uvicorn --factory service.app:create_app     (or: raysft serve)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from sqlalchemy import func, select

from service import store
from service.core.context import Core
from service.core.reconcile import reconcile_once
from service.core.serving import Serving
from service.limits import TokenBuckets
from service.middleware import LATENCY_BUCKETS_S, UI_DIR, BodyLimit, Dashboard, Observe
from service.ray_jobs import RayJobs
from service.routes import admin, chats, errors, files, jobs, openai_v1
from service.settings import Settings, get_settings

log = logging.getLogger("raysft.service")


def ray_address(settings: Settings) -> str:
    return settings.ray_address or os.environ.get("RAY_ADDRESS", "http://127.0.0.1:8265")


async def reconcile_forever(core: Core, interval_s: float) -> None:
    while True:
        try:
            await asyncio.to_thread(reconcile_once, core)
        except Exception:  # a failed pass must not stop the loop: the next one retries
            log.exception("reconcile pass failed")
        await asyncio.sleep(interval_s)


def create_app(settings: Settings | None = None, ray: RayJobs | None = None, reconcile: bool = True) -> FastAPI:
    settings = settings or get_settings()
    registry = CollectorRegistry()
    requests = Counter("raysft_http_requests", "HTTP requests", ["method", "route", "status"], registry=registry)
    latency = Histogram("raysft_http_request_seconds", "HTTP request latency", ["method", "route"], registry=registry,
                        buckets=LATENCY_BUCKETS_S)
    jobs_gauge = Gauge("raysft_jobs", "Jobs by status", ["status"], registry=registry)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        store.migrate(settings.database_url)
        engine = store.make_engine(settings.database_url)
        core = Core(store.session_factory(engine), ray or RayJobs(ray_address(settings)), settings,
                    Serving(ray_address(settings), settings))
        if (key := settings.bootstrap_key()) is not None:
            with core.sessions() as session:
                store.create_api_key(session, "admin", key)
        app.state.core = core
        task = asyncio.create_task(reconcile_forever(core, settings.reconcile_interval_s)) if reconcile else None
        yield
        if task is not None:
            task.cancel()
        engine.dispose()

    app = FastAPI(title="raysft", version="0.1.0", lifespan=lifespan,
                  description="Supervised fine-tuning jobs on Ray: prepare datasets, train, run pipelines.")
    for routes in (jobs, chats, admin, files, openai_v1):
        app.include_router(routes.router)
    errors.install(app)
    app.mount("/ui", Dashboard(directory=UI_DIR, html=True), name="ui")

    @app.get("/", include_in_schema=False)
    def home() -> RedirectResponse:
        return RedirectResponse("/ui/")

    @app.get("/healthz", include_in_schema=True)
    def healthz() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/readyz")
    def readyz(request: Request) -> JSONResponse:
        checks = request.app.state.core.ready()
        return JSONResponse({"ready": all(checks.values()), **checks}, status_code=200 if all(checks.values()) else 503)

    @app.get("/metrics", include_in_schema=False)
    def metrics(request: Request) -> Response:
        with request.app.state.core.sessions() as session:
            counts = dict(session.execute(select(store.Job.status, func.count()).group_by(store.Job.status)).all())
        for status in store.Status:
            jobs_gauge.labels(status.value).set(counts.get(status, 0))
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    app.state.request_rate = TokenBuckets(settings.tenant_requests_per_s, settings.tenant_request_burst)
    app.add_middleware(Observe, requests=requests, latency=latency)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes, upload_max_bytes=settings.max_upload_bytes)
    return app
