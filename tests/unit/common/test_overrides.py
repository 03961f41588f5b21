"""`--set path=value` overrides: values typed as a user expects, paths through mappings and lists,
every problem reported at once with the path, and the same checks as a spec file gets."""

from __future__ import annotations

import pytest

from jobs.common.overrides import apply_overrides, parse_value
from jobs.common.spec import SpecError
from jobs.train.spec import load_training_spec

TRAINING = {"name": "run", "model": {"uri": "m"}, "datasets": [{"uri": "a"}, {"uri": "b"}],
            "checkpoint": {"storage": "ckpt"}}


@pytest.mark.parametrize("text, value", [
    ("2e-4", 2e-4), ("3", 3), ("true", True), ("null", None), ('["q1", "q2"]', ["q1", "q2"]),
    ("[q1, q2]", ["q1", "q2"]), ("{kind: ddp}", {"kind": "ddp"}), ("all-linear", "all-linear"),
    ("on", "on"), ("2026-01-01", "2026-01-01"), ("a: b", "a: b"), ("", ""),
])
def test_values_are_json_then_yaml_collections_then_text(text, value):
    assert parse_value(text) == value


def test_paths_walk_mappings_and_lists_and_create_missing_mappings():
    out = apply_overrides(TRAINING, ["optim.lr=2e-4", "datasets.1.weight=0.5", "strategy={kind: ddp}", "epochs=3"])
    assert out["optim"] == {"lr": 2e-4} and out["datasets"][1] == {"uri": "b", "weight": 0.5}
    assert out["strategy"] == {"kind": "ddp"} and out["epochs"] == 3
    assert "optim" not in TRAINING and "weight" not in TRAINING["datasets"][1]  # the document is left alone
    spec = load_training_spec(TRAINING, ["optim.lr=2e-4", "datasets.1.weight=0.5", "strategy.kind=fsdp"])
    assert spec.optim.lr == 2e-4 and spec.datasets[1].weight == 0.5 and spec.strategy.kind == "fsdp"


def test_every_malformed_override_is_reported_at_once_with_its_path():
    with pytest.raises(SpecError) as info:
        apply_overrides(TRAINING, ["epochs", "datasets.2.weight=1", "name.first=x", "datasets.x=1", "=1"])
    assert info.value.problems == [
        "--set 'epochs': write path.to.field=value (for example optim.lr=2e-4)",
        "--set datasets.2: datasets is a list of 2: use an index below it",
        "--set name.first: name is a value, not a mapping",
        "--set datasets.x: datasets is a list of 2: use an index below it",
        "--set '=1': write path.to.field=value (for example optim.lr=2e-4)",
    ]


def test_an_override_is_validated_like_the_file_naming_the_field():
    with pytest.raises(SpecError) as info:
        load_training_spec(TRAINING, ["optim.lrr=1", "batch.micro_batch_size=0"])
    text = "\n".join(info.value.problems)
    assert "optim.lrr" in text and "batch.micro_batch_size" in text


def test_the_job_entrypoints_take_overrides(tmp_path, capsys):
    from jobs.prepare.__main__ import main as prepare
    from jobs.train.__main__ import main as train

    assert train(["--spec", str(TRAINING).replace("'", '"'), "--set", "batch.grad_accum=0", "--dry-run"]) == 2
    assert "batch.grad_accum" in capsys.readouterr().err
    dataset = '{"name": "d", "sources": [{"uri": "a.jsonl"}], "tokenizer": "t", "output": "o"}'
    assert prepare(["--spec", dataset, "--set", "max_seq_length=-1", "--set", "val_ratio"]) == 2
    err = capsys.readouterr().err
    assert "--set 'val_ratio'" in err


def test_fields_are_set_by_path_with_their_values_as_given():
    from jobs.common.overrides import set_fields

    document = {"optim": {"lr": 0.01}, "datasets": [{"uri": "a"}]}
    assert set_fields(document, {"optim.lr": 2e-4, "datasets.0.weight": 2, "lora.r": 16}) == {
        "optim": {"lr": 2e-4}, "datasets": [{"uri": "a", "weight": 2}], "lora": {"r": 16}}
    assert document == {"optim": {"lr": 0.01}, "datasets": [{"uri": "a"}]}  # left alone
    with pytest.raises(SpecError) as err:
        set_fields(document, {"datasets.3.weight": 2, "optim.lr.x": 1})
    assert len(err.value.problems) == 2
