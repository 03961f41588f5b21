"""Every popular chat template family masks exactly with `template: tokenizer`: the trained tokens
decode to each reply plus the end of turn the template renders (detected, not configured), no
prompt text is trained, single- and multi-turn, and generation stops at that end of turn."""

import pytest
from support.chat_families import FAMILIES, family_tokenizer, trained_runs

from jobs.prepare.formats import RowReject
from jobs.prepare.spec import TemplateName
from jobs.prepare.templates import build_template
from jobs.train.driver import stop_ids

SYSTEM = {"role": "system", "content": "Answer in one short sentence."}
SINGLE = [{"role": "user", "content": "What colour is the sky?"},
          {"role": "assistant", "content": "The sky is blue on a clear day."}]
MULTI = [{"role": "user", "content": "Name a primary colour."},
         {"role": "assistant", "content": "Red is a primary colour."},
         {"role": "user", "content": "Say 'Red is a primary colour.' again, then another one."},  # quotes the reply
         {"role": "assistant", "content": "Blue is another."},
         {"role": "user", "content": "And a third?"},
         {"role": "assistant", "content": "Yellow."}]


@pytest.fixture(scope="module", params=FAMILIES, ids=[f.name for f in FAMILIES])
def family(request, tiny_model, tmp_path_factory):
    fam = request.param
    return fam, family_tokenizer(fam, tiny_model, tmp_path_factory.mktemp(fam.name))


def conversations(fam):
    yield SINGLE
    yield MULTI
    if fam.system:
        yield [SYSTEM, *SINGLE]
        yield [SYSTEM, *MULTI]


def test_the_end_of_turn_is_detected_from_the_template(family):
    fam, tokenizer = family
    chat = build_template(TemplateName.TOKENIZER, tokenizer)
    assert chat.eot == fam.eot and chat.eot_source == "template"


def test_trained_tokens_are_exactly_each_reply_and_its_end_of_turn(family):
    fam, tokenizer = family
    chat = build_template(TemplateName.TOKENIZER, tokenizer)
    for messages in conversations(fam):
        replies = [m["content"] + fam.eot for m in messages if m["role"] == "assistant"]
        # A token straddling the start of a reply (Mistral's " Red") is trained whole: its leading space is the only
        # prompt character that may be trained.
        assert [run.lstrip(" ") for run in trained_runs(tokenizer, messages, chat)] == replies, messages


def test_generation_stops_at_the_trained_end_of_turn(family):
    fam, tokenizer = family
    stops = stop_ids(tokenizer, build_template(TemplateName.TOKENIZER, tokenizer).stop_tokens())
    assert stops[0] == tokenizer.convert_tokens_to_ids(fam.eot)
    assert tokenizer.eos_token_id in stops


def test_a_row_the_template_cannot_render_is_a_reject_with_its_message(tiny_model, tmp_path):
    gemma = next(f for f in FAMILIES if not f.system)
    chat = build_template(TemplateName.TOKENIZER, family_tokenizer(gemma, tiny_model, tmp_path))  # the probe has no system turn
    with pytest.raises(RowReject) as info:
        chat.render([SYSTEM, *SINGLE])
    assert info.value.reason == "template_error" and "System role not supported" in info.value.detail


def test_a_wrong_eot_token_is_refused_with_the_one_to_use(tiny_model, tmp_path):
    qwen = next(f for f in FAMILIES if f.name == "qwen2.5")
    tokenizer = family_tokenizer(qwen, tiny_model, tmp_path)
    with pytest.raises(ValueError, match=r"eot_token '<\|endoftext\|>' is not what this template renders after a reply "
                                         r"\('<\|im_end\|>'\): set eot_token: '<\|im_end\|>'"):
        build_template(TemplateName.TOKENIZER, tokenizer, eot_token="<|endoftext|>")
    # Naming what the template renders confirms it: the terminators still come from the template.
    assert build_template(TemplateName.TOKENIZER, tokenizer, eot_token="<|im_end|>").eot == "<|im_end|>"
