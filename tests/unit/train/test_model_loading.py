"""Hostile model files: a pickled file is never unpickled. Base weights load
from safetensors only, and DeepSpeed checkpoints load with `weights_only=True`. A crafted file
with a side effect fails to load and leaves no trace. (`trust_remote_code` outside the allowlist
is refused by the service: tests/test_service_api.py.)"""

from __future__ import annotations

import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support.jobs import training_spec

from jobs.train.engines.deepspeed import load_without_code
from jobs.train.loop import load_model
from jobs.train.spec import load_training_spec


class SideEffect:
    """Unpickling this touches a file: proof that the pickle ran."""

    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return Path.touch, (self.sentinel,)


def crafted(path: Path, sentinel: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"weight": torch.zeros(2), "payload": SideEffect(sentinel)}, path)
    return path


def test_the_payload_works_when_unpickled(tmp_path):
    """The crafted file is a real threat: loaded the unsafe way, it runs."""
    sentinel = tmp_path / "pwned"
    torch.load(crafted(tmp_path / "evil.pt", sentinel), weights_only=False)
    assert sentinel.exists()


def test_base_model_with_only_pickled_weights_is_refused(tmp_path, tiny_model):
    model_dir, sentinel = tmp_path / "model", tmp_path / "pwned"
    model_dir.mkdir()
    shutil.copy(tiny_model / "config.json", model_dir)
    crafted(model_dir / "pytorch_model.bin", sentinel)
    spec = load_training_spec(training_spec(model_dir, tmp_path / "data", tmp_path / "ckpt"))
    with pytest.raises(OSError, match="safetensors"):
        load_model(spec, str(model_dir))
    assert not sentinel.exists()


def test_crafted_deepspeed_checkpoint_file_fails_without_running(tmp_path):
    sentinel = tmp_path / "pwned"
    with pytest.raises(pickle.UnpicklingError):
        load_without_code(str(crafted(tmp_path / "state/mp_rank_00_model_states.pt", sentinel)))
    assert not sentinel.exists()


class ByGetattr:
    """Pickles as `getattr(owner, name)`: how Python 3.11.2 (Debian 12) pickles an enum member."""

    def __init__(self, owner, name: str):
        self.owner, self.name = owner, name

    def __reduce__(self):
        return getattr, (self.owner, self.name)


def test_enum_members_pickled_by_getattr_load_and_nothing_else_does(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    torch.save({"zero_stage": ByGetattr(ZeroStageEnum, "gradients")}, tmp_path / "enum.pt")
    assert load_without_code(str(tmp_path / "enum.pt"))["zero_stage"] is ZeroStageEnum.gradients
    for owner, name in [(LossScaler, "update_scale"), (ZeroStageEnum, "__class__"), (ZeroStageEnum, "missing")]:
        torch.save({"x": ByGetattr(owner, name)}, tmp_path / "other.pt")
        with pytest.raises(pickle.UnpicklingError, match="refused getattr"):
            load_without_code(str(tmp_path / "other.pt"))


DEEPSPEED_CHECKPOINTS = """
import os, sys, torch
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
import deepspeed
deepspeed.init_distributed(dist_backend="gloo")
for stage in (0, 1, 2, 3):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": stage}, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    engine.backward(engine(torch.randn(1, 4)).sum())
    engine.step()
    engine.save_checkpoint(f"{sys.argv[1]}/zero{stage}", tag="state")
"""


@pytest.mark.integration
def test_real_deepspeed_checkpoints_of_every_zero_stage_load_without_code(tmp_path):
    from service.local_ray import free_port

    result = subprocess.run([sys.executable, "-c", DEEPSPEED_CHECKPOINTS, str(tmp_path), str(free_port())],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    files = sorted(tmp_path.glob("zero*/state/*.pt"))
    assert {f.parent.parent.name for f in files} == {"zero0", "zero1", "zero2", "zero3"}
    for file in files:
        state = load_without_code(str(file), map_location="cpu")
        assert isinstance(state, dict) and state, file
