"""The contract between the stages: what `jobs.prepare` writes and `jobs.train` and the service
read. A prepared dataset is a directory:

    train/part-*.parquet, val/part-*.parquet   TOKEN_COLUMNS, one packed row each
    rejects/part-*.jsonl                       every rejected row with its reason, per input file
    DATA_CARD.md                               for people
    manifest.json                              `Manifest`, written last: its presence marks a complete output

The manifest is a typed model with a format version, so a reader gets fields, not string keys,
and a manifest of another version is refused with what to do.
"""

from __future__ import annotations

import json
import posixpath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from jobs.common import storage

IGNORE_INDEX = -100  # the label of a token that carries no loss (PyTorch's cross-entropy default)
TOKEN_COLUMNS = ("input_ids", "labels", "position_ids", "seq_lens")
SPLITS = ("train", "val")
MANIFEST_FILE = "manifest.json"
DATA_CARD_FILE = "DATA_CARD.md"
REJECTS_DIR = "rejects"  # part-NNNNN.jsonl per input file with rejects; in name order: (source, file, line)
MANIFEST_VERSION = 2  # 2: typed, with the serving chat template


class ManifestError(ValueError):
    """A manifest that cannot be read: missing, of another format version, or malformed."""


class _Part(BaseModel):
    # Readers ignore what a newer writer of the same version added; the writer fills every field.
    model_config = ConfigDict(extra="ignore")


class TokenizerInfo(_Part):
    uri: str
    sha256: str  # over the tokenizer's files by name: ties the data to the model it may train
    vocab_size: int
    eos_token: str | None
    pad_token: str | None


class TemplateInfo(_Part):
    name: str  # a built-in template's name, `tokenizer`, or `custom`
    eot: str  # what is trained after a reply another turn follows: where generation stops
    eot_source: Literal["template", "spec", "eos"]  # rendered by the template, or inserted (eot_token, else eos)
    eot_last: str | None = None  # what is trained after the final reply, where it differs (gpt-oss: <|return|>)
    stop_tokens: list[str] = Field(default_factory=list)  # every token ending a reply: the export's eos_token_id
    chat_template: str | None  # the Jinja template to serve the trained model with; None: the tokenizer's own


class Counts(_Part):
    rows_read: int
    rows_beyond_max_samples: dict[str, int]  # by source URI
    accepted: int
    rejected: dict[str, int]  # by reason
    rejected_total: int
    invalid: int  # rejects that count against max_reject_ratio
    duplicates: int
    truncated: int
    dropped: int
    samples: dict[str, int]  # by split, sampling-weight copies included


class TokenCount(_Part):
    all: int
    trainable: int


class Tokens(TokenCount):
    by_split: dict[str, TokenCount]


class PackingInfo(_Part):
    mode: str
    max_seq_length: int
    rows: dict[str, int]  # packed rows by split
    efficiency: float  # share of token slots holding real tokens


class Segment(_Part):
    """A run of a rendered example's tokens, decoded: trained (labels kept) or not (label -100)."""
    text: str
    trained: bool


class Manifest(_Part):
    format_version: Literal[2] = MANIFEST_VERSION
    status: Literal["succeeded", "failed"]
    name: str
    output: str
    spec: dict[str, Any]  # the dataset spec as validated
    spec_hash: str
    tokenizer: TokenizerInfo
    template: TemplateInfo
    counts: Counts
    tokens: Tokens
    zero_trainable_rows: int
    sample_length: dict[str, int]  # percentiles, min, max
    packing: PackingInfo
    files: list[str]
    columns: list[str]
    seconds: float
    library_versions: dict[str, str]
    created_at: str
    # A few rendered samples, split where training starts and stops: what the data card and the
    # dashboard show. Empty for a failed preparation (and in manifests written before it existed).
    examples: list[list[Segment]] = []
    # What `jobs.prepare.cache` reuses this output by: the spec, the input files and the tokenizer
    # it was prepared from. None in manifests written before the cache, which are never reused.
    cache_key: str | None = None
    # By split, the sources its rows came from and their share (`DatasetSpec.split_origins`).
    # Empty in manifests written before sources could be a split of their own.
    split_origins: dict[str, list[str]] = {}

    @property
    def succeeded(self) -> bool:
        return self.status == "succeeded"

    def rows(self, split: str) -> int:
        return self.packing.rows.get(split, 0)

    def split_bytes(self, split: str) -> int:
        """What a split takes in memory as Arrow arrays: its tokens times the int32 columns
        (`seq_lens` is a few ints a row, counted as token-sized all the same)."""
        return self.tokens.by_split[split].all * 4 * len(self.columns)

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)


def parse_manifest(text: str | bytes, where: str = MANIFEST_FILE) -> Manifest:
    try:
        data = json.loads(text)
    except ValueError as e:
        raise ManifestError(f"{where} is not JSON ({e}): prepare the dataset again") from None
    version = data.get("format_version") if isinstance(data, dict) else None
    if version != MANIFEST_VERSION:
        raise ManifestError(f"{where} has format_version {version!r}; this raysft reads {MANIFEST_VERSION}: "
                            "prepare the dataset again with this version")
    try:
        return Manifest.model_validate(data)
    except ValidationError as e:
        fields = ", ".join(".".join(map(str, err["loc"])) for err in e.errors()[:8])
        raise ManifestError(f"{where} is incomplete or malformed ({fields}): prepare the dataset again") from None


def read_manifest(dataset_uri: str) -> Manifest:
    """The manifest of a prepared dataset directory; FileNotFoundError when there is none."""
    fs, base = storage.filesystem(dataset_uri)
    where = posixpath.join(dataset_uri.rstrip("/"), MANIFEST_FILE)
    return parse_manifest(storage.read_bytes(fs, posixpath.join(base, MANIFEST_FILE)), where)
