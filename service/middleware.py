"""The service's ASGI middleware and the dashboard's static files: request body limits, request
metrics, and the headers every dashboard file is served with."""

from __future__ import annotations

import time
from pathlib import Path

from fastapi.responses import Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import Counter, Histogram

# Uploads have a limit of their own: the native API's and the OpenAI surface's.
UPLOAD_PATHS = frozenset({"/v1/files", "/openai/v1/files"})


class BodyLimit:
    """413 for bodies over the limit, whether announced by Content-Length or streamed (FastAPI has
    no limit of its own). Uploads have a limit of their own."""

    def __init__(self, app, max_bytes: int, upload_max_bytes: int):
        self.app, self.max_bytes, self.upload_max_bytes = app, max_bytes, upload_max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        upload = scope["method"] == "POST" and scope["path"] in UPLOAD_PATHS
        max_bytes = self.upload_max_bytes if upload else self.max_bytes
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > max_bytes):
            return await self._reject(scope, send)
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
            await self._reject(scope, send)

    async def _reject(self, scope, send):
        body = (b'{"error":{"message":"request body too large","type":"invalid_request_error","param":null,'
                b'"code":"request_too_large"}}' if scope["path"].startswith("/openai/")
                else b'{"detail":"request body too large"}')
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
