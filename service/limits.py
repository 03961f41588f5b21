"""Per-tenant request rate: a token bucket per tenant, in this process. One tenant's burst of
requests gets 429s with Retry-After instead of slowing every other tenant down.

The buckets are per replica, so a tenant's effective rate is the setting times the replicas; the
limit on active jobs (in the database) is the one that holds across replicas.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class TokenBuckets:
    rate: float  # tokens added per second
    burst: int  # bucket size: requests allowed at once after a quiet spell
    clock: Callable[[], float] = time.monotonic
    _buckets: dict[str, tuple[float, float]] = field(default_factory=dict)  # tenant -> (tokens, at)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self, tenant: str) -> float:
        """Spend one token of `tenant`'s bucket: 0.0 when allowed, else the seconds until a token."""
        with self._lock:
            now = self.clock()
            tokens, at = self._buckets.get(tenant, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - at) * self.rate)
            if tokens >= 1:
                self._buckets[tenant] = (tokens - 1, now)
                return 0.0
            self._buckets[tenant] = (tokens, now)
            return (1 - tokens) / self.rate
