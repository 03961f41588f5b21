"""What every engine provides (`Engine`, with the peak accelerator memory a worker reports), and
what they share: the AdamW optimizer and its learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

import torch

from jobs.train.spec import Scheduler, TrainingSpec


class Engine(Protocol):
    """How a worker steps its model; every engine subclasses it. Accumulation is the loop's
    business: it hands in losses already normalised over the step's trainable tokens, so no
    engine rescales them."""

    sharded: bool  # parameters are split across ranks: forward passes need every rank

    @staticmethod
    def weights_dtype(spec: TrainingSpec) -> torch.dtype:
        """The dtype the model's weights load in, for this engine's precision scheme."""
        ...

    def __init__(self, spec: TrainingSpec, model: torch.nn.Module, total_steps: int) -> None: ...

    @property
    def module(self) -> torch.nn.Module:
        """The model as built (with its LoRA adapter): for evaluation, generation and weights."""
        ...

    def forward(self, **inputs) -> Any: ...

    def backward(self, loss: torch.Tensor, boundary: bool) -> float | None:
        """Back-propagate; at the step's last micro-batch (`boundary`) clip, step the optimizer and
        the schedule, and return the gradient norm."""
        ...

    def lr(self) -> float: ...

    def gathered(self, param: torch.nn.Parameter) -> AbstractContextManager[torch.Tensor]:
        """The whole of one parameter, for this block (a collective when sharded: every rank
        enters it, in the same order)."""
        ...

    def save(self, directory: Path) -> bool:
        """Write this rank's engine state (weights, optimizer, schedule); returns whether it wrote files."""
        ...

    def load(self, directory: Path) -> None: ...

    def accelerator(self) -> dict[str, float]:
        """This worker's peak accelerator memory since the last call, in GiB, and the GPU's
        utilization (%) where NVML reports it; nothing on CPU (there is no such figure, and 0
        would read as one)."""
        if not torch.cuda.is_available():
            return {}
        gib = 1024**3
        stats = {"gpu_peak_allocated_gib": torch.cuda.max_memory_allocated() / gib,
                 "gpu_peak_reserved_gib": torch.cuda.max_memory_reserved() / gib}
        torch.cuda.reset_peak_memory_stats()
        try:
            stats["gpu_utilization_pct"] = float(torch.cuda.utilization())
        except (ModuleNotFoundError, RuntimeError):  # no NVML bindings, or NVML not on this node
            pass
        return stats


def lr_lambda(spec: TrainingSpec, total_steps: int) -> Callable[[int], float]:
    optim = spec.optim
    warmup = optim.warmup_steps if optim.warmup_steps is not None else int(optim.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if spec.optim.scheduler is Scheduler.CONSTANT:
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if spec.optim.scheduler is Scheduler.LINEAR:
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def adamw_settings(spec: TrainingSpec) -> dict[str, Any]:
    optim = spec.optim
    return {"lr": optim.lr, "betas": list(optim.betas), "eps": optim.eps, "weight_decay": optim.weight_decay}


def scheduler(spec: TrainingSpec, total_steps: int):
    return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(spec, total_steps))


def optimizer(spec: TrainingSpec, model: torch.nn.Module, total_steps: int):
    """AdamW over the trainable parameters, and its schedule."""
    params = [p for p in model.parameters() if p.requires_grad]
    adamw = torch.optim.AdamW(params, **adamw_settings(spec))
    return adamw, scheduler(spec, total_steps)(adamw)
