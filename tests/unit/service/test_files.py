"""Uploads on a real database and a local artifact store: a file streamed in is stored under its
tenant's prefix with its SHA-256, listed, named in a dataset spec as `file:<id>`, deleted; other
tenants see none of it; refused, malformed and broken-off uploads leave nothing, neither a record
nor an object; and a large upload never sits whole in the service's memory (uvicorn on loopback,
in this process, measured with tracemalloc)."""

from __future__ import annotations

import hashlib
import threading
import time
import tracemalloc
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient
from support.service import RecordingRay, dataset_body, service_settings

from service import local_ray, store
from service.app import create_app

ROWS = b'{"instruction": "Say hi", "output": "Hi!"}\n' * 50


@pytest.fixture
def app(tmp_path, tiny_model):
    return create_app(service_settings(tmp_path / "data", tiny_model, max_upload_bytes=1 << 30), ray=RecordingRay(),
                      reconcile=False)


@pytest.fixture
def client(app):
    with TestClient(app) as c:
        with app.state.core.sessions() as session:
            c.keys = {t: store.create_api_key(session, t) for t in ("acme", "globex")}
        yield c


def auth(client, tenant="acme"):
    return {"Authorization": f"Bearer {client.keys[tenant]}"}


def files_dir(app, tenant="acme") -> Path:
    return Path(app.state.core.policy.tenant_root(tenant)) / "files"


def registered(app) -> int:
    with app.state.core.sessions() as session:
        return session.query(store.File).count()


def test_an_upload_is_stored_under_the_tenant_with_its_digest_and_named_in_specs(client, app):
    uploaded = client.post("/v1/files", files={"file": ("../my data.jsonl", ROWS)}, headers=auth(client))
    assert uploaded.status_code == 201, uploaded.text
    f = uploaded.json()
    assert f["filename"] == "../my data.jsonl" and f["bytes"] == len(ROWS)
    assert f["sha256"] == hashlib.sha256(ROWS).hexdigest()
    assert f["uri"] == str(files_dir(app) / f["id"] / "my_data.jsonl") and Path(f["uri"]).read_bytes() == ROWS
    assert client.get(f"/v1/files/{f['id']}", headers=auth(client)).json() == f
    assert client.get("/v1/files", headers=auth(client)).json()["items"] == [f]

    body = dataset_body(app.state.core.settings.data_dir, sources=[{"uri": f"file:{f['id']}", "format": "alpaca"}])
    job = client.post("/v1/datasets", json=body, headers=auth(client))
    assert job.status_code == 202, job.text
    assert job.json()["spec"]["sources"][0]["uri"] == f["uri"]
    body["sources"].append({"uri": "file:nope", "format": "alpaca"})
    refused = client.post("/v1/datasets", json=body, headers=auth(client))
    assert refused.status_code == 422
    assert "sources.1.uri: no file nope for this tenant: `raysft files list` shows yours" in refused.text

    # Another tenant: not listed, not found, not usable in a spec, not deletable.
    assert client.get("/v1/files", headers=auth(client, "globex")).json()["total"] == 0
    assert client.get(f"/v1/files/{f['id']}", headers=auth(client, "globex")).status_code == 404
    assert client.delete(f"/v1/files/{f['id']}", headers=auth(client, "globex")).status_code == 404
    assert client.post("/v1/datasets", json=body, headers=auth(client, "globex")).status_code == 422

    assert client.delete(f"/v1/files/{f['id']}", headers=auth(client)).status_code == 200
    assert client.get(f"/v1/files/{f['id']}", headers=auth(client)).status_code == 404
    assert not (files_dir(app) / f["id"]).exists() and registered(app) == 0


@pytest.mark.parametrize(("kwargs", "expected"), [
    ({"files": {"data": ("a.jsonl", ROWS)}}, "unexpected form field 'data'"),
    ({"files": [("file", ("a.jsonl", ROWS)), ("file", ("b.jsonl", ROWS))]}, "one file per upload"),
    ({"data": {"file": "not a file"}, "files": {"other": ("x", b"")}}, "the `file` part has no filename"),
    ({"content": b"plain bytes", "headers": {"Content-Type": "application/octet-stream"}}, "send multipart/form-data"),
    ({"content": b"--xyz\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jsonl\"\r\n\r\n" + ROWS,
      "headers": {"Content-Type": "multipart/form-data; boundary=xyz"}}, "the body ended before its `file` part did"),
    ({"content": b"--xyz--\r\n", "headers": {"Content-Type": "multipart/form-data; boundary=xyz"}}, "no `file` part"),
], ids=["wrong-field", "two-files", "form-fields", "not-multipart", "truncated", "empty-form"])
def test_a_malformed_upload_is_refused_with_the_fix_and_leaves_nothing(client, app, kwargs, expected):
    headers = auth(client) | kwargs.pop("headers", {})
    refused = client.post("/v1/files", headers=headers, **kwargs)
    assert refused.status_code == 422 and expected in refused.text, refused.text
    assert registered(app) == 0 and not any(files_dir(app).glob("*/*"))


def test_an_upload_over_the_limit_gets_413_and_leaves_nothing(tmp_path, tiny_model):
    app = create_app(service_settings(tmp_path / "data", tiny_model, max_upload_bytes=4096), ray=RecordingRay(),
                     reconcile=False)
    with TestClient(app) as client, app.state.core.sessions() as session:
        headers = {"Authorization": f"Bearer {store.create_api_key(session, 'acme')}"}
        big = client.post("/v1/files", files={"file": ("big.jsonl", ROWS * 4)}, headers=headers)
        assert big.status_code == 413
        assert registered(app) == 0 and not any(files_dir(app).glob("*/*"))
        assert client.post("/v1/files", files={"file": ("ok.jsonl", ROWS[:1000])}, headers=headers).status_code == 201


@pytest.fixture
def served(app):
    """The app under uvicorn on loopback, in this process (so tracemalloc sees the server)."""
    with TestClient(app), app.state.core.sessions() as session:  # the lifespan migrates the database
        key = store.create_api_key(session, "acme")
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=local_ray.free_port(), log_level="warning",
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield httpx.Client(base_url=f"http://127.0.0.1:{server.config.port}", timeout=120,
                       headers={"Authorization": f"Bearer {key}"})
    server.should_exit = True
    thread.join(timeout=10)


def multipart(total_bytes: int, boundary: bytes = b"raysftboundary", fail_after: int | None = None):
    """A multipart body with one file part of `total_bytes`, generated 1 MiB at a time."""
    yield b"--" + boundary + b'\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n\r\n'
    line = b'{"text": "' + b"x" * 1000 + b'"}\n'
    chunk = line * ((1 << 20) // len(line))
    sent = 0
    while sent < total_bytes:
        if fail_after is not None and sent >= fail_after:
            raise ConnectionAbortedError("the client went away")
        piece = chunk[: total_bytes - sent]
        sent += len(piece)
        yield piece
    yield b"\r\n--" + boundary + b"--\r\n"


def test_a_large_upload_streams_through_in_bounded_memory(served, app, record_property):
    size = 256 << 20
    tracemalloc.start()
    started = time.monotonic()
    response = served.post("/v1/files", content=multipart(size),
                           headers={"Content-Type": "multipart/form-data; boundary=raysftboundary"})
    seconds = time.monotonic() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert response.status_code == 201, response.text
    stored = response.json()
    assert stored["bytes"] == size and Path(stored["uri"]).stat().st_size == size
    record_property("upload_mib_per_s", round(size / (1 << 20) / seconds, 1))
    record_property("upload_python_peak_mib", round(peak / (1 << 20), 1))
    assert peak < 16 << 20  # a 256 MiB file, never more than a few batches of it held


def test_an_upload_broken_off_midway_leaves_nothing(served, app):
    with pytest.raises(ConnectionAbortedError):
        served.post("/v1/files", content=multipart(64 << 20, fail_after=8 << 20),
                    headers={"Content-Type": "multipart/form-data; boundary=raysftboundary"})
    deadline = time.monotonic() + 10
    while any(files_dir(app).glob("*/*")) and time.monotonic() < deadline:
        time.sleep(0.1)  # the server notices the disconnect, then removes what it stored
    assert registered(app) == 0 and not any(files_dir(app).glob("*/*"))


@pytest.mark.integration
def test_uploads_stream_into_an_s3_artifact_store(tmp_path, tiny_model, s3_server):
    import boto3

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="raysft")
    app = create_app(service_settings(tmp_path / "data", tiny_model, artifact_root="s3://raysft/artifacts"),
                     ray=RecordingRay(), reconcile=False)
    with TestClient(app) as client, app.state.core.sessions() as session:
        headers = {"Authorization": f"Bearer {store.create_api_key(session, 'acme')}"}
        data = ROWS * 200
        f = client.post("/v1/files", files={"file": ("rows.jsonl", data)}, headers=headers).json()
        key = f"artifacts/tenants/acme/files/{f['id']}/rows.jsonl"
        assert f["uri"] == f"s3://raysft/{key}" and f["sha256"] == hashlib.sha256(data).hexdigest()
        assert s3.get_object(Bucket="raysft", Key=key)["Body"].read() == data
        truncated = b"--xyz\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jsonl\"\r\n\r\n" + data
        refused = client.post("/v1/files", content=truncated,
                              headers=headers | {"Content-Type": "multipart/form-data; boundary=xyz"})
        assert refused.status_code == 422
        assert client.delete(f"/v1/files/{f['id']}", headers=headers).status_code == 200
        left = s3.list_objects_v2(Bucket="raysft", Prefix="artifacts/tenants/acme/files/").get("Contents", [])
        # Only pyarrow's empty marker for the `files/` prefix is left, no object of either upload.
        assert [o["Key"] for o in left if not (o["Key"].endswith("/") and o["Size"] == 0)] == []
