"""The admin API, `/v1/admin`: tenants and their API keys, for the `admin` tenant's keys only
(the bootstrap key, `RAYSFT_ADMIN_API_KEY`, and any key an admin creates for `admin`). A key is
shown once, when it is created, and stored hashed; listing shows its name, first characters, and
when it was created, last used and revoked."""

from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException, status

from service.core import tenants
from service.deps import CoreDep, TenantDep
from service.schemas import COMMON_RESPONSES, CreatedKey, KeyOut, Message, NewKey, NewTenant, TenantOut, key_out, utc

ADMIN_TENANT = "admin"


def admin(tenant: TenantDep) -> str:
    if tenant != ADMIN_TENANT:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "the admin API takes an admin tenant's key")
    return tenant


router = APIRouter(prefix="/v1/admin", tags=["admin"], dependencies=[Depends(admin)], responses=COMMON_RESPONSES | {
    403: {"model": Message, "description": "Not an admin tenant's key"}})
# OpenAPI links: what a created tenant or key leads to (schemathesis' stateful runs follow them).
TENANT_LINKS = {name: {"operationId": operation, "parameters": {"tenant_id": "$response.body#/id"}}
                for name, operation in (("CreateKey", "createKey"), ("ListKeys", "listKeys"))}
KEY_LINKS = {"RevokeKey": {"operationId": "revokeKey", "parameters": {"key_id": "$response.body#/id"}}}


@router.post("/tenants", status_code=status.HTTP_201_CREATED, response_model=TenantOut, operation_id="createTenant",
             responses={201: {"description": "Created", "links": TENANT_LINKS},
                        409: {"model": Message, "description": "The tenant exists"}})
def create_tenant(core: CoreDep, body: NewTenant) -> TenantOut:
    """A new tenant, with no key yet: create one with POST /v1/admin/tenants/{id}/keys."""
    tenant = tenants.create(core, body.id)
    return TenantOut(id=tenant.id, created_at=utc(tenant.created_at), active_keys=0)


@router.get("/tenants", response_model=list[TenantOut], operation_id="listTenants")
def list_tenants(core: CoreDep) -> list[TenantOut]:
    return [TenantOut(id=t.id, created_at=utc(t.created_at), active_keys=keys) for t, keys in tenants.listing(core)]


@router.post("/tenants/{tenant_id}/keys", status_code=status.HTTP_201_CREATED, response_model=CreatedKey,
             operation_id="createKey", responses={201: {"description": "Created", "links": KEY_LINKS},
                                                  404: {"model": Message, "description": "No such tenant"}})
def create_key(core: CoreDep, tenant_id: str, body: NewKey) -> CreatedKey:
    """A new key for the tenant. The response is the only time the key is shown."""
    row, key = tenants.create_key(core, tenant_id, body.name)
    return CreatedKey(**key_out(row).model_dump(), key=key)


@router.get("/tenants/{tenant_id}/keys", response_model=list[KeyOut], operation_id="listKeys",
            responses={404: {"model": Message, "description": "No such tenant"}})
def list_keys(core: CoreDep, tenant_id: str) -> list[KeyOut]:
    return [key_out(row) for row in tenants.keys(core, tenant_id)]


@router.delete("/keys/{key_id}", response_model=KeyOut, operation_id="revokeKey",
               responses={404: {"model": Message, "description": "No such key"}})
def revoke_key(core: CoreDep, key_id: str) -> KeyOut:
    """Revoke a key: refused at once by this replica, by every replica within the key cache's
    lifetime (`RAYSFT_KEY_CACHE_TTL_S`)."""
    return key_out(tenants.revoke_key(core, key_id))
