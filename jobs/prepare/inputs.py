"""What a preparation needs before any row is read, checked up front with every problem at once:
the tokenizer (its files, fingerprinted later), the chat template it can mask with, and every
source file. Also the run options, which change how the job runs but never what it writes.

Finding the inputs (`locate_inputs`: the tokenizer's bytes and a listing of the sources) is
split from loading the tokenizer (`resolve_inputs`), which can take seconds (transformers, and
torch through AutoTokenizer): what is found is all the cache (`jobs.prepare.cache`) needs to
tell whether an earlier output can be reused without loading anything."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from jobs.common import storage, tokenizer_files
from jobs.common.spec import SpecError
from jobs.prepare import hub
from jobs.prepare.spec import DatasetSpec
from jobs.prepare.templates import ChatTemplate, build_template


@dataclass(frozen=True)
class Options:
    """How to run, not what to produce: none of these change the output."""

    num_cpus: int | None = None  # size of a local cluster, when the job starts one
    # Inputs up to this size are read and tokenized in this process, without Ray: about
    # two seconds of tokenizing on one core, less than Ray workers take to start.
    in_process_max_bytes: int = 4 << 20
    batch_size: int = 256  # rows per tokenizer call
    blocks: int | None = None  # tokenize in at least this many tasks, files split into parts (default: 2 per CPU)
    force: bool = False  # prepare again even where an earlier output of the same inputs can be reused


@dataclass(frozen=True)
class InputFile:
    """A source file as its listing describes it: what the cache key fingerprints it by."""

    path: str
    size: int
    mtime_ns: int | None  # modification time; an object's Last-Modified on S3 and GCS


@dataclass
class Located:
    """The tokenizer's files and every source file, found without loading anything."""

    tokenizer_files: dict[str, bytes]
    sources: list[tuple[Any, list[InputFile]]]  # per source: (filesystem, its files in read order)
    problems: list[str]  # what could not be found; `resolve_inputs` reports them with the rest


@dataclass
class Inputs:
    tokenizer_files: dict[str, bytes]
    tokenizer: Any
    template: ChatTemplate  # checked against the tokenizer; its `eot` is trained after every reply
    files: list[tuple[Any, list[str]]]  # per source: (filesystem, paths)
    total_bytes: int  # the size of every file together

    def numbered_files(self) -> list[tuple[int, Any, str]]:
        """(source index, filesystem, path) of every file, in the order files are numbered: by
        source, then path."""
        return [(i, fs, path) for i, (fs, paths) in enumerate(self.files) for path in paths]


def locate_inputs(spec: DatasetSpec) -> Located:
    """Fetch the tokenizer's files and list every source, collecting what cannot be found."""
    problems: list[str] = []
    try:
        tok_files = tokenizer_files.fetch(spec.tokenizer)
    except Exception as e:  # any reason the tokenizer cannot be read is a spec problem here
        tok_files = {}
        problems.append(f"tokenizer: cannot load {spec.tokenizer!r}: {e}")
    sources = []
    for i, source in enumerate(spec.sources):
        try:
            if hub.is_hub_dataset(source.uri):
                fs = hub.filesystem()
                infos = fs.get_file_info(hub.fetch(source.uri, source.subset, source.hub_split))
            else:
                fs, infos = storage.expand(source.uri)
        except Exception as e:
            problems.append(f"sources.{i}.uri: cannot list {source.uri!r}: {e}")
            continue
        if not infos:
            problems.append(f"sources.{i}.uri: no files match {source.uri!r}")
        sources.append((fs, [InputFile(info.path, info.size, info.mtime_ns) for info in infos]))
    return Located(tok_files, sources, problems)


def resolve_inputs(spec: DatasetSpec, located: Located | None = None) -> Inputs:
    """Load the tokenizer, check the template and find every source file (or take what
    `locate_inputs` found); report all problems at once."""
    located = located or locate_inputs(spec)
    problems, tokenizer, template = [], None, None
    if located.tokenizer_files:  # else `located.problems` says why
        try:
            tokenizer = tokenizer_files.load(located.tokenizer_files)
        except Exception as e:  # any reason the tokenizer cannot be read is a spec problem here
            problems.append(f"tokenizer: cannot load {spec.tokenizer!r}: {e}")
    if tokenizer is not None:
        try:
            template = build_template(spec.template, tokenizer, spec.eot_token)
        except ValueError as e:
            problems.append(f"template: {e}")
    problems += located.problems
    if problems:
        raise SpecError(problems)
    files = [(fs, [f.path for f in found]) for fs, found in located.sources]
    total_bytes = sum(f.size for _, found in located.sources for f in found)
    return Inputs(located.tokenizer_files, tokenizer, template, files, total_bytes)
