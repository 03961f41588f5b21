"""FSDP2, the third engine, on 2 CPU workers (gloo): LoRA and full fine-tuning, sharded DCP
checkpoints on S3 (the moto server), exact resume after a killed worker, a resume onto another
number of workers, exports that load in a fresh process and compute what training computed, and
the same losses as DDP and ZeRO-2 step for step (`docs/training-spec.md`, "Engines")."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file
from support.jobs import REFERENCE_STEPS as STEPS
from support.jobs import (
    Finished,
    finished,
    max_difference,
    reference_spec,
    run,
    run_watching,
    step_metrics,
    train_workers,
)

from jobs.common import run_layout, tokenizer_files
from jobs.train.evaluate import evaluate
from jobs.train.packed_batch import collate

# Each test trains real 2-worker runs (40-90 s each on 2 cores): `make test-slow`.
pytestmark = [pytest.mark.integration, pytest.mark.slow]
FSDP = {"kind": "fsdp"}


def engine_spec(tiny_model, prepared, storage, name: str, strategy: dict, **overrides) -> dict:
    """The reference spec on `strategy`, every checkpoint kept."""
    return reference_spec(tiny_model, prepared, storage, name, strategy=strategy,
                          checkpoint={"storage": str(storage), "every_steps": 5, "keep": 4}) | overrides


@pytest.fixture(scope="module")
def fsdp_lora(tiny_model, prepared, tmp_path_factory) -> Finished:
    """An FSDP2 LoRA run, never interrupted."""
    storage = tmp_path_factory.mktemp("fsdp")
    proc = run("jobs.train", engine_spec(tiny_model, prepared, storage, "lora", FSDP))
    return finished(storage, "lora", proc.stdout)


def validation_loss(model_dir: Path, prepared: Path) -> float:
    """The token-weighted loss of a saved model over the prepared validation split, computed in
    this process, apart from the training run."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = tokenizer_files.load(tokenizer_files.fetch(str(model_dir)))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    table = pq.read_table(prepared / "val")
    rows = [{k: table.column(k)[i].as_py() for k in ("input_ids", "labels", "position_ids", "seq_lens")}
            for i in range(table.num_rows)]
    rows = [{k: torch.tensor(v).numpy() for k, v in row.items()} for row in rows]
    metrics = evaluate(SimpleNamespace(module=model, forward=model), [collate([row], pad) for row in rows], lambda x: x)
    return metrics["eval_loss"]


@pytest.fixture
def ddp_lora(tiny_model, prepared, tmp_path) -> Finished:
    proc = run("jobs.train", engine_spec(tiny_model, prepared, tmp_path, "ddp", {"kind": "ddp"}))
    return finished(tmp_path, "ddp", proc.stdout)


@pytest.mark.parametrize("other", ["ddp_lora", "zero2_reference"], ids=["ddp", "zero2"])
def test_fsdp_ddp_and_zero2_train_the_same_steps(fsdp_lora, other, request, record_property):
    """Over the same data and seed every engine computes the same losses and adapter: switching
    engines changes memory and speed, not results."""
    other = request.getfixturevalue(other)
    theirs, ours = step_metrics(other.output), step_metrics(fsdp_lora.output)
    assert sorted(theirs) == sorted(ours) == list(range(1, STEPS + 1))
    worst_loss = max(abs(theirs[s]["loss"] - ours[s]["loss"]) for s in ours)
    worst_weight = max_difference(other.adapter, fsdp_lora.adapter)
    record_property("max_loss_difference", worst_loss)
    record_property("max_adapter_difference", worst_weight)
    assert worst_loss < 1e-4 and worst_weight < 1e-4


def test_fsdp_lora_checkpoints_to_s3_and_resumes_exactly_after_a_killed_worker(tiny_model, prepared, fsdp_lora,
                                                                               s3_server, tmp_path, record_property):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server["AWS_ENDPOINT_URL"])
    s3.create_bucket(Bucket="ckpt")
    spec = engine_spec(tiny_model, prepared, "s3://ckpt/runs", "lora", FSDP, max_failures=1)

    def registered_step() -> int | None:
        try:
            body = s3.get_object(Bucket="ckpt", Key="runs/lora/checkpoint_manager_snapshot.json")["Body"].read()
            latest = json.loads(body)["latest_checkpoint_result"]
        except (s3.exceptions.NoSuchKey, ValueError):
            return None
        return latest["metrics"]["step"] if latest else None

    killed_at: list[int] = []

    def kill_a_worker_once_a_checkpoint_is_registered(line, proc):
        if '{"step": ' not in line or (latest := registered_step()) is None:
            return False
        [*_, worker] = train_workers(proc)
        worker.kill()
        killed_at.append(latest)
        return True

    started = time.monotonic()
    watched = run_watching(spec, kill_a_worker_once_a_checkpoint_is_registered)
    assert killed_at and watched.code == 0, watched.output[-5000:]
    record_property("run_with_one_restart_s", round(watched.ended - started, 1))
    assert f"resumed from step {killed_at[0]} (epoch 0, micro-batch {killed_at[0] * 2}) after 1 failure(s)" in watched.output
    final = f"runs/lora/{run_layout.checkpoint_dir_name(STEPS)}"
    listed = s3.list_objects_v2(Bucket="ckpt", Prefix=f"{final}/fsdp_state/")["Contents"]
    assert {o["Key"].rsplit("/", 1)[1] for o in listed} - {""} == {".metadata", "__0_0.distcp", "__1_0.distcp"}  # each rank wrote its own shard
    adapter = tmp_path / "adapter.safetensors"
    s3.download_file("ckpt", f"{final}/adapter_model.safetensors", str(adapter))
    assert max_difference(load_file(adapter), fsdp_lora.adapter) < 1e-5


def test_fsdp_resumes_onto_another_number_of_workers(tiny_model, prepared, fsdp_lora, tmp_path):
    """DCP reshards the 2-worker checkpoint for one worker; the run continues (not bit for bit:
    the data is split otherwise) and learns on."""
    checkpoint = fsdp_lora.run_dir / run_layout.checkpoint_dir_name(10)
    spec = engine_spec(tiny_model, prepared, tmp_path, "one-worker", FSDP, scaling={"num_workers": 1},
                       checkpoint={"storage": str(tmp_path), "every_steps": 10, "keep": 1, "resume": str(checkpoint)})
    proc = run("jobs.train", spec)
    assert "checkpoint written by 2 workers, now 1" in proc.stdout
    assert "resumed from step 10 (epoch 0, micro-batch 20)" in proc.stdout
    steps = step_metrics(proc.stdout)
    assert sorted(steps) == list(range(11, STEPS + 1))
    assert abs(steps[11]["loss"] - step_metrics(fsdp_lora.output)[11]["loss"]) < 0.05  # the weights it resumed from


def test_fsdp_lora_export_computes_what_training_computed(fsdp_lora, prepared):
    final_eval = step_metrics(fsdp_lora.output)[STEPS]["eval_loss"]
    assert validation_loss(fsdp_lora.run_dir / "export/model", prepared) == pytest.approx(final_eval, abs=1e-4)


def test_fsdp_full_fine_tuning_with_gradient_checkpointing_exports_a_model_that_loads_fresh(
        tiny_model, prepared, tmp_path):
    spec = engine_spec(tiny_model, prepared, tmp_path, "full", FSDP, method="full", max_steps=10,
                       gradient_checkpointing=True, eval={"every_steps": 10})
    proc = run("jobs.train", spec)
    steps = step_metrics(proc.stdout)
    assert steps[10]["loss"] < steps[1]["loss"] - 0.5  # every weight trains: the loss falls fast
    exported = tmp_path / "full/export/model"
    trained = load_file(tmp_path / "full" / run_layout.checkpoint_dir_name(10) / "model.safetensors")
    assert max_difference(load_file(exported / "model.safetensors"), trained) == 0
    assert validation_loss(exported, prepared) == pytest.approx(steps[10]["eval_loss"], abs=1e-4)
