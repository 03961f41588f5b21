"""DeepSpeed ZeRO (stage 0-3, optionally offloading optimizer state and parameters to CPU), with
DeepSpeed's own mixed precision (an fp32 master copy of the trained weights), and checkpoints
that load without running code."""

from __future__ import annotations

import pickle
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch

from jobs.train.engines.base import Engine, adamw_settings, optimizer, scheduler
from jobs.train.spec import DeepSpeedStrategy, DType, TrainingSpec, torch_dtype

STATE_TAG = "state"


def deepspeed_checkpoint_types() -> list:
    """DeepSpeed's own classes inside its checkpoints; the rest is tensors and plain containers.
    Plus `getattr` as some Python releases (Debian 12's 3.11.2 among them) pickle enum members,
    `getattr(ZeroStageEnum, "gradients")`: a checkpoint written on such a node must load on any
    other. It stands in for the builtin and looks up members of the allowed enums only."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address, (_enum_member, "builtins.getattr")]


def _enum_member(cls, name: str):
    from deepspeed.runtime.zero.config import ZeroStageEnum

    if cls is not ZeroStageEnum or name not in ZeroStageEnum.__members__:
        raise pickle.UnpicklingError(f"refused getattr({cls!r}, {name!r}) in a checkpoint: only enum members load")
    return ZeroStageEnum[name]


def load_without_code(path: str, map_location=None):
    """Load a DeepSpeed checkpoint file with `weights_only=True`. DeepSpeed's loader unpickles
    anything, and a resume URI can point at any checkpoint its tenant could write: a crafted file
    must fail to load, not run code on the cluster."""
    with torch.serialization.safe_globals(deepspeed_checkpoint_types()):
        return torch.load(path, map_location=map_location, weights_only=True)


class DeepSpeedEngine(Engine):
    @staticmethod
    def weights_dtype(spec: TrainingSpec) -> torch.dtype:
        """DeepSpeed keeps its own fp32 master copy, so the model loads in the compute dtype."""
        return torch_dtype(spec.model.dtype)

    def __init__(self, spec: TrainingSpec, model: torch.nn.Module, total_steps: int):
        import deepspeed

        strategy = spec.strategy
        assert isinstance(strategy, DeepSpeedStrategy)  # engine_class picked this engine for it
        zero: dict[str, Any] = {"stage": strategy.zero_stage}
        if strategy.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu"}
        if strategy.offload_params:
            zero["offload_param"] = {"device": "cpu"}
        config = {
            "train_micro_batch_size_per_gpu": spec.batch.micro_batch_size,
            "gradient_accumulation_steps": spec.batch.grad_accum,
            "gradient_clipping": spec.optim.max_grad_norm,
            "zero_optimization": zero,
            "bf16": {"enabled": spec.model.dtype is DType.BF16},
            "fp16": {"enabled": spec.model.dtype is DType.FP16},
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        self.sharded = strategy.zero_stage == 3
        if strategy.offload_optimizer:
            # ZeRO-Offload steps the optimizer on the CPU with DeepSpeed's own Adam, built from the
            # config (it refuses a client optimizer); the schedule is ours, given the optimizer.
            config["optimizer"] = {"type": "AdamW", "params": adamw_settings(spec)}
            self.engine, _, _, _ = deepspeed.initialize(
                model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                lr_scheduler=scheduler(spec, total_steps), config=config)
        else:
            adamw, schedule = optimizer(spec, model, total_steps)
            self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=adamw, lr_scheduler=schedule,
                                                        config=config)

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    def forward(self, **inputs):
        return self.engine(**inputs)

    @contextmanager
    def gathered(self, param: torch.nn.Parameter):
        """ZeRO-3 holds a shard of each parameter: gather the whole of it (every rank takes part)."""
        import deepspeed

        with deepspeed.zero.GatheredParameters([param]) if self.sharded else nullcontext():
            yield param

    def backward(self, loss: torch.Tensor, boundary: bool) -> float | None:
        # The loss is already a share of the step mean: no 1/grad_accum scaling on top.
        self.engine.backward(loss, scale_wrt_gas=False)
        self.engine.step()  # DeepSpeed applies the optimizer only at its accumulation boundary
        if boundary:
            norm = self.engine.get_global_grad_norm()
            return float(norm) if norm is not None else None
        return None

    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def save(self, directory: Path) -> bool:
        """Every rank writes its shards; returns True: every rank reports its files."""
        self.engine.save_checkpoint(str(directory), tag=STATE_TAG)
        return True

    def load(self, directory: Path) -> None:
        self.engine.checkpoint_engine.load = load_without_code
        self.engine.load_checkpoint(str(directory), tag=STATE_TAG)
