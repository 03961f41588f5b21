"""Pure: render messages with a chat template and locate the characters that carry loss.

A rendering is the conversation text plus one character span per assistant turn, covering the
reply and its end-of-turn token (trained, so the model learns to stop) but no system/user text.
Masks are later derived from these spans and the tokenizer's offsets over the *whole* text, so a
token merge across a role boundary cannot shift them.

Built-in templates are laid out in Python, where spans are known exactly. Jinja templates (the
tokenizer's own or a custom string) are rendered once per conversation by transformers; a
template with `{% generation %}` blocks says where each reply is, and for any other the replies
are found in the whole render, in order, each span ending at the end-of-turn that follows it.
Nothing requires renders of prefixes to extend each other, so templates that fold the system
prompt into a later turn (Mistral), rewrite earlier turns (Qwen3) or add a default system prompt
(SmolLM2, Qwen2.5) mask exactly. The end-of-turn is detected from the template (the special
token rendered right after a reply) unless the spec sets it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Protocol

from jobs.prepare.formats import Message, RowReject
from jobs.prepare.spec import TemplateName, TrainOn

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
    eot: str
    eot_source: str  # `template` (its layout, or detected from its render), `spec` (eot_token), `eos`

    def render(self, messages: list[Message]) -> Rendered: ...

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


def locate_replies(text: str, messages: list[Message], eot: str) -> list[Span]:
    """The span of each assistant reply in a whole render: user and assistant contents are found in
    order (so a reply quoted by a later user turn is not mistaken for it), and a reply's span runs
    to the end-of-turn right after it. System prompts are skipped: templates place them anywhere,
    or fold them into a user turn."""
    spans, cursor = [], 0
    for k, m in enumerate(messages):
        if m["role"] == "system":
            continue
        at = text.find(m["content"], cursor)
        if at < 0:
            raise RowReject("template_error", f"turn {k} ({m['role']}) is not rendered verbatim by the template")
        end = at + len(m["content"])
        if m["role"] == "assistant":
            eot_at = text.find(eot, end)
            if eot_at < 0 or text[end:eot_at].strip():
                after = text[end:end + 40]
                raise RowReject("template_error", f"turn {k}: the reply is followed by {after!r}, not the end-of-turn "
                                f"{eot!r}")
            end = eot_at + len(eot)
            spans.append((at, end))
        cursor = end
    return spans


@dataclass(frozen=True)
class JinjaTemplate:
    """The tokenizer's own chat template, or a custom Jinja string, rendered by transformers."""

    tokenizer: Any
    source: str | None  # None: the tokenizer's own chat_template
    eot: str
    bos: str
    eos: str
    eot_source: str = "template"

    def chat_template(self) -> str | None:
        return self.source

    def render_text(self, messages: list[Message]) -> tuple[str, list[Span] | None]:
        """The whole render, and the `{% generation %}` spans when the template marks replies."""
        from transformers.utils.chat_template_utils import render_jinja_template

        source, marked = self._source
        texts, indices = render_jinja_template(conversations=[messages], chat_template=source,
                                               return_assistant_tokens_mask=marked,
                                               **self.tokenizer.special_tokens_map)
        return texts[0], ([tuple(span) for span in indices[0]] if marked else None)

    @cached_property
    def _source(self) -> tuple[str, bool]:
        """The template's text, and whether it marks replies with `{% generation %}`: once, not per row."""
        source = self.tokenizer.get_chat_template(self.source)
        return source, bool(GENERATION_BLOCK.search(source))

    def render(self, messages: list[Message]) -> Rendered:
        if (doc := _render_text(messages, self.bos, self.eos)) is not None:
            return doc
        try:
            text, marked = self.render_text(messages)
        except Exception as e:  # a template's raise_exception() (no system role, say) or a Jinja error
            raise RowReject("template_error", str(e)[:300]) from e
        replies = sum(m["role"] == "assistant" for m in messages)
        if marked is None:
            return Rendered(text, locate_replies(text, messages, self.eot))
        if len(marked) != replies:
            raise RowReject("template_error", f"{len(marked)} generation blocks for {replies} replies")
        return Rendered(text, marked)


def detect_eot(tokenizer: Any, source: str | None) -> str | None:
    """The end-of-turn a chat template renders: the special token right after a reply (whitespace
    between them allowed), longest first; None when the template renders none there."""
    template = JinjaTemplate(tokenizer, source, eot="", bos="", eos="")
    probe = PROBE_CONVERSATION[:3]  # a reply with a user turn after it: the end of turn is not the end of the text
    try:
        text, marked = template.render_text(probe)
    except Exception:
        return None  # check_template reports the template's own error
    reply = probe[1]["content"]
    if marked:
        start, end = marked[0]
        reply_end = text.find(reply, start, end) + len(reply)
    else:
        reply_at = text.find(reply, text.find(probe[0]["content"]) + len(probe[0]["content"]))
        if reply_at < 0:
            return None
        reply_end = reply_at + len(reply)
    rest = text[reply_end:].lstrip()
    special = sorted(set(tokenizer.all_special_tokens) | {t.content for t in tokenizer.added_tokens_decoder.values()
                                                          if t.special}, key=len, reverse=True)
    return next((token for token in special if token and rest.startswith(token)), None)


def select_spans(rendered: Rendered, train_on: TrainOn) -> list[Span]:
    """The spans that carry loss under `train_on`."""
    if train_on is TrainOn.ALL:
        return [(0, len(rendered.text))]
    if train_on is TrainOn.LAST_ASSISTANT:
        return rendered.spans[-1:]
    return rendered.spans




def build_template(template: TemplateName | str, tokenizer: Any, eot_token: str | None = None) -> ChatTemplate:
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
        detected = detect_eot(tokenizer, source)
        eot = eot_token or detected or eos
        if not eot:
            raise ValueError("set eot_token: the template renders no special token after a reply, and the "
                             "tokenizer has no eos_token")
        if eot_token and detected and eot_token != detected:
            raise ValueError(f"eot_token {eot_token!r} is not what this template renders after a reply "
                             f"({detected!r}): set eot_token: {detected!r}, or remove it to use the detected one")
        # Jinja templates render the BOS themselves; the text format follows the same rule.
        eot_source = "spec" if eot_token else "template" if detected else "eos"
        chat = JinjaTemplate(tokenizer, source, eot, bos="", eos=eos, eot_source=eot_source)
    check_template(chat, tokenizer)
    return chat


def check_template(chat: ChatTemplate, tokenizer: Any) -> None:
    """Fail early, with the fix, when the template cannot give exact masks with this tokenizer."""
    ids = tokenizer.encode(chat.eot, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"end-of-turn {chat.eot!r} is {len(ids)} tokens in this tokenizer, not one: add it "
                         "as a special token, or pick a template whose end-of-turn the tokenizer has")
    try:
        rendered = chat.render(PROBE_CONVERSATION)
    except RowReject as e:
        raise ValueError(f"the chat template cannot be used for masking: {e.detail}: set eot_token to the "
                         "text that ends a reply in this template, or pick a built-in template") from None
    replies = [m["content"] for m in PROBE_CONVERSATION if m["role"] == "assistant"]
    for (start, end), reply in zip(rendered.spans, replies, strict=True):
        if not rendered.text[start:end].strip().startswith(reply):
            raise ValueError(f"the chat template does not render the reply {reply!r} where expected")
