"""Local paths, s3:// and gs:// behind one interface (pyarrow filesystems, as Ray Data uses).

S3-compatible servers (MinIO, moto) are reached through the standard `AWS_ENDPOINT_URL`
(or `AWS_ENDPOINT_URL_S3`); credentials come from the usual AWS environment or instance role.
Google Cloud Storage uses the usual Google credentials, or, with `STORAGE_EMULATOR_HOST` set (as
Google's own clients read it), that emulator without credentials.
"""

from __future__ import annotations

import fnmatch
import glob
import os
import posixpath
from pathlib import Path

import pyarrow.fs as pafs

GLOB_CHARS = "*?["


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem holding `uri` and the path of `uri` inside it."""
    if uri.startswith("s3://"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        return pafs.S3FileSystem(endpoint_override=endpoint, region=region), uri[len("s3://"):].rstrip("/")
    if uri.startswith("gs://"):
        return gcs(), uri[len("gs://"):].rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def gcs() -> pafs.GcsFileSystem:
    emulator = os.environ.get("STORAGE_EMULATOR_HOST")
    if not emulator:
        return pafs.GcsFileSystem()
    scheme, _, host = emulator.rpartition("://")
    return pafs.GcsFileSystem(anonymous=True, scheme=scheme or "http", endpoint_override=host)


def is_remote(uri: str) -> bool:
    return uri.startswith(("s3://", "gs://"))


def absolute(uri: str) -> str:
    """A local path made absolute (processes on other nodes or in other directories read it); remote URIs as they are."""
    return uri if is_remote(uri) else os.path.abspath(uri)


def expand(uri: str) -> tuple[pafs.FileSystem, list[pafs.FileInfo]]:
    """Files named by `uri`: one file, every file under a directory, or a glob; sorted by path.
    Their size and modification time come from the listing itself: no request per file."""
    fs, path = filesystem(uri)
    if not is_remote(uri):
        if any(c in path for c in GLOB_CHARS):
            return fs, fs.get_file_info(sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p)))
    pattern = path if any(c in path for c in GLOB_CHARS) else None
    base = path.split("*")[0].split("?")[0].split("[")[0].rsplit("/", 1)[0] if pattern else path
    info = fs.get_file_info(base)
    if info.type == pafs.FileType.File:
        return fs, [info]
    if info.type != pafs.FileType.Directory:
        return fs, []
    files = [i for i in fs.get_file_info(pafs.FileSelector(base, recursive=True)) if i.type == pafs.FileType.File]
    if pattern:
        files = [f for f in files if fnmatch.fnmatch(f.path, pattern)]
    return fs, sorted((f for f in files if not posixpath.basename(f.path).startswith((".", "_"))), key=lambda f: f.path)


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    fs.create_dir(posixpath.dirname(path), recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(data)


def delete_file(fs: pafs.FileSystem, path: str) -> None:
    """Remove a file if it exists."""
    if fs.get_file_info(path).type == pafs.FileType.File:
        fs.delete_file(path)


def clear_dir(fs: pafs.FileSystem, path: str) -> None:
    """Remove a directory's contents if it exists (outputs of an earlier run)."""
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir_contents(path, missing_dir_ok=True)


def read_dir_files(uri: str, names: set[str] | None = None) -> dict[str, bytes]:
    """The top-level files of a directory (optionally only those named), by file name."""
    fs, path = filesystem(uri)
    selector = pafs.FileSelector(path, recursive=False)
    out = {}
    for info in fs.get_file_info(selector):
        name = posixpath.basename(info.path)
        if info.type == pafs.FileType.File and (names is None or name in names):
            out[name] = read_bytes(fs, info.path)
    return out


def materialize_files(files: dict[str, bytes], directory: str | Path) -> Path:
    """Write files into a local directory (e.g. a tokenizer for `from_pretrained`)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return directory
