"""API keys to tenants, remembered for a while so most requests skip the database."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from sqlalchemy.orm import Session, sessionmaker

from service import store

MAX_KNOWN_KEYS = 10_000


@dataclass
class KeyCache:
    sessions: sessionmaker[Session]
    ttl_s: float
    known: dict[str, tuple[str, float]] = field(default_factory=dict)  # key hash -> (tenant, expiry)

    def known_tenant(self, key: str) -> str | None:
        """The tenant of an API key looked up within `ttl_s`; no database round trip."""
        tenant, expiry = self.known.get(store.hash_key(key), (None, 0.0))
        return tenant if expiry > time.monotonic() else None

    def tenant_for_key(self, key: str) -> str | None:
        """API key -> tenant. Known keys are remembered for `ttl_s` (`key_cache_ttl_s`), so most
        requests skip that database round trip, and a key revoked on another replica is refused here
        once that time is up. Unknown keys are looked up every time: a flood of wrong keys cannot
        fill the memory."""
        if (tenant := self.known_tenant(key)) is not None:
            return tenant
        with self.sessions() as session:
            tenant = store.tenant_for_key(session, key)
        if tenant is not None:
            if len(self.known) >= MAX_KNOWN_KEYS:
                self.known.clear()
            self.known[store.hash_key(key)] = (tenant, time.monotonic() + self.ttl_s)
        return tenant

    def forget(self, key_hash: str) -> None:
        """A revoked key: refused here at once, by other replicas within `ttl_s`."""
        self.known.pop(key_hash, None)
