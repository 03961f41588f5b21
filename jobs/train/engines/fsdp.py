"""FSDP2 (`torch.distributed.fsdp.fully_shard`): every decoder layer, and the root, shard their
parameters across the workers, gathering a layer's whole weights only while it runs.

The weights are kept in fp32 shards; `model.dtype: bf16` computes in bf16 (the mixed-precision
policy casts each gathered layer) and reduces gradients in fp32. Checkpoints are
`torch.distributed.checkpoint` (DCP): each rank writes its own shard of the trained weights and
optimizer state, and a resume on another number of workers reshards them. They load without
running code, as DeepSpeed's do (`dcp_safety`).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from jobs.train.engines.base import Engine, optimizer
from jobs.train.engines.dcp_safety import SafeLoadPlanner, SafeReader
from jobs.train.spec import DType, FsdpStrategy, TrainingSpec

STATE_DIR = "fsdp_state"  # DCP: one .distcp file per rank, and .metadata
GROUPS_FILE = "fsdp_groups.pt"  # the optimizer's param groups and the schedule: the same on every rank


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks: the classes a transformers model names in `_no_split_modules`
    (the unit its own device maps and FSDP wrapping policies keep whole)."""
    classes = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in classes]
    if not layers:
        raise ValueError(f"{type(model).__name__} names no decoder layer class (_no_split_modules): "
                         "use strategy ddp or deepspeed for it")
    return layers


class FsdpEngine(Engine):
    sharded = True

    @staticmethod
    def weights_dtype(spec: TrainingSpec) -> torch.dtype:
        """fp32 shards: the mixed-precision policy casts each gathered layer to the compute dtype."""
        return torch.float32

    def __init__(self, spec: TrainingSpec, model: torch.nn.Module, total_steps: int):
        import ray.train.torch
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        strategy = spec.strategy
        assert isinstance(strategy, FsdpStrategy)  # engine_class picked this engine for it
        self.spec = spec
        device = ray.train.torch.get_device()
        if not strategy.offload_params:
            model.to(device)  # offloaded shards stay in host memory; each layer is gathered onto the device
        compute = {DType.BF16: torch.bfloat16}.get(spec.model.dtype)
        settings = {
            "mesh": init_device_mesh(device.type, (dist.get_world_size(),)),
            "mp_policy": MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32),
            "offload_policy": CPUOffloadPolicy() if strategy.offload_params else OffloadPolicy(),
        }
        for layer in decoder_layers(model):
            fully_shard(layer, reshard_after_forward=strategy.reshard_after_forward, **settings)
        # The root (embeddings, final norm, head) is needed again at once by backward: kept gathered.
        self.model = fully_shard(model, reshard_after_forward=False, **settings)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.trainable_names = {n for n, p in self.model.named_parameters() if p.requires_grad}
        self.optimizer, self.scheduler = optimizer(spec, self.model, total_steps)

    @property
    def module(self) -> torch.nn.Module:
        return self.model

    def forward(self, **inputs):
        return self.model(**inputs)

    def backward(self, loss: torch.Tensor, boundary: bool) -> float | None:
        from torch.distributed.tensor import DTensor

        loss.backward()  # each layer's gradients are reduce-scattered to their shards as it finishes
        if not boundary:
            return None
        grads = [p.grad for p in self.trainable if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, foreach=True)
        if isinstance(norm, DTensor):  # each rank holds the norm of its shards: combine them
            norm = norm.full_tensor()
        torch.nn.utils.clip_grads_with_norm_(self.trainable, self.spec.optim.max_grad_norm, norm, foreach=True)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def _reshard(self) -> None:
        """Back to shards only (an evaluation leaves the root gathered): what DCP and exports read."""
        from torch.distributed.fsdp import FSDPModule

        for module in self.model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()

    @contextmanager
    def gathered(self, param: torch.nn.Parameter):
        """The whole parameter, all-gathered from every rank's shard (a collective)."""
        from torch.distributed.tensor import DTensor

        self._reshard()
        yield param.full_tensor() if isinstance(param, DTensor) else param

    def _state(self) -> dict:
        """The trained weights' and optimizer's shards, by parameter name (so DCP can reshard them);
        a frozen LoRA base is the base model's, never checkpointed."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        self._reshard()
        weights, optim = get_state_dict(self.model, self.optimizer)
        return {"model": {k: v for k, v in weights.items() if k in self.trainable_names}, "optim": optim["state"]}, optim

    def save(self, directory: Path) -> bool:
        """Every rank writes its shard; rank 0 the param groups and schedule. Returns True."""
        import torch.distributed.checkpoint as dcp

        state, optim = self._state()
        dcp.save(state, checkpoint_id=directory / STATE_DIR)
        if dist.get_rank() == 0:
            torch.save({"param_groups": optim["param_groups"], "scheduler": self.scheduler.state_dict()},
                       directory / GROUPS_FILE)
        return True

    def load(self, directory: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        state, optim = self._state()
        dcp.load(state, storage_reader=SafeReader(directory / STATE_DIR), planner=SafeLoadPlanner())
        groups = torch.load(directory / GROUPS_FILE, weights_only=True)
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict={"state": state["optim"], "param_groups": groups["param_groups"]},
                       options=StateDictOptions(strict=False))
        self.scheduler.load_state_dict(groups["scheduler"])
