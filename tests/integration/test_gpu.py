"""GPU-only paths, skipped without CUDA (CI has none): flash attention's varlen path over packed
rows, QLoRA's 4-bit base model training its adapter, mixed precision, and whole training runs on
each engine."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jobs.prepare.packing import pack_row
from jobs.train.packed_batch import collate, token_loss_sum
from jobs.train.spec import Attention

pytestmark = pytest.mark.gpu


def samples(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    out = []
    for length in rng.integers(20, 60, n):
        ids = rng.integers(3, 200, length)
        out.append((ids, np.where(np.arange(length) > length // 2, ids, -100)))
    return out


def test_flash_attention_packed_micro_batch_equals_its_samples_alone(tiny_model):
    """A micro-batch of several packed rows, as `lora-zero2-gpu` trains: the real kernel must keep
    every sample apart."""
    pytest.importorskip("flash_attn")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="flash_attention_2",
                                                 dtype=torch.bfloat16).cuda().eval()
    parts = samples(6)
    flash = Attention.FLASH_ATTENTION_2
    with torch.no_grad():
        rows = [pack_row(parts[:2]), pack_row(parts[2:5]), pack_row(parts[5:])]
        packed = {k: v.cuda() for k, v in collate(rows, pad_id=0, attention=flash).items()}
        assert "attention_mask" not in packed  # boundaries come from position_ids (varlen)
        total, count = token_loss_sum(model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits,
                                      packed["labels"])
        alone_total, alone_count = 0.0, 0
        for part in parts:
            one = {k: v.cuda() for k, v in collate([pack_row([part])], pad_id=0, attention=flash).items()}
            s, n = token_loss_sum(model(input_ids=one["input_ids"], position_ids=one["position_ids"]).logits, one["labels"])
            alone_total, alone_count = alone_total + float(s), alone_count + n
    assert count == alone_count
    assert abs(float(total) / count - alone_total / alone_count) < 2e-2  # bf16 kernels: not fp32's 1e-4


def test_qlora_trains_its_adapter_over_a_4bit_base(tiny_model):
    pytest.importorskip("bitsandbytes")
    from jobs.train.loop import load_model
    from jobs.train.packed_batch import micro_batch_loss, trained_tokens
    from jobs.train.spec import load_training_spec

    spec = load_training_spec({"name": "q", "model": {"uri": str(tiny_model), "dtype": "bf16"}, "datasets": [{"uri": "d"}],
                               "method": "qlora", "strategy": {"kind": "ddp"}, "scaling": {"use_gpu": True, "num_workers": 1},
                               "checkpoint": {"storage": "s"}})
    model = load_model(spec, str(tiny_model))
    assert any("4bit" in type(m).__name__ for m in model.modules())
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    batch = {k: v.cuda() for k, v in collate([pack_row(samples(3, seed=1))], pad_id=0).items()}
    losses = []
    for _ in range(10):
        loss = micro_batch_loss(model, batch, trained_tokens(batch))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_ddp_mixed_precision_computes_low_and_steps_fp32_weights_on_gpu(dtype):
    from jobs.train.engines.ddp import MixedPrecision
    from jobs.train.spec import DType

    precision = MixedPrecision(DType(dtype), "cuda")
    layer = torch.nn.Linear(64, 64).cuda()
    before = layer.weight.detach().clone()
    optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-4)
    with precision.autocast():
        out = layer(torch.randn(8, 64, device="cuda"))
    assert out.dtype is {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    precision.backward(out.float().pow(2).mean())
    precision.step(optimizer, layer.parameters(), max_norm=1.0)
    assert layer.weight.dtype is torch.float32 and not torch.equal(layer.weight, before)


@pytest.mark.parametrize("strategy", [{"kind": "ddp"}, {"kind": "deepspeed", "zero_stage": 2}, {"kind": "fsdp"},
                                      {"kind": "fsdp", "offload_params": True}],
                         ids=["ddp", "zero2", "fsdp", "fsdp-offload"])
def test_every_engine_trains_in_bf16_on_gpu_and_reports_its_memory(tiny_model, prepared, tmp_path, strategy):
    """A whole `jobs.train` run on the GPU: batches (labels too) on the device, collectives over
    NCCL on CUDA tensors, bf16 compute, and the peak memory in the metrics."""
    from support.jobs import run, step_metrics, training_spec

    spec = training_spec(tiny_model, prepared, tmp_path, name="gpu", strategy=strategy, method="full",
                         model={"uri": str(tiny_model), "dtype": "bf16"},
                         scaling={"num_workers": 1, "use_gpu": True, "gpus_per_worker": 1})
    steps = step_metrics(run("jobs.train", spec).stdout)
    assert steps[10]["loss"] < steps[1]["loss"]
    assert steps[10]["gpu_peak_allocated_gib"] > 0 and steps[10]["gpu_peak_reserved_gib"] >= steps[10]["gpu_peak_allocated_gib"]
    [worker] = steps[10]["gpu_workers"]  # one worker: its figures are the run's
    assert worker["gpu_peak_allocated_gib"] == steps[10]["gpu_peak_allocated_gib"]
