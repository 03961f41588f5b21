"""The only place the service talks to Ray: its Job Submission API.

Entrypoints are constants (a preparation may add the constant `--force`). The spec never enters
the command line: the service writes it to a
file under the tenant's prefix and the command names that file, a path the service built from
its own identifiers (and quotes anyway). No `runtime_env` is ever sent: the cluster runs the
image's code and environment, so a job cannot install packages, set environment variables or
upload code. The Ray token comes from the service's environment (`RAY_AUTH_TOKEN`), as the SDK
reads it; it never appears in job metadata.
"""

from __future__ import annotations

import contextlib
import re
import shlex
from collections.abc import AsyncIterator
from dataclasses import dataclass

from service.store import Kind, Status

ENTRYPOINTS = {Kind.DATASET: "python -m jobs.prepare --spec {spec}", Kind.TRAINING: "python -m jobs.train --spec {spec}",
               Kind.EVALUATION: "python -m jobs.evaluate --spec {spec}"}
FORCE = " --force"  # the one flag a request may add, to a preparation: prepare again, reuse nothing
# Ray's job statuses, as the database records them.
STATUSES = {"PENDING": Status.QUEUED, "RUNNING": Status.RUNNING, "SUCCEEDED": Status.SUCCEEDED,
            "FAILED": Status.FAILED, "STOPPED": Status.CANCELLED}


class RayUnavailable(Exception):
    """Ray's job API could not be reached or answered with an error."""


class AlreadySubmitted(Exception):
    """Ray already has a job with this submission id: the submit is adopted, not an error."""


class UnknownToRay(Exception):
    """Ray has no job with this submission id (never submitted, or the cluster was restarted)."""


@dataclass(frozen=True)
class RayJob:
    status: Status
    message: str


def entrypoint(kind: Kind, spec_uri: str, force: bool = False) -> str:
    return ENTRYPOINTS[kind].format(spec=shlex.quote(spec_uri)) + (FORCE if force else "")


class RayJobs:
    def __init__(self, address: str):
        self.address = address
        self._client = None

    @property
    def client(self):
        if self._client is None:
            from ray.job_submission import JobSubmissionClient

            try:
                self._client = JobSubmissionClient(self.address)
            except Exception as e:  # the SDK raises ConnectionError/RuntimeError when the head is down
                raise RayUnavailable(f"Ray at {self.address}: {e}") from e
        return self._client

    def _call(self, method: str, *args, **kwargs):
        try:
            return getattr(self.client, method)(*args, **kwargs)
        except RayUnavailable:
            raise
        except Exception as e:
            text = str(e)
            # Ray's errors are text with a traceback inside: look before cutting it short, and by
            # status code, not by digits a random id may also hold.
            if "already exists" in text:
                raise AlreadySubmitted(text[-300:]) from e
            if re.match(r"Request failed with status code 404\b", text) or "does not exist" in text:
                raise UnknownToRay(text) from e
            self._client = None  # reconnect next time (the head may have restarted)
            raise RayUnavailable(f"Ray at {self.address}: {text[:300]}") from e

    def submit(self, kind: Kind, spec_uri: str, submission_id: str, metadata: dict[str, str],
               force: bool = False) -> None:
        """Submit once: a second submit of the same id (a retry, a restart between submit and
        commit) finds the first and adopts it."""
        with contextlib.suppress(AlreadySubmitted):
            self._call("submit_job", entrypoint=entrypoint(kind, spec_uri, force), submission_id=submission_id,
                       metadata=metadata)

    def status(self, submission_id: str) -> RayJob:
        info = self._call("get_job_info", submission_id)
        return RayJob(STATUSES[str(info.status.value if hasattr(info.status, "value") else info.status)],
                      info.message or "")

    def stop(self, submission_id: str) -> None:
        self._call("stop_job", submission_id)

    def logs(self, submission_id: str) -> str:
        return self._call("get_job_logs", submission_id)

    async def follow(self, submission_id: str) -> AsyncIterator[str]:
        try:
            async for chunk in self.client.tail_job_logs(submission_id):
                yield chunk
        except Exception as e:
            raise RayUnavailable(str(e)) from e

    def reachable(self) -> bool:
        try:
            self._call("get_version")
            return True
        except (RayUnavailable, UnknownToRay):
            return False
