"""Which engine trains a spec: `strategy.kind` to its `Engine`, in one place.

Each engine's module is imported only when a spec picks it: FSDP's stack (DTensor,
torch.distributed.checkpoint) takes seconds to import, and every worker of a DDP or DeepSpeed run
would otherwise pay for it at start."""

from __future__ import annotations

import torch

from jobs.train.engines.base import Engine
from jobs.train.spec import TrainingSpec


def engine_class(spec: TrainingSpec) -> type[Engine]:
    match spec.strategy.kind:
        case "ddp":
            from jobs.train.engines.ddp import DdpEngine
            return DdpEngine
        case "deepspeed":
            from jobs.train.engines.deepspeed import DeepSpeedEngine
            return DeepSpeedEngine
        case "fsdp":
            from jobs.train.engines.fsdp import FsdpEngine
            return FsdpEngine
    raise AssertionError(f"no engine for strategy {spec.strategy.kind!r}")  # the spec's Literal admits no other


def weights_dtype(spec: TrainingSpec) -> torch.dtype:
    """The dtype the model's weights load in, for the spec's engine."""
    return engine_class(spec).weights_dtype(spec)


def make_engine(spec: TrainingSpec, model: torch.nn.Module, total_steps: int) -> Engine:
    return engine_class(spec)(spec, model, total_steps)
