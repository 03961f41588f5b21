"""An upload: a `multipart/form-data` body with one `file` part (and, where the caller names them,
short text fields such as OpenAI's `purpose`), parsed as it streams in and
written straight to the artifact store (a local path or S3) while its SHA-256 and size are
counted. Neither the service's memory nor its local disk holds the file: at most one batch of
the body (`BATCH_BYTES`) plus the store's own upload buffer. A body that ends early, breaks off
or is refused leaves no object behind."""

from __future__ import annotations

import hashlib
import posixpath
import re
from dataclasses import dataclass, field
from typing import Any

import pyarrow.fs as pafs
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from jobs.common import storage

BATCH_BYTES = 1 << 20  # body bytes parsed per hop to a worker thread (storage writes block)
FILE_FIELD = "file"
MAX_FIELD_BYTES = 1024  # a text field beside the file (`purpose`) is a word, not data
SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


class UploadError(Exception):
    """The body is not a form with exactly one `file` part."""


def storage_name(filename: str) -> str:
    """The name an upload is stored under: the client's base name in safe characters, with its
    extension (readers pick a format by it)."""
    base = filename.replace("\\", "/").rsplit("/", 1)[-1]
    safe = SAFE_NAME.sub("_", base).strip("._")[:200]
    return safe or "upload"


@dataclass
class Stored:
    filename: str
    uri: str
    bytes: int
    sha256: str
    fields: dict[str, str] = field(default_factory=dict)  # the text fields the caller asked for


@dataclass
class _Form:
    """The parser's callbacks: each part's headers, and the file part's bytes into the store."""
    directory: str
    text_fields: frozenset[str] = frozenset()
    values: dict[str, bytearray] = field(default_factory=dict)  # text fields read so far
    field_name: str | None = None  # the text field being read, if the current part is one
    headers: dict[bytes, bytes] = field(default_factory=dict)
    header_name: bytes = b""
    header_value: bytes = b""
    stream: Any = None  # the store's output stream while the file part is read
    stored: Stored | None = None
    digest: Any = field(default_factory=hashlib.sha256)
    complete: bool = False

    def callbacks(self) -> dict[str, Any]:
        return {"on_part_begin": self.part_begin, "on_header_field": self.header_field,
                "on_header_value": self.header_value_part, "on_header_end": self.header_end,
                "on_headers_finished": self.headers_finished, "on_part_data": self.part_data,
                "on_part_end": self.part_end, "on_end": self.end}

    def part_begin(self) -> None:
        self.headers = {}

    def header_field(self, data: bytes, start: int, end: int) -> None:
        self.header_name += data[start:end]

    def header_value_part(self, data: bytes, start: int, end: int) -> None:
        self.header_value += data[start:end]

    def header_end(self) -> None:
        self.headers[self.header_name.lower()] = self.header_value
        self.header_name = self.header_value = b""

    def headers_finished(self) -> None:
        disposition, options = parse_options_header(self.headers.get(b"content-disposition", b""))
        name = options.get(b"name", b"").decode(errors="replace")
        self.field_name = None
        if disposition == b"form-data" and name in self.text_fields and not options.get(b"filename"):
            self.field_name, self.values[name] = name, bytearray()
            return
        if disposition != b"form-data" or name != FILE_FIELD:
            raise UploadError(f"unexpected form field {name!r}: send one part named `file` "
                              "(curl -F file=@data.jsonl)")
        if self.stored is not None:
            raise UploadError("one file per upload: send the others in requests of their own")
        filename = options.get(b"filename", b"").decode(errors="replace")
        if not filename:
            raise UploadError("the `file` part has no filename: send it as a file (curl -F file=@data.jsonl)")
        uri = posixpath.join(self.directory, storage_name(filename))
        fs, path = storage.filesystem(uri)
        fs.create_dir(posixpath.dirname(path), recursive=True)
        self.stream = fs.open_output_stream(path)
        self.stored = Stored(filename=filename[:255], uri=uri, bytes=0, sha256="")

    def part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self.field_name is not None:
            self.values[self.field_name] += chunk
            if len(self.values[self.field_name]) > MAX_FIELD_BYTES:
                raise UploadError(f"the `{self.field_name}` field is over {MAX_FIELD_BYTES} bytes")
            return
        self.stream.write(chunk)
        self.digest.update(chunk)
        self.stored.bytes += len(chunk)

    def part_end(self) -> None:
        if self.field_name is not None:
            return
        self.stream.close()
        self.stream = None
        self.stored.sha256 = self.digest.hexdigest()

    def end(self) -> None:
        self.complete = True

    def discard(self) -> None:
        """Remove whatever an unfinished upload wrote."""
        if self.stream is not None:
            self.stream.close()
        remove(self.directory)


def remove(directory: str) -> None:
    """Delete an upload's directory and its file, if they exist."""
    fs, path = storage.filesystem(directory)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)


async def receive(request: Request, directory: str, text_fields: frozenset[str] = frozenset()) -> Stored:
    """Store the request's `file` part under `directory`, with the `text_fields` sent beside it. Raises UploadError for a body that is
    not one complete file part; any exception (a refused or broken-off body) leaves nothing."""
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data" or not options.get(b"boundary"):
        raise UploadError("send multipart/form-data with one `file` part (curl -F file=@data.jsonl)")
    form = _Form(directory, text_fields)
    parser = MultipartParser(options[b"boundary"], form.callbacks())
    try:
        batch = bytearray()
        async for chunk in request.stream():
            batch += chunk
            if len(batch) >= BATCH_BYTES:
                await run_in_threadpool(parser.write, bytes(batch))
                batch.clear()
        await run_in_threadpool(parser.write, bytes(batch))
        parser.finalize()
        if form.stored is None:
            raise UploadError("no `file` part: send one (curl -F file=@data.jsonl)")
        if not form.complete or form.stream is not None:
            raise UploadError("the body ended before its `file` part did: send the whole file")
        form.stored.fields = {k: v.decode(errors="replace") for k, v in form.values.items()}
        return form.stored
    except Exception as e:
        await run_in_threadpool(form.discard)
        if isinstance(e, UploadError) or type(e).__module__.startswith("python_multipart"):
            raise UploadError(str(e)) from None
        raise
