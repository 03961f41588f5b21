"""Token-by-token chat completions (jobs/serve/generation.py) on the scaffold model: the same
tokens as transformers' own `generate`, greedy and seeded; stop tokens, stop strings and
`max_tokens` end it with the right reason; and the streamed pieces add up to the text."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from jobs.serve.generation import Sampling, complete, held_back, next_token, prompt_ids, stream

MESSAGES = [{"role": "user", "content": "How many tablespoons are in a cup?"}]


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model):
    return AutoModelForCausalLM.from_pretrained(tiny_model).eval(), AutoTokenizer.from_pretrained(tiny_model)


def reference(model, ids, stop_ids, max_tokens, **sampling):
    out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=max_tokens, eos_token_id=stop_ids, pad_token_id=stop_ids[0], **sampling)
    generated = out[0, len(ids):].tolist()
    return generated[:-1] if generated and generated[-1] in stop_ids else generated


def test_greedy_tokens_are_transformers_own(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    ids = prompt_ids(tokenizer, MESSAGES)
    assert tokenizer.decode(ids).endswith("<|im_start|>assistant\n")  # the assistant's turn is open
    stops = [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    done = complete(model, tokenizer, ids, Sampling(max_tokens=40, temperature=0), stops)
    assert done.token_ids == reference(model, ids, stops, 40, do_sample=False)
    assert done.prompt_tokens == len(ids) and done.completion_tokens == len(done.token_ids)
    assert done.finish_reason == ("length" if done.completion_tokens == 40 else "stop")


def test_a_seed_makes_sampling_reproducible_and_max_tokens_ends_it(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    ids = prompt_ids(tokenizer, MESSAGES)
    sampling = Sampling(max_tokens=12, temperature=1.5, top_p=0.9, seed=3)
    first, again = (complete(model, tokenizer, ids, sampling, stop_ids=[]) for _ in range(2))
    assert first.token_ids == again.token_ids and first.finish_reason == "length" and first.completion_tokens == 12
    other = complete(model, tokenizer, ids, Sampling(max_tokens=12, temperature=1.5, top_p=0.9, seed=4), stop_ids=[])
    assert other.token_ids != first.token_ids


def test_a_stop_token_ends_the_reply_and_is_not_part_of_it(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    ids = prompt_ids(tokenizer, MESSAGES)
    greedy = complete(model, tokenizer, ids, Sampling(max_tokens=10, temperature=0), stop_ids=[])
    stop = greedy.token_ids[4]  # the fifth token the model would emit
    cut = complete(model, tokenizer, ids, Sampling(max_tokens=10, temperature=0), stop_ids=[stop])
    assert cut.finish_reason == "stop" and cut.token_ids == greedy.token_ids[:greedy.token_ids.index(stop)]


def test_streamed_pieces_add_up_and_a_stop_string_is_never_sent(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    ids = prompt_ids(tokenizer, MESSAGES)
    whole = complete(model, tokenizer, ids, Sampling(max_tokens=30, temperature=0), stop_ids=[])
    assert "".join(stream(model, tokenizer, ids, Sampling(max_tokens=30, temperature=0), [])) == whole.text
    word = whole.text.strip().split()[min(3, len(whole.text.split()) - 1)]
    pieces = list(stream(model, tokenizer, ids, Sampling(max_tokens=30, temperature=0, stop=(word,)), []))
    sent = "".join(pieces)
    assert word not in sent and whole.text.startswith(sent) and sent == whole.text[:whole.text.find(word)]


def test_top_p_keeps_the_nucleus_and_temperature_zero_is_argmax():
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0])
    assert next_token(logits, Sampling(max_tokens=1, temperature=0), None) == 0
    g = torch.Generator().manual_seed(0)
    drawn = {next_token(logits, Sampling(max_tokens=1, top_p=0.5), g) for _ in range(200)}
    assert drawn == {0}  # the first token alone holds more than half the mass
    drawn = {next_token(logits, Sampling(max_tokens=1, top_p=0.9), g) for _ in range(400)}
    assert drawn == {0, 1, 2}
    assert held_back("the answer is </", ("</s>",)) == 2 and held_back("plain", ("</s>",)) == 0
