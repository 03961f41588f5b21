"""The two ways a worker steps its model: DeepSpeed ZeRO (stage 0-3) or plain DDP.

Both expose the same verbs to the training loop: `forward`, `backward(loss, boundary)`,
`gathered(param)`, `save(dir)` and `load(dir)`, and say whether parameters are `sharded` across
ranks. Accumulation is the loop's business: it hands in losses already normalised over the
step's trainable tokens, so neither engine rescales them.
"""

from __future__ import annotations

import math
import pickle
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from jobs.train.spec import DeepSpeedStrategy, DType, Method, Scheduler, TrainingSpec, torch_dtype

STATE_TAG = "state"


def lr_lambda(spec: TrainingSpec, total_steps: int):
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


def _scheduler(spec: TrainingSpec, total_steps: int):
    return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(spec, total_steps))


def _optimizer(spec: TrainingSpec, model: torch.nn.Module, total_steps: int):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, **adamw_settings(spec))
    return optimizer, _scheduler(spec, total_steps)(optimizer)


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


class DeepSpeedEngine:
    def __init__(self, spec: TrainingSpec, model: torch.nn.Module, total_steps: int):
        import deepspeed

        strategy = spec.strategy
        assert isinstance(strategy, DeepSpeedStrategy)
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
                lr_scheduler=_scheduler(spec, total_steps), config=config)
        else:
            optimizer, scheduler = _optimizer(spec, model, total_steps)
            self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                        config=config)

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    def forward(self, **inputs):
        return self.engine(**inputs)

    def gathered(self, param: torch.nn.Parameter):
        """ZeRO-3 holds a shard of each parameter: gather the whole of it (every rank takes part)."""
        import deepspeed

        return deepspeed.zero.GatheredParameters([param]) if self.sharded else nullcontext()

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


def weights_dtype(spec: TrainingSpec) -> torch.dtype:
    """The dtype the model's weights load in. Trained weights stay fp32 under DDP (the fp32 master
    copy mixed precision steps; LoRA adapters are fp32 whatever the base, as peft casts them);
    DeepSpeed keeps its own fp32 master copy, so its model loads in the compute dtype."""
    if spec.method is Method.FULL and not isinstance(spec.strategy, DeepSpeedStrategy):
        return torch.float32
    return torch_dtype(spec.model.dtype)


class DdpEngine:
    def __init__(self, spec: TrainingSpec, model: torch.nn.Module, total_steps: int):
        import ray.train.torch

        self.spec = spec
        self.sharded = False
        self.model = ray.train.torch.prepare_model(model)
        self.optimizer, self.scheduler = _optimizer(spec, model, total_steps)
        self.precision = MixedPrecision(spec.model.dtype, "cuda" if spec.scaling.use_gpu else "cpu")

    @property
    def module(self) -> torch.nn.Module:
        return getattr(self.model, "module", self.model)

    def forward(self, **inputs):
        with self.precision.autocast():
            return self.model(**inputs)

    def gathered(self, param: torch.nn.Parameter):
        return nullcontext()  # every replica holds every parameter

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

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        names = {n for n, p in self.module.named_parameters() if p.requires_grad}
        return {k: v for k, v in self.module.state_dict().items() if k in names}

    def save(self, directory: Path) -> bool:
        """Rank 0 holds everything (DDP replicas are identical); returns whether this rank wrote."""
        import ray.train

        if ray.train.get_context().get_world_rank() != 0:
            return False
        torch.save({"model": self._trainable_state(), "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(), "scaler": self.precision.state_dict()},
                   directory / "ddp_state.pt")
        return True

    def load(self, directory: Path) -> None:
        # Our own file, written by save() above: plain tensors and dicts, so weights_only holds.
        state = torch.load(directory / "ddp_state.pt", weights_only=True)
        missing = set(self._trainable_state()) - set(state["model"])
        if missing:
            raise RuntimeError(f"checkpoint lacks {len(missing)} trainable tensors, e.g. {sorted(missing)[:3]}")
        self.module.load_state_dict(state["model"], strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.precision.load_state_dict(state.get("scaler", {}))


def make_engine(spec: TrainingSpec, model: torch.nn.Module, total_steps: int) -> DeepSpeedEngine | DdpEngine:
    if isinstance(spec.strategy, DeepSpeedStrategy):
        return DeepSpeedEngine(spec, model, total_steps)
    return DdpEngine(spec, model, total_steps)
