import io
import json

import pyarrow as pa
import pyarrow.parquet as pq

from jobs.prepare.records import split_rows


def test_jsonl_rows_keep_line_numbers_and_reasons():
    data = b'{"a": 1}\n\n{broken\n\xff\xfe{"x": 2}\n[1, 2]\n{"b": "ok"}\n'
    rows = list(split_rows("f.jsonl", data))
    assert [(r.line, r.reason) for r in rows] == [
        (1, None), (3, "invalid_json"), (4, "invalid_utf8"), (5, "not_an_object"), (6, None)]
    assert rows[1].raw == "{broken"
    assert rows[-1].record == {"b": "ok"}


def test_json_array_and_json_lines_named_json():
    arr = json.dumps([{"a": 1}, "str", {"b": 2}]).encode()
    assert [r.reason for r in split_rows("f.json", arr)] == [None, "not_an_object", None]
    lines = b'{"a": 1}\n{"b": 2}\n'
    assert [r.record for r in split_rows("f.json", lines)] == [{"a": 1}, {"b": 2}]


def test_csv_quoting_bad_rows_and_bad_bytes():
    data = b'question,answer\n"Why, though?","Because ""quotes"" work"\nonly-one-column\n'
    data += b"\xffbad,row\n" + b"last,one\n"
    rows = list(split_rows("f.csv", data))
    good = [r.record for r in rows if r.record]
    assert good[0] == {"question": "Why, though?", "answer": 'Because "quotes" work'}
    assert {"question": "last", "answer": "one"} in good
    assert sorted(r.reason for r in rows if r.reason) == ["invalid_utf8", "malformed_csv"]


def test_parquet_rows_and_unreadable_file():
    buf = io.BytesIO()
    pq.write_table(pa.table({"q": ["a", "b"], "r": ["c", "d"]}), buf)
    rows = list(split_rows("f.parquet", buf.getvalue()))
    assert [r.record for r in rows] == [{"q": "a", "r": "c"}, {"q": "b", "r": "d"}]
    bad = list(split_rows("f.parquet", b"not parquet"))
    assert len(bad) == 1 and bad[0].reason == "invalid_file"


def test_unsupported_extension_is_one_reject():
    rows = list(split_rows("notes.docx", b"..."))
    assert [r.reason for r in rows] == ["unsupported_file_type"]


def test_text_files_are_one_sample_per_line_or_per_blank_line_separated_block():
    by_line = list(split_rows("notes.txt", b"first sample\n  second sample  \n"))
    assert [(r.line, r.record) for r in by_line] == [(1, {"text": "first sample"}), (2, {"text": "second sample"})]
    by_block = list(split_rows("book.TXT", b"\n\nOne paragraph\r\nover two lines.\r\n\r\n\r\nAnother.\n"))
    assert [(r.line, r.record) for r in by_block] == [(3, {"text": "One paragraph\nover two lines."}),
                                                       (7, {"text": "Another."})]
    bad = list(split_rows("mixed.txt", b"fine\n\xff\xfe not utf-8\n"))
    assert [r.reason for r in bad] == [None, "invalid_utf8"] and bad[1].line == 2
    assert list(split_rows("empty.txt", b"")) == []
