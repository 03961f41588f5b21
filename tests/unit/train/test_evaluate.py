"""Evaluation inside the training loop, on the scaffold model: the loss is the token-weighted
cross-entropy over trained tokens only, summed over workers; generations are reproducible."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from jobs.common.contract import IGNORE_INDEX
from jobs.train.evaluate import evaluate, exact_replies, generate_answers
from jobs.train.packed_batch import collate
from jobs.train.spec import load_training_spec


@pytest.fixture(scope="module")
def engine(tiny_model):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    return SimpleNamespace(module=model, forward=model, sharded=False)


def packed_row(ids: list[int], trained_from: int) -> dict[str, np.ndarray]:
    ids_arr = np.asarray(ids, dtype=np.int32)
    labels = np.where(np.arange(len(ids)) >= trained_from, ids_arr, IGNORE_INDEX).astype(np.int32)
    return {"input_ids": ids_arr, "labels": labels, "position_ids": np.arange(len(ids), dtype=np.int32),
            "seq_lens": np.asarray([len(ids)], dtype=np.int32)}


def test_loss_is_token_weighted_over_trained_tokens_only(engine):
    rows = [packed_row([5, 9, 12, 40, 41, 42], trained_from=3), packed_row([7, 8, 30, 31], trained_from=1)]
    batches = [collate(rows[:1], pad_id=0), collate(rows[1:], pad_id=0)]
    metrics = evaluate(engine, batches, reduce_sum=lambda x: x)
    expected_sum, expected_count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            logits = engine.module(input_ids=torch.as_tensor(row["input_ids"][None]).long()).logits[0]
            labels = torch.as_tensor(row["labels"]).long()
            expected_sum += float(F.cross_entropy(logits[:-1], labels[1:], ignore_index=IGNORE_INDEX, reduction="sum"))
            expected_count += int((labels[1:] != IGNORE_INDEX).sum())
    assert metrics["eval_loss"] == pytest.approx(expected_sum / expected_count, rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(np.exp(metrics["eval_loss"]), rel=1e-6)
    assert 0.0 <= metrics["token_accuracy"] <= 1.0
    assert engine.module.training  # evaluation hands the model back in training mode


def test_workers_sums_are_combined_before_dividing(engine):
    rows = [packed_row([5, 9, 12, 40, 41, 42], trained_from=2)]
    alone = evaluate(engine, [collate(rows, 0)], reduce_sum=lambda x: x)
    # Two workers with the same shard: sums double, the mean stays.
    doubled = evaluate(engine, [collate(rows, 0)], reduce_sum=lambda x: 2 * x)
    assert doubled["eval_loss"] == pytest.approx(alone["eval_loss"])


def test_no_trained_token_gives_no_metrics(engine):
    assert evaluate(engine, [collate([packed_row([5, 9, 12], trained_from=3)], 0)], reduce_sum=lambda x: x) == {}
    assert evaluate(engine, [], reduce_sum=lambda x: x) == {}


def test_generations_are_reproducible_and_leave_the_training_random_stream_alone(engine, tokenizer):
    spec = load_training_spec({"name": "r", "model": {"uri": "m", "dtype": "fp32"}, "datasets": [{"uri": "d"}],
                               "checkpoint": {"storage": "c"},
                               "eval": {"prompts": ["Name a colour.", "Hello"], "max_new_tokens": 8}})
    stop = [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    first = generate_answers(engine, tokenizer, spec.eval, stop, seed=7, rank=0)
    assert torch.rand(1) == before  # the training stream continues as if nothing was sampled
    again = generate_answers(engine, tokenizer, spec.eval, stop, seed=7, rank=0)
    assert first == again and [a["prompt"] for a in first] == spec.eval.prompts
    assert all(isinstance(a["answer"], str) for a in first)
    # Unsharded parameters: only rank 0 generates.
    assert generate_answers(engine, tokenizer, spec.eval, stop, seed=7, rank=1) == []


@pytest.mark.parametrize("rows,world,micro", [(3, 2, 1), (5, 3, 1), (1, 2, 1), (7, 2, 2)])
def test_every_validation_row_is_evaluated_once_whatever_the_number_of_workers(rows, world, micro):
    """Ray Train's equal split would drop the rows that do not divide among the workers (a third of
    a 3-row split on 2 workers): a held split goes whole to every worker, which takes its share,
    and a worker past the end runs a batch that scores nothing."""
    import pyarrow as pa

    from jobs.train.loop import held_share

    spec = load_training_spec({"name": "e", "model": {"uri": "m"}, "datasets": [{"uri": "d"}],
                               "checkpoint": {"storage": "s"}, "batch": {"micro_batch_size": micro}})
    table = pa.Table.from_pylist([packed_row([i + 1, i + 2, i + 3], 1) for i in range(rows)])
    per_rank = [list(held_share(table, spec, 0, rank, world)) for rank in range(world)]
    scored = [int(b["input_ids"][r, 0]) for batches in per_rank for b in batches
              for r in range(len(b["input_ids"])) if (b["labels"][r] != IGNORE_INDEX).any()]
    assert sorted(scored) == [i + 1 for i in range(rows)]
    # Sharded parameters need every rank in every forward pass: each rank runs as many.
    assert len({len(batches) for batches in per_rank}) == 1


def test_sequence_accuracy_counts_replies_right_in_every_token():
    """A reply is a run of trained positions; packed samples and rows never join into one."""
    I = IGNORE_INDEX
    # Two rows; the first packs two samples (a reply each), the second has two replies in one sample.
    labels = torch.tensor([[I, I, 5, 6, I, I, 7, 8],
                           [I, 3, 4, I, I, 9, I, I]])
    predicted = torch.tensor([[0, 5, 6, 0, 0, 7, 0],   # the next tokens: first reply right, second wrong at 8
                              [3, 4, 0, 0, 9, 0, 0]])  # both right
    assert exact_replies(predicted, labels) == (3, 4)
    # A run reaching a row's end does not continue into the next row's first run.
    labels = torch.tensor([[I, 1, 2], [I, 3, 4]])
    assert exact_replies(torch.tensor([[1, 2], [3, 0]]), labels) == (1, 2)
    assert exact_replies(torch.zeros(1, 2, dtype=torch.long), torch.full((1, 3), I)) == (0, 0)


def test_evaluate_reports_sequence_accuracy(engine):
    rows = [packed_row([5, 9, 12, 40, 41, 42], trained_from=3), packed_row([7, 8, 30, 31], trained_from=1)]
    metrics = evaluate(engine, [collate(rows, pad_id=0)], reduce_sum=lambda x: x)
    assert 0.0 <= metrics["sequence_accuracy"] <= metrics["token_accuracy"] <= 1.0
