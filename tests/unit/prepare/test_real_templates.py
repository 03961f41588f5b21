"""Masks on 24 model families' own chat templates, copied verbatim (`tests/data/chat_templates/`),
each with a tokenizer carrying that model's special tokens: the trained tokens of every accepted
conversation decode to exactly each reply plus what the template ends it with, whatever the
contents are; conversations that collide on purpose are generated (hypothesis)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.real_templates import families, real_tokenizer

from jobs.common.contract import IGNORE_INDEX
from jobs.prepare.formats import RowReject, validate_conversation
from jobs.prepare.labels import tokenize_rendered
from jobs.prepare.spec import Reasoning, TemplateName, TrainOn, Truncation
from jobs.prepare.templates import build_template, select_spans
from jobs.train.driver import stop_ids

FAMILIES = families()


@pytest.fixture(scope="module", params=FAMILIES, ids=[f.name for f in FAMILIES])
def family(request, tiny_model, tmp_path_factory):
    fam = request.param
    tokenizer = real_tokenizer(fam, tiny_model, tmp_path_factory.mktemp(fam.name))
    return fam, tokenizer, build_template(TemplateName.TOKENIZER, tokenizer)


def runs(tokenizer, rendered, train_on: TrainOn = TrainOn.ASSISTANT) -> list[str]:
    """The text of each run of consecutive trained tokens of one rendered sample."""
    [tokenized] = tokenize_rendered(tokenizer, [rendered.text], [select_spans(rendered, train_on)], 1 << 16,
                                    Truncation.TRUNCATE)
    trained = tokenized.labels != IGNORE_INDEX
    edges = np.flatnonzero(np.diff(np.concatenate([[0], trained.astype(np.int8), [0]])))
    # A token straddling the start of a reply (Mistral's " Red") is trained whole: its leading space is the only
    # prompt character that may be trained.
    return [tokenizer.decode(tokenized.input_ids[a:b].tolist()).lstrip(" ")
            for a, b in zip(edges[::2], edges[1::2], strict=True)]


def expected(fam, messages) -> list[str]:
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    return [reply + (fam.last_end if i == len(replies) - 1 else fam.turn_end) for i, reply in enumerate(replies)]


def usable(fam, messages):
    """The conversation as the family's template takes it: without a system turn where it refuses one."""
    return messages if fam.system or messages[0]["role"] != "system" else messages[1:]


def test_the_template_sets_are_real_and_recorded():
    assert len(FAMILIES) >= 20
    for fam in FAMILIES:
        repo, _, path = fam.source.partition(":")
        assert "/" in repo and "@" in repo and len(repo.split("@")[1]) == 40 and path, fam.source


def test_what_ends_a_reply_is_read_from_each_template(family):
    fam, tokenizer, chat = family
    assert (chat.eot, chat.eot_last) == (fam.turn_end, fam.last_end)


def test_generation_stops_at_every_token_that_ends_a_reply(family):
    fam, tokenizer, chat = family
    stops = stop_ids(tokenizer, chat.stop_tokens())
    ends = {token for end in (fam.turn_end, fam.last_end)
            for token in tokenizer.convert_ids_to_tokens(tokenizer.encode(end, add_special_tokens=False))}
    assert {tokenizer.convert_tokens_to_ids(t) for t in ends} <= set(stops)
    assert tokenizer.eos_token_id in stops


# Conversations that fooled a search for each reply in the render (issue 24, items 1 and 2).
SCHOOL = "She goes to school."
COLLIDING = {
    "system prompt quotes the user": [
        {"role": "system", "content": f"Example: {SCHOOL}"}, {"role": "user", "content": SCHOOL},
        {"role": "assistant", "content": SCHOOL}, {"role": "user", "content": f"Again: {SCHOOL}"},
        {"role": "assistant", "content": SCHOOL}],
    "few-shot system prompt holds the reply": [
        {"role": "system", "content": "Q: What is 2+2?\nA: 4"}, {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"}],
    "replies are role names": [
        {"role": "user", "content": "Which role are you?"}, {"role": "assistant", "content": "assistant"},
        {"role": "user", "content": "user"}, {"role": "assistant", "content": "model"},
        {"role": "user", "content": "system"}, {"role": "assistant", "content": "user"}],
    "every content the same": [
        {"role": "system", "content": "Yes."}, {"role": "user", "content": "Yes."},
        {"role": "assistant", "content": "Yes."}, {"role": "user", "content": "Yes."},
        {"role": "assistant", "content": "Yes."}],
}


@pytest.mark.parametrize("case", COLLIDING)
def test_colliding_contents_train_exactly_each_reply_and_its_end(family, case):
    fam, tokenizer, chat = family
    messages = usable(fam, COLLIDING[case])
    assert runs(tokenizer, chat.render(messages)) == expected(fam, messages)


def test_the_issue_reproduction_trains_the_reply_not_the_users_message(tiny_model, tmp_path):
    qwen = next(f for f in FAMILIES if f.name == "qwen2.5")
    chat = build_template(TemplateName.TOKENIZER, real_tokenizer(qwen, tiny_model, tmp_path))
    text = ("<|im_start|>system\nExample: She goes to school.<|im_end|>\n<|im_start|>user\n"
            "She goes to school.<|im_end|>\n<|im_start|>assistant\nShe goes to school.<|im_end|>\n")
    rendered = chat.render([{"role": "system", "content": "Example: She goes to school."},
                            {"role": "user", "content": SCHOOL}, {"role": "assistant", "content": SCHOOL}])
    assert rendered.text == text
    assert rendered.spans == [(127, 127 + len("She goes to school.<|im_end|>"))]


def test_a_generation_block_is_cut_at_the_end_of_turn(tiny_model, tmp_path):
    """LFM2.5's `{% generation %}` blocks hold the newline after `<|im_end|>`: it is not trained."""
    lfm = next(f for f in FAMILIES if f.name == "lfm2.5")
    tokenizer = real_tokenizer(lfm, tiny_model, tmp_path)
    chat = build_template(TemplateName.TOKENIZER, tokenizer)
    rendered = chat.render(COLLIDING["replies are role names"])
    assert [rendered.text[a:b] for a, b in rendered.spans] == ["assistant<|im_end|>", "model<|im_end|>",
                                                               "user<|im_end|>"]


def test_a_template_that_ends_the_last_reply_with_nothing_trains_the_eos_after_it(tiny_model, tmp_path):
    glm = next(f for f in FAMILIES if f.name == "glm4.5")
    tokenizer = real_tokenizer(glm, tiny_model, tmp_path)
    chat = build_template(TemplateName.TOKENIZER, tokenizer)
    messages = COLLIDING["replies are role names"][:4]
    rendered = chat.render(messages)
    assert rendered.text.endswith("model<|endoftext|>") and chat.eot_source == "eos"
    assert runs(tokenizer, rendered) == ["assistant<|user|>", "model<|endoftext|>"]


# ------------------------------------------------------------------ reasoning (issue 24, item 5)

THINK = [{"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "<think>\nThe user greets me.\n</think>\n\nHello!"},
         {"role": "user", "content": "Bye"},
         {"role": "assistant", "content": "<think>\nThey leave.\n</think>\n\nGoodbye."}]


def reasoning_chat(name, tiny_model, tmp_path, reasoning):
    fam = next(f for f in FAMILIES if f.name == name)
    tokenizer = real_tokenizer(fam, tiny_model, tmp_path)
    return fam, tokenizer, build_template(TemplateName.TOKENIZER, tokenizer, reasoning=reasoning)


def test_qwen3_reasoning_of_an_earlier_turn_is_kept_as_a_sample_of_its_own(tiny_model, tmp_path):
    _, tokenizer, chat = reasoning_chat("qwen3", tiny_model, tmp_path, Reasoning.KEEP)
    whole, first = chat.samples(THINK, TrainOn.ASSISTANT)
    # The template keeps the last turn's reasoning: the conversation trains that turn, as rendered.
    assert runs(tokenizer, whole) == [THINK[3]["content"] + "<|im_end|>"]
    assert "The user greets me" not in whole.text  # the earlier turn is context, as the template renders it
    # The earlier turn, with its reasoning, ends a sample of its own.
    assert runs(tokenizer, first) == [THINK[1]["content"] + "<|im_end|>"]
    assert "Bye" not in first.text


def test_deepseek_r1_reasoning_is_put_back_where_the_template_strips_it(tiny_model, tmp_path):
    _, tokenizer, chat = reasoning_chat("deepseek-r1-distill", tiny_model, tmp_path, Reasoning.KEEP)
    samples = chat.samples(THINK, TrainOn.ASSISTANT)
    assert [runs(tokenizer, s) for s in samples] == [[m["content"] + "<｜end▁of▁sentence｜>"]
                                                     for m in (THINK[1], THINK[3])]
    assert "The user greets me" not in samples[1].text  # context as the template renders it


@pytest.mark.parametrize("name", ["qwen3", "deepseek-r1-distill", "lfm2.5"])
def test_reasoning_template_trains_what_the_template_renders_and_reject_rejects(tiny_model, tmp_path, name):
    fam, tokenizer, chat = reasoning_chat(name, tiny_model, tmp_path / "t", Reasoning.TEMPLATE)
    [sample] = chat.samples(THINK, TrainOn.ASSISTANT)
    assert runs(tokenizer, sample)[0].lstrip("\n") == "Hello!" + fam.turn_end  # R1 keeps the blank lines after </think>
    _, _, strict = reasoning_chat(name, tiny_model, tmp_path / "r", Reasoning.REJECT)
    with pytest.raises(RowReject) as info:
        strict.samples(THINK, TrainOn.ASSISTANT)
    assert info.value.reason == "reasoning_dropped" and "turn 1" in info.value.detail


def test_reasoning_a_template_renders_is_trained_in_place(family):
    """Templates that keep reasoning (or know nothing of it) train it with its reply, in one sample."""
    fam, tokenizer, chat = family
    for sample in chat.samples(THINK, TrainOn.ASSISTANT):
        trained = runs(tokenizer, sample)
        assert all(run.endswith((fam.turn_end, fam.last_end)) for run in trained)
        assert all(run.startswith("<think>") or run.startswith("Hello!") for run in trained), trained


# ------------------------------------------------------------------ properties over every template

POOL = ["Yes.", "assistant", "user", "model", "system", "Assistant:", "### Response:", SCHOOL, f"Example: {SCHOOL}",
        "héllo wörld ✓ 你好 🦙", "  padded reply  ", "Yes. Yes.", "\nnew lines\n", "[INST]", "The", "a"]


@st.composite
def colliding_conversations(draw):
    """Contents drawn from a small pool and from each other: equal turns, the system prompt
    repeated, role names and header words, unicode, surrounding whitespace."""
    seen: list[str] = []

    def content():
        text = draw(st.sampled_from(seen) if seen and draw(st.booleans()) else st.sampled_from(POOL))
        seen.append(text)
        return text

    turns = [{"role": "system", "content": content()}] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(1, 3))):
        turns += [{"role": "user", "content": content()}, {"role": "assistant", "content": content()}]
    return turns


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(conversation=colliding_conversations())
def test_any_conversation_trains_exactly_each_reply_and_its_end(family, conversation):
    fam, tokenizer, chat = family
    # As the pipeline hands them over: contents stripped (formats.to_messages), roles checked.
    messages = validate_conversation(usable(fam, [{**m, "content": m["content"].strip()} for m in conversation]))
    assert runs(tokenizer, chat.render(messages)) == expected(fam, messages)


def test_a_stale_cached_layout_is_built_again_before_a_row_is_rejected(tiny_model, tmp_path):
    """Templates that render today's date (Llama 3.1/3.2, Granite, gpt-oss) change their markup at
    midnight: a layout cached the day before must not reject the rows after it."""
    from dataclasses import replace

    from jobs.prepare.skeleton import shape

    llama = next(f for f in FAMILIES if f.name == "llama3.2")
    chat = build_template(TemplateName.TOKENIZER, real_tokenizer(llama, tiny_model, tmp_path))
    messages = COLLIDING["every content the same"]
    fresh = chat.layout(shape(messages))
    stale = replace(fresh, segments=(fresh.segments[0].replace("Today Date: ", "Today Date: 0"), *fresh.segments[1:]))
    assert stale != fresh
    chat._layouts[shape(messages)] = stale
    assert runs(chat.tokenizer, chat.render(messages)) == expected(llama, messages)
    assert chat._layouts[shape(messages)] == fresh
