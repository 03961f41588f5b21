"""The training spec: the contract of `jobs.train`, shared with the REST API and the CLI.

Validation happens in three layers, each reporting every problem at once:
`load_training_spec` (shape and values), `check_environment` (what this cluster can run: GPU-only
features fail here with the fix), and `check_datasets` (the prepared datasets exist, succeeded,
and were tokenized by the model's own tokenizer).
"""

from __future__ import annotations

import importlib.util
import json
import posixpath
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from jobs import storage, tokenizer_files
from jobs.spec import SpecError, SpecModel, check_uri, read_document, validate

Uri = Annotated[str, Field(min_length=1)]


class DType(StrEnum):
    BF16 = "bf16"
    FP16 = "fp16"
    FP32 = "fp32"  # the only choice on CPU


def torch_dtype(dtype: DType):
    import torch

    return {DType.FP32: torch.float32, DType.BF16: torch.bfloat16, DType.FP16: torch.float16}[dtype]


class Attention(StrEnum):
    SDPA = "sdpa"
    EAGER = "eager"
    FLASH_ATTENTION_2 = "flash_attention_2"  # GPU only


class Method(StrEnum):
    LORA = "lora"
    QLORA = "qlora"  # 4-bit base weights: GPU only
    FULL = "full"


class Scheduler(StrEnum):
    COSINE = "cosine"
    LINEAR = "linear"
    CONSTANT = "constant"


class ModelSpec(SpecModel):
    """The base model: an HF model directory with safetensors weights."""

    uri: Uri = Field(description="HF model directory (local path or s3://); safetensors only.")
    dtype: DType = Field(DType.BF16, description="Compute dtype: bf16 | fp16 (GPU) or fp32 (CPU runs).")
    attn_implementation: Attention = Field(Attention.SDPA, description="sdpa | eager | flash_attention_2 (GPU).")
    trust_remote_code: bool = Field(False, description="Run the model repository's own code (off unless set).")

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        return check_uri(v)


class DatasetRef(SpecModel):
    """A prepared dataset: the output directory of `jobs.prepare` (holding manifest.json)."""

    uri: Uri = Field(description="Prepared dataset directory (local path or s3://).")
    weight: float = Field(1.0, gt=0, le=100, description="Mixing weight relative to the other datasets.")

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        return check_uri(v)


class LoraSpec(SpecModel):
    """LoRA adapter settings (peft)."""

    r: int = Field(16, ge=1, le=1024, description="Rank.")
    alpha: float = Field(32, gt=0, description="Scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: Literal["all-linear"] | list[str] = Field(
        "all-linear", description="`all-linear` or module names such as [q_proj, v_proj].")


class DeepSpeedStrategy(SpecModel):
    """DeepSpeed ZeRO (stage 0-3), optionally offloading optimizer state and parameters to CPU."""

    kind: Literal["deepspeed"] = "deepspeed"
    zero_stage: int = Field(2, ge=0, le=3, description="0: none, 1: optimizer, 2: + gradients, 3: + parameters.")
    offload_optimizer: bool = Field(False, description="Keep optimizer state on CPU (stage >= 1).")
    offload_params: bool = Field(False, description="Keep parameters on CPU (stage 3 only).")

    @model_validator(mode="after")
    def _offload(self) -> DeepSpeedStrategy:
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("offload_params needs zero_stage 3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage >= 1")
        return self


class DdpStrategy(SpecModel):
    """PyTorch DistributedDataParallel: every worker holds the whole model."""

    kind: Literal["ddp"] = "ddp"


class OptimSpec(SpecModel):
    """AdamW with warm-up and a decay schedule."""

    lr: float = Field(2.0e-4, gt=0, le=1, description="Peak learning rate.")
    scheduler: Scheduler = Field(Scheduler.COSINE, description="cosine | linear | constant after warm-up.")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Share of steps spent warming up.")
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")


class BatchSpec(SpecModel):
    """Rows per worker per micro-step, and micro-steps per optimizer step."""

    micro_batch_size: int = Field(4, ge=1, description="Packed rows per worker per forward pass.")
    grad_accum: int = Field(2, ge=1, description="Micro-batches per optimizer step.")


class ScalingSpec(SpecModel):
    """Ray Train workers and their resources."""

    num_workers: int = Field(2, ge=1, description="Training workers.")
    use_gpu: bool = Field(False, description="One or more GPUs per worker.")
    cpus_per_worker: float = Field(1, gt=0, description="CPUs reserved per worker.")
    gpus_per_worker: float = Field(1, gt=0, description="GPUs per worker when use_gpu.")


class CheckpointSpec(SpecModel):
    """Where checkpoints go and which one a run resumes from."""

    storage: Uri = Field(description="Checkpoint root (local path or s3://); runs live under it by name.")
    every_steps: int = Field(50, ge=1, description="Checkpoint every N optimizer steps (and at the end).")
    keep: int = Field(3, ge=1, description="Checkpoints kept: the best by eval loss plus the latest.")
    resume: str = Field("latest", description="Where a new run starts: `latest` (this run's latest checkpoint, "
                        "if the name was run before), `none` (the base model; refused if the name has checkpoints) "
                        "or the URI of one checkpoint. A restarted worker group always continues from the "
                        "run's own latest checkpoint.")

    @field_validator("storage")
    @classmethod
    def _uri(cls, v: str) -> str:
        return check_uri(v)

    @field_validator("resume")
    @classmethod
    def _resume(cls, v: str) -> str:
        return v if v in ("latest", "none") else check_uri(v)


class EvalSpec(SpecModel):
    """Evaluation on the validation split, and sample generations."""

    every_steps: int = Field(50, ge=1, description="Evaluate every N optimizer steps (and at the end).")
    prompts: list[str] = Field(default_factory=list, description="User prompts answered at each evaluation.")
    max_new_tokens: int = Field(64, ge=1, le=4096, description="Generation length.")
    temperature: float = Field(0.7, ge=0, description="0 means greedy.")
    top_p: float = Field(0.9, gt=0, le=1, description="Nucleus sampling mass.")


class ExportSpec(SpecModel):
    """What the job leaves ready to serve."""

    merge_lora: bool = Field(True, description="Also write base+adapter merged weights (safetensors).")


class TrainingSpec(SpecModel):
    """What `jobs.train` trains, on which data, how, and where it keeps checkpoints."""

    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                      description="Run name: checkpoints live under checkpoint.storage/name; reused to resume.")
    model: ModelSpec = Field(description="The base model.")
    datasets: list[DatasetRef] = Field(min_length=1, description="Prepared datasets, mixed by weight.")
    method: Method = Field(Method.LORA, description="lora | qlora | full.")
    lora: LoraSpec = Field(default_factory=LoraSpec, description="Adapter settings (lora, qlora).")
    strategy: DeepSpeedStrategy | DdpStrategy = Field(
        default_factory=DeepSpeedStrategy, discriminator="kind", description="deepspeed or ddp.")
    optim: OptimSpec = Field(default_factory=OptimSpec, description="Optimizer and schedule.")
    batch: BatchSpec = Field(default_factory=BatchSpec, description="Micro-batch and accumulation.")
    epochs: int | None = Field(1, ge=1, description="Passes over the data (unless max_steps is set).")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps; overrides epochs.")
    log_every_steps: int = Field(10, ge=1, description="Report metrics (averaged over the steps since the last "
                                 "report) every N optimizer steps; evaluations and checkpoints report too.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations to save memory.")
    seed: int = Field(42, description="Seed of initialisation, data order and dropout.")
    scaling: ScalingSpec = Field(default_factory=ScalingSpec, description="Workers and resources.")
    checkpoint: CheckpointSpec = Field(description="Checkpoint storage and resume.")
    eval: EvalSpec = Field(default_factory=EvalSpec, description="Evaluation.")
    export: ExportSpec = Field(default_factory=ExportSpec, description="Export.")
    max_failures: int = Field(2, ge=0, description="Worker-group restarts from the latest checkpoint.")

    @model_validator(mode="after")
    def _consistent(self) -> TrainingSpec:
        if self.method is Method.QLORA and isinstance(self.strategy, DeepSpeedStrategy) and self.strategy.zero_stage == 3:
            raise ValueError("method qlora cannot shard 4-bit weights with zero_stage 3: use zero_stage 2 or ddp")
        return self

    @property
    def run_uri(self) -> str:
        return run_uri(self.checkpoint.storage, self.name)


def run_uri(checkpoint_storage: str, name: str) -> str:
    """Where a run lives: its checkpoints, metrics history and export. The service reads its
    progress there, from the stored spec."""
    return posixpath.join(checkpoint_storage.rstrip("/"), name)


def load_training_spec(spec: str | Path | dict[str, Any]) -> TrainingSpec:
    """The training spec from a mapping, a file path, or an inline JSON/YAML string."""
    return validate(TrainingSpec, read_document(spec))


def module_installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def check_environment(spec: TrainingSpec, cluster_gpus: float,
                      installed: Callable[[str], bool] = module_installed) -> None:
    """GPU-only features fail here, before any worker starts, with what to change. `cluster_gpus`
    is what the Ray cluster has; the GPU libraries are looked up here, since every node runs the
    same image."""
    problems = []
    gpu = spec.scaling.use_gpu and cluster_gpus > 0
    wanted = spec.scaling.num_workers * spec.scaling.gpus_per_worker
    if spec.scaling.use_gpu and cluster_gpus == 0:
        problems.append("scaling.use_gpu: the cluster has no GPU: set use_gpu: false (and model.dtype: fp32)")
    elif gpu and wanted > cluster_gpus:
        problems.append(f"scaling: {wanted:g} GPUs wanted (num_workers x gpus_per_worker) but the cluster has "
                        f"{cluster_gpus:g}: lower num_workers")
    if not gpu:
        if spec.method is Method.QLORA:
            problems.append("method: qlora needs a GPU (4-bit kernels): use method: lora on CPU")
        if spec.model.attn_implementation is Attention.FLASH_ATTENTION_2:
            problems.append("model.attn_implementation: flash_attention_2 needs a GPU: use sdpa")
        if spec.model.dtype is not DType.FP32:
            problems.append(f"model.dtype: {spec.model.dtype.value} needs a GPU here: use fp32 on CPU")
    else:
        if spec.method is Method.QLORA and not installed("bitsandbytes"):
            problems.append("method: qlora needs bitsandbytes: install raysft[gpu] in the image")
        if spec.model.attn_implementation is Attention.FLASH_ATTENTION_2 and not installed("flash_attn"):
            problems.append("model.attn_implementation: flash_attention_2 needs the flash-attn package "
                            "in the image (see the Dockerfile's GPU notes), or use sdpa")
    if problems:
        raise SpecError(problems)


def read_manifest(uri: str) -> dict[str, Any]:
    fs, base = storage.filesystem(uri)
    return json.loads(storage.read_bytes(fs, posixpath.join(base, "manifest.json")))


def check_datasets(spec: TrainingSpec) -> list[dict[str, Any]]:
    """Every dataset is a succeeded preparation tokenized by the model's tokenizer; returns the manifests."""
    problems, manifests = [], []
    model_sha = tokenizer_files.sha256(tokenizer_files.fetch(spec.model.uri))
    for i, ref in enumerate(spec.datasets):
        try:
            manifest = read_manifest(ref.uri)
        except (OSError, ValueError) as e:
            problems.append(f"datasets.{i}.uri: no readable manifest.json under {ref.uri!r} ({e}): run jobs.prepare first")
            continue
        if manifest.get("status") != "succeeded":
            problems.append(f"datasets.{i}.uri: preparation of {ref.uri!r} did not succeed (status {manifest.get('status')!r})")
        data_sha = manifest.get("tokenizer", {}).get("sha256")
        if data_sha != model_sha:
            problems.append(f"datasets.{i}.uri: tokenized with tokenizer {data_sha}, but the model's tokenizer is "
                            f"{model_sha}: prepare the dataset again with tokenizer: {spec.model.uri}")
        manifests.append(manifest)
    if problems:
        raise SpecError(problems)
    return manifests


REFERENCE_MODELS = (TrainingSpec, ModelSpec, DatasetRef, LoraSpec, DeepSpeedStrategy, DdpStrategy, OptimSpec,
                    BatchSpec, ScalingSpec, CheckpointSpec, EvalSpec, ExportSpec)

if __name__ == "__main__":
    from jobs.spec import reference_markdown

    print(reference_markdown(REFERENCE_MODELS))
