import json

import pytest
import yaml
from support import REPO

from jobs.common.spec import SpecError
from jobs.prepare.spec import DatasetSpec, SourceFormat, TemplateName, load_spec

MINIMAL = {"name": "d", "sources": [{"uri": "data.jsonl"}], "tokenizer": "tok", "output": "out"}


def test_defaults_and_enums():
    spec = load_spec(MINIMAL)
    assert spec.template is TemplateName.CHATML
    assert spec.sources[0].format is SourceFormat.AUTO
    assert spec.packing.value == "bfd" and spec.dedup.value == "exact" and spec.val_ratio == 0.05


def test_template_names_become_enums_and_jinja_stays_custom():
    assert load_spec(MINIMAL | {"template": "tokenizer"}).template is TemplateName.TOKENIZER
    custom = load_spec(MINIMAL | {"template": "{% for m in messages %}{{ m.content }}{% endfor %}"})
    assert custom.template_is_custom


def test_every_problem_is_reported_with_its_path():
    bad = {
        "name": "bad name!",
        "sources": [{"uri": "http://example.invalid/x.jsonl", "format": "alpacca", "weight": 0, "colour": 1},
                    {"uri": "a.csv", "format": "prompt_response"}],
        "tokenizer": "tok",
        "template": "chatmel",
        "max_seq_length": 4,
        "val_ratio": 1.5,
        "filters": {"min_prompt_chars": 10, "max_prompt_chars": 5},
        "output": "out",
        "unknown_top": True,
    }
    with pytest.raises(SpecError) as info:
        load_spec(bad)
    text = "\n".join(info.value.problems)
    for path in ("name:", "sources.0.uri:", "sources.0.format:", "sources.0.weight:", "sources.0.colour:",
                 "sources.1:", "template:", "max_seq_length:", "val_ratio:", "filters:", "unknown_top:"):
        assert path in text, f"{path} missing from:\n{text}"
    assert "fields.prompt and fields.response" in text  # the fix is in the message
    assert "use one of chatml" in text


def test_inline_json_and_yaml_file(tmp_path):
    assert load_spec(json.dumps(MINIMAL)).name == "d"
    f = tmp_path / "s.yaml"
    f.write_text("name: d\nsources: [{uri: x.jsonl}]\ntokenizer: t\noutput: o\n")
    assert load_spec(str(f)).sources[0].uri == "x.jsonl"
    with pytest.raises(SpecError, match="neither a readable file"):
        load_spec(str(tmp_path / "missing.yaml"))
    f.write_text("- not a mapping\n")
    with pytest.raises(SpecError, match="must be a mapping"):
        load_spec(str(f))


def test_yaml_is_safe_loaded(tmp_path):
    f = tmp_path / "evil.yaml"
    f.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(str(f))


def test_spec_hash_ignores_layout():
    a = load_spec(MINIMAL)
    b = load_spec(json.dumps(dict(reversed(list(MINIMAL.items())))))
    assert a.spec_hash() == b.spec_hash()
    assert a.spec_hash() != load_spec(MINIMAL | {"seed": 7}).spec_hash()


@pytest.mark.parametrize("path", sorted((REPO / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_is_valid(path):
    assert path.parent.name in ("datasets", "training", "pipelines", "evaluation", "sweeps"), \
        f"{path}: configs/ holds datasets/, training/, pipelines/, evaluation/ and sweeps/ specs"
    assert path.read_text().startswith("#"), "every preset opens with a comment giving its command"
    if path.parent.name == "sweeps":  # each run's training, as the service fills it in
        from jobs.train.spec import load_training_spec
        from service.sweeps import run_documents

        for run in run_documents(yaml.safe_load(path.read_text())):
            load_training_spec(run | {"datasets": [{"uri": "d"}], "checkpoint": run["checkpoint"] | {"storage": "c"}})
        assert "raysft submit sweep" in path.read_text().split("\ntraining:")[0]
        return
    if path.parent.name == "evaluation":
        from jobs.evaluate.spec import load_evaluation_spec

        load_evaluation_spec(str(path))
        assert "python -m jobs.evaluate" in path.read_text().split("\nname:")[0]
        return
    if path.parent.name == "pipelines":  # what the service fills in: outputs, the prepared dataset
        from jobs.train.spec import load_training_spec

        pipeline = yaml.safe_load(path.read_text())
        assert set(pipeline) == {"dataset", "training"}
        load_spec(pipeline["dataset"] | {"output": "out"})
        load_training_spec(pipeline["training"] | {"datasets": [{"uri": "d"}],
                                                   "checkpoint": pipeline["training"]["checkpoint"] | {"storage": "c"}})
        return
    if path.parent.name == "training":
        from jobs.train.preflight import check_environment
        from jobs.train.spec import load_training_spec

        spec = load_training_spec(str(path))
        gpus = spec.scaling.num_workers * spec.scaling.gpus_per_worker if spec.scaling.use_gpu else 0
        check_environment(spec, cluster_gpus=gpus, installed=lambda module: True)  # runs on the cluster it asks for
        assert "python -m jobs.train" in path.read_text().split("\nname:")[0] or "make demo" in path.read_text()
        return
    spec = load_spec(str(path))
    assert isinstance(spec, DatasetSpec)
    for source in spec.sources:  # local example sources exist
        if "://" not in source.uri:
            assert (REPO / source.uri).exists(), source.uri


def test_training_presets_cover_the_common_setups():
    names = {p.stem for p in (REPO / "configs/training").glob("*.yaml")}
    assert {"cpu-smoke", "lora-zero2-gpu", "full-zero3-offload", "qlora-single-gpu", "low-memory"} <= names


def test_docs_field_reference_matches_the_models():
    from jobs.common.spec import reference_markdown
    from jobs.prepare.spec import REFERENCE_MODELS

    assert reference_markdown(REFERENCE_MODELS) in (REPO / "docs/dataset-spec.md").read_text()


def test_hugging_face_ids_name_tokenizers_only():
    from jobs.common.model_source import hf_id
    from jobs.prepare.spec import DatasetSpec

    base = {"name": "d", "sources": [{"uri": "a.jsonl"}], "tokenizer": "hf://Qwen/Qwen2.5-0.5B@main", "output": "out"}
    assert DatasetSpec.model_validate(base).tokenizer == "hf://Qwen/Qwen2.5-0.5B@main"
    with pytest.raises(SpecError) as info:
        load_spec(base | {"output": "hf://org/name", "sources": [{"uri": "hf://org/data"}]})
    assert {p.split(":")[0] for p in info.value.problems} == {"output", "sources.0.uri"}
    assert hf_id("hf://Qwen/Qwen2.5-0.5B@v1") == ("Qwen/Qwen2.5-0.5B", "v1")
    assert hf_id("Qwen/Qwen2.5-0.5B") == ("Qwen/Qwen2.5-0.5B", None)  # no such local path here
    assert hf_id("configs/data") is None and hf_id("s3://b/m") is None and hf_id(".cache/models/x") is None


def test_source_splits_are_checked_and_described():
    base = {"name": "t", "tokenizer": "tok", "output": "out", "val_ratio": 0.1}
    with pytest.raises(SpecError, match="remove weight 2.0 from val.jsonl"):
        load_spec(base | {"sources": [{"uri": "a.jsonl"}, {"uri": "val.jsonl", "split": "val", "weight": 2.0}]})
    with pytest.raises(SpecError, match="every source is `split: val`: give the training data as another source"):
        load_spec(base | {"sources": [{"uri": "val.jsonl", "split": "val"}]})
    with pytest.raises(SpecError, match="sources.0.split"):
        load_spec(base | {"sources": [{"uri": "a.jsonl", "split": "test"}]})
    spec = load_spec(base | {"sources": [{"uri": "a.jsonl"}, {"uri": "b.jsonl", "split": "train"}]})
    assert spec.split_origins() == {"train": ["a.jsonl (90% by hash, seed 42)", "b.jsonl (all)"],
                                    "val": ["a.jsonl (10% by hash, seed 42)"]}
