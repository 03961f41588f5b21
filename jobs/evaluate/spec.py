"""The evaluation spec: what `jobs.evaluate` scores, on what, and where the report goes.

A model is a base model, a training's export (`export/model`), or a base model with a LoRA adapter
(a training's `export/adapter`, or any LoRA checkpoint `step_NNNNNNNN`). It is scored on a prepared
dataset's split with the figures training reports (token-weighted loss, perplexity, token and
sequence accuracy) and answers prompts; with an adapter, the base model's figures come beside it.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from jobs.common.overrides import apply_overrides
from jobs.common.spec import Name, SpecModel, Uri, read_document, reference_markdown, validate
from jobs.train.spec import Generation, ModelSpec, ScalingSpec

REPORT_FILE = "evaluation.json"  # under `output`: what the job found


class ScoredSplit(StrEnum):
    VAL = "val"
    TRAIN = "train"


def greedy() -> Generation:
    return Generation(temperature=0.0)


def one_worker() -> ScalingSpec:
    return ScalingSpec(num_workers=1)


class EvaluationSpec(SpecModel):
    """A model, a prepared dataset's split and prompts: scored on Ray workers, reported as JSON."""

    name: Name = Field(description="Evaluation name: letters, digits, `.`, `_`, `-`.")
    model: ModelSpec = Field(description="The model scored: a base model, or a training's export/model.")
    adapter: Uri | None = Field(None, description="A LoRA adapter on the model: a training's export/adapter or a LoRA "
                                "checkpoint directory. The base model's figures (adapter disabled) come beside it.")
    dataset: Uri | None = Field(None, description="A prepared dataset (jobs.prepare's output) tokenized by the model's "
                                "tokenizer; its chat template and stop tokens are used for the prompts too.")
    split: ScoredSplit = Field(ScoredSplit.VAL, description="The dataset's split scored: val | train.")
    generation: Generation = Field(default_factory=greedy,
                                   description="Prompts answered, and how (greedy by default).")
    micro_batch_size: int = Field(4, ge=1, le=4096, description="Packed rows per forward pass.")
    scaling: ScalingSpec = Field(default_factory=one_worker,
                                 description="Workers the rows are shared among, and their resources.")
    seed: int = Field(42, description="Seed of sampled answers (temperature > 0).")
    output: Uri = Field(description="Directory the report (evaluation.json) is written to (local path or s3://).")

    @model_validator(mode="after")
    def _something_to_do(self) -> EvaluationSpec:
        if self.dataset is None and not self.generation.prompts:
            raise ValueError("nothing to evaluate: name a prepared dataset, or give generation.prompts")
        return self


def load_evaluation_spec(spec: str | Path | dict[str, Any], overrides: Iterable[str] = ()) -> EvaluationSpec:
    """The evaluation spec from a mapping, a file path, or an inline JSON/YAML string, with
    `--set path=value` overrides applied (`jobs.common.overrides`)."""
    return validate(EvaluationSpec, apply_overrides(read_document(spec), overrides))


REFERENCE_MODELS = (EvaluationSpec, Generation)

if __name__ == "__main__":
    print(reference_markdown(REFERENCE_MODELS))
