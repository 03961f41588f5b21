"""What the behaviour modules refuse with; the routes turn each into its HTTP answer."""

from __future__ import annotations


class Conflict(Exception):
    """The Idempotency-Key was used before with a different request body."""


class NotFound(Exception):
    """No such resource for this tenant (another tenant's is not disclosed)."""


class TooManyJobs(Exception):
    """The tenant already has its limit of queued or running jobs."""

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Exists(Exception):
    """What is being created exists already (a tenant)."""
