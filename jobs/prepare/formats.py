"""Pure: turn one record of any supported format into a list of chat messages.

The output is always ``[{"role": "system"|"user"|"assistant", "content": str}, ...]`` with an
optional leading system message, then user/assistant alternating, ending on assistant; or, for
the `text` format, a single ``{"role": "text"}`` message trained on every token. A record that
cannot be normalised raises `RowReject` with a machine-readable reason and a human detail.
"""

from __future__ import annotations

from typing import Any

from jobs.prepare.spec import FieldMap, SourceFormat

Message = dict[str, str]

SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
}
MESSAGE_ROLES = {"system", "user", "assistant"}

# Default keys per format; `FieldMap` entries override them.
DEFAULT_KEYS: dict[SourceFormat, dict[str, str]] = {
    SourceFormat.ALPACA: {"prompt": "instruction", "input": "input", "response": "output", "system": "system"},
    SourceFormat.QA: {"prompt": "question", "response": "answer", "system": "system"},
    SourceFormat.INPUT_OUTPUT: {"prompt": "input", "response": "output", "system": "system"},
    SourceFormat.PROMPT_RESPONSE: {"system": "system"},
    SourceFormat.SHAREGPT: {"messages": "conversations", "system": "system"},
    SourceFormat.MESSAGES: {"messages": "messages"},
    SourceFormat.TEXT: {"text": "text"},
}


class RowReject(Exception):
    """A row that cannot be used, with the reason it is reported under."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def _keys(fmt: SourceFormat, fields: FieldMap) -> dict[str, str]:
    keys = dict(DEFAULT_KEYS[fmt])
    keys.update({k: v for k, v in fields.model_dump().items() if v})
    return keys


def detect_format(record: dict[str, Any], fields: FieldMap) -> SourceFormat:
    """Guess the format of one record from its keys (renamed keys count as their canonical names)."""
    if fields.messages and fields.messages in record:
        value = record[fields.messages]
        first = value[0] if isinstance(value, list) and value else {}
        return SourceFormat.SHAREGPT if isinstance(first, dict) and "from" in first else SourceFormat.MESSAGES
    if fields.prompt and fields.response and fields.prompt in record:
        return SourceFormat.PROMPT_RESPONSE
    if "conversations" in record:
        return SourceFormat.SHAREGPT
    if "messages" in record:
        return SourceFormat.MESSAGES
    if "instruction" in record and "output" in record:
        return SourceFormat.ALPACA
    if "question" in record and "answer" in record:
        return SourceFormat.QA
    if "input" in record and "output" in record:  # after alpaca, whose rows have both as well
        return SourceFormat.INPUT_OUTPUT
    if "text" in record:
        return SourceFormat.TEXT
    raise RowReject("unknown_format", f"cannot tell the format from keys {sorted(record)[:8]}")


def _text(record: dict[str, Any], key: str, *, required: bool) -> str:
    if key not in record or record[key] is None:
        if required:
            raise RowReject("missing_field", f"no {key!r}")
        return ""
    value = record[key]
    if not isinstance(value, str):
        raise RowReject("wrong_type", f"{key!r} is {type(value).__name__}, expected string")
    return value.strip()


def _single_turn(record: dict[str, Any], keys: dict[str, str]) -> list[Message]:
    for key in ("prompt", "response"):
        if key not in keys:
            raise RowReject("missing_field", f"no key configured for {key!r}; set fields.{key}")
    prompt = _text(record, keys["prompt"], required=True)
    extra = _text(record, keys["input"], required=False) if "input" in keys else ""
    response = _text(record, keys["response"], required=True)
    system = _text(record, keys["system"], required=False)
    user = f"{prompt}\n\n{extra}" if extra else prompt
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": user}, {"role": "assistant", "content": response}]


def _turns(record: dict[str, Any], keys: dict[str, str], sharegpt: bool) -> list[Message]:
    key = keys["messages"]
    turns = record.get(key)
    if turns is None:
        raise RowReject("missing_field", f"no {key!r}")
    if not isinstance(turns, list):
        raise RowReject("wrong_type", f"{key!r} is {type(turns).__name__}, expected list")
    role_key, content_key = ("from", "value") if sharegpt else ("role", "content")
    messages = []
    system = _text(record, keys["system"], required=False) if "system" in keys else ""
    if system:
        messages.append({"role": "system", "content": system})
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RowReject("wrong_type", f"turn {i} is {type(turn).__name__}, expected object")
        role = turn.get(role_key)
        if not isinstance(role, str):
            raise RowReject("missing_field" if role is None else "wrong_type", f"turn {i} has no string {role_key!r}")
        role = SHAREGPT_ROLES.get(role.lower()) if sharegpt else role.lower()
        if role not in MESSAGE_ROLES:
            raise RowReject("unknown_role", f"turn {i} role {turn.get(role_key)!r}")
        content = turn.get(content_key)
        if content is None:
            raise RowReject("missing_field", f"turn {i} has no {content_key!r}")
        if not isinstance(content, str):
            raise RowReject("wrong_type", f"turn {i} {content_key!r} is {type(content).__name__}")
        messages.append({"role": role, "content": content.strip()})
    return messages


def validate_conversation(messages: list[Message]) -> list[Message]:
    """Check role order and emptiness; return the messages unchanged when they are usable."""
    if not messages:
        raise RowReject("empty_conversation", "no turns")
    body = messages[1:] if messages[0]["role"] == "system" else messages
    for i, m in enumerate(messages):
        if not m["content"]:
            raise RowReject("empty_message", f"turn {i} ({m['role']}) is empty")
    if not body:
        raise RowReject("bad_role_order", "only a system message")
    for i, m in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise RowReject("bad_role_order", f"turn {i} is {m['role']}, expected {expected}")
    if body[-1]["role"] != "assistant":
        raise RowReject("bad_role_order", "conversation does not end with an assistant turn")
    return messages


def to_messages(record: dict[str, Any], fmt: SourceFormat, fields: FieldMap) -> list[Message]:
    """Normalise one record; raises `RowReject` when it cannot be used."""
    if fmt is SourceFormat.AUTO:
        fmt = detect_format(record, fields)
    keys = _keys(fmt, fields)
    if fmt is SourceFormat.TEXT:
        text = _text(record, keys["text"], required=True)
        if not text:
            raise RowReject("empty_message", "text is empty")
        return [{"role": "text", "content": text}]
    if fmt in (SourceFormat.SHAREGPT, SourceFormat.MESSAGES):
        messages = _turns(record, keys, sharegpt=fmt is SourceFormat.SHAREGPT)
    else:
        messages = _single_turn(record, keys)
    return validate_conversation(messages)
