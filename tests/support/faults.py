"""Faults to inject, with no hook in the product code: service factories that die at a chosen
moment (`uvicorn --factory support.faults:<name> --app-dir tests`), and an HTTP proxy in front of
an S3 server that refuses chosen writes the way a failing object store does (503 SlowDown,
which clients retry and then give up on)."""

from __future__ import annotations

import http.client
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from service.app import create_app
from service.ray_jobs import RayJobs


def create_app_dying_after_ray_submit():
    """The service, killed the moment Ray accepts a job and before the database records that it
    did: the window a crash between the two calls leaves."""
    submit = RayJobs.submit

    def submit_then_die(self, *args, **kwargs):
        submit(self, *args, **kwargs)
        os._exit(137)

    RayJobs.submit = submit_then_die
    return create_app()


SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")


class FaultyS3:
    def __init__(self, upstream: str):
        self.upstream = urlsplit(upstream)
        self.refuse = lambda method, path: False  # set by the test: which requests fail
        self.refused: list[tuple[float, str]] = []  # (time.monotonic(), request) of each refusal
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
                    return self.rfile.read(int(self.headers.get("Content-Length") or 0))
                chunks = []
                while size := int(self.rfile.readline().split(b";")[0], 16):
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                    pass
                return b"".join(chunks)

            def _forward(self):
                body = self._body()
                if proxy.refuse(self.command, self.path):
                    proxy.refused.append((time.monotonic(), f"{self.command} {self.path}"))
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOW_DOWN)))
                    self.end_headers()
                    self.wfile.write(SLOW_DOWN)
                    return
                connection = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("connection", "transfer-encoding", "content-length")}
                headers["Content-Length"] = str(len(body))
                connection.request(self.command, self.path, body=body, headers=headers)
                response = connection.getresponse()
                payload = response.read()
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in ("connection", "transfer-encoding", "content-length"):
                        self.send_header(key, value)
                # A HEAD answer has no body but the object's length: clients size their reads by it.
                length = response.getheader("Content-Length") if self.command == "HEAD" else len(payload)
                self.send_header("Content-Length", str(length or 0))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)
                connection.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
