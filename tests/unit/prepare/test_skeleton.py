"""The pure pieces of placing replies: reading a render against a template's markup, and what
ends a reply."""

import pytest

from jobs.prepare.formats import RowReject
from jobs.prepare.skeleton import (
    Layout,
    SpecialRun,
    build_layout,
    locate,
    piece_texts,
    sentinel_messages,
    shape,
    split_reasoning,
    terminator,
)

SPECIALS = SpecialRun(["<|im_start|>", "<|im_end|>", "<|eot_id|>", "<|start_header_id|>", "<|end|>", "<|return|>",
                       "<|start|>", "<|user|>", "<|END_RESPONSE|>", "<|END_OF_TURN_TOKEN|>", "<|START_OF_TURN_TOKEN|>"])


def test_special_runs_take_the_longest_token_back_to_back():
    assert SPECIALS("<|END_RESPONSE|><|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|>x") == [
        "<|END_RESPONSE|>", "<|END_OF_TURN_TOKEN|>", "<|START_OF_TURN_TOKEN|>"]
    assert SPECIALS("<|im_end|>\n<|im_start|>") == ["<|im_end|>"]  # whitespace ends the run
    assert SpecialRun([])("<|im_end|>") == []


@pytest.mark.parametrize("after, last_tail, ends", [
    ("<|im_end|>\n<|im_start|>user\n", "<|im_end|>\n", "<|im_end|>"),  # ChatML: not the newline
    ("<|eot_id|><|start_header_id|>user", "<|eot_id|>", "<|eot_id|>"),  # Llama 3: not the next header
    ("<|END_RESPONSE|><|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|>", "<|END_RESPONSE|><|END_OF_TURN_TOKEN|>",
     "<|END_RESPONSE|><|END_OF_TURN_TOKEN|>"),  # Command R7B: two tokens
    ("<|end|><|start|>user<|message|>", "<|return|>", "<|end|>"),  # gpt-oss: the last reply ends otherwise
    ("<|user|>\nBye", "", "<|user|>"),  # GLM-4.5: the next turn's opener ends the reply
    ("\n<|im_end|>\n", "\n<|im_end|>", "\n<|im_end|>"),  # whitespace before the token is trained with it
    ("\n\n### User:\n", "\n\n", ""),  # no special token: nothing rendered ends the reply
])
def test_what_ends_a_reply_another_turn_follows(after, last_tail, ends):
    assert terminator(after, last_tail, SPECIALS) == ends


def test_what_ends_the_last_reply_is_the_run_after_it():
    assert terminator("<|return|>", None, SPECIALS) == "<|return|>"
    assert terminator("<|end|>\n<|endoftext|>", None, SPECIALS) == "<|end|>"  # Phi-3's trailing eos is not
    assert terminator("", None, SPECIALS) == ""


def test_reasoning_is_split_only_when_it_opens_the_reply():
    assert split_reasoning("<think>\nhm\n</think>\n\nHi") == ("\nhm\n", "\n\nHi")
    assert split_reasoning("Hi <think>x</think>") is None
    assert split_reasoning("no reasoning") is None


CHATML = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content | trim }}<|im_end|>\n{% endfor %}"


def chatml_layout(messages) -> Layout:
    from jinja2 import Template

    def render(msgs):
        return Template(CHATML).render(messages=msgs), None

    def layout(key):
        return build_layout(key, render, lambda prefix: layout(prefix).tail, SPECIALS)

    return layout(shape(messages))


def test_a_render_is_read_piece_by_piece_against_the_markup():
    messages = [{"role": "user", "content": "user"}, {"role": "assistant", "content": "  user  "}]
    layout = chatml_layout(messages)
    assert layout.segments == ("<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n", "<|im_end|>\n")
    assert [(r.message, r.terminator) for r in layout.replies] == [(1, "<|im_end|>")]
    text = "<|im_start|>user\nuser<|im_end|>\n<|im_start|>assistant\nuser<|im_end|>\n"
    # The trimmed reply is found where the markup puts it, not where its text first occurs.
    assert locate(text, layout, piece_texts(messages)) == [(17, 21), (54, 58)]


def test_a_variant_that_fits_locally_but_not_globally_is_backtracked():
    """`a ` fits as `a` (trimmed) and as `a ` (verbatim); only one reading matches the rest."""
    layout = Layout(("<", "", ">"), (1, 3), ())
    texts = {1: "a ", 3: " b"}
    assert locate("<a  b>", layout, texts) == [(1, 3), (3, 5)]
    assert locate("<ab>", layout, texts) == [(1, 2), (2, 3)]


def test_a_content_the_template_rewrites_is_a_reject_naming_the_turn():
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    layout = chatml_layout(messages)
    with pytest.raises(RowReject, match="turn 1 is not rendered verbatim") as info:
        locate("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHELLO<|im_end|>\n", layout,
               piece_texts(messages))
    assert info.value.reason == "template_error"


def test_a_reply_rendered_twice_or_never_cannot_be_placed():
    twice = "{% for m in messages %}{{ m.content }}{{ m.content }}<|im_end|>{% endfor %}"
    from jinja2 import Template

    key = shape([{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}])
    with pytest.raises(RowReject, match="rendered 2 times"):
        build_layout(key, lambda msgs: (Template(twice).render(messages=msgs), None), None, SPECIALS)


def test_sentinels_stand_for_every_piece_and_reasoning_gets_its_own():
    key = shape([{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>r</think>a"}])
    assert key == (("user", False), ("assistant", True))
    user, reply = sentinel_messages(key)
    assert user["content"] == "\ue0001\ue001"
    assert reply["content"] == "<think>\ue0002\ue001</think>\ue0003\ue001"
