"""Evaluation inside the training loop: validation loss, perplexity, token and sequence accuracy, and answers
to the spec's prompts, rendered with the chat template the model is trained (and served) with."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import astuple, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from jobs.common.contract import IGNORE_INDEX
from jobs.train.packed_batch import model_inputs, token_loss_sum
from jobs.train.spec import Generation


def exact_replies(predicted: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """How many replies the greedy next-token predictions get entirely right, and how many
    replies there are. A reply is a maximal run of trained positions in a row: a reply and its
    end of turn (a packed row's samples are apart, each one's first token untrained)."""
    trained = labels[:, 1:] != IGNORE_INDEX
    wrong = (predicted != labels[:, 1:]) & trained
    # An untrained column before each row, so no run continues from one row into the next.
    trained, wrong = F.pad(trained, (1, 0)).flatten(), F.pad(wrong, (1, 0)).flatten()
    starts = trained & ~torch.roll(trained, 1)
    replies = int(starts.sum())
    if replies == 0:
        return 0, 0
    run = torch.cumsum(starts, 0) - 1
    wrong_runs = torch.zeros(replies, dtype=torch.bool, device=labels.device)
    wrong_runs[run[wrong]] = True
    return replies - int(wrong_runs.sum()), replies


@dataclass(frozen=True)
class EvalSums:
    """What evaluation adds up over batches and workers; the metrics are its ratios."""

    loss_sum: float = 0.0
    tokens: float = 0.0  # trained tokens scored
    correct: float = 0.0  # of them, predicted right
    exact: float = 0.0  # replies predicted right in every token
    replies: float = 0.0

    def __add__(self, other: EvalSums) -> EvalSums:
        return EvalSums(*(a + b for a, b in zip(astuple(self), astuple(other), strict=True)))

    def reduced(self, reduce_sum: Callable[[float], float]) -> EvalSums:
        return EvalSums(*(reduce_sum(x) for x in astuple(self)))

    def metrics(self) -> dict[str, float]:
        """Token-weighted loss, perplexity, token accuracy and sequence accuracy; none without tokens."""
        if self.tokens == 0:
            return {}
        eval_loss = self.loss_sum / self.tokens
        return {"eval_loss": eval_loss, "perplexity": float(np.exp(min(eval_loss, 50))),
                "token_accuracy": self.correct / self.tokens, "sequence_accuracy": self.exact / max(self.replies, 1)}


def evaluation_sums(forward, batches) -> EvalSums:
    """The sums over collated validation batches of one model call (`forward`, in eval mode)."""
    sums = EvalSums()
    with torch.no_grad():
        for b in batches:
            logits = forward(**model_inputs(b)).logits
            loss, n = token_loss_sum(logits, b["labels"])
            trained = b["labels"][:, 1:] != IGNORE_INDEX
            predicted = logits[:, :-1].argmax(-1)
            right, replies = exact_replies(predicted, b["labels"])
            sums += EvalSums(float(loss), n, float((predicted[trained] == b["labels"][:, 1:][trained]).sum()),
                             right, replies)
    return sums


def evaluate(engine, batches, reduce_sum) -> dict[str, float]:
    """Token-weighted loss, perplexity, next-token accuracy and sequence accuracy (replies whose
    every token the model predicts) over this worker's collated validation batches, summed over
    workers by `reduce_sum`."""
    engine.module.eval()
    sums = evaluation_sums(engine.forward, batches)
    engine.module.train()
    return sums.reduced(reduce_sum).metrics()


def generate_answers(engine, tokenizer: Any, ev: Generation, stop_ids: list[int], seed: int,
                     rank: int) -> list[dict[str, str]]:
    """Answers to `ev.prompts`, sampled with a seed of their own so they are reproducible and the
    training random streams stay untouched. Sharded (ZeRO-3) parameters need every rank in each
    forward pass, so then all ranks generate in step (`synced_gpus`); otherwise rank 0 alone."""
    if not ev.prompts or (rank != 0 and not engine.sharded):
        return []
    module = engine.module
    device = next(module.parameters()).device
    module.eval()
    answers = []
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for prompt in ev.prompts:
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                 add_generation_prompt=True)
            ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
            sampling = {"do_sample": True, "temperature": ev.temperature, "top_p": ev.top_p} if ev.temperature > 0 else {"do_sample": False}
            out = module.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=ev.max_new_tokens,
                                  eos_token_id=stop_ids, pad_token_id=stop_ids[0], synced_gpus=engine.sharded,
                                  **sampling)
            answers.append({"prompt": prompt, "answer": tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)})
    module.train()
    return answers
