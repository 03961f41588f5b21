"""Chat completions from a loaded causal LM, one token at a time: the conversation rendered with
the model's own chat template, tokens sampled with a KV cache, and each piece of text yielded as
soon as it decodes cleanly, until a stop token, a stop string, or `max_tokens`.

Pure of serving concerns (no HTTP, no Ray): `jobs.serve.app` runs it in Ray Serve replicas, and the
tests run it in process against `model.generate`."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

FinishReason = str  # "stop" (a stop token or string) | "length" (max_tokens)


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedily at temperature 0, else from the top-p nucleus of the
    tempered distribution, with a seed of its own when one is given."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class Completion:
    """What a stream produced so far: its text, its token counts and, once done, why it ended."""

    prompt_tokens: int
    completion_tokens: int = 0
    text: str = ""
    finish_reason: FinishReason | None = None
    token_ids: list[int] = field(default_factory=list)


def prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """The conversation as the model saw conversations in training: its chat template, with the
    assistant's turn opened."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def stop_ids(tokenizer: Any, model: Any, stop_tokens: list[str]) -> list[int]:
    """Where an answer ends: the tokens that ended replies in training (the manifest's
    `stop_tokens`), the tokenizer's eos and the model's generation config's."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    configured = configured if isinstance(configured, list) else [configured]
    ids = [tokenizer.convert_tokens_to_ids(t) for t in stop_tokens] + [tokenizer.eos_token_id, *configured]
    return list(dict.fromkeys(i for i in ids if isinstance(i, int)))


def next_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    """One token from the last position's logits."""
    if sampling.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest set whose mass reaches top_p (the most likely token always stays).
        outside = sorted_probs.cumsum(-1) - sorted_probs >= sampling.top_p
        sorted_probs[outside] = 0
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters might begin a stop string, and so cannot be sent yet."""
    return max((n for stop in stops for n in range(1, len(stop)) if text.endswith(stop[:n])), default=0)


@torch.no_grad()
def stream(model: Any, tokenizer: Any, ids: list[int], sampling: Sampling, stop_ids: list[int]) -> Iterator[str]:
    """Text deltas of the completion, as they become final. The `Completion` the generator returns
    (`StopIteration.value`, or `complete`) has the counts and the finish reason."""
    device = next(model.parameters()).device
    generator = None
    if sampling.seed is not None and sampling.temperature > 0:
        generator = torch.Generator(device=device).manual_seed(sampling.seed)
    done = Completion(prompt_tokens=len(ids))
    sent, cache = "", None
    inputs = torch.tensor([ids], device=device)
    while done.completion_tokens < sampling.max_tokens:
        out = model(input_ids=inputs, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        token = next_token(out.logits[0, -1], sampling, generator)
        if token in stop_ids:
            done.finish_reason = "stop"
            break
        done.token_ids.append(token)
        done.completion_tokens += 1
        text = tokenizer.decode(done.token_ids, skip_special_tokens=True)
        if (cut := min((i for s in sampling.stop if (i := text.find(s)) >= 0), default=-1)) >= 0:
            text, done.finish_reason = text[:cut], "stop"
        ready = text if done.finish_reason else text[:len(text) - held_back(text, sampling.stop)]
        if ready.endswith("\ufffd") and not done.finish_reason:  # half a character: wait for the rest
            ready = ready[:-1]
        if len(ready) > len(sent) and ready.startswith(sent):
            yield ready[len(sent):]
            sent = ready
        done.text = text
        if done.finish_reason:
            break
        inputs = torch.tensor([[token]], device=device)
    else:
        done.finish_reason = "length"
    if len(done.text) > len(sent):  # what was held back for a stop string that never came
        yield done.text[len(sent):]
    return done


def complete(model: Any, tokenizer: Any, ids: list[int], sampling: Sampling, stop_ids: list[int]) -> Completion:
    """The whole completion at once."""
    deltas = stream(model, tokenizer, ids, sampling, stop_ids)
    while True:
        try:
            next(deltas)
        except StopIteration as finished:
            return finished.value
