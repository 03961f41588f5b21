"""OpenAI's fine-tuning terms in raysft's (service/fine_tuning.py), function by function; the
surface itself is driven through the `openai` package in test_openai.py."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from jobs.common.spec import SpecError
from service import fine_tuning as ft
from service.settings import FineTunableModel, Settings


def base(**training) -> FineTunableModel:
    return FineTunableModel(uri="s3://models/m", training=training)


@pytest.mark.parametrize(("batch_size", "workers", "micro", "expected"), [
    (8, 1, 4, (4, 2)),    # the configured micro-batch, accumulated twice
    (6, 2, 4, (3, 1)),    # 3 per worker: the largest micro-batch up to 4 that divides it
    (7, 1, 4, (1, 7)),    # a prime: micro-batches of one
    (2, 2, 4, (1, 1)),
    (64, 4, 8, (8, 2)),
])
def test_a_batch_size_is_split_over_workers_then_into_micro_batches(batch_size, workers, micro, expected):
    fields = ft.batch_fields(batch_size, base(scaling={"num_workers": workers}, batch={"micro_batch_size": micro}))
    assert (fields["batch.micro_batch_size"], fields["batch.grad_accum"]) == expected
    assert expected[0] * expected[1] * workers == batch_size


def test_a_batch_size_that_does_not_split_over_the_workers_is_refused_with_the_fix():
    with pytest.raises(SpecError, match="use a multiple of 4"):
        ft.batch_fields(6, base(scaling={"num_workers": 4}))


def test_auto_keeps_the_configured_training_and_numbers_replace_it():
    configured = base(optim={"lr": 1e-3, "warmup_ratio": 0.1}, max_steps=50)
    request = ft.FineTuningRequest(model="m", training_file="file-a")
    training = ft.pipeline_body(request, configured, "ft-m")["training"]
    assert training == {"optim": {"lr": 1e-3, "warmup_ratio": 0.1}, "max_steps": 50, "name": "ft-m",
                        "model": {"uri": "s3://models/m"}}
    request = ft.FineTuningRequest(model="m", training_file="file-a", seed=3,
                                   hyperparameters={"n_epochs": 4, "learning_rate_multiplier": 0.5})
    training = ft.pipeline_body(request, configured, "ft-m")["training"]
    assert (training["epochs"], training["max_steps"], training["optim"]["lr"], training["seed"]) == (4, None, 5e-4, 3)
    assert ft.hyperparameters({"epochs": 4, "optim": {"lr": 5e-4}, "batch": {"micro_batch_size": 2, "grad_accum": 3},
                               "scaling": {"num_workers": 2}}, 1e-3) == {
        "n_epochs": 4, "batch_size": 12, "learning_rate_multiplier": 0.5}


def test_a_base_models_name_cannot_hold_what_names_a_fine_tuned_model():
    with pytest.raises(ValidationError, match="ft:<base>:<tenant>:<suffix>:<job>"):
        Settings(openai_models={"org/model:v1": {"uri": "s3://m"}})
    assert ft.model_name("smollm2", "acme", None, "abc") == "ft:smollm2:acme::abc"
