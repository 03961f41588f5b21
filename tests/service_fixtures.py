"""Shared by the service tests: settings for a data directory, example specs, and a Ray stand-in
for the API tests that do not need a cluster (the end-to-end tests use a real one)."""

from __future__ import annotations

import shutil
from pathlib import Path

from service.ray_jobs import RayJob, RayUnavailable, UnknownToRay, entrypoint
from service.settings import Settings
from service.store import Status

REPO = Path(__file__).resolve().parents[1]
ADMIN_KEY = "rsk_admin_test_key"


class RecordingRay:
    """Keeps submissions in memory and answers with the statuses a test sets. Same contract as
    `service.ray_jobs.RayJobs`: a second submit of one id adopts the first."""

    def __init__(self):
        self.jobs: dict[str, dict] = {}
        self.statuses: dict[str, RayJob] = {}
        self.submit_calls = 0
        self.down = False

    def submit(self, kind, spec_uri, submission_id, metadata):
        self.submit_calls += 1
        if self.down:
            raise RayUnavailable("connection refused")
        self.jobs.setdefault(submission_id, {"entrypoint": entrypoint(kind, spec_uri), "metadata": metadata})

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
