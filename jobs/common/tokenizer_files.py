"""Tokenizer files: fetch them once, fingerprint them, and load them with `from_pretrained`.

The fingerprint (SHA-256 over the tokenizer's files, by name) is what ties a prepared dataset to
the model it may train: the training stage recomputes it from the model directory and refuses a
mismatch. Only tokenizer files count, so a model directory and a bare tokenizer directory with
the same tokenizer hash equal.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from typing import Any

from jobs.common import model_source, storage

TOKENIZER_FILES = {
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
}


def fetch(uri: str) -> dict[str, bytes]:
    """The tokenizer files of a model or tokenizer directory, or of a Hugging Face id."""
    files = storage.read_dir_files(model_source.resolve(uri), TOKENIZER_FILES)
    if "tokenizer.json" not in files and "tokenizer.model" not in files and "vocab.json" not in files:
        raise FileNotFoundError(f"{uri}: no tokenizer files (tokenizer.json, tokenizer.model or vocab.json)")
    return files


def sha256(files: dict[str, bytes]) -> str:
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode() + b"\0" + len(files[name]).to_bytes(8, "big"))
        h.update(files[name])
    return h.hexdigest()


# Tokenizers saved as plain fast tokenizers (`tokenizer.json` alone) load with that class
# directly. AutoTokenizer would give the same tokenizer, but it imports torch through the model
# config classes: two of the six seconds a small preparation's driver takes.
PLAIN_FAST_CLASSES = {"PreTrainedTokenizerFast", "TokenizersBackend"}


def load(files: dict[str, bytes]) -> Any:
    """A transformers tokenizer built through `from_pretrained`: the plain fast class where the
    files name it, `AutoTokenizer` for every other tokenizer."""
    try:
        named = json.loads(files.get("tokenizer_config.json", b"{}")).get("tokenizer_class")
    except (ValueError, AttributeError):
        named = None  # AutoTokenizer reports what is wrong with the file
    if named in PLAIN_FAST_CLASSES and "tokenizer.json" in files:
        from transformers import PreTrainedTokenizerFast as tokenizer_class
    else:
        from transformers import AutoTokenizer as tokenizer_class

    with tempfile.TemporaryDirectory(prefix="raysft-tokenizer-") as tmp:
        storage.materialize_files(files, tmp)
        return tokenizer_class.from_pretrained(tmp)
