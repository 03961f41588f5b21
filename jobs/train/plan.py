"""How long a run is (`total_steps`), and `jobs.train --dry-run`: what a spec would do, without training.

The model is built from its config on the meta device (no weights are read or allocated), LoRA
applied to it, and its parameters counted. Memory per worker follows the ZeRO paper's accounting
(Rajbhandari et al., 2020): weights, gradients and optimizer state, each divided across workers
where the strategy shards it (`Sharding`: ZeRO stages, FSDP) and moved off the accelerator by offload, plus an activation
estimate (Korthikanti et al., 2022: about 34·s·b·h bytes per layer at 16 bits with fused
attention; with gradient checkpointing each layer's input plus one layer being recomputed) and the fp32 logits.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from jobs.common.contract import Manifest
from jobs.common.spec import SpecError
from jobs.train.data_order import epoch_rows, steps_per_epoch
from jobs.train.spec import DType, Method, TrainingSpec

GIB = 1024**3
BYTES = {DType.FP32: 4, DType.BF16: 2, DType.FP16: 2}


def planned_train_rows(spec: TrainingSpec, manifests: list[Manifest]) -> int:
    """Packed training rows per epoch, datasets mixed by weight (`data_order`: int(rows * weight)
    of each; a streamed split's fractional sample counted at its expected size, rounded down)."""
    return epoch_rows([m.rows("train") for m in manifests], [ref.weight for ref in spec.datasets])


def total_steps(spec: TrainingSpec, train_rows: int) -> int:
    """Optimizer steps: max_steps, or epochs of whole steps over every row (the last step of an
    epoch completed with its first rows, `data_order`)."""
    if spec.max_steps:
        return spec.max_steps
    if train_rows == 0:
        raise SpecError(["datasets: no training rows: add data"])
    return spec.epochs * steps_per_epoch(train_rows, spec.rows_per_step)


@dataclass(frozen=True)
class ModelShape:
    total_params: int
    trainable_params: int
    hidden_size: int
    num_layers: int
    vocab_size: int


@dataclass(frozen=True)
class Memory:
    """Estimated GiB per worker: on the accelerator (or the only device on CPU) and in host memory."""

    weights: float
    gradients: float
    optimizer: float
    activations: float
    device_total: float
    host_offloaded: float


def estimate_memory(spec: TrainingSpec, shape: ModelShape, seq_len: int) -> Memory:
    workers = spec.scaling.num_workers
    shards = spec.strategy.sharding
    width = BYTES[spec.model.dtype]
    frozen = shape.total_params - shape.trainable_params
    frozen_width = 0.5 if spec.method is Method.QLORA else width  # 4-bit base weights
    weights = (frozen * frozen_width + shape.trainable_params * width) / (workers if shards.weights else 1)
    gradients = shape.trainable_params * width / (workers if shards.gradients else 1)
    # AdamW: two moments in fp32, plus an fp32 master copy when training in 16 bits.
    per_param = 8 + (4 if width < 4 else 0)
    optimizer = shape.trainable_params * per_param / (workers if shards.optimizer else 1)
    tokens = spec.batch.micro_batch_size * seq_len
    full_layer = 34 * tokens * shape.hidden_size * width / 2
    if spec.gradient_checkpointing:  # each layer's input kept, one layer recomputed at a time
        activations = tokens * shape.hidden_size * width * shape.num_layers + full_layer
    else:
        activations = full_layer * shape.num_layers
    activations += 2 * tokens * shape.vocab_size * 4  # logits and their gradient, in fp32
    host = (optimizer if shards.offload_optimizer else 0) + (weights if shards.offload_params else 0)
    device = weights + gradients + optimizer + activations - host
    return Memory(*(round(x / GIB, 4) for x in (weights, gradients, optimizer, activations, device, host)))


def model_shape(spec: TrainingSpec, config: Any) -> ModelShape:
    """Count parameters of the model (and its LoRA adapter) built on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=spec.model.trust_remote_code)
    if spec.method is Method.FULL:
        total = trainable = model.num_parameters()
    else:
        from peft import LoraConfig, get_peft_model

        lora = spec.lora
        model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, target_modules=lora.target_modules,
                                                 task_type="CAUSAL_LM"))
        trainable, total = model.get_nb_trainable_parameters()
    return ModelShape(total, trainable, config.hidden_size, config.num_hidden_layers, config.vocab_size)


def plan(spec: TrainingSpec, config: Any, manifests: list[Manifest], steps: int) -> dict[str, Any]:
    """The dry-run plan: steps, tokens per step, parameters and memory per worker."""
    shape = model_shape(spec, config)
    seq_len = max(m.packing.max_seq_length for m in manifests)
    rows_per_step = spec.rows_per_step
    train_rows = planned_train_rows(spec, manifests)
    trainable_tokens = sum(m.tokens.by_split["train"].trainable * ref.weight
                           for m, ref in zip(manifests, spec.datasets, strict=True))
    return {
        "name": spec.name,
        "steps": steps,
        "rows_per_step": rows_per_step,
        "max_tokens_per_step": rows_per_step * seq_len,
        "trainable_tokens_per_step": round(trainable_tokens / max(train_rows, 1) * rows_per_step),
        "parameters": {"total": shape.total_params, "trainable": shape.trainable_params,
                       "trainable_percent": round(100 * shape.trainable_params / shape.total_params, 4)},
        "strategy": spec.strategy.model_dump(mode="json"),
        "workers": spec.scaling.num_workers,
        "memory_gib_per_worker": asdict(estimate_memory(spec, shape, seq_len)),
    }
