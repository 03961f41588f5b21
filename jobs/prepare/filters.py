"""Pure: quality filters and the de-duplication key of a normalised conversation."""

from __future__ import annotations

import hashlib
import re

from jobs.prepare.formats import Message, RowReject
from jobs.prepare.spec import Filters

URL_RE = re.compile(r"https?://|www\.[a-z0-9-]+\.[a-z]", re.IGNORECASE)
CODE_FENCE = "```"


def _chars(messages: list[Message], roles: set[str]) -> int:
    return sum(len(m["content"]) for m in messages if m["role"] in roles)


def apply_filters(messages: list[Message], filters: Filters) -> None:
    """Raise `RowReject` named after the first filter the conversation fails."""
    prompt = _chars(messages, {"system", "user"})
    response = _chars(messages, {"assistant", "text"})
    if prompt < filters.min_prompt_chars and messages[0]["role"] != "text":
        raise RowReject("prompt_too_short", f"{prompt} < {filters.min_prompt_chars} chars")
    if filters.max_prompt_chars is not None and prompt > filters.max_prompt_chars:
        raise RowReject("prompt_too_long", f"{prompt} > {filters.max_prompt_chars} chars")
    if response < filters.min_response_chars:
        raise RowReject("response_too_short", f"{response} < {filters.min_response_chars} chars")
    if filters.max_response_chars is not None and response > filters.max_response_chars:
        raise RowReject("response_too_long", f"{response} > {filters.max_response_chars} chars")
    if filters.drop_urls and any(URL_RE.search(m["content"]) for m in messages):
        raise RowReject("contains_url")
    if filters.drop_code_blocks and any(CODE_FENCE in m["content"] for m in messages):
        raise RowReject("contains_code_block")


def conversation_key(messages: list[Message]) -> str:
    """Hash of the conversation with case and whitespace folded: equal keys are duplicates."""
    h = hashlib.blake2b(digest_size=16)
    for m in messages:
        h.update(m["role"].encode())
        h.update(b"\x1f")
        h.update(" ".join(m["content"].split()).lower().encode())  # split(): faster than a regex sub
        h.update(b"\x1e")
    return h.hexdigest()


def unit_interval(*parts: object) -> float:
    """A deterministic number in [0, 1) from the parts (used for the split and for sampling)."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64
