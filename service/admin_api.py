"""The admin API, `/v1/admin`: tenants and their API keys, for the `admin` tenant's keys only
(the bootstrap key, `RAYSFT_ADMIN_API_KEY`, and any key an admin creates for `admin`). A key is
shown once, when it is created, and stored hashed; listing shows its name, first characters, and
when it was created, last used and revoked."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Depends, HTTPException, status
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import func, select

from service import store
from service.api import COMMON_RESPONSES, Message, utc
from service.deps import ControlDep, TenantDep

ADMIN_TENANT = "admin"


def admin(tenant: TenantDep) -> str:
    if tenant != ADMIN_TENANT:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "the admin API takes an admin tenant's key")
    return tenant


router = APIRouter(prefix="/v1/admin", tags=["admin"], dependencies=[Depends(admin)], responses=COMMON_RESPONSES | {
    403: {"model": Message, "description": "Not an admin tenant's key"}})


class NewTenant(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(pattern=store.TENANT_ID_PATTERN, description="Lowercase letters, digits and '-', at most "
                    "64 characters: it names the tenant's storage prefix, tenants/<id>/.")


class TenantOut(BaseModel):
    id: str
    created_at: datetime
    active_keys: int = Field(description="Keys not revoked.")


class NewKey(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field("", max_length=64, description="What the key is for (a person, a CI system).")


class KeyOut(BaseModel):
    id: str
    tenant: str
    name: str
    prefix: str = Field(description="The key's first characters, to tell keys apart.")
    created_at: datetime
    last_used_at: datetime | None = Field(description="Last looked up; exact to the key cache's lifetime.")
    revoked_at: datetime | None


class CreatedKey(KeyOut):
    key: str = Field(description="The key itself: shown this once, stored only hashed.")


def key_out(row: store.ApiKey) -> KeyOut:
    return KeyOut(id=row.id, tenant=row.tenant_id, name=row.name, prefix=row.prefix, created_at=utc(row.created_at),
                  last_used_at=utc(row.last_used_at), revoked_at=utc(row.revoked_at))


def active_keys(session, tenant_id: str) -> int:
    return session.scalar(select(func.count()).where(store.ApiKey.tenant_id == tenant_id,
                                                     store.ApiKey.revoked_at.is_(None)))


def known_tenant(session, tenant_id: str) -> store.Tenant:
    tenant = session.get(store.Tenant, tenant_id)
    if tenant is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no tenant {tenant_id}")
    return tenant


# OpenAPI links: what a created tenant or key leads to (schemathesis' stateful runs follow them).
TENANT_LINKS = {name: {"operationId": operation, "parameters": {"tenant_id": "$response.body#/id"}}
                for name, operation in (("CreateKey", "createKey"), ("ListKeys", "listKeys"))}
KEY_LINKS = {"RevokeKey": {"operationId": "revokeKey", "parameters": {"key_id": "$response.body#/id"}}}


@router.post("/tenants", status_code=status.HTTP_201_CREATED, response_model=TenantOut, operation_id="createTenant",
             responses={201: {"description": "Created", "links": TENANT_LINKS},
                        409: {"model": Message, "description": "The tenant exists"}})
def create_tenant(control: ControlDep, body: NewTenant) -> TenantOut:
    """A new tenant, with no key yet: create one with POST /v1/admin/tenants/{id}/keys."""
    with control.sessions() as session:
        try:
            tenant = store.create_tenant(session, body.id)
        except store.TenantExists:
            raise HTTPException(status.HTTP_409_CONFLICT, f"tenant {body.id} exists") from None
        return TenantOut(id=tenant.id, created_at=utc(tenant.created_at), active_keys=0)


@router.get("/tenants", response_model=list[TenantOut], operation_id="listTenants")
def list_tenants(control: ControlDep) -> list[TenantOut]:
    with control.sessions() as session:
        return [TenantOut(id=t.id, created_at=utc(t.created_at), active_keys=active_keys(session, t.id))
                for t in session.scalars(select(store.Tenant).order_by(store.Tenant.id))]


@router.post("/tenants/{tenant_id}/keys", status_code=status.HTTP_201_CREATED, response_model=CreatedKey,
             operation_id="createKey", responses={201: {"description": "Created", "links": KEY_LINKS},
                                                  404: {"model": Message, "description": "No such tenant"}})
def create_key(control: ControlDep, tenant_id: str, body: NewKey) -> CreatedKey:
    """A new key for the tenant. The response is the only time the key is shown."""
    with control.sessions() as session:
        known_tenant(session, tenant_id)
        key = store.create_api_key(session, tenant_id, name=body.name)
        return CreatedKey(**key_out(store.api_key(session, key)).model_dump(), key=key)


@router.get("/tenants/{tenant_id}/keys", response_model=list[KeyOut], operation_id="listKeys",
            responses={404: {"model": Message, "description": "No such tenant"}})
def list_keys(control: ControlDep, tenant_id: str) -> list[KeyOut]:
    with control.sessions() as session:
        known_tenant(session, tenant_id)
        rows = session.scalars(select(store.ApiKey).where(store.ApiKey.tenant_id == tenant_id)
                               .order_by(store.ApiKey.created_at, store.ApiKey.id))
        return [key_out(row) for row in rows]


@router.delete("/keys/{key_id}", response_model=KeyOut, operation_id="revokeKey",
               responses={404: {"model": Message, "description": "No such key"}})
def revoke_key(control: ControlDep, key_id: str) -> KeyOut:
    """Revoke a key: refused at once by this replica, by every replica within the key cache's
    lifetime (`RAYSFT_KEY_CACHE_TTL_S`)."""
    row = control.revoke_key(key_id)
    if row is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no key {key_id}")
    return key_out(row)
