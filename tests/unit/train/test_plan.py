"""The `--dry-run` plan: memory per worker by the ZeRO paper's accounting, and parameters counted on
the meta device."""

from __future__ import annotations

import pytest

from jobs.train.plan import ModelShape, estimate_memory, model_shape
from jobs.train.spec import load_training_spec

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


def test_fsdp_shards_like_zero_3():
    """FSDP2 shards weights, gradients and optimizer state across workers, as ZeRO-3 does; its
    offload moves the shards and the optimizer step to host memory."""
    z3 = estimate_memory(spec(strategy={"kind": "deepspeed", "zero_stage": 3}), SHAPE, 1024)
    fsdp = estimate_memory(spec(strategy={"kind": "fsdp"}), SHAPE, 1024)
    assert fsdp == z3
    offload = estimate_memory(spec(strategy={"kind": "fsdp", "offload_params": True}), SHAPE, 1024)
    assert offload.host_offloaded == pytest.approx(z3.optimizer + z3.weights, abs=1e-3)


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
