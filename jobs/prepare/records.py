"""Pure: split the bytes of one input file into rows, each row either a record or a reason it is not.

Parsing is row by row so one broken line costs one row, never the file (HF datasets' JSON loader
fails the whole file on one bad row). Every row keeps its 1-based line (or row) number and raw text
for the rejects report.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

FILE_TYPES = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".txt": "txt",
}


@dataclass(frozen=True, slots=True)
class Row:
    """One input row: `record` when it parsed, else `reason` (+ `detail`)."""

    line: int
    raw: str
    record: dict[str, Any] | None = None
    reason: str | None = None
    detail: str = ""


def file_type(path: str) -> str | None:
    lower = path.lower()
    for suffix, kind in FILE_TYPES.items():
        if lower.endswith(suffix):
            return kind
    return None


def _raw(data: bytes) -> str:
    return data.decode("utf-8", errors="backslashreplace")


def _object_row(line: int, raw: str, value: Any) -> Row:
    if not isinstance(value, dict):
        return Row(line, raw, reason="not_an_object", detail=f"row is a JSON {type(value).__name__}")
    return Row(line, raw, record=value)


def _jsonl_rows(data: bytes) -> Iterator[Row]:
    for number, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue  # blank lines are layout, not rows
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            yield Row(number, _raw(line), reason="invalid_utf8", detail=str(e))
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            yield Row(number, text, reason="invalid_json", detail=str(e))
            continue
        yield _object_row(number, text, value)


def _json_rows(data: bytes) -> Iterator[Row]:
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        # Not one JSON document: many ".json" files are JSON Lines in disguise.
        yield from _jsonl_rows(data)
        return
    items = value if isinstance(value, list) else [value]
    for index, item in enumerate(items, start=1):
        yield _object_row(index, json.dumps(item, ensure_ascii=False), item)


def _csv_rows(data: bytes) -> Iterator[Row]:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        # Keep the good rows: decode line by line and reject only the undecodable ones.
        text = None
    if text is None:
        lines = data.split(b"\n")
        header = lines[0].decode("utf-8-sig", errors="replace")
        good = []
        for number, line in enumerate(lines[1:], start=2):
            try:
                good.append((number, line.decode("utf-8")))
            except UnicodeDecodeError as e:
                yield Row(number, _raw(line), reason="invalid_utf8", detail=str(e))
        text = "\n".join([header] + [g for _, g in good])
    reader = csv.DictReader(io.StringIO(text, newline=""))
    for record in reader:
        line = reader.line_num
        raw = json.dumps(record, ensure_ascii=False)
        if None in record or any(v is None for v in record.values()):
            yield Row(line, raw, reason="malformed_csv", detail="column count differs from header")
            continue
        yield Row(line, raw, record=dict(record))


def _txt_rows(data: bytes) -> Iterator[Row]:
    """Plain text, as `{"text": ...}` records: one per blank-line-separated block when the file has
    a blank line, else one per line, each numbered by its first line. A block or line that is not
    UTF-8 is one `invalid_utf8` row."""
    lines = [line.rstrip(b"\r") for line in data.split(b"\n")]
    blank = [not line.strip() for line in lines]
    pieces: list[tuple[int, list[bytes]]] = []  # (first line, lines)
    if any(blank[:-1]):  # the empty string after a final newline is no blank line
        for number, line in enumerate(lines, start=1):
            if blank[number - 1]:
                continue
            if number == 1 or blank[number - 2]:
                pieces.append((number, []))
            pieces[-1][1].append(line)
    else:
        pieces = [(number, [line]) for number, line in enumerate(lines, start=1) if not blank[number - 1]]
    for number, parts in pieces:
        raw = b"\n".join(parts)
        try:
            text = raw.decode("utf-8").strip()
        except UnicodeDecodeError as e:
            yield Row(number, _raw(raw), reason="invalid_utf8", detail=str(e))
            continue
        yield Row(number, text, record={"text": text})


def _parquet_rows(data: bytes) -> Iterator[Row]:
    table = pq.read_table(pa.BufferReader(data))
    for index, record in enumerate(table.to_pylist(), start=1):
        yield Row(index, json.dumps(record, ensure_ascii=False, default=str), record=record)


_READERS = {"jsonl": _jsonl_rows, "json": _json_rows, "csv": _csv_rows, "parquet": _parquet_rows, "txt": _txt_rows}


def split_rows(path: str, data: bytes) -> Iterator[Row]:
    """Rows of one file. A file that cannot be read at all becomes one `invalid_file` row."""
    kind = file_type(path)
    if kind is None:
        yield Row(0, "", reason="unsupported_file_type",
                  detail=f"{path}: use .jsonl, .json, .csv, .parquet or .txt")
        return
    try:
        yield from _READERS[kind](data)
    except (pa.ArrowException, csv.Error, OSError) as e:
        yield Row(0, _raw(data[:2000]), reason="invalid_file", detail=f"{kind}: {e}")
