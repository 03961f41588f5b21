"""Pure: render messages with a chat template and locate the characters that carry loss.

A rendering is the conversation text plus one character span per assistant turn, covering the
reply and its end-of-turn token (trained, so the model learns to stop) but no system/user text.
Masks are later derived from these spans and the tokenizer's offsets over the *whole* text, so a
token merge across a role boundary cannot shift them.

Built-in templates are laid out in Python, where spans are known exactly. Jinja templates (the
tokenizer's own or a custom string) are rendered by transformers' `apply_chat_template`; the span
of turn k is what rendering messages[:k+1] adds to messages[:k] plus the generation prompt,
trimmed after the end-of-turn text. That needs a template whose renders extend each other, which
`check_template` verifies up front.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Protocol

from jobs.prepare.formats import Message, RowReject
from jobs.prepare.spec import TemplateName, TrainOn

Span = tuple[int, int]


@dataclass(frozen=True, slots=True)
class Rendered:
    text: str
    spans: list[Span]  # one per assistant turn, in order


class ChatTemplate(Protocol):
    eot: str

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


@dataclass(frozen=True)
class JinjaTemplate:
    """The tokenizer's own chat template, or a custom Jinja string rendered the same way."""

    tokenizer: Any
    source: str | None  # None: the tokenizer's own chat_template
    eot: str
    bos: str
    eos: str

    def chat_template(self) -> str | None:
        return self.source

    def _apply(self, messages: list[Message], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.source, tokenize=False, add_generation_prompt=generation_prompt
        )

    def render(self, messages: list[Message]) -> Rendered:
        if (doc := _render_text(messages, self.bos, self.eos)) is not None:
            return doc
        try:
            text = self._apply(messages, False)
            spans = []
            for k, m in enumerate(messages):
                if m["role"] != "assistant":
                    continue
                prompt = self._apply(messages[:k], True)
                upto = self._apply(messages[: k + 1], False)
                if not (upto.startswith(prompt) and text.startswith(upto)):
                    raise RowReject("template_error", f"render of turn {k} does not extend the previous one")
                reply_at = upto.find(m["content"], len(prompt))
                eot_at = upto.find(self.eot, max(reply_at, len(prompt)) + len(m["content"]))
                if reply_at < 0 or eot_at < 0:
                    raise RowReject("template_error", f"turn {k}: reply or end-of-turn {self.eot!r} not rendered")
                spans.append((len(prompt), eot_at + len(self.eot)))
        except RowReject:
            raise
        except Exception as e:  # a template's raise_exception() or a Jinja error in user text
            raise RowReject("template_error", str(e)[:300]) from e
        return Rendered(text, spans)


def select_spans(rendered: Rendered, train_on: TrainOn) -> list[Span]:
    """The spans that carry loss under `train_on`."""
    if train_on is TrainOn.ALL:
        return [(0, len(rendered.text))]
    if train_on is TrainOn.LAST_ASSISTANT:
        return rendered.spans[-1:]
    return rendered.spans


PROBE_CONVERSATION: list[Message] = [
    {"role": "system", "content": "You are a careful assistant."},
    {"role": "user", "content": "Name a primary colour."},
    {"role": "assistant", "content": "Red is a primary colour."},
    {"role": "user", "content": "And another one?"},
    {"role": "assistant", "content": "Blue."},
]


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
        eot = eot_token or eos
        if not eot:
            raise ValueError("set eot_token: the tokenizer has no eos_token to end assistant turns with")
        source = None if template is TemplateName.TOKENIZER else str(template)
        # Jinja templates render the BOS themselves; the text format follows the same rule.
        chat = JinjaTemplate(tokenizer, source, eot, bos="", eos=eos)
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
        raise ValueError(f"the chat template cannot be used for masking: {e.detail}") from None
    replies = [m["content"] for m in PROBE_CONVERSATION if m["role"] == "assistant"]
    for (start, end), reply in zip(rendered.spans, replies, strict=True):
        if not rendered.text[start:end].strip().startswith(reply):
            raise ValueError(f"the chat template does not render the reply {reply!r} where expected")
