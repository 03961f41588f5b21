import pytest

from jobs.prepare.filters import apply_filters, conversation_key
from jobs.prepare.formats import RowReject, detect_format, to_messages
from jobs.prepare.spec import FieldMap, Filters, SourceFormat

F = SourceFormat


def msgs(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


def test_alpaca_with_input_and_system():
    rec = {"instruction": "Summarise.", "input": "Long text.", "output": "Short.", "system": "Be terse."}
    assert to_messages(rec, F.ALPACA, FieldMap()) == msgs(
        ("system", "Be terse."), ("user", "Summarise.\n\nLong text."), ("assistant", "Short."))


def test_sharegpt_roles_are_mapped():
    rec = {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Hi"},
                             {"from": "gpt", "value": "Hello"}, {"from": "human", "value": "Bye"},
                             {"from": "gpt", "value": "Bye!"}]}
    assert [m["role"] for m in to_messages(rec, F.SHAREGPT, FieldMap())] == [
        "system", "user", "assistant", "user", "assistant"]


def test_messages_qa_prompt_response_text_and_renames():
    assert to_messages({"messages": msgs(("user", " q "), ("assistant", "a"))}, F.MESSAGES, FieldMap()) == msgs(
        ("user", "q"), ("assistant", "a"))
    assert to_messages({"question": "q", "answer": "a", "source": "x"}, F.QA, FieldMap()) == msgs(
        ("user", "q"), ("assistant", "a"))
    fields = FieldMap(prompt="query", response="reply")
    assert to_messages({"query": "q", "reply": "a"}, F.PROMPT_RESPONSE, fields) == msgs(("user", "q"), ("assistant", "a"))
    assert to_messages({"body": "doc"}, F.TEXT, FieldMap(text="body")) == [{"role": "text", "content": "doc"}]
    assert to_messages({"input": "q", "output": "a", "system": "s"}, F.AUTO, FieldMap()) == msgs(
        ("system", "s"), ("user", "q"), ("assistant", "a"))
    renamed = FieldMap(prompt="task", response="solution")
    assert to_messages({"task": "t", "input": "", "solution": "s"}, F.ALPACA, renamed)[-1]["content"] == "s"


@pytest.mark.parametrize("record, fmt", [
    ({"conversations": [{"from": "human", "value": "x"}]}, F.SHAREGPT),
    ({"messages": []}, F.MESSAGES),
    ({"instruction": "i", "output": "o"}, F.ALPACA),
    ({"question": "q", "answer": "a"}, F.QA),
    ({"instruction": "i", "input": "x", "output": "o"}, F.ALPACA),  # alpaca rows have input and output too
    ({"input": "x", "output": "o"}, F.INPUT_OUTPUT),
    ({"text": "t"}, F.TEXT),
])
def test_auto_detection(record, fmt):
    assert detect_format(record, FieldMap()) is fmt


@pytest.mark.parametrize("record, fmt, reason", [
    ({"instruction": "i"}, F.ALPACA, "missing_field"),
    ({"instruction": 3, "output": "o"}, F.ALPACA, "wrong_type"),
    ({"instruction": "i", "output": "   "}, F.ALPACA, "empty_message"),
    ({"messages": "hello"}, F.MESSAGES, "wrong_type"),
    ({"messages": msgs(("assistant", "a"), ("user", "u"))}, F.MESSAGES, "bad_role_order"),
    ({"messages": msgs(("user", "u"), ("user", "u2"), ("assistant", "a"))}, F.MESSAGES, "bad_role_order"),
    ({"messages": msgs(("user", "u"))}, F.MESSAGES, "bad_role_order"),
    ({"messages": msgs(("user", "u"), ("robot", "a"))}, F.MESSAGES, "unknown_role"),
    ({"messages": [{"role": "user"}]}, F.MESSAGES, "missing_field"),
    ({"conversations": [{"from": "human", "value": ["x"]}]}, F.SHAREGPT, "wrong_type"),
    ({"foo": "bar"}, F.AUTO, "unknown_format"),
    ({"text": ""}, F.TEXT, "empty_message"),
])
def test_rejects_carry_a_reason(record, fmt, reason):
    with pytest.raises(RowReject) as info:
        to_messages(record, fmt, FieldMap())
    assert info.value.reason == reason


def test_filters_name_the_failing_filter():
    conv = msgs(("user", "Read www.example.com please"), ("assistant", "```py\nprint(1)\n```"))
    apply_filters(conv, Filters())
    for filters, reason in [
        (Filters(min_prompt_chars=100), "prompt_too_short"),
        (Filters(max_prompt_chars=5), "prompt_too_long"),
        (Filters(min_response_chars=100), "response_too_short"),
        (Filters(max_response_chars=5), "response_too_long"),
        (Filters(drop_urls=True), "contains_url"),
        (Filters(drop_code_blocks=True), "contains_code_block"),
    ]:
        with pytest.raises(RowReject) as info:
            apply_filters(conv, filters)
        assert info.value.reason == reason


def test_dedup_key_folds_case_and_whitespace_only():
    a = msgs(("user", "Hello   World"), ("assistant", "Hi"))
    b = msgs(("user", "hello world"), ("assistant", "hi "))
    c = msgs(("user", "hello world"), ("assistant", "hi!"))
    assert conversation_key(a) == conversation_key(b) != conversation_key(c)
