"""The FSDP2 engine's pure parts: which modules it shards, and sharded checkpoints (DCP) that load
without running code. Training with it is `tests/integration/test_fsdp.py`."""

from __future__ import annotations

import pickle

import pytest
import torch
import torch.distributed.checkpoint as dcp
from support.jobs import training_spec
from test_model_loading import SideEffect
from torch.distributed.checkpoint.api import CheckpointException

from jobs.train.engines.dcp_safety import SafeLoadPlanner, SafeReader
from jobs.train.engines.fsdp import decoder_layers
from jobs.train.loop import load_model
from jobs.train.spec import load_training_spec


def test_every_decoder_layer_is_a_shard_unit_under_lora(tiny_model, tmp_path):
    from transformers import AutoConfig

    spec = load_training_spec(training_spec(tiny_model, tmp_path, tmp_path, strategy={"kind": "fsdp"}))
    layers = decoder_layers(load_model(spec, str(tiny_model)))  # through peft's wrapper
    assert len(layers) == AutoConfig.from_pretrained(tiny_model).num_hidden_layers
    assert len({type(layer).__name__ for layer in layers}) == 1
    with pytest.raises(ValueError, match="use strategy ddp or deepspeed"):
        decoder_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_a_dcp_checkpoint_round_trips_through_the_safe_reader(tmp_path):
    saved = {"model": {"w": torch.arange(6.0).reshape(2, 3)}, "optim": {"step": torch.tensor(3.0)}}
    dcp.save(saved, checkpoint_id=tmp_path)  # one process, no process group
    loaded = {"model": {"w": torch.zeros(2, 3)}, "optim": {"step": torch.tensor(0.0)}}
    dcp.load(loaded, storage_reader=SafeReader(tmp_path), planner=SafeLoadPlanner())
    assert torch.equal(loaded["model"]["w"], saved["model"]["w"]) and loaded["optim"]["step"].item() == 3.0


def test_crafted_dcp_metadata_fails_without_running(tmp_path):
    sentinel = tmp_path / "pwned"
    dcp.save({"w": torch.zeros(2)}, checkpoint_id=tmp_path)
    (tmp_path / ".metadata").write_bytes(pickle.dumps(SideEffect(sentinel)))
    with pytest.raises(CheckpointException, match="refused pathlib.Path.touch in checkpoint metadata"):
        dcp.load({"w": torch.zeros(2)}, storage_reader=SafeReader(tmp_path), planner=SafeLoadPlanner())
    assert not sentinel.exists()


def test_a_pickled_entry_in_a_dcp_checkpoint_is_refused(tmp_path):
    """DCP stores anything that is not a tensor as a pickle and loads it with weights_only=False."""
    sentinel = tmp_path / "pwned"
    dcp.save({"w": torch.zeros(2), "extra": SideEffect(sentinel)}, checkpoint_id=tmp_path / "ckpt")
    sentinel.unlink(missing_ok=True)  # saving pickled the payload, it did not run it
    with pytest.raises(CheckpointException, match="raysft checkpoints hold tensors only"):
        dcp.load({"w": torch.zeros(2), "extra": None}, storage_reader=SafeReader(tmp_path / "ckpt"),
                 planner=SafeLoadPlanner())
    assert not sentinel.exists()
