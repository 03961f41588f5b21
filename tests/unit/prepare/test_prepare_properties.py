"""Hostile input, property-based: no input crashes the data functions, and
every row is either output or rejected with a reason."""

from __future__ import annotations

import contextlib
import json
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jobs.prepare.formats import MESSAGE_ROLES, RowReject, to_messages
from jobs.prepare.labels import Tokenized
from jobs.prepare.records import FILE_TYPES
from jobs.prepare.spec import DatasetSpec, FieldMap, SourceFormat, TemplateName
from jobs.prepare.stages import OK, RenderTokenize, parse_file, row_order
from jobs.prepare.templates import BuiltinTemplate, build_template

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
KEYS = ["instruction", "input", "output", "system", "question", "answer", "conversations", "messages", "text",
        "from", "value", "role", "content", "prompt", "response"]
# Text meant to break things: template markers, Jinja, format braces, control and odd unicode.
NASTY = st.sampled_from(["<|im_end|>", "<|im_start|>assistant\n", "{content}", "{{ x }}", "{% raw %}", "\x00",
                         "\ud7ff", "### Response:", "\r\n", " ", "", "🦙", "\u202e", "[/INST]"])
TEXT = st.one_of(st.text(max_size=40), NASTY, st.lists(NASTY, max_size=4).map("".join))
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | TEXT,
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(KEYS) | TEXT, inner, max_size=4),
                    max_leaves=12)
TURN = st.fixed_dictionaries({}, optional={"from": st.sampled_from(["human", "gpt", "system", "tool"]) | TEXT,
                                           "value": JSON, "role": st.sampled_from(sorted(MESSAGE_ROLES)) | TEXT,
                                           "content": JSON})
RECORD = st.dictionaries(st.sampled_from(KEYS), JSON | st.lists(TURN, max_size=5), max_size=6)
CONTENT = TEXT.map(str.strip).filter(bool)
REASON = re.compile(r"^[a-z][a-z0-9_]*$")  # machine-readable, as the rejects file reports it


@st.composite
def conversations(draw) -> list[dict[str, str]]:
    turns = [{"role": "system", "content": draw(CONTENT)}] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(1, 3))):
        turns += [{"role": "user", "content": draw(CONTENT)}, {"role": "assistant", "content": draw(CONTENT)}]
    return turns


@SETTINGS
@given(record=RECORD, fmt=st.sampled_from(list(SourceFormat)))
def test_any_record_normalises_or_is_rejected_with_a_reason(record, fmt):
    try:
        fields = FieldMap(prompt="prompt", response="response") if fmt is SourceFormat.PROMPT_RESPONSE else FieldMap()
        messages = to_messages(record, fmt, fields)
    except RowReject as reject:
        assert REASON.match(reject.reason)
        return
    assert messages and all(isinstance(m["content"], str) and m["content"] for m in messages)
    if messages[0]["role"] == "text":
        assert len(messages) == 1
        return
    body = messages[1:] if messages[0]["role"] == "system" else messages
    assert [m["role"] for m in body] == ["user", "assistant"] * (len(body) // 2) and len(body) % 2 == 0


def file_bytes(kind: str, records: list, junk: bytes) -> bytes:
    if kind == "jsonl":
        return b"\n".join(json.dumps(r).encode() for r in records) + junk
    if kind == "json":
        return json.dumps(records).encode() + junk
    if kind == "csv":
        return ("question,answer\n" + "".join(f"{json.dumps(r)},x\n" for r in records)).encode() + junk
    return junk  # parquet: arbitrary bytes are a broken file


@SETTINGS
@given(records=st.lists(RECORD | JSON, max_size=6), junk=st.binary(max_size=30), suffix=st.sampled_from(sorted(FILE_TYPES)),
       fmt=st.sampled_from(list(SourceFormat)))
def test_every_row_of_any_file_is_output_or_rejected(records, junk, suffix, fmt):
    fields = {"prompt": "question", "response": "answer"} if fmt is SourceFormat.PROMPT_RESPONSE else {}
    spec = DatasetSpec.model_validate({"name": "p", "sources": [{"uri": f"x{suffix}", "format": fmt.value,
                                                                 "fields": fields}],
                                       "tokenizer": "t", "output": "o"})
    rows = parse_file(f"x{suffix}", file_bytes(FILE_TYPES[suffix], records, junk), 3, 0, spec.sources[0], spec)
    for row in rows:
        if row["reason"] == OK:
            assert row["messages"] and row["key"]
        else:
            assert row["messages"] is None and REASON.match(row["reason"])
    assert len({row["line"] for row in rows}) == len(rows) or FILE_TYPES[suffix] == "json"
    # Rows keep their file order in `order`, whatever their line numbers: the global steps sort by it.
    assert [row["order"] for row in rows] == [row_order(3, i) for i in range(len(rows))]
    # Tasks sharing a file (`part`) read every row once between them, each row as the whole file's.
    parts = [parse_file(f"x{suffix}", file_bytes(FILE_TYPES[suffix], records, junk), 3, 0, spec.sources[0], spec, (k, 3))
             for k in range(3)]
    assert sorted((row for part in parts for row in part), key=lambda row: row["order"]) == rows


@pytest.mark.parametrize("name", [t for t in TemplateName if t is not TemplateName.TOKENIZER])
@SETTINGS
@given(conversation=conversations())
def test_builtin_templates_train_exactly_each_reply_and_serve_the_same_text(tokenizer, name, conversation):
    template = build_template(name, tokenizer)
    assert isinstance(template, BuiltinTemplate)
    rendered = template.render(conversation)
    replies = [m["content"] for m in conversation if m["role"] == "assistant"]
    assert [rendered.text[a:b] for a, b in rendered.spans] == [r + template.eot for r in replies]
    assert all(b1 <= a2 for (_, b1), (a2, _) in zip(rendered.spans, rendered.spans[1:], strict=False))
    served = tokenizer.apply_chat_template(conversation, chat_template=template.chat_template(), tokenize=False)
    assert served == rendered.text


@pytest.mark.parametrize("template", [TemplateName.TOKENIZER, TemplateName.CHATML,
                                      "{% for m in messages %}<|im_start|>{{ m['role'] }}: {{ m['content'] }}<|im_end|>"
                                      "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant: {% endif %}"])
@SETTINGS
@given(records=st.lists(conversations().map(lambda c: {"messages": c}) | RECORD, min_size=1, max_size=4))
def test_normalised_rows_render_and_tokenize_or_are_rejected(tokenizer, template, records):
    """What the job does to each row after parsing: normalise, render, tokenize."""
    spec = DatasetSpec.model_validate({"name": "p", "sources": [{"uri": "x.jsonl"}], "tokenizer": "t", "output": "o",
                                       "template": template, "eot_token": None if isinstance(template, TemplateName) else "<|im_end|>",
                                       "max_seq_length": 64})
    normalised = []
    for record in records:
        with contextlib.suppress(RowReject):  # rejected rows never reach the template
            normalised.append(to_messages(record, SourceFormat.AUTO, FieldMap()))
    results = RenderTokenize(spec, tokenizer)(normalised)
    assert len(results) == len(normalised)
    for result in results:
        assert isinstance(result, list) or REASON.match(result.reason)
        if isinstance(result, list):
            assert result and all(isinstance(sample, Tokenized) for sample in result)
            assert all(len(sample.input_ids) == len(sample.labels) <= 64 for sample in result)
