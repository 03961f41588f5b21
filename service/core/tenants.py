"""Tenants and their API keys, as the admin API manages them. A key is shown once, when it is
created, and stored hashed."""

from __future__ import annotations

from sqlalchemy import func, select

from service import store
from service.core.context import Core
from service.core.errors import Exists, NotFound


def create(core: Core, tenant_id: str) -> store.Tenant:
    with core.sessions() as session:
        try:
            return store.create_tenant(session, tenant_id)
        except store.TenantExists:
            raise Exists(f"tenant {tenant_id} exists") from None


def listing(core: Core) -> list[tuple[store.Tenant, int]]:
    """Every tenant with its number of keys not revoked."""
    active = (select(store.ApiKey.tenant_id, func.count().label("keys")).where(store.ApiKey.revoked_at.is_(None))
              .group_by(store.ApiKey.tenant_id).subquery())
    with core.sessions() as session:
        rows = session.execute(select(store.Tenant, func.coalesce(active.c["keys"], 0))
                               .outerjoin(active, active.c.tenant_id == store.Tenant.id).order_by(store.Tenant.id))
        return [(tenant, int(keys)) for tenant, keys in rows]


def _known(session, tenant_id: str) -> store.Tenant:
    if (tenant := session.get(store.Tenant, tenant_id)) is None:
        raise NotFound(f"no tenant {tenant_id}")
    return tenant


def create_key(core: Core, tenant_id: str, name: str) -> tuple[store.ApiKey, str]:
    """A new key for the tenant: its record, and the key itself (shown this once)."""
    with core.sessions() as session:
        _known(session, tenant_id)
        key = store.create_api_key(session, tenant_id, name=name)
        return store.api_key(session, key), key


def keys(core: Core, tenant_id: str) -> list[store.ApiKey]:
    with core.sessions() as session:
        _known(session, tenant_id)
        return list(session.scalars(select(store.ApiKey).where(store.ApiKey.tenant_id == tenant_id)
                                    .order_by(store.ApiKey.created_at, store.ApiKey.id)))


def revoke_key(core: Core, key_id: str) -> store.ApiKey:
    """Revoke a key: refused by this replica at once, by every replica within the key cache's lifetime."""
    with core.sessions() as session:
        row = store.revoke_api_key(session, key_id)
    if row is None:
        raise NotFound(f"no key {key_id}")
    core.keys.forget(row.key_hash)
    return row
