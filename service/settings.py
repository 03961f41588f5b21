"""Service settings, from `RAYSFT_*` environment variables (pydantic-settings).

With nothing set, the service runs the embedded default: a data directory `.raysft/` holding
the SQLite database, the artifacts (specs, prepared datasets, checkpoints) and a local Ray head
that `raysft serve` starts and stops. Production sets a PostgreSQL URL, an object-storage
artifact root and the address of a Ray cluster.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class FineTunableModel(BaseModel):
    """A base model the OpenAI-compatible surface offers for fine-tuning (`model` in POST
    /openai/v1/fine_tuning/jobs), and the defaults its jobs start from."""

    model_config = ConfigDict(extra="forbid")
    uri: str = Field(description="The model (and tokenizer) as specs name it: a path, s3://, or hf://org/name.")
    dataset: dict[str, Any] = Field(default_factory=dict, description="Dataset spec fields for its preparations "
                                    "(max_seq_length, packing, template...); the sources are the job's files.")
    training: dict[str, Any] = Field(default_factory=dict, description="Training spec fields its trainings start "
                                     "from (method, lora, strategy, scaling, optim.lr...); the job's hyperparameters "
                                     "are applied over them.")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RAYSFT_", extra="forbid")

    data_dir: Path = Field(Path(".raysft"), description="Embedded default's home: SQLite, artifacts, local Ray.")
    database_url: str = Field("", description="SQLAlchemy URL; empty: sqlite under data_dir. "
                              "PostgreSQL: postgresql+psycopg://user:pass@host/db.")
    ray_address: str = Field("", description="Ray dashboard address (http://head:8265); empty: RAY_ADDRESS, "
                             "else the local head `raysft serve` starts.")
    artifact_root: str = Field("", description="Where job specs and outputs go (local path or s3://bucket/prefix); "
                               "each tenant gets tenants/<tenant>/ under it. Empty: data_dir/artifacts.")
    shared_read_prefixes: list[str] = Field(default_factory=list, description="URI prefixes every tenant may "
                                            "read (base models, tokenizers), besides its own artifacts.")
    admin_api_key: SecretStr | None = Field(None, description="Bootstrap key of the `admin` tenant.")
    admin_api_key_file: Path | None = Field(None, description="The same, read from a file (a mounted secret).")
    trusted_remote_code_models: list[str] = Field(default_factory=list, description="Model URIs allowed "
                                                  "trust_remote_code: true.")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="Request bodies above this get 413.")
    max_upload_bytes: int = Field(10 << 30, ge=1024, description="Uploads (POST /v1/files) above this get 413.")
    reconcile_interval_s: float = Field(2.0, gt=0, description="How often job records are checked against Ray.")
    ray_unreachable_lost_s: float = Field(120.0, ge=0, description="How long Ray may be unreachable before "
                                          "its running jobs are marked LOST.")
    log_copy_interval_s: float = Field(30.0, gt=0, description="How often a running job's Ray log is copied next "
                                       "to its outputs, so it outlives a Ray restart.")
    cluster_max_gpus: float | None = Field(None, ge=0, description="GPUs the Ray cluster can ever have (its "
                                           "autoscaling maximum); a training asking for more is refused. Unset: no check.")
    cluster_max_cpus: float | None = Field(None, ge=0, description="The same for CPUs (Ray Train workers' "
                                           "cpus_per_worker).")
    start_deadline_s: float = Field(3600.0, gt=0, description="A job not started after this long (Ray still "
                                    "PENDING, or a training without its first step) fails with the reason.")
    tenant_max_active_jobs: int = Field(20, ge=1, description="Jobs a tenant may have queued or running at once "
                                        "(a pipeline counts once); more get 429.")
    tenant_requests_per_s: float = Field(20.0, gt=0, description="Sustained requests per second per tenant "
                                         "(per replica); more get 429 with Retry-After.")
    tenant_request_burst: int = Field(40, ge=1, description="Requests a tenant may send at once after a quiet spell.")
    openai_models: dict[str, FineTunableModel] = Field(default_factory=dict, description="The base models the "
                                                       "OpenAI-compatible surface fine-tunes, by the name clients "
                                                       "send as `model` (JSON: {\"name\": {\"uri\": ...}}).")
    serve_address: str = Field("", description="Ray Serve's HTTP proxy, where chats are sent (http://head:8000); "
                               "empty: the Ray address's host on serve_port.")
    serve_host: str = Field("127.0.0.1", description="Where Ray Serve's proxy listens on the head (0.0.0.0 in a "
                            "cluster; keep it unreachable from outside: it takes the control plane's requests only, "
                            "and under Ray token auth the replicas refuse any request without the service's token).")
    serve_port: int = Field(8000, ge=1, le=65535, description="Ray Serve's proxy port.")
    serve_idle_s: float = Field(300.0, ge=0, description="Seconds a served model may be idle before its replicas "
                                "scale to zero (the next chat starts one again).")
    serve_max_replicas: int = Field(1, ge=1, description="Replicas one served base model may scale up to.")
    serve_cpus: float = Field(1.0, gt=0, description="CPUs of each serving replica.")
    serve_gpus: float = Field(0.0, ge=0, description="GPUs of each serving replica.")
    serve_max_tokens: int = Field(1024, ge=1, description="The most tokens one answer may have (max_tokens).")
    serve_tenant_max_chats: int = Field(4, ge=1, description="Chats a tenant may have answering at once (per "
                                        "replica of the service); more get 429.")
    serve_start_timeout_s: float = Field(600.0, gt=0, description="How long a chat waits for its model's "
                                         "application to start (a cold start loads the model).")
    key_cache_ttl_s: float = Field(10.0, ge=0, description="How long a replica remembers an API key it has "
                                   "looked up: a revoked key is refused by every replica within this many seconds.")

    @model_validator(mode="after")
    def _defaults(self) -> Settings:
        if bad := [name for name in self.openai_models if not name or ":" in name or "/" in name]:
            raise ValueError(f"openai_models: {bad} cannot be model names: fine-tuned models are named "
                             "ft:<base>:<tenant>:<suffix>:<job>, so a base's name has no ':' or '/'")
        if not self.database_url:
            self.database_url = f"sqlite:///{(self.data_dir / 'raysft.db').absolute()}"
        if not self.artifact_root:
            self.artifact_root = str((self.data_dir / "artifacts").absolute())
        return self

    def bootstrap_key(self) -> str | None:
        if self.admin_api_key is not None:
            return self.admin_api_key.get_secret_value()
        if self.admin_api_key_file is not None:
            return self.admin_api_key_file.read_text().strip()
        return None


@lru_cache
def get_settings() -> Settings:
    return Settings()
