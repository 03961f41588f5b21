"""Faults around the control plane: the database going away and coming back, and the
service dying between its Ray submit and its database commit."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient
from support.service import RecordingRay, dataset_body, service_settings

from service import store
from service.app import create_app
from service.core.reconcile import reconcile_once

pytestmark = pytest.mark.integration


def pg_url(server) -> str:
    return server.get_uri().replace("postgresql://", "postgresql+psycopg://", 1)


def test_database_outage_is_reported_answered_with_503_and_loses_nothing(tmp_path, tiny_model, record_property):
    pgserver = pytest.importorskip("pgserver")
    pgdata = tmp_path / "pg"
    server = pgserver.get_server(pgdata, cleanup_mode="stop")
    ray = RecordingRay()
    app = create_app(service_settings(tmp_path / "data", tiny_model, database_url=pg_url(server)), ray=ray, reconcile=False)
    with TestClient(app) as client:
        with app.state.core.sessions() as session:
            headers = {"Authorization": f"Bearer {store.create_api_key(session, 'acme')}"}
        body = dataset_body(tmp_path / "data")
        job = client.post("/v1/datasets", json=body, headers=headers).json()

        server.cleanup()  # PostgreSQL stops
        down = time.monotonic()
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["database"] is False
        slowest = 0.0
        for method, path, kwargs in [("GET", f"/v1/jobs/{job['id']}", {}), ("GET", "/v1/jobs", {}),
                                     ("POST", "/v1/datasets", {"json": body})]:
            asked = time.monotonic()
            response = client.request(method, path, headers=headers, **kwargs)
            slowest = max(slowest, time.monotonic() - asked)
            assert response.status_code == 503, (path, response.text)
            assert response.json() == {"detail": "database unavailable"} and response.headers["Retry-After"]
        with pytest.raises(Exception, match="(?i)connect|operational"):
            reconcile_once(app.state.core)  # the loop logs this and tries again next pass
        assert time.monotonic() - down < 10  # every answer came at once, none hung on the outage

        record_property("slowest_503_s", round(slowest, 2))
        server = pgserver.get_server(pgdata, cleanup_mode="stop")  # and comes back
        back = time.monotonic()
        assert pg_url(server) == app.state.core.settings.database_url
        assert client.get("/readyz").status_code == 200
        record_property("database_back_to_ready_s", round(time.monotonic() - back, 2))
        again = client.get(f"/v1/jobs/{job['id']}", headers=headers)
        assert again.status_code == 200 and again.json()["status"] == job["status"]
        assert client.post("/v1/datasets", json=body, headers=headers).status_code == 202
        listed = client.get("/v1/jobs", headers=headers).json()
        assert listed["total"] == 2 and len(ray.jobs) == 2  # the refused POST left nothing behind
    server.cleanup()
