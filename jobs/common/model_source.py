"""Models and tokenizers named by Hugging Face id: `hf://org/name[@revision]`, or a bare
`org/name` where no such local path exists. They resolve through `huggingface_hub` into its
cache, which honours `HF_HOME` (or `HF_HUB_CACHE`), `HF_TOKEN`, `HF_HUB_OFFLINE` and
`HF_ENDPOINT` from the job's environment; nothing in a spec carries a token. Only what training
reads is fetched: configs, safetensors weights and tokenizer files, never pickled weights.

Every node resolves the id itself: the driver for the tokenizer and the plan, each training
worker for the weights. A cache shared by the nodes (a volume under HF_HOME) downloads once.
"""

from __future__ import annotations

import os
import re

from jobs.common.spec import MODEL_SCHEME

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
MODEL_FILES = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken"]


class ModelNotFound(ValueError):
    """A Hugging Face id that cannot be resolved here; the message says how to provide the model."""


def hf_id(uri: str) -> tuple[str, str | None] | None:
    """(repo id, revision) when `uri` names a Hugging Face model, else None (a path or an object store URI)."""
    if uri.startswith(MODEL_SCHEME):
        repo, _, revision = uri[len(MODEL_SCHEME):].partition("@")
        return repo, revision or None
    if "://" not in uri and REPO_ID.match(uri) and not os.path.exists(uri):
        return uri, None
    return None


def unreachable(error: Exception) -> str:
    """Why the Hub could not give a repository: offline and not cached, or the Hub's own answer."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set and it is not in the cache"
    return f"{type(error).__name__}: {error}"


def resolve(uri: str) -> str:
    """A local directory holding the model for a Hugging Face id; any other URI unchanged."""
    named = hf_id(uri)
    if named is None:
        return uri
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo, revision = named
    try:
        return snapshot_download(repo, revision=revision, allow_patterns=MODEL_FILES)
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as e:
        raise ModelNotFound(
            f"{uri!r} is neither a local path nor a Hugging Face model this node can get ({unreachable(e)}). Provide it one "
            f"of these ways: download it ahead of time into the cache the cluster shares (HF_HOME; "
            f"`huggingface-cli download {repo}`), copy the model directory to s3:// and name that, or convert a "
            "GGUF file with `python -m jobs.import_model FILE.gguf DIR` and name DIR") from None
