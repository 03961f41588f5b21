"""The training spec, the GPU-only checks and the tokenizer-hash check."""

import json
from pathlib import Path

import pytest
from support import REPO
from support.jobs import stub_manifest

from jobs import scaffold_model
from jobs.common.spec import SpecError
from jobs.train.preflight import check_datasets, check_environment
from jobs.train.spec import DdpStrategy, DeepSpeedStrategy, FsdpStrategy, load_training_spec

MINIMAL = {"name": "run", "model": {"uri": "m", "dtype": "fp32"}, "datasets": [{"uri": "d"}],
           "checkpoint": {"storage": "ckpt"}}


def test_defaults_and_strategy_union():
    spec = load_training_spec(MINIMAL)
    assert isinstance(spec.strategy, DeepSpeedStrategy) and spec.strategy.zero_stage == 2
    assert spec.method.value == "lora" and spec.lora.target_modules == "all-linear"
    ddp = load_training_spec(MINIMAL | {"strategy": {"kind": "ddp"}})
    assert isinstance(ddp.strategy, DdpStrategy)
    fsdp = load_training_spec(MINIMAL | {"strategy": {"kind": "fsdp"}})
    assert isinstance(fsdp.strategy, FsdpStrategy) and fsdp.strategy.reshard_after_forward
    assert not fsdp.strategy.offload_params


def test_fsdp_refuses_what_it_cannot_train_with_the_fix():
    with pytest.raises(SpecError) as info:
        load_training_spec(MINIMAL | {"method": "qlora", "strategy": {"kind": "fsdp"},
                                      "model": {"uri": "m", "dtype": "fp16"}})
    text = "\n".join(info.value.problems)
    assert "qlora cannot shard 4-bit weights (fsdp shards them)" in text and "use model.dtype bf16" in text
    offloaded = load_training_spec(MINIMAL | {"strategy": {"kind": "fsdp", "offload_params": True}})
    with pytest.raises(SpecError, match="set offload_params: false"):
        check_environment(offloaded, cluster_gpus=0)
    gpu = load_training_spec(MINIMAL | {"strategy": {"kind": "fsdp", "offload_params": True},
                                        "scaling": {"use_gpu": True, "num_workers": 2}})
    check_environment(gpu, cluster_gpus=2, installed=lambda name: True)


def test_the_service_finds_a_run_where_the_job_writes_it():
    from service.job_outputs import run_dir

    for storage in ("s3://bucket/runs/", "/data/checkpoints"):
        spec = load_training_spec(MINIMAL | {"checkpoint": {"storage": storage}})
        assert spec.run_uri == storage.rstrip("/") + "/run"
        assert run_dir(json.loads(spec.model_dump_json())) == spec.run_uri


def test_every_problem_with_its_path():
    bad = MINIMAL | {"method": "qlora", "strategy": {"kind": "deepspeed", "zero_stage": 3},
                     "batch": {"micro_batch_size": 0}, "lora": {"r": 0, "rank": 8},
                     "checkpoint": {"storage": "ftp://x", "resume": "http://example.invalid/ckpt"}}
    with pytest.raises(SpecError) as info:
        load_training_spec(bad)
    text = "\n".join(info.value.problems)
    for path in ("batch.micro_batch_size", "lora.r", "lora.rank", "checkpoint.storage", "checkpoint.resume"):
        assert path in text, text
    with pytest.raises(SpecError, match="offload_params needs zero_stage 3"):
        load_training_spec(MINIMAL | {"strategy": {"kind": "deepspeed", "zero_stage": 2, "offload_params": True}})
    with pytest.raises(SpecError, match="zero_stage 2 or ddp"):
        load_training_spec(MINIMAL | {"method": "qlora", "strategy": {"kind": "deepspeed", "zero_stage": 3}})


def test_gpu_only_features_fail_without_a_gpu_with_the_fix():
    spec = load_training_spec(MINIMAL | {"method": "qlora", "strategy": {"kind": "ddp"},
                                         "model": {"uri": "m", "dtype": "bf16", "attn_implementation": "flash_attention_2"},
                                         "scaling": {"use_gpu": True, "num_workers": 2}})
    with pytest.raises(SpecError) as info:
        check_environment(spec, cluster_gpus=0)
    text = "\n".join(info.value.problems)
    assert "use_gpu" in text and "qlora needs a GPU" in text and "flash_attention_2 needs a GPU" in text
    assert "bf16 needs a GPU here: use fp32" in text
    check_environment(spec, cluster_gpus=8, installed=lambda name: True)  # fine on a GPU cluster
    check_environment(load_training_spec(MINIMAL), cluster_gpus=0)


def test_gpu_runs_need_enough_gpus_and_the_gpu_libraries():
    spec = load_training_spec(MINIMAL | {"method": "qlora", "strategy": {"kind": "ddp"},
                                         "model": {"uri": "m", "dtype": "bf16", "attn_implementation": "flash_attention_2"},
                                         "scaling": {"use_gpu": True, "num_workers": 4, "gpus_per_worker": 2}})
    with pytest.raises(SpecError) as info:
        check_environment(spec, cluster_gpus=4, installed=lambda name: False)
    text = "\n".join(info.value.problems)
    assert "8 GPUs wanted" in text and "has 4" in text
    assert "needs bitsandbytes" in text and "flash-attn" in text


def write_manifest(path: Path, sha: str, status: str = "succeeded"):
    path.mkdir(parents=True)
    (path / "manifest.json").write_text(stub_manifest(sha, status).to_json())


def test_dataset_tokenizer_must_match_the_model(tiny_model, tmp_path):
    from jobs.common import tokenizer_files

    model_sha = tokenizer_files.sha256(tokenizer_files.fetch(str(tiny_model)))
    write_manifest(tmp_path / "good", model_sha)
    other = tmp_path / "other-model"
    scaffold_model.scaffold(other, vocab_size=512)
    other_sha = tokenizer_files.sha256(tokenizer_files.fetch(str(other)))
    write_manifest(tmp_path / "bad", other_sha)
    write_manifest(tmp_path / "failed", model_sha, status="failed")
    spec = MINIMAL | {"model": {"uri": str(tiny_model), "dtype": "fp32"}}
    assert len(check_datasets(load_training_spec(spec | {"datasets": [{"uri": str(tmp_path / "good")}]}))) == 1
    refs = [{"uri": str(tmp_path / n)} for n in ("good", "bad", "failed", "missing")]
    with pytest.raises(SpecError) as info:
        check_datasets(load_training_spec(spec | {"datasets": refs}))
    text = "\n".join(info.value.problems)
    assert f"tokenized with tokenizer {other_sha}, but the model's tokenizer is {model_sha}" in text
    assert "datasets.2.uri: preparation" in text and "datasets.3.uri: no readable manifest.json" in text
    assert "datasets.0" not in text


def test_docs_field_reference_matches_the_models():
    from jobs.common.spec import reference_markdown
    from jobs.train.spec import REFERENCE_MODELS

    assert reference_markdown(REFERENCE_MODELS) in (REPO / "docs/training-spec.md").read_text()


def test_a_field_typo_names_the_nearest_field():
    with pytest.raises(SpecError) as info:
        load_training_spec(MINIMAL | {"model": {"uri": "m", "dtyp": "fp32"}, "datasets": [{"uri": "d", "wieght": 2}],
                                      "strategy": {"kind": "deepspeed", "zero_stag": 3}, "zzz": 1})
    assert info.value.problems[:3] == ["model.dtyp: unknown field: did you mean 'dtype'?",
                                       "datasets.0.wieght: unknown field: did you mean 'weight'?",
                                       "strategy.deepspeed.zero_stag: unknown field: did you mean 'zero_stage'?"]
    assert info.value.problems[3].startswith("zzz: unknown field: the fields here are batch, checkpoint, datasets")


def test_a_missing_model_directory_says_how_to_provide_one(tmp_path):
    missing = tmp_path / "no-model"
    with pytest.raises(SpecError) as info:
        check_datasets(load_training_spec(MINIMAL | {"model": {"uri": str(missing), "dtype": "fp32"}}))
    [problem] = info.value.problems
    assert problem.startswith(f"model.uri: no model with a tokenizer at '{missing}'")
    assert f"python -m jobs.scaffold_model {missing}" in problem
