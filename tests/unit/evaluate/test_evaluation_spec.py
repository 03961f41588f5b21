"""The evaluation spec: validated like the others, documented from the models."""

import pytest
from support import REPO

from jobs.common.spec import SpecError
from jobs.evaluate.spec import EvaluationSpec, load_evaluation_spec

MINIMAL = {"name": "e", "model": {"uri": "m"}, "dataset": "d", "output": "out"}


def test_defaults_score_the_val_split_greedily_on_one_worker():
    spec = load_evaluation_spec(MINIMAL)
    assert spec.split.value == "val" and spec.generation.temperature == 0.0 and spec.scaling.num_workers == 1


def test_every_problem_is_reported_with_its_path():
    with pytest.raises(SpecError) as err:
        load_evaluation_spec({"name": "e", "model": {"uri": "m"}, "split": "test", "adapter": "ftp://x", "output": "o"})
    text = str(err.value)
    assert "split:" in text and "adapter:" in text
    with pytest.raises(SpecError, match="nothing to evaluate: name a prepared dataset, or give generation.prompts"):
        load_evaluation_spec({"name": "e", "model": {"uri": "m"}, "output": "o"})
    assert load_evaluation_spec(MINIMAL, ["split=train"]).split.value == "train"


def test_docs_field_reference_matches_the_models():
    from jobs.common.spec import reference_markdown
    from jobs.evaluate.spec import REFERENCE_MODELS

    assert REFERENCE_MODELS[0] is EvaluationSpec
    assert reference_markdown(REFERENCE_MODELS) in (REPO / "docs/evaluation.md").read_text()
