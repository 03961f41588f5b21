"""Mixed precision where the engine has none of its own (DDP): bf16/fp16 compute under autocast
over fp32 trainable weights, fp16 with loss scaling; LoRA adapters fp32 over a bf16 base. On CPU,
where torch runs bf16 and fp16 autocast."""

import pytest
import torch

from jobs.train.engines.ddp import MixedPrecision
from jobs.train.engines.registry import weights_dtype
from jobs.train.spec import DType, load_training_spec

MINIMAL = {"name": "run", "model": {"uri": "m", "dtype": "bf16"}, "datasets": [{"uri": "d"}],
           "checkpoint": {"storage": "ckpt"}}


def one_step(precision: MixedPrecision, lr: float, loss_scale: float = 1.0):
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 8)
    with torch.no_grad():
        layer.weight.fill_(1.0)
    optimizer = torch.optim.SGD(layer.parameters(), lr=lr)
    with precision.autocast():
        out = layer(torch.randn(4, 8))
    precision.backward(out.float().pow(2).mean() * loss_scale)
    precision.step(optimizer, layer.parameters(), max_norm=1e9)
    return layer, out


@pytest.mark.parametrize("dtype, compute", [(DType.BF16, torch.bfloat16), (DType.FP16, torch.float16)])
def test_compute_is_low_precision_and_updates_land_on_fp32_weights(dtype, compute):
    layer, out = one_step(MixedPrecision(dtype, "cpu"), lr=1e-5)
    assert out.dtype is compute and layer.weight.dtype is torch.float32
    moved = (layer.weight - 1.0).abs()
    # Updates of ~1e-5 on weights of 1.0: below bf16/fp16 resolution there (2^-7, 2^-10), kept in fp32.
    assert 0 < moved.max().item() < 1e-3
    assert (layer.weight.to(compute) == 1.0).all()  # in the compute dtype the update would be lost


def test_fp16_scales_the_loss_and_skips_a_step_whose_gradients_overflow():
    precision = MixedPrecision(DType.FP16, "cpu")
    assert precision.scaler is not None and precision.scaler.get_scale() == 65536.0
    layer, _ = one_step(precision, lr=1.0, loss_scale=1e30)  # inf gradients once scaled
    assert (layer.weight == 1.0).all()  # the step was skipped, not applied as NaN
    assert precision.scaler.get_scale() < 65536.0
    restored = MixedPrecision(DType.FP16, "cpu")
    restored.load_state_dict(precision.state_dict())
    assert restored.scaler.get_scale() == precision.scaler.get_scale()


def test_fp32_is_plain():
    precision = MixedPrecision(DType.FP32, "cpu")
    layer, out = one_step(precision, lr=0.1)
    assert out.dtype is torch.float32 and precision.scaler is None and precision.state_dict() == {}


@pytest.mark.parametrize("method, strategy, expected", [
    ("full", {"kind": "ddp"}, torch.float32),  # the master copy DDP's optimizer steps
    ("full", {"kind": "deepspeed", "zero_stage": 2}, torch.bfloat16),  # DeepSpeed keeps its own fp32 copy
    ("lora", {"kind": "ddp"}, torch.bfloat16),  # a frozen base
    ("lora", {"kind": "fsdp"}, torch.float32),  # fp32 shards; FSDP's policy casts each gathered layer
    ("full", {"kind": "fsdp"}, torch.float32),
])
def test_weights_load_in_fp32_where_the_engine_keeps_no_master_copy(method, strategy, expected):
    assert weights_dtype(load_training_spec(MINIMAL | {"method": method, "strategy": strategy})) is expected


def test_lora_adapters_train_in_fp32_over_a_bf16_base(tiny_model):
    from jobs.train.loop import load_model

    spec = load_training_spec(MINIMAL | {"model": {"uri": str(tiny_model), "dtype": "bf16"}, "method": "lora",
                                         "strategy": {"kind": "ddp"}})
    model = load_model(spec, str(tiny_model))
    trained = {p.dtype for p in model.parameters() if p.requires_grad}
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert trained == {torch.float32} and frozen == {torch.bfloat16}
