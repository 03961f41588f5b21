"""The control plane's shared state: the database (the source of truth), Ray's job API and Ray
Serve, the settings, the storage policy, and what is kept in memory (the key cache, the reconcile
loop's view of Ray, the chats answering)."""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from service.core.keys import KeyCache
from service.core.serving import Serving
from service.ray_jobs import RayJobs
from service.settings import Settings
from service.uris import UriPolicy


@dataclass
class Core:
    sessions: sessionmaker[Session]
    ray: RayJobs
    settings: Settings
    serving: Serving
    policy: UriPolicy = field(init=False)
    keys: KeyCache = field(init=False)
    ray_down_since: float | None = None  # monotonic time the reconcile loop first failed to reach Ray
    log_copied_at: dict[str, float] = field(default_factory=dict)  # job id -> monotonic time

    def __post_init__(self) -> None:
        self.policy = UriPolicy(self.settings.artifact_root, self.settings.data_dir.absolute(),
                                tuple(self.settings.shared_read_prefixes))
        self.keys = KeyCache(self.sessions, self.settings.key_cache_ttl_s)

    def ready(self) -> dict[str, bool]:
        try:
            with self.sessions() as session:
                session.execute(text("SELECT 1"))
            database = True
        except Exception:
            database = False
        return {"database": database, "ray": self.ray.reachable()}
