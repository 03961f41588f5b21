"""Exact resume. A 20-step LoRA run (ZeRO-2, 2 workers, dropout on, so the
random streams matter; two epochs of 11 steps, each in its own order) checkpointing every 5 steps
is killed after step 12 or in its second epoch and resubmitted, or loses a worker process mid-run;
each ends with the parameters of a run that never stopped. The same spec under a fresh name starts
from zero."""

from __future__ import annotations

import json
import time

import pytest
from safetensors.torch import load_file
from support.jobs import REFERENCE_STEPS as STEPS
from support.jobs import (
    Finished,
    finished,
    kill_tree,
    latest_registered_step,
    max_difference,
    reference_spec,
    run,
    run_watching,
    step_metrics,
    train_workers,
)

from jobs.common import run_layout

# Each test trains, kills and resumes real runs (40-110 s each on 2 cores): `make test-slow`.
pytestmark = [pytest.mark.integration, pytest.mark.slow]


def final_adapter(storage, name: str) -> dict:
    return load_file(storage / name / run_layout.checkpoint_dir_name(STEPS) / "adapter_model.safetensors")


def test_killed_job_resumes_exactly_from_its_latest_complete_checkpoint(tiny_model, prepared, zero2_reference,
                                                                        record_property):
    # The reference's storage holds a finished run of this very spec: under a fresh name, the
    # spec starts from zero all the same.
    storage = zero2_reference.run_dir.parent
    spec = reference_spec(tiny_model, prepared, storage, "killed")
    run_dir = storage / "killed"

    def kill_after_step_12(line, proc):
        if '{"step": 12,' in line:
            kill_tree(proc)  # the driver and its whole local Ray cluster, mid-run
            return True
        return False

    killed = run_watching(spec, kill_after_step_12)
    assert killed.code != 0
    assert "resumed" not in killed.output and sorted(step_metrics(killed.output))[0] == 1
    assert not (run_dir / run_layout.checkpoint_dir_name(STEPS)).exists()
    # Ray Train registers a checkpoint once every worker has uploaded it and the controller has
    # taken the report (it polls every 2 s), so step 10's may or may not be registered yet.
    latest = latest_registered_step(run_dir)
    assert latest in (5, 10)
    # What a crash during an upload leaves: a checkpoint directory Ray Train never registered.
    (run_dir / run_layout.checkpoint_dir_name(15)).mkdir(exist_ok=True)
    (run_dir / run_layout.checkpoint_dir_name(15) / "adapter_model.safetensors").write_bytes(b"cut short")

    resubmitted = time.monotonic()
    resumed = run_watching(spec)
    output = resumed.output
    assert resumed.code == 0, output[-5000:]
    assert f"resumed from step {latest} (epoch 0, micro-batch {latest * 2}) after 1 failure(s)" in output
    assert sorted(step_metrics(output)) == list(range(latest + 1, STEPS + 1))
    assert max_difference(final_adapter(storage, "killed"), zero2_reference.adapter) < 1e-5
    record_property("resubmit_to_first_new_step_s", round(resumed.first(f'{{"step": {latest + 1},') - resubmitted, 1))
    record_property("steps_redone", 12 - latest)
    # The history beside the checkpoints holds every step once: the steps after the checkpoint
    # that the killed attempt ran are gone.
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in history] == list(range(1, STEPS + 1))
    assert [entry["failures"] for entry in history] == [0] * latest + [1] * (STEPS - latest)
    # The running token totals came back with the checkpoint: every step's equal the reference's.
    reference = [json.loads(line) for line in (zero2_reference.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [e["tokens_seen"] for e in history] == [e["tokens_seen"] for e in reference if e["step"] > 0]
    assert ([e["trainable_tokens_seen"] for e in history]
            == [e["trainable_tokens_seen"] for e in reference if e["step"] > 0])


def test_a_job_killed_in_its_second_epoch_resumes_exactly(tiny_model, prepared, zero2_reference):
    """An epoch here is 11 steps (84 rows in steps of 8): the step-15 checkpoint is mid-way through
    the second epoch, whose order differs from the first's; the resumed run reads the rest of that
    same order."""
    storage = zero2_reference.run_dir.parent
    spec = reference_spec(tiny_model, prepared, storage, "killed-epoch-2")

    def kill_once_step_15_is_registered(line, proc):
        if '{"step": ' in line and latest_registered_step(storage / "killed-epoch-2") == 15:
            kill_tree(proc)
            return True
        return False

    killed = run_watching(spec, kill_once_step_15_is_registered)
    # Killed before step 20 was registered. Under load Ray Train may register step 15 only after
    # step 20's files are written: an unregistered checkpoint is ignored on resume (as in the
    # test above), so the run still resumes from 15.
    assert killed.code != 0 and latest_registered_step(storage / "killed-epoch-2") == 15, killed.output[-3000:]
    resumed = run_watching(spec)
    assert resumed.code == 0, resumed.output[-5000:]
    assert "resumed from step 15 (epoch 1, micro-batch 8) after 1 failure(s)" in resumed.output
    assert max_difference(final_adapter(storage, "killed-epoch-2"), zero2_reference.adapter) < 1e-5


@pytest.fixture(scope="module")
def streamed_reference(tiny_model, prepared, tmp_path_factory) -> Finished:
    """The same run with its splits streamed from storage, never interrupted: a streamed split is
    shuffled otherwise than a held one (blocks, then a buffer), so it has a reference of its own."""
    storage = tmp_path_factory.mktemp("streamed-reference")
    proc = run("jobs.train", reference_spec(tiny_model, prepared, storage, "reference"), args=("--in-memory-max-bytes", "0"))
    return finished(storage, "reference", proc.stdout)


# Streamed from storage, the splits are read again by every epoch, evaluation and restarted worker
# group: resuming is just as exact (against a reference that streamed them too), but each
# evaluation starts read tasks again, which makes the run too slow for `make test`.
@pytest.mark.parametrize("splits", ["held in memory", "streamed"])
def test_killed_worker_is_restarted_from_the_latest_checkpoint(tiny_model, prepared, tmp_path, request,
                                                              record_property, splits):
    reference = request.getfixturevalue("streamed_reference" if splits == "streamed" else "zero2_reference")
    spec = reference_spec(tiny_model, prepared, tmp_path, "worker-killed", max_failures=1)
    args = ("--in-memory-max-bytes", "0") if splits == "streamed" else ()
    killed_at: list[int] = []
    killed: list[float] = []

    def kill_a_worker_once_a_checkpoint_is_registered(line, proc):
        # A failure before Ray Train has registered any checkpoint restarts from scratch (also
        # exact, but not what this test is about): wait for the step-5 one.
        latest = latest_registered_step(tmp_path / "worker-killed")
        if '{"step": ' not in line or latest is None:
            return False
        workers = train_workers(proc)
        assert len(workers) == 2, workers
        workers[-1].kill()
        killed.append(time.monotonic())
        killed_at.append(latest)
        return True

    watched = run_watching(spec, kill_a_worker_once_a_checkpoint_is_registered, args=args)
    assert killed_at and watched.code == 0, watched.output[-5000:]
    assert f"train split {splits}" in watched.output and f"val split {splits}" in watched.output
    resumed = f"resumed from step {killed_at[0]} (epoch 0, micro-batch {killed_at[0] * 2}) after 1 failure(s)"
    assert resumed in watched.output
    record_property("kill_to_resumed_s", round(watched.first(resumed, after=killed[0]) - killed[0], 1))
    record_property("kill_to_first_new_step_s",
                    round(watched.first(f'{{"step": {killed_at[0] + 1},', after=killed[0]) - killed[0], 1))
    assert max_difference(final_adapter(tmp_path, "worker-killed"), reference.adapter) < 1e-5
    last = json.loads((tmp_path / "worker-killed/metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == STEPS and last["failures"] == 1


def test_a_killed_worker_with_no_failures_left_fails_the_job_with_the_reason(tiny_model, prepared, tmp_path,
                                                                            record_property):
    spec = reference_spec(tiny_model, prepared, tmp_path, "no-retries", max_failures=0)
    killed: list[float] = []

    def kill_a_worker_at_step_3(line, proc):
        if '{"step": 3,' not in line:
            return False
        [worker, *_] = train_workers(proc)
        worker.kill()
        killed.append(time.monotonic())
        return True

    watched = run_watching(spec, kill_a_worker_at_step_3)
    assert killed and watched.code != 0
    assert watched.ended - killed[0] < 60  # the driver noticed, gave up and exited
    assert "max_failures" in watched.output or "failed" in watched.output.lower(), watched.output[-3000:]
    record_property("kill_to_exit_s", round(watched.ended - killed[0], 1))


def test_an_object_store_failing_mid_checkpoint_fails_clearly_and_resume_skips_the_partial(
        tiny_model, prepared, tmp_path, zero2_reference, s3_server, monkeypatch, record_property):
    import boto3
    from safetensors.torch import load as load_safetensors
    from support.faults import FaultyS3

    proxy = FaultyS3(s3_server["AWS_ENDPOINT_URL"])
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)  # the job talks to the store through the proxy
    s3 = boto3.client("s3", endpoint_url=s3_server["AWS_ENDPOINT_URL"])
    s3.create_bucket(Bucket="ckpt")
    # No retries: each would resume from the same registered checkpoint and be refused at the same
    # upload (with the default 2, the job ends 2 minutes later with the same error).
    spec = reference_spec(tiny_model, prepared, tmp_path, "s3-fault", max_failures=0)
    spec["checkpoint"] |= {"storage": "s3://ckpt/runs"}
    run_prefix = "runs/s3-fault/"

    def registered() -> int | None:
        try:
            snapshot = s3.get_object(Bucket="ckpt", Key=f"{run_prefix}checkpoint_manager_snapshot.json")["Body"].read()
            latest = json.loads(snapshot)["latest_checkpoint_result"]
        except (s3.exceptions.NoSuchKey, ValueError):
            return None
        return latest["metrics"]["step"] if latest else None

    registered_then: list[int] = []

    def refuse_later_checkpoints_weights(line, proc):
        if '{"step": ' not in line or (latest := registered()) is None:
            return False
        # The store now takes everything but the weights of checkpoints after the registered one: the next
        # checkpoint is left half written, whichever it is by the time this line was read.
        def later_weights(method: str, path: str) -> bool:
            step = next((run_layout.checkpoint_step(part) for part in path.split("/")
                         if run_layout.checkpoint_step(part) is not None), None)
            return method in ("PUT", "POST") and "safetensors" in path and step is not None and step > latest
        proxy.refuse = later_weights
        registered_then.append(latest)
        return True

    watched = run_watching(spec, refuse_later_checkpoints_weights)
    output = watched.output
    assert registered_then, ([o["Key"] for o in s3.list_objects_v2(Bucket="ckpt").get("Contents", [])], output[-2000:])
    assert watched.code != 0 and proxy.refused, output[-3000:]
    refused_dir = next(part for part in proxy.refused[0][1].split("/") if run_layout.checkpoint_step(part) is not None)
    refused, latest = run_layout.checkpoint_step(refused_dir), registered()
    assert latest == refused - 5 and latest >= registered_then[0]
    # The store's own answer and the file it refused, in the job's log.
    assert f"'runs/s3-fault/{refused_dir}/adapter_model.safetensors'" in output and "SLOW_DOWN" in output
    partial = [o["Key"] for o in s3.list_objects_v2(Bucket="ckpt", Prefix=f"{run_prefix}{refused_dir}/")
               .get("Contents", [])]
    assert partial and not any(key.endswith(".safetensors") for key in partial)  # half written

    proxy.refuse = lambda method, path: False  # the store is back; the same spec is resubmitted
    resubmitted = time.monotonic()
    resumed = run_watching(spec)
    assert resumed.code == 0, resumed.output[-5000:]
    assert f"resumed from step {latest} (epoch 0, micro-batch {latest * 2}) after 1 failure(s)" in resumed.output
    final = s3.get_object(Bucket="ckpt", Key=f"{run_prefix}{run_layout.checkpoint_dir_name(STEPS)}/adapter_model.safetensors")
    final = final["Body"].read()
    assert max_difference(load_safetensors(final), zero2_reference.adapter) < 1e-5
    proxy.close()
    record_property("first_refusal_to_exit_s", round(watched.ended - proxy.refused[0][0], 1))
    record_property("resubmit_to_first_new_step_s", round(resumed.first(f'{{"step": {latest + 1},') - resubmitted, 1))
