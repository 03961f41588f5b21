"""The admin API on a real database: tenants and keys created, listed and revoked by the admin
tenant only; a key shown once and stored hashed; a revoked key refused at once by the replica that
revoked it and within the key cache's lifetime by another (the bound measured)."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient
from support.service import ADMIN_KEY, RecordingRay, service_settings

from service import store
from service.app import create_app

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def data_dir(tmp_path):
    return tmp_path / "data"


@pytest.fixture
def client(data_dir, tiny_model):
    with TestClient(create_app(service_settings(data_dir, tiny_model), ray=RecordingRay(), reconcile=False)) as c:
        yield c


def test_only_an_admin_tenants_key_reaches_the_admin_api(client):
    acme = client.post("/v1/admin/tenants/admin/keys", json={"name": "second admin"}, headers=ADMIN).json()["key"]
    assert client.get("/v1/admin/tenants", headers=bearer(acme)).status_code == 200  # any key of `admin`
    client.post("/v1/admin/tenants", json={"id": "acme"}, headers=ADMIN)
    tenant_key = client.post("/v1/admin/tenants/acme/keys", json={}, headers=ADMIN).json()["key"]
    for method, path in [("GET", "/v1/admin/tenants"), ("POST", "/v1/admin/tenants"),
                         ("GET", "/v1/admin/tenants/acme/keys"), ("DELETE", "/v1/admin/keys/x")]:
        assert client.request(method, path, headers=bearer(tenant_key), json={"id": "x"}).status_code == 403
        assert client.request(method, path, json={"id": "x"}).status_code == 401


def test_tenants_are_created_once_with_ids_safe_for_storage_paths(client):
    created = client.post("/v1/admin/tenants", json={"id": "globex"}, headers=ADMIN)
    assert created.status_code == 201 and created.json()["active_keys"] == 0
    assert client.post("/v1/admin/tenants", json={"id": "globex"}, headers=ADMIN).status_code == 409
    for bad in ("../admin", "Globex", "-x", "a" * 65, "a/b", ""):
        refused = client.post("/v1/admin/tenants", json={"id": bad}, headers=ADMIN)
        assert refused.status_code == 422, bad
    assert client.post("/v1/admin/tenants", json={"id": "x", "quota": 1}, headers=ADMIN).status_code == 422
    assert [t["id"] for t in client.get("/v1/admin/tenants", headers=ADMIN).json()] == ["admin", "globex"]
    assert client.post("/v1/admin/tenants/nobody/keys", json={}, headers=ADMIN).status_code == 404


def test_a_key_is_shown_once_stored_hashed_and_listed_with_its_use(client):
    client.post("/v1/admin/tenants", json={"id": "globex"}, headers=ADMIN)
    created = client.post("/v1/admin/tenants/globex/keys", json={"name": "ci"}, headers=ADMIN).json()
    key = created["key"]
    assert key.startswith("rsk_") and created["prefix"] == key[:8] and created["last_used_at"] is None
    with client.app.state.core.sessions() as session:
        row = session.get(store.ApiKey, created["id"])
        assert row.key_hash == store.hash_key(key) and key not in str(row.__dict__)
    assert client.get("/v1/jobs", headers=bearer(key)).json()["total"] == 0  # globex sees its own, none yet
    [listed] = client.get("/v1/admin/tenants/globex/keys", headers=ADMIN).json()
    assert listed["name"] == "ci" and listed["last_used_at"] is not None and "key" not in listed
    assert key not in str(client.get("/v1/admin/tenants/globex/keys", headers=ADMIN).text)
    tenants = {t["id"]: t for t in client.get("/v1/admin/tenants", headers=ADMIN).json()}
    assert tenants["globex"]["active_keys"] == 1


def test_a_revoked_key_is_refused_at_once_by_the_replica_that_revoked_it(client):
    created = client.post("/v1/admin/tenants/admin/keys", json={"name": "temp"}, headers=ADMIN).json()
    assert client.get("/v1/jobs", headers=bearer(created["key"])).status_code == 200  # now cached
    revoked = client.delete(f"/v1/admin/keys/{created['id']}", headers=ADMIN).json()
    assert revoked["revoked_at"] is not None
    assert client.get("/v1/jobs", headers=bearer(created["key"])).status_code == 401
    again = client.delete(f"/v1/admin/keys/{created['id']}", headers=ADMIN).json()
    assert again["revoked_at"] == revoked["revoked_at"]  # the first revocation stands
    assert client.delete("/v1/admin/keys/nope", headers=ADMIN).status_code == 404


def test_another_replica_refuses_a_revoked_key_within_the_key_cache_lifetime(data_dir, tiny_model, record_property):
    ttl = 2.0
    settings = service_settings(data_dir, tiny_model, key_cache_ttl_s=ttl)
    with TestClient(create_app(settings, ray=RecordingRay(), reconcile=False)) as revoking, \
            TestClient(create_app(settings, ray=RecordingRay(), reconcile=False)) as other:
        created = revoking.post("/v1/admin/tenants/admin/keys", json={}, headers=ADMIN).json()
        assert other.get("/v1/jobs", headers=bearer(created["key"])).status_code == 200  # cached there
        revoking.delete(f"/v1/admin/keys/{created['id']}", headers=ADMIN)
        revoked_at = time.monotonic()
        while other.get("/v1/jobs", headers=bearer(created["key"])).status_code == 200:
            assert time.monotonic() - revoked_at < ttl + 1, "still accepted after the key cache's lifetime"
            time.sleep(0.05)
        refused_after = time.monotonic() - revoked_at
    record_property("revoked_key_refused_after_s", round(refused_after, 2))
    record_property("key_cache_ttl_s", ttl)
    assert refused_after <= ttl + 0.2
