"""Which engine trains a spec: `strategy.kind` to its `Engine`, in one place."""

from __future__ import annotations

import torch

from jobs.train.engines.base import Engine
from jobs.train.engines.ddp import DdpEngine
from jobs.train.engines.deepspeed import DeepSpeedEngine
from jobs.train.engines.fsdp import FsdpEngine
from jobs.train.spec import TrainingSpec

ENGINES: dict[str, type[Engine]] = {"ddp": DdpEngine, "deepspeed": DeepSpeedEngine, "fsdp": FsdpEngine}


def engine_class(spec: TrainingSpec) -> type[Engine]:
    return ENGINES[spec.strategy.kind]


def weights_dtype(spec: TrainingSpec) -> torch.dtype:
    """The dtype the model's weights load in, for the spec's engine."""
    return engine_class(spec).weights_dtype(spec)


def make_engine(spec: TrainingSpec, model: torch.nn.Module, total_steps: int) -> Engine:
    return engine_class(spec)(spec, model, total_steps)
