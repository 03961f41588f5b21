"""Reusing an earlier preparation: an output whose manifest says it succeeded with the same cache
key is what this preparation would write again, so it is returned as it is, in about the time
listing the inputs takes, whatever their size.

The key covers what the output follows from: the spec (its hash: sources, template, packing,
split, output...), the tokenizer's files (their SHA-256) and every input file's path, size and
modification time, as the listing gives them. An object store's listing carries its
Last-Modified, which every write of the object renews, but not its ETag (pyarrow's FileInfo has
none), so an object rewritten with the same size within the same second goes unnoticed: `--force`
prepares again whatever the key says. The raysft version is in the key too: another version may
render, select or pack differently.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging

import pyarrow.fs as pafs

from jobs.common import storage, tokenizer_files
from jobs.common.contract import Manifest, ManifestError, read_manifest
from jobs.prepare.inputs import Located, Options
from jobs.prepare.spec import DatasetSpec

log = logging.getLogger("raysft.prepare")
try:
    VERSION = importlib.metadata.version("raysft")
except importlib.metadata.PackageNotFoundError:  # run from a checkout that was never installed
    VERSION = "not installed"


def cache_key(spec: DatasetSpec, located: Located) -> str:
    """SHA-256 over the spec hash, the tokenizer's SHA-256, the raysft version and, source by
    source, each file's path, size and modification time."""
    document = {
        "raysft": VERSION,
        "spec": spec.spec_hash(),
        "tokenizer": tokenizer_files.sha256(located.tokenizer_files),
        "sources": [[[f.path, f.size, f.mtime_ns] for f in files] for _, files in located.sources],
    }
    return hashlib.sha256(json.dumps(document, separators=(",", ":")).encode()).hexdigest()


def files_present(output: str, names: list[str]) -> bool:
    """Whether every file a manifest lists is still in the output: one listing of the output, not
    a request per file (a forced preparation that broke off may have deleted them)."""
    fs, base = storage.filesystem(output)
    listed = {info.path[len(base) + 1:] for info in fs.get_file_info(pafs.FileSelector(base, recursive=True,
                                                                                        allow_not_found=True))}
    return listed.issuperset(names)


def reusable(spec: DatasetSpec, key: str) -> Manifest | None:
    """The manifest at `spec.output` if it succeeded with this cache key and its files are there."""
    try:
        manifest = read_manifest(spec.output)
    except (FileNotFoundError, ManifestError):
        return None
    if not manifest.succeeded or manifest.cache_key != key or not files_present(spec.output, manifest.files):
        return None
    return manifest


def cached_manifest(spec: DatasetSpec, located: Located, options: Options) -> Manifest | None:
    """The earlier output this preparation can return instead of preparing, or None: always None
    with `--force`, or when an input is missing (`resolve_inputs` then reports it)."""
    if options.force or located.problems:
        return None
    manifest = reusable(spec, cache_key(spec, located))
    if manifest is not None:
        log.info("prepare: reusing %s: spec, inputs and tokenizer unchanged since %s (--force prepares again)",
                 spec.output, manifest.created_at)
    return manifest
