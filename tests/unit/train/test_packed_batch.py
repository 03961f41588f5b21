"""On the scaffold model: packed rows equal their samples alone, and
gradient accumulation does not change the gradients."""

import warnings

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from jobs.prepare.packing import pack_row
from jobs.train.packed_batch import (
    block_causal_mask,
    collate,
    micro_batch_loss,
    static_flex_shapes,
    token_loss_sum,
    trained_tokens,
)
from jobs.train.spec import Attention


def sample(rng, n):
    ids = rng.integers(3, 200, size=n).astype(np.int32)
    labels = np.where(rng.random(n) < 0.6, ids, -100).astype(np.int32)
    labels[0] = -100
    return ids, labels


@pytest.fixture(scope="module", params=["sdpa", "eager", "flex_attention"])
def model(request, tiny_model):
    static_flex_shapes()
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=request.param,
                                                dtype=torch.float32).eval()


def test_mask_is_block_diagonal_causal_and_padding_safe():
    mask = block_causal_mask(torch.tensor([[0, 0, 1, 1, 1, -1]]))[0, 0] == 0
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ], dtype=torch.bool)
    assert torch.equal(mask, expected)


def test_collate_takes_read_only_rows_as_ray_data_hands_them_over():
    """Rows iterated from Ray Data are read-only views of Arrow buffers; torch warns (once per
    worker, in every job's log) when a tensor is made straight from one."""
    rng = np.random.default_rng(0)
    rows = [pack_row([sample(rng, 7), sample(rng, 4)]), pack_row([sample(rng, 5)])]
    for row in rows:
        for values in row.values():
            values.setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batch = collate(rows, pad_id=0)
    assert batch["input_ids"].dtype == torch.long and batch["input_ids"].shape == (2, 11)
    assert batch["input_ids"][1, 5:].eq(0).all() and batch["labels"][1, 5:].eq(-100).all()
    assert np.array_equal(batch["input_ids"][0].numpy(), rows[0]["input_ids"])


def test_packed_loss_equals_samples_run_one_by_one(model):
    rng = np.random.default_rng(0)
    samples = [sample(rng, n) for n in (17, 9, 30, 5)]
    rows = [pack_row(samples[:3]), pack_row(samples[3:])]  # two rows of different length: padding too
    attention = Attention(model.config._attn_implementation)
    batch = collate(rows, pad_id=0, attention=attention)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                       attention_mask=batch["attention_mask"]).logits
        packed_sum, packed_n = token_loss_sum(logits, batch["labels"])
        alone_sum, alone_n = 0.0, 0
        for ids, labels in samples:
            one = collate([pack_row([(ids, labels)])], pad_id=0, attention=attention)
            s, n = token_loss_sum(model(**{k: v for k, v in one.items() if k != "labels"}).logits, one["labels"])
            alone_sum, alone_n = alone_sum + s, alone_n + n
    assert packed_n == alone_n == sum(int((lab[1:] != -100).sum()) for _, lab in samples)
    assert abs(packed_sum.item() / packed_n - alone_sum.item() / alone_n) < 1e-4
    with torch.no_grad():  # without the block mask, samples see their neighbours and the loss moves
        leaky = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    assert abs(token_loss_sum(leaky, batch["labels"])[0].item() / packed_n - alone_sum.item() / alone_n) > 1e-3


def grads(model, micro_batches):
    model.zero_grad()
    step_tokens = sum(trained_tokens(b) for b in micro_batches)
    for b in micro_batches:
        micro_batch_loss(model, b, step_tokens).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def trainable_model(request, tiny_model):
    """Flex attention has no backward on CPU (torch 2.13): gradients are checked on the others."""
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=request.param,
                                                dtype=torch.float32).eval()


def test_accumulation_does_not_change_gradients(trainable_model):
    model = trainable_model
    rng = np.random.default_rng(1)
    rows = [pack_row([sample(rng, n)]) for n in (40, 8, 25, 12)]  # uneven trained-token counts
    one_big = grads(model, [collate(rows, pad_id=0)])
    four_small = grads(model, [collate([r], pad_id=0) for r in rows])
    assert torch.allclose(one_big, four_small, atol=1e-6, rtol=1e-4)
    # A per-micro-batch mean would not: it weights the short rows up.
    model.zero_grad()
    for r in rows:
        b = collate([r], pad_id=0)
        s, n = token_loss_sum(model(input_ids=b["input_ids"]).logits, b["labels"])
        (s / n / len(rows)).backward()
    naive = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    assert not torch.allclose(one_big, naive, atol=1e-6, rtol=1e-4)


def test_flash_attention_gets_the_micro_batch_as_one_row_whose_positions_separate_every_sample():
    """transformers runs flash attention's varlen kernel (one sequence per sample) only for a batch
    of one row whose `position_ids` restart: what it derives from our inputs must be exactly the
    samples of every row of the micro-batch."""
    from transformers.modeling_flash_attention_utils import _is_packed_sequence, prepare_fa_kwargs_from_position_ids

    rng = np.random.default_rng(1)
    samples = [sample(rng, n) for n in (17, 9, 30, 5, 12)]
    rows = [pack_row(samples[:3]), pack_row(samples[3:])]
    batch = collate(rows, pad_id=0, attention=Attention.FLASH_ATTENTION_2)
    assert "attention_mask" not in batch and batch["input_ids"].shape == (1, 73)
    assert _is_packed_sequence(batch["position_ids"], batch_size=1)
    (cu_seqlens, _), (max_len, _) = prepare_fa_kwargs_from_position_ids(batch["position_ids"])
    assert cu_seqlens.tolist() == [0, 17, 26, 56, 61, 73] and int(max_len) == 30
    # The same trained tokens as the padded layout: nothing is trained across a row boundary.
    padded = collate(rows, pad_id=0)
    assert trained_tokens(batch) == trained_tokens(padded)
    assert torch.equal(batch["labels"][0][batch["labels"][0] != -100], padded["labels"][padded["labels"] != -100])
