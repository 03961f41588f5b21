"""The FastAPI application: wiring only (routes in `api.py`, behaviour in `control.py`).

    uvicorn --factory service.app:create_app     (or: raysft serve)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError

from service import admin_api, api, files_api, store
from service.control import Control
from service.limits import TokenBuckets
from service.ray_jobs import RayJobs
from service.settings import Settings, get_settings

log = logging.getLogger("raysft.service")


UPLOAD_PATH = "/v1/files"


class BodyLimit:
    """413 for bodies over the limit, whether announced by Content-Length or streamed (FastAPI has
    no limit of its own). Uploads have a limit of their own."""

    def __init__(self, app, max_bytes: int, upload_max_bytes: int):
        self.app, self.max_bytes, self.upload_max_bytes = app, max_bytes, upload_max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        upload = scope["method"] == "POST" and scope["path"] == UPLOAD_PATH
        max_bytes = self.upload_max_bytes if upload else self.max_bytes
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > max_bytes):
            return await self._reject(send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > max_bytes:
                raise _TooLarge  # an upload under way removes what it stored as this passes through
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await self._reject(send)

    async def _reject(self, send):
        body = b'{"detail":"request body too large"}'
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


# Fine below 100 ms, where an API answering from its database should be (the GET target is 25 ms).
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Observe:
    """Counts and times every request by route. A plain ASGI middleware: Starlette's
    `@app.middleware("http")` adds a task and a memory stream to every request."""

    def __init__(self, app, requests: Counter, latency: Histogram):
        self.app, self.requests, self.latency = app, requests, latency

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), 500  # what Starlette answers if the app raises

        async def send_observing(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_observing)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")  # set by the router
            self.requests.labels(scope["method"], route, status).inc()
            self.latency.labels(scope["method"], route).observe(time.perf_counter() - started)


UI_DIR = Path(__file__).parent / "ui"
# The dashboard runs only its own files and talks only to this origin: no CDN, no inline script,
# and nothing a job's data could inject (it is inserted as text, never as HTML).
UI_HEADERS = {"Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                                         "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
              "Referrer-Policy": "no-referrer", "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}


class Dashboard(StaticFiles):
    """The web dashboard's files, `/ui/`. The pages hold no data and need no key: they ask the API
    for everything with the key the user entered, kept in the browser's session storage."""

    def file_response(self, *args, **kwargs) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers.update(UI_HEADERS)
        return response


def ray_address(settings: Settings) -> str:
    return settings.ray_address or os.environ.get("RAY_ADDRESS", "http://127.0.0.1:8265")


async def reconcile_forever(control: Control, interval_s: float) -> None:
    while True:
        try:
            await asyncio.to_thread(control.reconcile_once)
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
        control = Control(store.session_factory(engine), ray or RayJobs(ray_address(settings)), settings)
        if (key := settings.bootstrap_key()) is not None:
            with control.sessions() as session:
                store.create_api_key(session, "admin", key)
        app.state.control = control
        task = asyncio.create_task(reconcile_forever(control, settings.reconcile_interval_s)) if reconcile else None
        yield
        if task is not None:
            task.cancel()
        engine.dispose()

    app = FastAPI(title="raysft", version="0.1.0", lifespan=lifespan,
                  description="Supervised fine-tuning jobs on Ray: prepare datasets, train, run pipelines.")
    app.include_router(api.router)
    app.include_router(admin_api.router)
    app.include_router(files_api.router)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        """FastAPI's own 422s (query, headers) in the same shape as spec problems."""
        problems = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors()]
        return JSONResponse({"detail": {"problems": problems}}, status_code=422)

    @app.exception_handler(OperationalError)
    async def database_unavailable(request: Request, error: OperationalError) -> JSONResponse:
        """The database is down: say so, and lose nothing."""
        return JSONResponse({"detail": "database unavailable"}, status_code=503, headers={"Retry-After": "5"})

    app.mount("/ui", Dashboard(directory=UI_DIR, html=True), name="ui")

    @app.get("/", include_in_schema=False)
    def home() -> RedirectResponse:
        return RedirectResponse("/ui/")

    @app.get("/healthz", include_in_schema=True)
    def healthz() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/readyz")
    def readyz(request: Request) -> JSONResponse:
        checks = request.app.state.control.ready()
        return JSONResponse({"ready": all(checks.values()), **checks}, status_code=200 if all(checks.values()) else 503)

    @app.get("/metrics", include_in_schema=False)
    def metrics(request: Request) -> Response:
        with request.app.state.control.sessions() as session:
            counts = dict(session.execute(select(store.Job.status, func.count()).group_by(store.Job.status)).all())
        for status in store.Status:
            jobs_gauge.labels(status.value).set(counts.get(status, 0))
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    app.state.request_rate = TokenBuckets(settings.tenant_requests_per_s, settings.tenant_request_burst)
    app.add_middleware(Observe, requests=requests, latency=latency)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes, upload_max_bytes=settings.max_upload_bytes)
    return app
