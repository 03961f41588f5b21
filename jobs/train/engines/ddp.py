"""Plain PyTorch DDP: every worker holds the whole model, gradients are averaged in backward, and
mixed precision is autocast over fp32 trained weights (`MixedPrecision`)."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from jobs.train.engines.base import Engine, optimizer
from jobs.train.spec import DType, Method, TrainingSpec, torch_dtype


class MixedPrecision:
    """bf16 or fp16 compute over fp32 trainable weights, for an engine with no mixed precision of
    its own (DDP): the forward runs under autocast, the optimizer steps the fp32 weights, and fp16
    scales the loss (a dynamic `GradScaler`) so small gradients do not underflow. fp32: a no-op."""

    def __init__(self, dtype: DType, device_type: str):
        self.device_type = device_type
        self.compute = {DType.BF16: torch.bfloat16, DType.FP16: torch.float16}.get(dtype)
        self.scaler = torch.amp.GradScaler(device_type) if dtype is DType.FP16 else None

    def autocast(self):
        if self.compute is None:
            return nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.compute)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self, optimizer: torch.optim.Optimizer, params, max_norm: float) -> float:
        """Clip the true (unscaled) gradients and step; an fp16 step with inf/NaN gradients is
        skipped and the scale lowered. Returns the gradient norm."""
        if self.scaler:
            self.scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if self.scaler:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()
        return float(norm)

    def state_dict(self) -> dict[str, Any]:
        return self.scaler.state_dict() if self.scaler else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler and state:
            self.scaler.load_state_dict(state)


def trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The entries of a module's state dict that training changes."""
    names = {n for n, p in module.named_parameters() if p.requires_grad}
    return {k: v for k, v in module.state_dict().items() if k in names}


class DdpEngine(Engine):
    sharded = False

    @staticmethod
    def weights_dtype(spec: TrainingSpec) -> torch.dtype:
        """Trained weights stay fp32 (the master copy mixed precision steps; LoRA adapters are fp32
        whatever the base, as peft casts them); a frozen base loads in the compute dtype."""
        return torch.float32 if spec.method is Method.FULL else torch_dtype(spec.model.dtype)

    def __init__(self, spec: TrainingSpec, model: torch.nn.Module, total_steps: int):
        import ray.train.torch

        self.spec = spec
        self.model = ray.train.torch.prepare_model(model)
        self.optimizer, self.scheduler = optimizer(spec, model, total_steps)
        self.precision = MixedPrecision(spec.model.dtype, "cuda" if spec.scaling.use_gpu else "cpu")

    @property
    def module(self) -> torch.nn.Module:
        return getattr(self.model, "module", self.model)

    def forward(self, **inputs):
        with self.precision.autocast():
            return self.model(**inputs)

    def gathered(self, param: torch.nn.Parameter):
        return nullcontext(param)  # every replica holds every parameter

    def backward(self, loss: torch.Tensor, boundary: bool) -> float | None:
        self.precision.backward(loss)
        if not boundary:
            return None
        norm = self.precision.step(self.optimizer, self.model.parameters(), self.spec.optim.max_grad_norm)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save(self, directory: Path) -> bool:
        """Rank 0 holds everything (DDP replicas are identical); returns whether this rank wrote."""
        import ray.train

        if ray.train.get_context().get_world_rank() != 0:
            return False
        torch.save({"model": trainable_state(self.module), "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(), "scaler": self.precision.state_dict()},
                   directory / "ddp_state.pt")
        return True

    def load(self, directory: Path) -> None:
        # Our own file, written by save() above: plain tensors and dicts, so weights_only holds.
        state = torch.load(directory / "ddp_state.pt", weights_only=True)
        missing = set(trainable_state(self.module)) - set(state["model"])
        if missing:
            raise RuntimeError(f"checkpoint lacks {len(missing)} trainable tensors, e.g. {sorted(missing)[:3]}")
        self.module.load_state_dict(state["model"], strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.precision.load_state_dict(state.get("scaler", {}))
