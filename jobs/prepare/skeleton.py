"""Pure: where a Jinja chat template puts each message, found by rendering markers, never by searching.

Searching a render for a reply's text goes wrong whenever that text also occurs earlier: in the
system prompt (few-shot prompts quote the user), in another turn, or in the template's own markup
(a reply that reads `assistant`). So each conversation shape is rendered once with a unique
*sentinel* in place of every content: what the template writes around them is its markup alone
(the `Layout`). A real render is then read against that markup piece by piece (`locate`), which
gives every content's exact place, or fails and the row is rejected with the turn that could not be
placed. Layouts depend only on the roles (and on which replies carry reasoning), so they are
cached: a row costs one template render plus a linear walk over its text.

What is trained after a reply is read from the markup too (`terminator`): the special tokens the
template writes right after it and before the next turn opens, which may be several tokens
(`<|END_RESPONSE|><|END_OF_TURN_TOKEN|>`), may differ for the last reply (`<|end|>` then
`<|return|>`), or may be nothing (the caller then inserts the model's eos).

Reasoning (`<think>…</think>` at the start of a reply) becomes a piece of its own, so a layout also
tells which turns' reasoning the template keeps and which it drops.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from jobs.prepare.formats import Message, RowReject

Span = tuple[int, int]
REASONING = re.compile(r"\s*<think>(.*?)</think>(.*)", re.DOTALL)
SENTINEL = re.compile("\ue000(\\d+)\ue001")  # private-use characters: no template writes them
THINK_OPEN = "<think>"
REASONING_PART, REPLY_PART = 0, 1


def split_reasoning(content: str) -> tuple[str, str] | None:
    """(reasoning, reply) of a reply that opens with a `<think>` block; None for any other."""
    match = REASONING.fullmatch(content)
    return (match.group(1), match.group(2)) if match else None


def piece_id(message: int, part: int) -> int:
    return 2 * message + part


def sentinel(piece: int) -> str:
    return f"\ue000{piece}\ue001"


def shape(messages: Sequence[Message]) -> tuple[tuple[str, bool], ...]:
    """What a layout depends on: each message's role, and whether it is a reply with reasoning."""
    return tuple((m["role"], m["role"] == "assistant" and split_reasoning(m["content"]) is not None)
                 for m in messages)


def sentinel_messages(key: tuple[tuple[str, bool], ...]) -> list[Message]:
    out = []
    for k, (role, reasoning) in enumerate(key):
        content = sentinel(piece_id(k, REPLY_PART))
        if reasoning:
            content = f"{THINK_OPEN}{sentinel(piece_id(k, REASONING_PART))}</think>{content}"
        out.append({"role": role, "content": content})
    return out


def piece_texts(messages: Sequence[Message]) -> dict[int, str]:
    """The text of every piece of a conversation, by piece id."""
    texts = {}
    for k, m in enumerate(messages):
        parts = split_reasoning(m["content"]) if m["role"] == "assistant" else None
        if parts:
            texts[piece_id(k, REASONING_PART)], texts[piece_id(k, REPLY_PART)] = parts
        else:
            texts[piece_id(k, REPLY_PART)] = m["content"]
    return texts


@dataclass(frozen=True, slots=True)
class Reply:
    """One assistant message in a layout: what of it carries loss."""

    message: int
    first: int  # index in `Layout.pieces` where training starts: the reasoning when rendered, else the reply
    lead: int  # characters of markup right before `first` that are trained too (`<think>`, a generation block)
    last: int  # index in `Layout.pieces` of the reply itself
    terminator: str  # markup after the reply that is trained (whitespace, then special tokens); "" when none
    reasoning_dropped: bool  # the message has reasoning the template does not render


@dataclass(frozen=True, slots=True)
class Layout:
    """A template's markup for one conversation shape: `segments[i]` precedes `pieces[i]`."""

    segments: tuple[str, ...]  # len(pieces) + 1
    pieces: tuple[int, ...]  # piece ids in render order (a message may appear anywhere, or twice, or never)
    replies: tuple[Reply, ...]  # one per assistant message, in order

    @property
    def tail(self) -> str:
        return self.segments[-1]


class SpecialRun:
    """Splits the special tokens a text starts with, longest token first."""

    def __init__(self, specials: Sequence[str]):
        tokens = sorted({t for t in specials if t}, key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, tokens))) if tokens else None

    def __call__(self, text: str) -> list[str]:
        run, at = [], 0
        while self._pattern and (match := self._pattern.match(text, at)):
            run.append(match.group())
            at = match.end()
        return run


def terminator(after: str, last_tail: str | None, specials: SpecialRun) -> str:
    """What ends a reply, from the markup `after` it: leading whitespace and the special tokens
    that follow back to back. For a reply that is not the last (`last_tail` is the markup after
    the same reply when it ends the conversation), only the tokens the two agree on: the rest open
    the next turn (`<|start_header_id|>`). When they agree on none (`<|end|>` then `<|return|>`;
    nothing at the end but `<|user|>` next), the first token is the end of this turn."""
    body = after.lstrip()
    run = specials(body)
    if last_tail is not None:
        ends_last = specials(last_tail.lstrip())
        common = []
        for mine, theirs in zip(run, ends_last, strict=False):
            if mine != theirs:
                break
            common.append(mine)
        run = common or run[:1]
    return after[:len(after) - len(body)] + "".join(run) if run else ""


def build_layout(key: tuple[tuple[str, bool], ...], render: Callable[[list[Message]], tuple[str, list[Span] | None]],
                 last_tail: Callable[[tuple[tuple[str, bool], ...]], str], specials: SpecialRun) -> Layout:
    """The layout of one conversation shape. `render` renders messages (text, generation spans or
    None); `last_tail(prefix_key)` is the markup after the final reply of a shorter shape."""
    text, marked = render(sentinel_messages(key))
    segments, pieces, starts, at = [], [], [], 0
    for match in SENTINEL.finditer(text):
        segments.append(text[at:match.start()])
        pieces.append(int(match.group(1)))
        starts.append(match.start())
        at = match.end()
    segments.append(text[at:])
    replies = []
    assistants = [k for k, (role, _) in enumerate(key) if role == "assistant"]
    for k in assistants:
        reply = _sole_place(pieces, piece_id(k, REPLY_PART), k)
        reasoning = [i for i, p in enumerate(pieces) if p == piece_id(k, REASONING_PART)]
        if len(reasoning) > 1 or (reasoning and not (reasoning[0] < reply
                                                      and all(p // 2 == k for p in pieces[reasoning[0]:reply + 1]))):
            raise RowReject("template_error", f"turn {k} (assistant): its reasoning is rendered apart from its reply")
        first = reasoning[0] if reasoning else reply
        lead = 0
        if marked and (block := next((b for b in marked if b[0] <= starts[first] < b[1]), None)):
            lead = min(starts[first] - block[0], len(segments[first]))
        if reasoning and (opened := segments[first].rfind(THINK_OPEN)) >= 0:
            lead = max(lead, len(segments[first]) - opened)
        is_last = k == len(key) - 1
        ends = terminator(segments[reply + 1], None if is_last else last_tail(key[:k + 1]), specials)
        replies.append(Reply(k, first, lead, reply, ends, key[k][1] and not reasoning))
    return Layout(tuple(segments), tuple(pieces), tuple(replies))


def _sole_place(pieces: list[int], piece: int, message: int) -> int:
    places = [i for i, p in enumerate(pieces) if p == piece]
    if len(places) != 1:
        raise RowReject("template_error", f"turn {message} (assistant) is rendered {len(places)} times by the "
                        "template, not once: its loss cannot be placed")
    return places[0]


def variants(text: str) -> list[str]:
    """How templates may write a content: as given, or trimmed (`| trim`, `.strip('\\n')`)."""
    return list(dict.fromkeys((text, text.strip(), text.strip("\n"), text.lstrip(), text.rstrip(),
                               text.lstrip("\n"), text.rstrip("\n"))))


def locate(text: str, layout: Layout, texts: dict[int, str]) -> list[Span]:
    """Where each piece of `layout` lies in `text`, a render of the conversation whose pieces are
    `texts`: the markup must match exactly and each piece be one of its `variants`. Backtracks over
    variants, so a trimmed piece cannot be mistaken for an untrimmed one."""
    n = len(layout.pieces)
    spans: list[Span] = []
    choices = [0] * n  # the variant tried at each piece
    # A piece's variants, worked out only when it is not rendered as given (rare).
    options_of: list[list[str] | None] = [None] * n
    deepest, i, at = 0, 0, 0
    while True:
        segment = layout.segments[i]
        ok = text.startswith(segment, at)
        if ok and i == n:
            if at + len(segment) == len(text):
                return spans
            ok = False
        if ok:
            start = at + len(segment)
            piece = texts[layout.pieces[i]]
            if choices[i] == 0 and text.startswith(piece, start):
                options = [piece]  # as given, the first variant
            else:
                options = options_of[i] = options_of[i] or variants(piece)
                while choices[i] < len(options) and not text.startswith(options[choices[i]], start):
                    choices[i] += 1
            ok = choices[i] < len(options)
        if ok:
            spans.append((start, start + len(options[choices[i]])))
            i, at = i + 1, spans[-1][1]
            deepest = max(deepest, i)
            continue
        # Backtrack: the previous piece's next variant.
        if i < n:
            choices[i] = 0
        if not spans:
            message = layout.pieces[min(deepest, n - 1)] // 2 if n else 0
            raise RowReject("template_error", f"turn {message} is not rendered verbatim by the template "
                            "(it rewrites that content): its loss cannot be placed exactly")
        i -= 1
        start, _ = spans.pop()
        at = start - len(layout.segments[i])
        choices[i] += 1
