"""What a preparation needs before any row is read, checked up front with every problem at once:
the tokenizer (its files, fingerprinted later), the chat template it can mask with, and every
source file. Also the run options, which change how the job runs but never what it writes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from jobs.common import storage, tokenizer_files
from jobs.common.spec import SpecError
from jobs.prepare.spec import DatasetSpec
from jobs.prepare.templates import ChatTemplate, build_template


@dataclass(frozen=True)
class Options:
    """How to run, not what to produce: none of these change the output."""

    num_cpus: int | None = None  # size of a local cluster, when the job starts one for Ray Data
    # Inputs up to this size are read and tokenized in this process, without Ray Data: about
    # two seconds of tokenizing on one core, less than Ray workers take to start.
    in_process_max_bytes: int = 4 << 20
    batch_size: int = 256  # rows per tokenizer call
    blocks: int | None = None  # repartition parsed rows into this many blocks (default: one per file)
    rows_per_file: int = 8192  # Parquet rows per output file


@dataclass
class Inputs:
    tokenizer_files: dict[str, bytes]
    tokenizer: Any
    template: ChatTemplate  # checked against the tokenizer; its `eot` is trained after every reply
    files: list[tuple[Any, list[str]]]  # per source: (filesystem, paths)
    total_bytes: int  # the size of every file together


def resolve_inputs(spec: DatasetSpec) -> Inputs:
    """Load the tokenizer, check the template and find every source file; report all problems at once."""
    problems: list[str] = []
    files, tokenizer, template, total_bytes = [], None, None, 0
    try:
        tok_files = tokenizer_files.fetch(spec.tokenizer)
        tokenizer = tokenizer_files.load(tok_files)
    except Exception as e:  # any reason the tokenizer cannot be read is a spec problem here
        tok_files = {}
        problems.append(f"tokenizer: cannot load {spec.tokenizer!r}: {e}")
    if tokenizer is not None:
        try:
            template = build_template(spec.template, tokenizer, spec.eot_token)
        except ValueError as e:
            problems.append(f"template: {e}")
    for i, source in enumerate(spec.sources):
        try:
            fs, paths = storage.expand(source.uri)
        except Exception as e:
            problems.append(f"sources.{i}.uri: cannot list {source.uri!r}: {e}")
            continue
        if not paths:
            problems.append(f"sources.{i}.uri: no files match {source.uri!r}")
        files.append((fs, paths))
        total_bytes += sum(info.size for info in fs.get_file_info(paths))
    if problems:
        raise SpecError(problems)
    return Inputs(tok_files, tokenizer, template, files, total_bytes)
