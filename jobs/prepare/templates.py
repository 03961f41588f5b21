"""Pure: render messages with a chat template and locate the characters that carry loss.

A rendering is the conversation text plus one character span per assistant turn, covering the
reply and what ends its turn (trained, so the model learns to stop) but no system/user text.
Masks are later derived from these spans and the tokenizer's offsets over the *whole* text, so a
token merge across a role boundary cannot shift them.

Built-in templates are laid out in Python, where spans are known exactly. Jinja templates (the
tokenizer's own or a custom string) are rendered by transformers, and `skeleton` places every
content by rendering the same conversation shape with sentinels: a reply is never searched for,
so one equal to the system prompt, to another turn or to the template's markup is still placed
exactly. Templates that fold the system prompt into a later turn (Mistral), trim contents
(Llama 3), add a default system prompt (SmolLM2, Qwen2.5) or end turns differently (gpt-oss's
`<|end|>` and `<|return|>`) mask exactly; a `{% generation %}` block may start a reply's span
earlier, never end it later than its end of turn.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Protocol

from jobs.prepare.formats import Message, RowReject
from jobs.prepare.skeleton import Layout, SpecialRun, build_layout, locate, piece_texts, shape
from jobs.prepare.spec import Reasoning, TemplateName, TrainOn

Span = tuple[int, int]

# What a template is tried on before any row: no system turn, since some templates refuse one
# (Gemma), and rows with one are then rejected one by one with the template's own message.
PROBE_CONVERSATION: list[Message] = [
    {"role": "user", "content": "Name a primary colour."},
    {"role": "assistant", "content": "Red is a primary colour."},
    {"role": "user", "content": "And another one?"},
    {"role": "assistant", "content": "Blue."},
]


@dataclass(frozen=True, slots=True)
class Rendered:
    text: str
    spans: list[Span]  # one per assistant turn, in order


class ChatTemplate(Protocol):
    eot: str  # what ends a reply another turn follows
    eot_last: str  # what ends the final reply
    eot_source: str  # `template` (its layout, or read from its render), `spec` (eot_token), `eos` (inserted)

    def render(self, messages: list[Message]) -> Rendered: ...

    def samples(self, messages: list[Message], train_on: TrainOn) -> list[Rendered]:
        """What a conversation trains: itself, or several samples (`JinjaTemplate.samples`); spans are
        then chosen by `select_spans`."""

    def stop_tokens(self) -> list[str]:
        """Every token that ends a reply: where generation stops."""

    def chat_template(self) -> str | None:
        """The Jinja chat template to serve a model trained on these renders with; None: the
        tokenizer's own."""


@dataclass(frozen=True)
class TurnLayout:
    """A built-in template: how each role is laid out. `{eos}` is the tokenizer's eos token."""

    system: str
    user: str
    assistant_prefix: str  # the generation prompt: ends on a newline so a reply starts a new token
    eot: str
    after_eot: str  # not trained: the model stops at `eot`
    default_system: str = ""


LAYOUTS: dict[TemplateName, TurnLayout] = {
    TemplateName.CHATML: TurnLayout(
        system="<|im_start|>system\n{content}<|im_end|>\n",
        user="<|im_start|>user\n{content}<|im_end|>\n",
        assistant_prefix="<|im_start|>assistant\n",
        eot="<|im_end|>",
        after_eot="\n",
    ),
    TemplateName.ALPACA: TurnLayout(
        system="{content}\n\n",
        user="### Instruction:\n{content}\n\n",
        assistant_prefix="### Response:\n",
        eot="{eos}",
        after_eot="\n\n",
        default_system="Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.",
    ),
    TemplateName.INSTRUCT: TurnLayout(
        system="[SYS]\n{content}\n[/SYS]\n",
        user="[INST]\n{content}\n[/INST]\n",
        assistant_prefix="",
        eot="{eos}",
        after_eot="\n",
    ),
    TemplateName.CHAT: TurnLayout(
        system="### System:\n{content}\n\n",
        user="### User:\n{content}\n\n",
        assistant_prefix="### Assistant:\n",
        eot="{eos}",
        after_eot="\n\n",
    ),
}


def _render_text(messages: list[Message], bos: str, eos: str) -> Rendered | None:
    """The `text` format: the document and an eos, every character trained."""
    if messages[0]["role"] != "text":
        return None
    text = bos + messages[0]["content"] + eos
    return Rendered(text, [(len(bos), len(text))])


@dataclass(frozen=True)
class BuiltinTemplate:
    layout: TurnLayout
    bos: str
    eos: str
    eot_source = "template"

    @property
    def eot(self) -> str:
        return self.layout.eot.format(eos=self.eos)

    @property
    def eot_last(self) -> str:
        return self.eot

    def stop_tokens(self) -> list[str]:
        return list(dict.fromkeys(t for t in (self.eot, self.eos) if t))

    def samples(self, messages: list[Message], train_on: TrainOn) -> list[Rendered]:
        return [self.render(messages)]

    def chat_template(self) -> str:
        """The same layout as a Jinja chat template, for serving the trained model (the exported
        tokenizer's `chat_template`): it renders exactly what `render` does."""
        layout = self.layout

        def lit(text: str) -> str:
            return "{{ " + json.dumps(text) + " }}"

        def role(name: str, layout_text: str) -> str:
            before, after = layout_text.split("{content}")
            return f"{{%- if message['role'] == '{name}' -%}}{lit(before)}{{{{ message['content'] }}}}{lit(after)}{{%- endif -%}}"

        default = ""
        if layout.default_system:
            default = (f"{{%- if messages[0]['role'] != 'system' -%}}"
                       f"{lit(layout.system.format(content=layout.default_system))}{{%- endif -%}}")
        assistant = (f"{{%- if message['role'] == 'assistant' -%}}{lit(layout.assistant_prefix)}"
                     f"{{{{ message['content'] }}}}{lit(self.eot + layout.after_eot)}{{%- endif -%}}")
        return (lit(self.bos) + default + "{%- for message in messages -%}" + role("system", layout.system)
                + role("user", layout.user) + assistant + "{%- endfor -%}"
                + f"{{%- if add_generation_prompt -%}}{lit(layout.assistant_prefix)}{{%- endif -%}}")

    def render(self, messages: list[Message]) -> Rendered:
        if (doc := _render_text(messages, self.bos, self.eos)) is not None:
            return doc
        layout, eot = self.layout, self.eot
        parts = [self.bos]
        length = len(self.bos)
        spans: list[Span] = []
        if messages[0]["role"] != "system" and layout.default_system:
            messages = [{"role": "system", "content": layout.default_system}, *messages]
        for m in messages:
            if m["role"] == "assistant":
                chunk = layout.assistant_prefix
                start = length + len(chunk)
                chunk += m["content"] + eot
                spans.append((start, length + len(chunk)))
                chunk += layout.after_eot
            else:
                chunk = getattr(layout, m["role"]).format(content=m["content"])
            parts.append(chunk)
            length += len(chunk)
        return Rendered("".join(parts), spans)


GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")
LAYOUT_CACHE = 4096  # conversation shapes kept per template: a few per dataset in practice


@dataclass(frozen=True)
class Terminators:
    """What a template renders after a reply, and what is inserted where it renders nothing."""

    turn: str  # after a reply another turn follows (stripped of whitespace)
    last: str  # after the final reply
    inserted: str  # trained after a reply the template ends with no special token: eot_token, else eos
    source: str  # `template`: both rendered; `spec`/`eos`: some reply gets `inserted`


@dataclass
class JinjaTemplate:
    """The tokenizer's own chat template, or a custom Jinja string, rendered by transformers.

    Each row is rendered once; its layout (`skeleton.build_layout`, cached per conversation shape)
    says where every content and every end of turn lies, so spans never come from a text search."""

    tokenizer: Any
    source: str | None  # None: the tokenizer's own chat_template
    inserted: str  # what ends a reply the template ends with no special token
    inserted_source: str  # `spec` (eot_token) or `eos`
    reasoning: Reasoning = Reasoning.KEEP
    _layouts: OrderedDict = field(default_factory=OrderedDict, repr=False)

    def chat_template(self) -> str | None:
        return self.source

    @cached_property
    def _source(self) -> tuple[str, bool]:
        """The template's text, and whether it marks replies with `{% generation %}`: once, not per row."""
        source = self.tokenizer.get_chat_template(self.source)
        return source, bool(GENERATION_BLOCK.search(source))

    @cached_property
    def _specials(self) -> SpecialRun:
        tokens = set(self.tokenizer.all_special_tokens)
        tokens |= {t.content for t in self.tokenizer.added_tokens_decoder.values() if t.special}
        return SpecialRun(sorted(tokens))

    def render_text(self, messages: list[Message]) -> tuple[str, list[Span] | None]:
        """The whole render, and the `{% generation %}` spans when the template marks replies."""
        from transformers.utils.chat_template_utils import render_jinja_template

        source, marked = self._source
        texts, indices = render_jinja_template(conversations=[messages], chat_template=source,
                                               return_assistant_tokens_mask=marked,
                                               **self.tokenizer.special_tokens_map)
        return texts[0], ([tuple(span) for span in indices[0]] if marked else None)

    def _checked_render(self, messages: list[Message]) -> tuple[str, list[Span] | None]:
        try:
            return self.render_text(messages)
        except Exception as e:  # a template's raise_exception() (no system role, say) or a Jinja error
            raise RowReject("template_error", str(e)[:300]) from e

    def layout(self, key: tuple[tuple[str, bool], ...]) -> Layout:
        """The layout of a conversation shape, built once (a template error is a reject, cached too)."""
        if (found := self._layouts.get(key)) is None:
            try:
                found = build_layout(key, self._checked_render, lambda k: self.layout(k).tail, self._specials)
            except RowReject as e:
                found = e
            self._layouts[key] = found
            if len(self._layouts) > LAYOUT_CACHE:
                self._layouts.popitem(last=False)
        if isinstance(found, RowReject):
            raise found
        return found

    @cached_property
    def terminators(self) -> Terminators:
        """What ends a reply in this template, read from the layout of the probe conversation."""
        layout = self.layout(shape(PROBE_CONVERSATION))
        turn, last = (reply.terminator.strip() for reply in (layout.replies[0], layout.replies[-1]))
        source = "template" if turn and last else self.inserted_source
        return Terminators(turn or self.inserted, last or self.inserted, self.inserted, source)

    @property
    def eot(self) -> str:
        return self.terminators.turn

    @property
    def eot_last(self) -> str:
        return self.terminators.last

    @property
    def eot_source(self) -> str:
        return self.terminators.source

    def stop_tokens(self) -> list[str]:
        t = self.terminators
        return list(dict.fromkeys(token for token in (*self._specials(t.turn), *self._specials(t.last), t.inserted)
                                  if token))

    def render(self, messages: list[Message]) -> Rendered:
        """The conversation as the template renders it, every reply placed (reasoning the template
        drops is not put back: see `samples`)."""
        if (doc := _render_text(messages, "", self.inserted)) is not None:
            return doc
        return self._placed(messages)[0]

    def _placed(self, messages: list[Message], rewrite: dict[int, str] | None = None) -> tuple[Rendered, Layout]:
        text, _ = self._checked_render(messages)
        key, texts = shape(messages), piece_texts(messages)
        cached = key in self._layouts
        try:
            layout = self.layout(key)
            return place_replies(text, layout, texts, self.inserted, rewrite), layout
        except RowReject:
            if not cached:
                raise
            # A layout cached earlier may be stale where the template renders the date
            # (`strftime_now`): build it again once before rejecting the row.
            del self._layouts[key]
            layout = self.layout(key)
            return place_replies(text, layout, texts, self.inserted, rewrite), layout

    def samples(self, messages: list[Message], train_on: TrainOn) -> list[Rendered]:
        """What one conversation trains, as samples: itself, and under `reasoning: keep` one more
        per reply whose reasoning the template drops (its earlier turns as context, rendered by the
        template, and the reply with its reasoning put back where the template drops it)."""
        if (doc := _render_text(messages, "", self.inserted)) is not None:
            return [doc]
        rendered, layout = self._placed(messages)
        replies = layout.replies
        if train_on is TrainOn.LAST_ASSISTANT:
            replies, rendered = replies[-1:], Rendered(rendered.text, rendered.spans[-1:])
        elif train_on is TrainOn.ALL:
            return [rendered]
        dropped = [r.message for r in replies if r.reasoning_dropped]
        if not dropped or self.reasoning is Reasoning.TEMPLATE:
            return [rendered]
        if self.reasoning is Reasoning.REJECT:
            raise RowReject("reasoning_dropped", f"turn {dropped[0]}: the template does not render this reply's "
                            "reasoning; set reasoning: keep to train it, or reasoning: template to train the reply alone")
        kept = [span for reply, span in zip(replies, rendered.spans, strict=True) if not reply.reasoning_dropped]
        own = [self._with_reasoning(messages[:k + 1]) for k in dropped]
        return ([Rendered(rendered.text, kept)] if kept else []) + own

    def _with_reasoning(self, messages: list[Message]) -> Rendered:
        """A conversation that trains its final reply alone, with its reasoning."""
        last = self.layout(shape(messages)).replies[-1]
        rendered, _ = self._placed(messages, {last.message: messages[-1]["content"]} if last.reasoning_dropped else None)
        return Rendered(rendered.text, rendered.spans[-1:])


def place_replies(text: str, layout: Layout, texts: dict[int, str], inserted: str,
                  rewrite: dict[int, str] | None = None) -> Rendered:
    """The trained span of every reply in `text`: `inserted` is added after each reply the
    template ends with no special token, and the replies of the messages in `rewrite` are
    replaced by the text given there."""
    places = locate(text, layout, texts)
    spans, parts, copied, shift = [], [], 0, 0
    for reply in layout.replies:
        start = places[reply.first][0] - reply.lead + shift
        reply_start, end = places[reply.last]
        if rewrite and reply.message in rewrite:
            parts.append(text[copied:reply_start] + rewrite[reply.message])
            copied = end
            shift += len(rewrite[reply.message]) - (end - reply_start)
        reply_end = end + shift
        if not reply.terminator:
            parts.append(text[copied:end] + inserted)
            copied = end
            shift += len(inserted)
        spans.append((start, reply_end + len(reply.terminator or inserted)))
    parts.append(text[copied:])
    return Rendered("".join(parts), spans)


def select_spans(rendered: Rendered, train_on: TrainOn) -> list[Span]:
    """The spans that carry loss under `train_on`."""
    if train_on is TrainOn.ALL:
        return [(0, len(rendered.text))]
    if train_on is TrainOn.LAST_ASSISTANT:
        return rendered.spans[-1:]
    return rendered.spans


def build_template(template: TemplateName | str, tokenizer: Any, eot_token: str | None = None,
                   reasoning: Reasoning = Reasoning.KEEP) -> ChatTemplate:
    """Build the template for a spec, or raise ValueError explaining what to change."""
    eos = tokenizer.eos_token or ""
    bos = tokenizer.bos_token if tokenizer.bos_token and tokenizer.bos_token != eos else ""
    if isinstance(template, TemplateName) and template is not TemplateName.TOKENIZER:
        if "{eos}" in LAYOUTS[template].eot and not eos:
            raise ValueError(f"template {template.value} ends replies with the tokenizer's eos_token, "
                             "but the tokenizer has none: set eos_token in tokenizer_config.json")
        chat: ChatTemplate = BuiltinTemplate(LAYOUTS[template], bos, eos)
        if eot_token and eot_token != chat.eot:
            raise ValueError(f"eot_token {eot_token!r} differs from template {template.value}'s {chat.eot!r}: "
                             "remove eot_token or use a custom template")
    else:
        if template is TemplateName.TOKENIZER and not getattr(tokenizer, "chat_template", None):
            raise ValueError("template 'tokenizer' but the tokenizer has no chat_template: "
                             "pick a built-in template (e.g. chatml) or pass a Jinja string")
        source = None if template is TemplateName.TOKENIZER else str(template)
        jinja = JinjaTemplate(tokenizer, source, eot_token or eos, "spec" if eot_token else "eos", reasoning)
        try:
            ends = jinja.terminators
        except RowReject as e:
            raise ValueError(f"the chat template cannot be used for masking: {e.detail}: "
                             "pick a built-in template, or pass a Jinja template that renders each message") from None
        if ends.source != "template" and not ends.inserted:
            raise ValueError("set eot_token: the template renders no special token after a reply, and the "
                             "tokenizer has no eos_token")
        if eot_token and ends.source == "template" and eot_token not in (ends.turn, ends.last):
            raise ValueError(f"eot_token {eot_token!r} is not what this template renders after a reply "
                             f"({ends.turn!r}): set eot_token: {ends.turn!r}, or remove it to use what the template renders")
        chat = jinja
    check_template(chat, tokenizer)
    return chat


def check_template(chat: ChatTemplate, tokenizer: Any) -> None:
    """Fail early, with the fix, when the template cannot give exact masks with this tokenizer."""
    for token in chat.stop_tokens():
        if len(ids := tokenizer.encode(token, add_special_tokens=False)) != 1:
            raise ValueError(f"end-of-turn {token!r} is {len(ids)} tokens in this tokenizer, not one: add it "
                             "as a special token, or pick a template whose end-of-turn the tokenizer has")
    try:
        rendered = chat.render(PROBE_CONVERSATION)
    except RowReject as e:
        raise ValueError(f"the chat template cannot be used for masking: {e.detail}: "
                         "pick a built-in template, or pass a Jinja template that renders each message") from None
    replies = [m["content"] for m in PROBE_CONVERSATION if m["role"] == "assistant"]
    for (start, end), reply in zip(rendered.spans, replies, strict=True):
        if not rendered.text[start:end].startswith(reply):
            raise ValueError(f"the chat template does not render the reply {reply!r} where expected")
