"""The per-row work of preparation as plain functions over batches, free of Ray.

`parse_file` turns one file into rows (messages or a reject reason); `add_tokens` renders,
tokenizes and masks a batch of them; `tokenize_file` does both for a file. The driver runs it in
its own process for small inputs, `ray_pass` inside Ray tasks for large ones, and the benchmark
runs `RenderTokenize` under `datasets.map`: the same functions everywhere, so all three give (and
measure) identical work.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pyarrow as pa

from jobs.prepare.filters import apply_filters, conversation_key
from jobs.prepare.formats import Message, RowReject, to_messages
from jobs.prepare.labels import Tokenized, tokenize_rendered
from jobs.prepare.packing import offsets_list
from jobs.prepare.records import split_rows
from jobs.prepare.spec import DatasetSpec, Source
from jobs.prepare.templates import build_template, select_spans

OK = ""  # the `reason` of a usable row
ROW_BITS = 32  # rows per file < 2^32


def row_order(file_index: int, row: int) -> int:
    """A row's place in (source, file, line) order, files numbered in (source, path) order."""
    return (file_index << ROW_BITS) | row


def parse_file(path: str, data: bytes, file_index: int, source_index: int, source: Source,
               spec: DatasetSpec, part: tuple[int, int] = (0, 1)) -> list[dict[str, Any]]:
    """Every row of one file, normalised to `messages` (None for a row rejected here) or marked
    with its reject reason, with its `order` (`row_order`); with `part=(k, n)`, only rows k, k+n, k+2n, ... (one of n tasks
    sharing a file).

    With `max_samples`, rows past it in this file are not read: no later file can need them."""
    out = []
    k, n = part
    for number, row in enumerate(itertools.islice(split_rows(path, data), source.max_samples)):
        if number % n != k:
            continue
        messages, key, reason, detail = None, "", row.reason or OK, row.detail
        if row.record is not None:
            try:
                messages = to_messages(row.record, source.format, source.fields)
                apply_filters(messages, spec.filters)
                key = conversation_key(messages)
            except RowReject as e:
                messages, reason, detail = None, e.reason, e.detail
        out.append({"source": source_index, "order": row_order(file_index, number), "path": path, "line": row.line,
                    "raw": row.raw, "messages": messages, "key": key, "reason": reason, "detail": detail})
    return out


class RenderTokenize:
    """Messages -> template -> token ids + labels. Build once per worker: it holds the tokenizer."""

    def __init__(self, spec: DatasetSpec, tokenizer: Any):
        self.spec = spec
        self.tokenizer = tokenizer
        self.template = build_template(spec.template, tokenizer, spec.eot_token, spec.reasoning)

    def __call__(self, conversations: list[list[Message]]) -> list[list[Tokenized] | RowReject]:
        """Each row's samples (one, or more where `reasoning: keep` splits it), or why it is rejected:
        a row is kept whole or rejected whole."""
        results: list[list[Tokenized] | RowReject] = [[] for _ in conversations]
        texts, spans, where = [], [], []
        for i, messages in enumerate(conversations):
            try:
                samples = self.template.samples(messages, self.spec.train_on)
            except RowReject as e:
                results[i] = e
                continue
            for rendered in samples:
                texts.append(rendered.text)
                spans.append(select_spans(rendered, self.spec.train_on))
                where.append(i)
        tokenized = tokenize_rendered(self.tokenizer, texts, spans, self.spec.max_seq_length, self.spec.truncation)
        for i, result in zip(where, tokenized, strict=True):
            row = results[i]
            if isinstance(result, RowReject):
                results[i] = row if isinstance(row, RowReject) else result
            elif not isinstance(row, RowReject):
                row.append(result)
        return results

    def columns(self, conversations: list[list[Message]]) -> dict[str, list]:
        """The same work as columns: input_ids and labels (a row's samples one after the other),
        sample_lens, truncated, reason, detail."""
        cols: dict[str, list] = {name: [] for name in ("input_ids", "labels", "sample_lens", "truncated", "reason",
                                                       "detail")}
        empty = np.empty(0, np.int32)
        for result in self(conversations):
            rejected = isinstance(result, RowReject)
            samples = [] if rejected else result
            cols["input_ids"].append(np.concatenate([s.input_ids for s in samples]) if samples else empty)
            cols["labels"].append(np.concatenate([s.labels for s in samples]) if samples else empty)
            cols["sample_lens"].append(np.asarray([len(s.input_ids) for s in samples], np.int32))
            cols["truncated"].append(any(s.truncated for s in samples))
            cols["reason"].append(result.reason if rejected else OK)
            cols["detail"].append(result.detail if rejected else "")
        return cols


# The columns of a parsed row kept beside its tokens (its messages are not: they are in the tokens).
PARSED_SCHEMA = pa.schema([("source", pa.int64()), ("order", pa.int64()), ("path", pa.string()), ("line", pa.int64()),
                           ("raw", pa.string()), ("key", pa.string())])


def add_tokens(rows: list[dict[str, Any]], stage: RenderTokenize) -> pa.Table:
    """Render + tokenize + mask the usable ones of a batch of parsed rows: a table of the rows
    (`PARSED_SCHEMA`), each with its tokens or reject reason.

    Rows already rejected while parsing pass through untouched; a row rejected here (too long,
    nothing to train, template error) gets its reason."""
    reasons = [row["reason"] for row in rows]
    details = [row["detail"] for row in rows]
    todo = [i for i, r in enumerate(reasons) if r == OK]
    cols = stage.columns([rows[i]["messages"] for i in todo])
    empty = np.empty(0, np.int32)
    ids, labels, lens = [empty] * len(reasons), [empty] * len(reasons), [empty] * len(reasons)
    truncated = [False] * len(reasons)
    for j, i in enumerate(todo):
        ids[i], labels[i], lens[i] = cols["input_ids"][j], cols["labels"][j], cols["sample_lens"][j]
        truncated[i], reasons[i], details[i] = cols["truncated"][j], cols["reason"][j], cols["detail"][j]
    return pa.Table.from_pylist(rows, schema=PARSED_SCHEMA).append_column(
        "reason", pa.array(reasons, pa.string())).append_column(
        "detail", pa.array(details, pa.string())).append_column(
        "input_ids", list_array(ids)).append_column(
        "labels", list_array(labels)).append_column(
        "sample_lens", list_array(lens)).append_column(
        "truncated", pa.array(truncated, pa.bool_()))


def tokenize_file(path: str, data: bytes, file_index: int, source_index: int, stage: RenderTokenize,
                  batch_size: int, part: tuple[int, int] = (0, 1)) -> pa.Table | None:
    """`parse_file` then `add_tokens` in batches of `batch_size` rows: one file's (or part's) rows
    tokenized, or None when it has none."""
    spec = stage.spec
    rows = parse_file(path, data, file_index, source_index, spec.sources[source_index], spec, part)
    batches = [add_tokens(rows[start:start + batch_size], stage) for start in range(0, len(rows), batch_size)]
    return pa.concat_tables(batches) if batches else None


def list_array(arrays: list[np.ndarray]) -> pa.Array:
    """int32 arrays as one Arrow list column, built from offsets without a per-element loop."""
    offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
    np.cumsum([len(a) for a in arrays], out=offsets[1:])
    values = pa.array((np.concatenate(arrays) if arrays else np.empty(0)).astype(np.int32, copy=False))
    return offsets_list(offsets, values)
