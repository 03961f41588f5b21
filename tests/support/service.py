"""Shared by the service tests: settings for a data directory, example specs, a Ray stand-in for
the API tests that do not need a cluster, and the service under uvicorn for those that use a real
one."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from service import local_ray, store
from service.ray_jobs import RayJob, RayUnavailable, UnknownToRay, entrypoint
from service.settings import Settings
from service.store import Status
from support import REPO

ADMIN_KEY = "rsk_admin_test_key"
TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED", "LOST"}


class RecordingRay:
    """Keeps submissions in memory and answers with the statuses a test sets. Same contract as
    `service.ray_jobs.RayJobs`: a second submit of one id adopts the first."""

    def __init__(self):
        self.jobs: dict[str, dict] = {}
        self.statuses: dict[str, RayJob] = {}
        self.submit_calls = 0
        self.down = False

    def submit(self, kind, spec_uri, submission_id, metadata, force=False):
        self.submit_calls += 1
        if self.down:
            raise RayUnavailable("connection refused")
        self.jobs.setdefault(submission_id, {"entrypoint": entrypoint(kind, spec_uri, force), "metadata": metadata})

    def status(self, submission_id):
        if self.down:
            raise RayUnavailable("connection refused")
        if submission_id not in self.jobs:
            raise UnknownToRay(submission_id)
        return self.statuses.get(submission_id, RayJob(Status.RUNNING, ""))

    def set(self, submission_id, status: Status, message: str = ""):
        self.statuses[submission_id] = RayJob(status, message)

    def stop(self, submission_id):
        self.set(submission_id, Status.CANCELLED, "stopped")

    def logs(self, submission_id):
        return "".join(f"line {i}\n" for i in range(5))

    async def follow(self, submission_id):
        for line in self.logs(submission_id).splitlines(keepends=True):
            yield line

    def reachable(self):
        return not self.down


def service_settings(data_dir: Path, tiny_model: Path, **overrides) -> Settings:
    """A data directory with the scaffold model under a shared prefix and the demo data in the
    `acme` tenant's prefix."""
    models = data_dir / "models"
    if not (models / "tiny").exists():
        shutil.copytree(tiny_model, models / "tiny")
        inputs = data_dir / "artifacts/tenants/acme/inputs"
        shutil.copytree(REPO / "configs/data", inputs)
    return Settings(data_dir=data_dir, shared_read_prefixes=[str(models)], admin_api_key=ADMIN_KEY,
                    reconcile_interval_s=0.5, **overrides)


def dataset_body(data_dir: Path, **overrides) -> dict:
    inputs = data_dir / "artifacts/tenants/acme/inputs"
    return {"name": "demo", "sources": [{"uri": str(inputs / "alpaca.jsonl"), "format": "alpaca"},
                                        {"uri": str(inputs / "messages.jsonl"), "format": "messages"}],
            "tokenizer": str(data_dir / "models/tiny"), "template": "chatml", "max_seq_length": 512,
            "val_ratio": 0.1} | overrides


def training_body(data_dir: Path, **overrides) -> dict:
    return {"name": "lora", "model": {"uri": str(data_dir / "models/tiny"), "dtype": "fp32"}, "method": "lora",
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0}, "strategy": {"kind": "deepspeed", "zero_stage": 2},
            "optim": {"lr": 0.01, "warmup_ratio": 0.0}, "batch": {"micro_batch_size": 2, "grad_accum": 1},
            "max_steps": 12, "log_every_steps": 2, "scaling": {"num_workers": 1},
            "checkpoint": {"every_steps": 6, "keep": 2}, "eval": {"every_steps": 6}} | overrides


class Service:
    """`uvicorn --factory service.app:create_app` in a subprocess, restartable."""

    def __init__(self, data_dir: Path, tiny_model: Path, head: local_ray.LocalRay,
                 factory: str = "service.app:create_app", **settings):
        service_settings(data_dir, tiny_model)  # lays out the data directory
        self.port = local_ray.free_port()
        self.env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | head.env | {
            "RAYSFT_DATA_DIR": str(data_dir), "RAYSFT_ADMIN_API_KEY": ADMIN_KEY,
            "RAYSFT_SHARED_READ_PREFIXES": json.dumps([str(data_dir / "models")]),
            "RAYSFT_RECONCILE_INTERVAL_S": "0.5"} | {f"RAYSFT_{k.upper()}": str(v) for k, v in settings.items()}
        self.log = data_dir / "service.log"
        self.process = None
        self.start(factory)

    def start(self, factory: str = "service.app:create_app") -> None:
        # A session of its own, as a deployed service has a pod of its own: where the kernel
        # shares CPU between sessions (autogroups), the test's client threads are not its rivals.
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--factory", factory, "--app-dir", str(REPO / "tests"),
             "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=REPO, env=self.env, stdout=open(self.log, "a"), stderr=subprocess.STDOUT, start_new_session=True)
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=30,
                                 headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if self.http.get("/healthz").status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.3)
        raise RuntimeError(self.log.read_text()[-3000:])

    def session(self):
        """A session on the service's database (SQLite in its data directory), for a test that adds
        tenants, keys or rows directly."""
        url = f"sqlite:///{Path(self.env['RAYSFT_DATA_DIR']).absolute() / 'raysft.db'}"
        return store.session_factory(store.make_engine(url))()

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def wait(self, job_id: str, until=lambda job: job["status"] in TERMINAL, timeout: float = 400,
             headers: dict[str, str] | None = None) -> list[dict]:
        """Poll the job (as the admin tenant, or with `headers`) until `until(job)`; returns every
        response seen."""
        seen, deadline = [], time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.http.get(f"/v1/jobs/{job_id}", headers=headers).json()
            seen.append(job)
            if until(job):
                return seen
            time.sleep(0.5)
        raise TimeoutError(json.dumps(seen[-1], indent=2) + self.log.read_text()[-3000:])
