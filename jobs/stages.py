"""The per-row work of preparation as plain functions over batches, free of Ray.

`jobs.prepare` runs them inside Ray Data tasks and actors; the benchmark runs the very same
functions under `datasets.map`, so both measure identical work.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

import numpy as np

from jobs.filters import apply_filters, conversation_key
from jobs.formats import RowReject, to_messages
from jobs.records import split_rows
from jobs.spec import DatasetSpec, Source
from jobs.templates import build_template, select_spans
from jobs.tokenize import Tokenized, tokenize_rendered

OK = ""  # the `reason` of a usable row


def parse_file(path: str, data: bytes, source_index: int, source: Source, spec: DatasetSpec) -> list[dict[str, Any]]:
    """Every row of one file, normalised to messages or marked with its reject reason.

    With `max_samples`, rows past it in this file are not read: no later file can need them."""
    out = []
    for row in itertools.islice(split_rows(path, data), source.max_samples):
        messages_json, key, reason, detail = "", "", row.reason or OK, row.detail
        if row.record is not None:
            try:
                messages = to_messages(row.record, source.format, source.fields)
                apply_filters(messages, spec.filters)
                messages_json = json.dumps(messages, ensure_ascii=False)
                key = conversation_key(messages)
            except RowReject as e:
                reason, detail = e.reason, e.detail
        out.append({"source": source_index, "path": path, "line": row.line, "raw": row.raw,
                    "messages": messages_json, "key": key, "reason": reason, "detail": detail})
    return out


class RenderTokenize:
    """Messages (JSON) -> template -> token ids + labels. Build once per worker: it holds the tokenizer."""

    def __init__(self, spec: DatasetSpec, tokenizer: Any):
        self.spec = spec
        self.tokenizer = tokenizer
        self.template = build_template(spec.template, tokenizer, spec.eot_token)

    def __call__(self, messages_json: list[str]) -> list[Tokenized | RowReject]:
        results: list[Tokenized | RowReject | None] = [None] * len(messages_json)
        texts, spans, where = [], [], []
        for i, raw in enumerate(messages_json):
            try:
                rendered = self.template.render(json.loads(raw))
            except RowReject as e:
                results[i] = e
                continue
            texts.append(rendered.text)
            spans.append(select_spans(rendered, self.spec.train_on))
            where.append(i)
        tokenized = tokenize_rendered(self.tokenizer, texts, spans, self.spec.max_seq_length, self.spec.truncation)
        for i, result in zip(where, tokenized, strict=True):
            results[i] = result
        return results  # type: ignore[return-value]

    def columns(self, messages_json: list[str]) -> dict[str, list]:
        """The same work as columns: input_ids, labels, truncated, reason, detail."""
        cols: dict[str, list] = {"input_ids": [], "labels": [], "truncated": [], "reason": [], "detail": []}
        for result in self(messages_json):
            if isinstance(result, RowReject):
                cols["input_ids"].append(np.empty(0, np.int32))
                cols["labels"].append(np.empty(0, np.int32))
                cols["truncated"].append(False)
                cols["reason"].append(result.reason)
                cols["detail"].append(result.detail)
            else:
                cols["input_ids"].append(result.input_ids)
                cols["labels"].append(result.labels)
                cols["truncated"].append(result.truncated)
                cols["reason"].append(OK)
                cols["detail"].append("")
        return cols
