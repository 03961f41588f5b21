"""The dataset spec: the contract of `jobs.prepare`, shared with the REST API and the CLI.

Every field is documented; ``load_spec`` accepts a YAML/JSON file or an inline JSON string and
reports every problem at once, each with its field path (the rules every spec shares are in
`jobs.common.spec`). ``python -m jobs.prepare.spec`` prints the field reference.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator

from jobs.common.overrides import apply_overrides
from jobs.common.spec import ModelUri, Name, SourceUri, SpecModel, Uri, read_document, reference_markdown, validate


class SourceFormat(StrEnum):
    """How the rows of a source are laid out."""

    AUTO = "auto"  # detected per row from its keys
    ALPACA = "alpaca"  # instruction / input / output (/ system)
    SHAREGPT = "sharegpt"  # conversations: [{from: human|gpt|system, value}]
    MESSAGES = "messages"  # OpenAI chat: messages: [{role, content}]
    QA = "qa"  # question / answer (/ source)
    INPUT_OUTPUT = "input_output"  # input / output (/ system)
    PROMPT_RESPONSE = "prompt_response"  # any two keys named in `fields`
    TEXT = "text"  # plain text, trained on every token


class TemplateName(StrEnum):
    """Built-in chat templates; `tokenizer` uses the tokenizer's own `chat_template`."""

    CHATML = "chatml"
    ALPACA = "alpaca"
    INSTRUCT = "instruct"
    CHAT = "chat"
    TOKENIZER = "tokenizer"


class Truncation(StrEnum):
    DROP = "drop"  # rows longer than max_seq_length are rejected as `too_long`
    TRUNCATE = "truncate"  # cut at max_seq_length; rejected if no trainable token survives


class TrainOn(StrEnum):
    ASSISTANT = "assistant"  # every assistant turn, each with its end-of-turn token
    LAST_ASSISTANT = "last_assistant"  # only the final assistant turn
    ALL = "all"  # every token of the rendered conversation


class Reasoning(StrEnum):
    """Replies that open with `<think>…</think>` when the template does not render that reasoning
    (Qwen3 drops it from every turn before the last user message, DeepSeek-R1 from every turn)."""

    KEEP = "keep"  # each such reply becomes a sample of its own, trained with its reasoning
    TEMPLATE = "template"  # train what the template renders: the reply without its reasoning
    REJECT = "reject"  # reject the row (`reasoning_dropped`)


class Packing(StrEnum):
    NONE = "none"  # one conversation per row
    BFD = "bfd"  # best-fit-decreasing over the whole split into rows of max_seq_length


class Dedup(StrEnum):
    NONE = "none"
    EXACT = "exact"  # hash of the normalised conversation (case and whitespace folded)


class SourceSplit(StrEnum):
    """Which split a source's rows go to."""

    AUTO = "auto"  # the val_ratio share by hash, or train beside a `val` source
    TRAIN = "train"
    VAL = "val"


class FieldMap(SpecModel):
    """Renames: the key in your rows that holds each canonical field. Unset means the format's default."""

    prompt: str | None = Field(None, description="User prompt (alpaca `instruction`, qa `question`).")
    input: str | None = Field(None, description="Extra context appended to the prompt (alpaca `input`).")
    response: str | None = Field(None, description="Assistant reply (alpaca `output`, qa `answer`).")
    system: str | None = Field(None, description="System prompt.")
    messages: str | None = Field(
        None, description="List of turns (sharegpt `conversations`, messages `messages`)."
    )
    text: str | None = Field(None, description="Plain text for the `text` format.")


class Source(SpecModel):
    """One input: every row of every file it names becomes one conversation (or one reject)."""

    uri: SourceUri = Field(description="Local path or glob, s3://bucket/key (or prefix/glob), gs://bucket/key, or a "
                           "Hugging Face dataset: hf://datasets/org/name[@revision][/path/in/repo].")
    format: SourceFormat = Field(SourceFormat.AUTO, description="Row layout; `auto` detects it per row.")
    fields: FieldMap = Field(default_factory=FieldMap, description="Optional key renames.")
    weight: float = Field(
        1.0,
        gt=0,
        le=100,
        description="Sampling factor: 2.0 emits each accepted row twice, 0.5 keeps a "
        "deterministic half (the rest are counted as `downsampled`).",
    )
    max_samples: int | None = Field(
        None, ge=1, description="Read at most this many rows from the source (in file order)."
    )
    split: SourceSplit = Field(
        SourceSplit.AUTO,
        description="`train` or `val`: every row of the source goes to that split (a separate validation file "
        "is `split: val`). `auto`: the `val_ratio` share by hash goes to val, or every row to train when another "
        "source is `split: val`.",
    )

    subset: str | None = Field(None, min_length=1, description="A Hugging Face dataset's subset (config) to read; "
                               "hf://datasets/ sources only.")
    hub_split: str | None = Field(None, min_length=1, pattern=r"^[\w.-]+$",
                                  description="A Hugging Face dataset's split to read (default `train`); hf://datasets/ "
                                  "sources without a path in the repository only.")

    @model_validator(mode="after")
    def _hub_options_name_a_hub_dataset(self) -> Source:
        from jobs.prepare import hub

        if not hub.is_hub_dataset(self.uri):
            if self.subset or self.hub_split:
                raise ValueError("subset and hub_split choose files of a Hugging Face dataset: "
                                 f"remove them, or name one as hf://datasets/org/name (uri is {self.uri!r})")
            return self
        _, _, path = hub.parse(self.uri)
        if path is not None and (self.subset or self.hub_split):
            raise ValueError(f"{self.uri!r} names its files by path: remove subset and hub_split, or the path")
        return self

    @model_validator(mode="after")
    def _val_is_held_out_whole(self) -> Source:
        if self.split is SourceSplit.VAL and self.weight != 1.0:
            raise ValueError(f"a `split: val` source is held out whole, and weight samples training rows only: "
                             f"remove weight {self.weight} from {self.uri}")
        return self

    @model_validator(mode="after")
    def _prompt_response_needs_fields(self) -> Source:
        if self.format is SourceFormat.PROMPT_RESPONSE and not (
            self.fields.prompt and self.fields.response
        ):
            raise ValueError(
                "format prompt_response needs fields.prompt and fields.response "
                "(e.g. fields: {prompt: query, response: reply})"
            )
        return self


class Filters(SpecModel):
    """Row filters; a row that fails one is rejected with the filter's name as its reason."""

    min_prompt_chars: int = Field(0, ge=0, description="Minimum characters of user+system text.")
    max_prompt_chars: int | None = Field(None, ge=1, description="Maximum characters of user+system text.")
    min_response_chars: int = Field(0, ge=0, description="Minimum characters of assistant text.")
    max_response_chars: int | None = Field(None, ge=1, description="Maximum characters of assistant text.")
    drop_urls: bool = Field(False, description="Reject rows containing http(s):// or www. links.")
    drop_code_blocks: bool = Field(False, description="Reject rows containing ``` fenced code.")

    @model_validator(mode="after")
    def _ranges(self) -> Filters:
        problems = []
        if self.max_prompt_chars is not None and self.max_prompt_chars < self.min_prompt_chars:
            problems.append("max_prompt_chars must be >= min_prompt_chars")
        if self.max_response_chars is not None and self.max_response_chars < self.min_response_chars:
            problems.append("max_response_chars must be >= min_response_chars")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class DatasetSpec(SpecModel):
    """What `jobs.prepare` reads, how it renders and tokenizes it, and where it writes."""

    name: Name = Field(description="Dataset name: letters, digits, `.`, `_`, `-`.")
    sources: list[Source] = Field(min_length=1, description="One or more inputs.")
    tokenizer: ModelUri = Field(description="HF tokenizer (or model) directory: a local path, s3://, or a Hugging "
                                "Face id (hf://org/name[@revision], or org/name where no such local path exists).")
    template: TemplateName | str = Field(
        TemplateName.CHATML,
        description="chatml | alpaca | instruct | chat | tokenizer (its own chat_template) "
        "| a custom Jinja chat template string.",
    )
    eot_token: str | None = Field(
        None,
        description="End-of-turn token trained after each assistant reply. Built-in templates know theirs; for "
        "`tokenizer`/custom templates what the template renders after each reply is trained (read from its "
        "layout, per turn: the last reply may end differently), and after a reply it ends with no special token "
        "this token is inserted (default: the tokenizer's eos_token). Set it to insist on one the template renders, "
        "or to choose the inserted one.",
    )
    reasoning: Reasoning = Field(
        Reasoning.KEEP,
        description="Reasoning (`<think>…</think>` opening a reply) the chat template does not render: `keep` "
        "trains each such reply with its reasoning as a sample of its own (the earlier turns as its context, "
        "as the template renders them), `template` trains only what the template renders, `reject` rejects "
        "the row.",
    )
    max_seq_length: int = Field(1024, ge=16, le=1_048_576, description="Tokens per sample and per packed row.")
    truncation: Truncation = Field(Truncation.DROP, description="What to do with over-long rows.")
    train_on: TrainOn = Field(TrainOn.ASSISTANT, description="Which tokens carry loss.")
    packing: Packing = Field(Packing.BFD, description="How samples are laid into rows.")
    filters: Filters = Field(default_factory=Filters, description="Row filters.")
    dedup: Dedup = Field(Dedup.EXACT, description="De-duplication mode.")
    val_ratio: float = Field(0.05, ge=0, lt=1, description="Share of each `split: auto` source's conversations in "
                             "`val/` (hash-based); unused when a source is `split: val`.")
    seed: int = Field(42, description="Seed of the split and of fractional sampling weights.")
    max_reject_ratio: float = Field(
        0.05,
        ge=0,
        le=1,
        description="Fail if invalid rows / rows read exceeds this (duplicates and downsampling "
        "are not counted as invalid).",
    )
    output: Uri = Field(description="Output directory (local path or s3://).")

    @field_validator("template", mode="before")
    @classmethod
    def _template(cls, v: Any) -> Any:
        if not isinstance(v, str):
            return v
        if v in {t.value for t in TemplateName}:
            return TemplateName(v)  # a plain str would win the union otherwise
        if "{{" not in v and "{%" not in v:
            names = " | ".join(t.value for t in TemplateName)
            raise ValueError(f"unknown template {v!r}: use one of {names}, or a Jinja string")
        return v

    @model_validator(mode="after")
    def _something_trains(self) -> DatasetSpec:
        if all(source.split is SourceSplit.VAL for source in self.sources):
            raise ValueError("every source is `split: val`: give the training data as another source "
                             "(split: train, or auto)")
        return self

    def split_rules(self) -> list[SourceSplit]:
        """Each source's split as applied: `train`, `val`, or `auto` for the `val_ratio` share by hash."""
        separate_val = any(source.split is SourceSplit.VAL for source in self.sources)
        return [SourceSplit.TRAIN if source.split is SourceSplit.AUTO and (separate_val or not self.val_ratio)
                else source.split for source in self.sources]

    def split_origins(self) -> dict[str, list[str]]:
        """Where each split's rows come from, as the manifest and the data card say it."""
        out: dict[str, list[str]] = {"train": [], "val": []}
        for source, rule in zip(self.sources, self.split_rules(), strict=True):
            if rule is SourceSplit.AUTO:
                out["train"].append(f"{source.uri} ({1 - self.val_ratio:.0%} by hash, seed {self.seed})")
                out["val"].append(f"{source.uri} ({self.val_ratio:.0%} by hash, seed {self.seed})")
            else:
                out[rule.value].append(f"{source.uri} (all)")
        return out

    @property
    def template_is_custom(self) -> bool:
        return not isinstance(self.template, TemplateName)

    def spec_hash(self) -> str:
        """SHA-256 of the canonical JSON form: equal specs hash equal whatever their file layout."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


def load_spec(spec: str | Path | dict[str, Any], overrides: Iterable[str] = ()) -> DatasetSpec:
    """The dataset spec from a mapping, a file path, or an inline JSON/YAML string, with
    `--set path=value` overrides applied (`jobs.common.overrides`)."""
    return validate(DatasetSpec, apply_overrides(read_document(spec), overrides))


REFERENCE_MODELS = (DatasetSpec, Source, FieldMap, Filters)

if __name__ == "__main__":
    print(reference_markdown(REFERENCE_MODELS))
