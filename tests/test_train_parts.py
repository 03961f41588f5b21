"""Unit tests of the training stage's small parts: the memory plan, RNG state round trips, and the
metrics history a resumed run rewrites."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from jobs.metrics_log import MetricsLog
from jobs.train_checkpoint import rng_state, set_rng_state
from jobs.train_plan import ModelShape, estimate_memory, model_shape
from jobs.train_spec import load_training_spec

GIB = 1024**3
SHAPE = ModelShape(total_params=7 * 10**9, trainable_params=7 * 10**9, hidden_size=4096, num_layers=32, vocab_size=32000)


def spec(**overrides):
    base = {"name": "p", "model": {"uri": "m", "dtype": "bf16"}, "datasets": [{"uri": "d"}], "method": "full",
            "scaling": {"num_workers": 8, "use_gpu": True}, "checkpoint": {"storage": "s"},
            "batch": {"micro_batch_size": 1, "grad_accum": 1}}
    return load_training_spec(base | overrides)


def test_memory_follows_the_zero_stages():
    """ZeRO paper, 7B in bf16 with AdamW: 2 bytes of weights, 2 of gradients, 12 of optimizer state
    per parameter; stage 1 shards the optimizer state, 2 also gradients, 3 also weights."""
    p = SHAPE.total_params
    ddp = estimate_memory(spec(strategy={"kind": "ddp"}), SHAPE, 1024)
    z1 = estimate_memory(spec(strategy={"kind": "deepspeed", "zero_stage": 1}), SHAPE, 1024)
    z3 = estimate_memory(spec(strategy={"kind": "deepspeed", "zero_stage": 3}), SHAPE, 1024)
    assert ddp.weights == pytest.approx(2 * p / GIB, rel=1e-3) and ddp.optimizer == pytest.approx(12 * p / GIB, rel=1e-3)
    assert z1.optimizer == pytest.approx(ddp.optimizer / 8, rel=1e-3) and z1.gradients == ddp.gradients
    assert z3.weights == pytest.approx(ddp.weights / 8, rel=1e-3) and z3.gradients == pytest.approx(ddp.gradients / 8, rel=1e-3)
    offload = estimate_memory(spec(strategy={"kind": "deepspeed", "zero_stage": 3, "offload_optimizer": True,
                                             "offload_params": True}), SHAPE, 1024)
    assert offload.host_offloaded == pytest.approx(z3.optimizer + z3.weights, abs=1e-3)
    assert offload.device_total == pytest.approx(z3.device_total - offload.host_offloaded, abs=1e-3)


def test_lora_qlora_and_checkpointing_shrink_the_estimate():
    lora_shape = ModelShape(SHAPE.total_params, 40 * 10**6, 4096, 32, 32000)
    lora = estimate_memory(spec(method="lora", strategy={"kind": "ddp"}), lora_shape, 2048)
    qlora = estimate_memory(spec(method="qlora", strategy={"kind": "ddp"}), lora_shape, 2048)
    assert qlora.weights < lora.weights / 3  # 4-bit base weights
    assert lora.optimizer == pytest.approx(12 * 40 * 10**6 / GIB, rel=1e-2)
    checkpointed = estimate_memory(spec(method="lora", strategy={"kind": "ddp"}, gradient_checkpointing=True), lora_shape, 2048)
    assert checkpointed.activations < lora.activations / 4


def test_model_shape_counts_what_peft_trains(tiny_model):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(tiny_model)
    shape = model_shape(spec(method="lora", lora={"r": 8}), config)  # on the meta device: no weights read
    real = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                          LoraConfig(r=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    assert (shape.trainable_params, shape.total_params) == real.get_nb_trainable_parameters()


def test_rng_state_round_trips_through_json():
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    saved = json.loads(json.dumps(rng_state()))
    first = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    set_rng_state(saved)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]


def test_metrics_history_drops_the_steps_a_resumed_run_repeats(tmp_path):
    log = MetricsLog(str(tmp_path / "run"), resume_step=0, interval_s=3600)
    for step in range(1, 6):
        log.add({"step": step, "loss": 1.0 / step})
    # The first entry is written at once, the next ones wait for the interval.
    assert len((tmp_path / "run/metrics.jsonl").read_text().splitlines()) == 1
    log.add({"step": 6, "eval_loss": 0.5}, important=True)  # evaluations and checkpoints are written at once
    assert len((tmp_path / "run/metrics.jsonl").read_text().splitlines()) == 6
    resumed = MetricsLog(str(tmp_path / "run"), resume_step=4)
    resumed.add({"step": 5, "loss": 0.2}, important=True)
    steps = [json.loads(line)["step"] for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]
