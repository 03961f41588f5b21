"""Dataset sources on the Hugging Face Hub: `hf://datasets/org/name[@revision][/path/in/repo]`.

The files are fetched through `huggingface_hub` into its cache, which honours `HF_HOME` (or
`HF_HUB_CACHE`), `HF_TOKEN`, `HF_HUB_OFFLINE` and `HF_ENDPOINT` from the job's environment, and
are then read like any local file (their sizes and modification times, under a snapshot named by
the revision's commit, make the cache key). Only the data files chosen are fetched:

- a path in the repository (a file, a directory or a glob) names them outright;
- otherwise the source's `hub_split` (default `train`) of its `subset` (a config, default none)
  is found by the Hub's own layout conventions: `data/train-*.parquet`, `train/...`,
  `<subset>/train-*`, the Parquet export's `<subset>/train/*.parquet`, `train.jsonl`, ...
  Where a split has Parquet files they are read; other data files only where it has none.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from jobs.common.model_source import unreachable

DATASET_SCHEME = "hf://datasets/"
DATA_EXTENSIONS = (".parquet", ".jsonl", ".json", ".csv", ".txt")


class DatasetNotFound(ValueError):
    """A Hub dataset (or its split) this node cannot get; the message says how to provide it."""


def is_hub_dataset(uri: str) -> bool:
    return uri.startswith(DATASET_SCHEME)


def parse(uri: str) -> tuple[str, str | None, str | None]:
    """(repo id, revision, path in the repository) of a `hf://datasets/` URI."""
    parts = uri[len(DATASET_SCHEME):].split("/")
    if len(parts) < 2 or not parts[0] or not parts[1].partition("@")[0]:
        raise ValueError(f"{uri!r}: name a dataset as hf://datasets/org/name[@revision][/path/in/repo]")
    name, _, revision = parts[1].partition("@")
    return f"{parts[0]}/{name}", revision or None, "/".join(parts[2:]).strip("/") or None


def split_patterns(subset: str | None, split: str) -> list[str]:
    """Where the Hub's conventions put a split's data files, most specific first."""
    roots = [f"{subset}/"] if subset else ["data/", ""]
    out = []
    for root in roots:
        out += [f"{root}{split}-*", f"{root}{split}.*", f"{root}{split}/*", f"{root}partial-{split}/*",
                f"{root}*-{split}-*", f"{root}*_{split}.*", f"{root}*-{split}.*"]
    return out


def chosen(files: list[str], patterns: list[str]) -> list[str]:
    """The data files (repository paths) matching the patterns; the Parquet ones where there are any."""
    data = [f for f in files if f.endswith(DATA_EXTENSIONS) and any(fnmatch.fnmatch(f, p) for p in patterns)]
    parquet = [f for f in data if f.endswith(".parquet")]
    return sorted(parquet or data)


def fetch(uri: str, subset: str | None = None, split: str | None = None) -> list[str]:
    """The files a source reads, fetched into this node's cache, as `HubCache` paths (pinned to
    the commit the revision names now)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo, revision, path = parse(uri)
    if path is not None:
        patterns = [path, f"{path}/*"] if not any(c in path for c in "*?[") else [path]
    else:
        patterns = split_patterns(subset, split or "train")
    try:
        # allow_patterns matches as `chosen` does (fnmatch, `*` crossing `/`): only these files are fetched.
        snapshot = Path(snapshot_download(repo, repo_type="dataset", revision=revision, allow_patterns=patterns))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as e:
        raise DatasetNotFound(
            f"{uri!r} is not a Hugging Face dataset this node can get ({unreachable(e)}). Download it ahead of time into the "
            f"cache the job uses (HF_HOME; `huggingface-cli download --repo-type dataset {repo}`), or copy its "
            "files to s3:// and name that") from None
    files = [p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()]
    found = chosen(files, patterns)
    if not found:
        what = f"path {path!r}" if path else f"split {split or 'train'!r}" + (f" of subset {subset!r}" if subset else "")
        raise DatasetNotFound(f"{uri!r} has no data files for {what} (looked for {', '.join(patterns[:4])}, ...): "
                              "name the files as hf://datasets/org/name/path/in/repo, or set hub_split / subset")
    return [f"{repo}@{snapshot.name}/{f}" for f in found]  # the snapshot's directory is named by its commit


class HubCache(pafs.FileSystemHandler):
    """The files of Hub dataset snapshots, as `org/name@commit/path/in/repo`, read from the Hugging
    Face cache of the node that reads them and fetched into it where missing: whichever node a
    read task runs on gets its file itself (the same commit, so the same bytes). Read-only."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HubCache)

    def __ne__(self, other: object) -> bool:
        return not self == other

    def get_type_name(self) -> str:
        return "hf-datasets"

    def normalize_path(self, path: str) -> str:
        return path

    @staticmethod
    def local(path: str) -> str:
        from huggingface_hub import hf_hub_download

        named, _, file = path.partition("/")[2].partition("/")
        repo = f"{path.partition('/')[0]}/{named.partition('@')[0]}"
        return hf_hub_download(repo, file, repo_type="dataset", revision=named.partition("@")[2])

    def get_file_info(self, paths: list[str]) -> list[pafs.FileInfo]:
        infos = []
        for path in paths:
            found = pafs.LocalFileSystem().get_file_info(self.local(path))
            infos.append(pafs.FileInfo(path, type=found.type, size=found.size, mtime_ns=found.mtime_ns))
        return infos

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        raise NotImplementedError("a Hub dataset's files are named one by one (jobs.prepare.hub.fetch)")

    def open_input_stream(self, path: str) -> pa.NativeFile:
        return pa.OSFile(self.local(path), mode="r")

    def open_input_file(self, path: str) -> pa.NativeFile:
        return pa.OSFile(self.local(path), mode="r")

    def _read_only(self, *args: object) -> None:
        raise OSError("Hub datasets are read-only here")

    create_dir = delete_dir = delete_dir_contents = delete_root_dir_contents = delete_file = _read_only
    move = copy_file = open_output_stream = open_append_stream = _read_only


def filesystem() -> pafs.FileSystem:
    return pafs.PyFileSystem(HubCache())
