"""The training spec: the contract of `jobs.train`, shared with the REST API and the CLI.

`load_training_spec` checks shape and values, reporting every problem at once; what this cluster
can run and whether the datasets fit the model is checked before any worker starts
(`jobs.train.preflight`). ``python -m jobs.train.spec`` prints the field reference.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from jobs.common import run_layout
from jobs.common.overrides import apply_overrides
from jobs.common.spec import ModelUri, Name, SpecModel, Uri, check_uri, read_document, reference_markdown, validate


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
    FLEX_ATTENTION = "flex_attention"  # torch's flex attention, a document mask per sample (CPU too)


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

    uri: ModelUri = Field(description="HF model directory, safetensors only: a local path, s3://, or a Hugging Face "
                          "id (hf://org/name[@revision], or org/name where no such local path exists).")
    dtype: DType = Field(DType.BF16, description="Compute dtype: bf16 | fp16 (GPU) or fp32 (CPU runs).")
    attn_implementation: Attention = Field(Attention.SDPA, description="sdpa | eager | flash_attention_2 (GPU) | "
                                      "flex_attention: each keeps packed samples apart.")
    trust_remote_code: bool = Field(False, description="Run the model repository's own code (off unless set).")


class DatasetRef(SpecModel):
    """A prepared dataset: the output directory of `jobs.prepare` (holding manifest.json)."""

    uri: Uri = Field(description="Prepared dataset directory (local path or s3://).")
    weight: float = Field(1.0, gt=0, le=100, description="Mixing weight relative to the other datasets.")


class LoraSpec(SpecModel):
    """LoRA adapter settings (peft)."""

    r: int = Field(16, ge=1, le=1024, description="Rank.")
    alpha: float = Field(32, gt=0, description="Scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: Literal["all-linear"] | list[str] = Field(
        "all-linear", description="`all-linear` or module names such as [q_proj, v_proj].")
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases train with the adapter "
                                                      "(peft's `bias`): none | all | lora_only.")


class QuantizationSpec(SpecModel):
    """How `method: qlora` quantizes the frozen base weights (bitsandbytes, GPU only)."""

    bits: Literal[4, 8] = Field(4, description="4 (NF4/FP4) or 8 (LLM.int8()).")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type.")
    double_quant: bool = Field(True, description="Quantize the 4-bit quantization constants too.")


@dataclass(frozen=True)
class Sharding:
    """What a strategy divides across workers, and what it keeps in host memory: the plan's
    memory estimate per worker reads this, whatever the engine."""

    weights: bool = False
    gradients: bool = False
    optimizer: bool = False
    offload_optimizer: bool = False
    offload_params: bool = False


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

    @property
    def sharding(self) -> Sharding:
        stage = self.zero_stage
        return Sharding(weights=stage == 3, gradients=stage >= 2, optimizer=stage >= 1,
                        offload_optimizer=self.offload_optimizer, offload_params=self.offload_params)


class DdpStrategy(SpecModel):
    """PyTorch DistributedDataParallel: every worker holds the whole model."""

    kind: Literal["ddp"] = "ddp"

    @property
    def sharding(self) -> Sharding:
        return Sharding()


class FsdpStrategy(SpecModel):
    """PyTorch FSDP2 (`fully_shard`): each decoder layer and the root shard weights, gradients and
    optimizer state across workers, gathering a layer only while it computes. Weights are kept in
    fp32 shards; `model.dtype: bf16` computes in bf16 and reduces gradients in fp32."""

    kind: Literal["fsdp"] = "fsdp"
    reshard_after_forward: bool = Field(True, description="Free each decoder layer's gathered weights after its "
                                        "forward pass and gather them again for backward (less memory, one more "
                                        "all-gather per layer); false keeps them until backward.")
    offload_params: bool = Field(False, description="Keep the parameter shards, gradients and optimizer state in "
                                 "host memory (GPU workers only); the optimizer steps on the CPU.")

    @property
    def sharding(self) -> Sharding:
        return Sharding(weights=True, gradients=True, optimizer=True, offload_optimizer=self.offload_params,
                        offload_params=self.offload_params)


class OptimSpec(SpecModel):
    """AdamW with warm-up and a decay schedule."""

    lr: float = Field(2.0e-4, gt=0, le=1, description="Peak learning rate.")
    scheduler: Scheduler = Field(Scheduler.COSINE, description="cosine | linear | constant after warm-up.")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Share of steps spent warming up.")
    warmup_steps: int | None = Field(None, ge=0, description="Warm-up steps; overrides warmup_ratio when set.")
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW's (beta1, beta2).")
    eps: float = Field(1e-8, gt=0, description="AdamW's epsilon.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, betas: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in betas):
            raise ValueError(f"betas {list(betas)}: each must be in [0, 1), e.g. [0.9, 0.999]")
        return betas


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


class CheckpointUpload(StrEnum):
    ASYNC = "async"
    SYNC = "sync"


# `resume` values that name no checkpoint: the run's own latest, or the base model.
RESUME_LATEST, RESUME_NONE = "latest", "none"
RESUME_KEYWORDS = (RESUME_LATEST, RESUME_NONE)


class CheckpointSpec(SpecModel):
    """Where checkpoints go and which one a run resumes from."""

    storage: Uri = Field(description="Checkpoint root (local path or s3://); runs live under it by name.")
    every_steps: int = Field(50, ge=1, description="Checkpoint every N optimizer steps (and at the end).")
    keep: int = Field(3, ge=1, description="Checkpoints kept: the best by eval loss plus the latest.")
    upload: CheckpointUpload = Field(CheckpointUpload.ASYNC, description="`async`: training goes on while a "
                                     "checkpoint uploads (it counts once uploaded, as always); `sync`: training waits "
                                     "for each upload. The final checkpoint always uploads before the export.")
    resume: str = Field("latest", description="Where a new run starts: `latest` (this run's latest checkpoint, "
                        "if the name was run before), `none` (the base model; refused if the name has checkpoints) "
                        "or the URI of one checkpoint. A restarted worker group always continues from the "
                        "run's own latest checkpoint.")

    @field_validator("resume")
    @classmethod
    def _resume(cls, v: str) -> str:
        return v if v in RESUME_KEYWORDS else check_uri(v)

    @property
    def resume_uri(self) -> str | None:
        """The checkpoint a new run starts from when `resume` names one; None for the keywords."""
        return None if self.resume in RESUME_KEYWORDS else self.resume


class Generation(SpecModel):
    """Sample answers to prompts, each rendered as a user turn with the chat template."""

    prompts: list[str] = Field(default_factory=list, description="User prompts answered at each evaluation.")
    max_new_tokens: int = Field(64, ge=1, le=4096, description="Generation length.")
    temperature: float = Field(0.7, ge=0, description="0 means greedy.")
    top_p: float = Field(0.9, gt=0, le=1, description="Nucleus sampling mass.")


class EvalSpec(Generation):
    """Evaluation on the validation split, and sample generations."""

    every_steps: int = Field(50, ge=1, description="Evaluate every N optimizer steps (and at the end).")
    at_start: bool = Field(False, description="Also evaluate and answer the prompts before the first step (step 0 "
                           "in the metrics): the base model's figures the run is measured against.")


class Tracker(StrEnum):
    MLFLOW = "mlflow"
    TENSORBOARD = "tensorboard"
    WANDB = "wandb"  # pip install raysft[wandb]


class TrackingSpec(SpecModel):
    """Trackers that get each logged step's metrics and the spec, from rank 0; where they report and with which credentials is the nodes' environment, never the spec."""  # noqa: E501

    report_to: list[Tracker] = Field(default_factory=list, description="mlflow | tensorboard | wandb.")
    project: str = Field("raysft", min_length=1, max_length=128, description="MLflow experiment / W&B project.")


class ExportCheckpoint(StrEnum):
    LATEST = "latest"  # the final step's weights
    BEST = "best"  # the checkpoint with the lowest eval loss, when a validation split is evaluated


class ExportSpec(SpecModel):
    """What the job leaves ready to serve."""

    merge_lora: bool = Field(True, description="Also write base+adapter merged weights (safetensors).")
    checkpoint: ExportCheckpoint = Field(ExportCheckpoint.LATEST, description="Which checkpoint is exported: "
                                         "`latest` (the final step) or `best` (lowest eval loss among the kept "
                                         "checkpoints and the final one; the final one when nothing is evaluated).")


class TrainingSpec(SpecModel):
    """What `jobs.train` trains, on which data, how, and where it keeps checkpoints."""

    name: Name = Field(description="Run name: checkpoints live under checkpoint.storage/name; reused to resume.")
    model: ModelSpec = Field(description="The base model.")
    datasets: list[DatasetRef] = Field(min_length=1, description="Prepared datasets, mixed by weight.")
    method: Method = Field(Method.LORA, description="lora | qlora | full.")
    lora: LoraSpec = Field(default_factory=LoraSpec, description="Adapter settings (lora, qlora).")
    quantization: QuantizationSpec = Field(default_factory=QuantizationSpec,
                                           description="Base-weight quantization for qlora.")
    strategy: DeepSpeedStrategy | DdpStrategy | FsdpStrategy = Field(
        default_factory=DeepSpeedStrategy, discriminator="kind", description="deepspeed, ddp or fsdp.")
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
    tracking: TrackingSpec = Field(default_factory=TrackingSpec, description="Experiment tracking.")
    max_failures: int = Field(2, ge=0, description="Worker-group restarts from the latest checkpoint.")

    @model_validator(mode="after")
    def _consistent(self) -> TrainingSpec:
        problems = []
        if self.method is Method.QLORA and self.strategy.sharding.weights:
            problems.append(f"method qlora cannot shard 4-bit weights ({self.strategy.kind} shards them): use "
                            "deepspeed zero_stage 2 or ddp")
        if self.strategy.kind == "fsdp" and self.model.dtype is DType.FP16:
            problems.append("strategy fsdp computes in bf16 or fp32 (fp16 would need loss scaling of sharded "
                            "gradients): use model.dtype bf16")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def run_uri(self) -> str:
        """Where the run lives: its checkpoints, metrics history and export."""
        return run_layout.run_uri(self.checkpoint.storage, self.name)

    @property
    def rows_per_step(self) -> int:
        """Packed rows one optimizer step consumes, over all workers."""
        return self.batch.micro_batch_size * self.batch.grad_accum * self.scaling.num_workers


def load_training_spec(spec: str | Path | dict[str, Any], overrides: Iterable[str] = ()) -> TrainingSpec:
    """The training spec from a mapping, a file path, or an inline JSON/YAML string, with
    `--set path=value` overrides applied (`jobs.common.overrides`)."""
    return validate(TrainingSpec, apply_overrides(read_document(spec), overrides))


REFERENCE_MODELS = (TrainingSpec, ModelSpec, DatasetRef, LoraSpec, QuantizationSpec, DeepSpeedStrategy, DdpStrategy,
                    FsdpStrategy, OptimSpec, BatchSpec, ScalingSpec, CheckpointSpec, EvalSpec, ExportSpec, TrackingSpec)

if __name__ == "__main__":
    from jobs.common.spec import reference_markdown

    print(reference_markdown(REFERENCE_MODELS))
