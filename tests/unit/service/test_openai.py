"""The OpenAI-compatible surface driven by the official `openai` package, as users' scripts drive
OpenAI: upload files, create a fine-tuning job, follow its status, events and checkpoints to the
fine-tuned model, list and page; refusals are OpenAI errors naming the field and the fix, and
another tenant's key sees none of it. Ray is the recording stand-in: the job's outputs (metrics
and checkpoint directories) are laid out where the training writes them."""

from __future__ import annotations

import csv
import io
import json
import time
from datetime import UTC, datetime
from pathlib import Path

import openai
import pytest
from fastapi.testclient import TestClient
from support import REPO
from support.service import RecordingRay, service_settings

from jobs.common import run_layout
from service import job_outputs, store
from service.app import create_app
from service.core import fine_tuning
from service.core.reconcile import reconcile_once
from service.store import Status

TRAINING = (REPO / "configs/data/messages.jsonl").read_bytes()
VALIDATION = b"\n".join(TRAINING.splitlines()[:2]) + b"\n"
BASE_TRAINING = {"method": "lora", "lora": {"r": 8, "alpha": 16}, "optim": {"lr": 1e-3},
                 "batch": {"micro_batch_size": 4, "grad_accum": 1}, "scaling": {"num_workers": 2},
                 "strategy": {"kind": "ddp"}, "model": {"dtype": "fp32"}}


@pytest.fixture
def app(tmp_path, tiny_model):
    data = tmp_path / "data"
    models = {"tiny": {"uri": str(data / "models/tiny"), "dataset": {"max_seq_length": 256},
                       "training": BASE_TRAINING}}
    return create_app(service_settings(data, tiny_model, openai_models=models), ray=RecordingRay(), reconcile=False)


@pytest.fixture
def http(app):
    with TestClient(app) as c:
        with app.state.core.sessions() as session:
            c.keys = {t: store.create_api_key(session, t) for t in ("acme", "globex")}
        yield c


def client(http, tenant="acme") -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/openai/v1", api_key=http.keys[tenant], http_client=http,
                         max_retries=0)


def reconcile(app, **statuses: Status) -> None:
    for submission_id, status in statuses.items():
        app.state.core.ray.set(submission_id, status)
    reconcile_once(app.state.core)


def pipeline(app, openai_id: str) -> store.Job:
    with app.state.core.sessions() as session:
        return session.get(store.Job, openai_id.removeprefix("ftjob-"))


def children(app, job: store.Job) -> dict[str, store.Job]:
    with app.state.core.sessions() as session:
        return {c.kind.value: c for c in session.query(store.Job).filter(store.Job.parent_id == job.id)}


def write_run(spec: dict, steps: range, every: int, since: datetime) -> None:
    """What a training writes: metrics.jsonl, one row per step (logged between `since` and now),
    and a checkpoint every `every` steps."""
    run = Path(job_outputs.run_dir(spec))
    run.mkdir(parents=True, exist_ok=True)
    start = since.replace(tzinfo=UTC).timestamp()
    tick = (time.time() - start) / (len(steps) + 1)
    rows = [{"step": s, "total_steps": steps[-1], "loss": 3.0 - 0.1 * s, "time": start + tick * s,
             "tokens_seen": 100 * s}
            | ({"eval_loss": 3.1 - 0.1 * s, "token_accuracy": 0.1 * s} if s % every == 0 else {}) for s in steps]
    Path(run_layout.metrics_uri(str(run))).write_text("".join(json.dumps(r) + "\n" for r in rows))
    for s in steps:
        if s % every == 0:
            (run / run_layout.checkpoint_dir_name(s)).mkdir()


def test_a_fine_tune_through_the_openai_package_from_upload_to_model(app, http):
    oa = client(http)
    training = oa.files.create(file=("train.jsonl", TRAINING), purpose="fine-tune")
    validation = oa.files.create(file=("val.jsonl", VALIDATION), purpose="fine-tune")
    assert training.id.startswith("file-") and training.bytes == len(TRAINING) and training.purpose == "fine-tune"
    assert oa.files.content(training.id).content == TRAINING
    assert [f.id for f in oa.files.list()] == [validation.id, training.id]
    assert oa.files.retrieve(validation.id).filename == "val.jsonl"

    job = oa.fine_tuning.jobs.create(
        model="tiny", training_file=training.id, validation_file=validation.id, suffix="house", seed=7,
        metadata={"team": "support"},
        method={"type": "supervised", "supervised": {"hyperparameters": {
            "n_epochs": 2, "batch_size": 6, "learning_rate_multiplier": 2.0}}})
    assert job.id.startswith("ftjob-") and job.status == "validating_files" and job.model == "tiny"
    assert job.seed == 7 and job.metadata == {"team": "support"} and job.organization_id == "acme"
    assert job.hyperparameters.n_epochs == 2 and job.hyperparameters.batch_size == 6
    assert job.hyperparameters.learning_rate_multiplier == 2.0 and job.fine_tuned_model is None

    # What raysft runs: the files prepared (the validation file held out whole), then trained with
    # the operator's defaults under the job's hyperparameters: batch 6 = 2 workers x 3 x 1.
    spec = pipeline(app, job.id).spec
    assert [(s["format"], s["split"]) for s in spec["dataset"]["sources"]] == [("messages", "auto"), ("messages", "val")]
    assert spec["dataset"]["template"] == "tokenizer" and spec["dataset"]["max_seq_length"] == 256
    train = spec["training"]
    assert (train["epochs"], train["max_steps"], train["seed"], train["optim"]["lr"]) == (2, None, 7, 2e-3)
    assert (train["batch"]["micro_batch_size"], train["batch"]["grad_accum"], train["scaling"]["num_workers"]) == (3, 1, 2)
    assert train["method"] == "lora" and train["strategy"]["kind"] == "ddp"

    dataset = children(app, pipeline(app, job.id))["dataset"]
    reconcile(app, **{dataset.submission_id: Status.SUCCEEDED})
    training_job = children(app, pipeline(app, job.id))["training"]
    reconcile(app, **{training_job.submission_id: Status.QUEUED})
    assert oa.fine_tuning.jobs.retrieve(job.id).status == "queued"
    reconcile(app, **{training_job.submission_id: Status.RUNNING})
    assert oa.fine_tuning.jobs.retrieve(job.id).status == "running"

    write_run(train, range(1, 9), every=4, since=training_job.created_at)
    checkpoints = oa.fine_tuning.jobs.checkpoints.list(job.id)
    assert [c.step_number for c in checkpoints.data] == [8, 4]
    assert checkpoints.data[0].metrics.train_loss == pytest.approx(2.2)
    assert checkpoints.data[0].metrics.valid_loss == pytest.approx(2.3)
    reconcile(app, **{training_job.submission_id: Status.RUNNING})
    assert oa.fine_tuning.jobs.retrieve(job.id).trained_tokens is None  # OpenAI's: null until it succeeds
    reconcile(app, **{training_job.submission_id: Status.SUCCEEDED})

    done = oa.fine_tuning.jobs.retrieve(job.id)
    model = f"ft:tiny:acme:house:{job.id.removeprefix('ftjob-')}"
    assert done.status == "succeeded" and done.fine_tuned_model == model and done.finished_at
    assert done.trained_tokens == 800  # every token the 8 steps trained on, from the run's running total
    # The result file, as OpenAI's: step_metrics.csv, one row per step, validation where evaluated.
    assert len(done.result_files) == 1 and oa.files.retrieve(done.result_files[0]).purpose == "fine-tune-results"
    assert oa.files.retrieve(done.result_files[0]).filename == "step_metrics.csv"
    table = list(csv.DictReader(io.StringIO(oa.files.content(done.result_files[0]).text)))
    assert [int(row["step"]) for row in table] == list(range(1, 9))
    assert float(table[-1]["train_loss"]) == pytest.approx(2.2) and float(table[-1]["valid_loss"]) == pytest.approx(2.3)
    assert table[0]["valid_loss"] == table[0]["train_accuracy"] == ""
    # Written once: another pass, or another replica reconciling the same job, adds no second file.
    reconcile(app)
    fine_tuning.write_results(app.state.core, job.id.removeprefix("ftjob-"))
    assert [f.purpose for f in oa.files.list()].count("fine-tune-results") == 1
    assert oa.fine_tuning.jobs.retrieve(job.id).result_files == done.result_files
    assert checkpoints.data[0].fine_tuned_model_checkpoint == f"{model}:ckpt-step-8"
    events = list(oa.fine_tuning.jobs.list_events(job.id, limit=100))
    messages = [e.message for e in events]
    assert messages[0] == "The job has successfully completed" and messages[-1].startswith("Created fine-tuning job")
    metrics = [e for e in events if e.type == "metrics"]
    assert [e.data["step"] for e in metrics] == list(range(8, 0, -1))
    assert "Checkpoint created at step 4" in messages and "Fine-tuning job started" in messages
    page = oa.fine_tuning.jobs.list_events(job.id, limit=3)
    assert len(page.data) == 3 and page.has_more
    assert oa.fine_tuning.jobs.list_events(job.id, after=page.data[-1].id, limit=1).data[0].id == events[3].id
    assert [m.id for m in oa.models.list()] == ["tiny", model] and oa.models.retrieve(model).owned_by == "acme"


def test_jobs_are_listed_in_pages_and_cancelled(app, http):
    oa = client(http)
    training = oa.files.create(file=("train.jsonl", TRAINING), purpose="fine-tune")
    created = [oa.fine_tuning.jobs.create(model="tiny", training_file=training.id, suffix=f"run{i}",
                                          metadata=[None, {"team": "support", "run": "a b&c"}, {"team": "sales"}][i])
               for i in range(3)]
    first = oa.fine_tuning.jobs.list(limit=2)
    assert [j.id for j in first.data] == [created[2].id, created[1].id] and first.has_more
    assert [j.id for j in oa.fine_tuning.jobs.list(limit=2, after=first.data[-1].id).data] == [created[0].id]
    assert [j.id for j in oa.fine_tuning.jobs.list()] == [j.id for j in created[::-1]]  # the package pages on
    assert created[0].hyperparameters.batch_size == 8 and created[0].hyperparameters.learning_rate_multiplier == 1
    # OpenAI's metadata filter: metadata[k]=v for each key, metadata=null for none; an empty object is no filter.
    def listed(**query):
        return [j.id for j in oa.fine_tuning.jobs.list(**query)]
    assert listed(metadata={"team": "support"}) == listed(metadata={"team": "support", "run": "a b&c"}) == [created[1].id]
    assert listed(metadata={"team": "sales"}, limit=1) == [created[2].id]
    assert listed(metadata={"team": "support", "run": "a"}) == listed(metadata={"team": ""}) == []
    assert listed(extra_query={"metadata": "null"}) == [created[0].id]
    assert listed(metadata={}) == [j.id for j in created[::-1]]
    refused = http.get("/openai/v1/fine_tuning/jobs", params={"metadata": "null", "metadata[team]": "sales"},
                       headers={"Authorization": f"Bearer {http.keys['acme']}"})
    assert refused.status_code == 422 and "metadata=null for jobs without metadata; not both" in refused.text
    cancelled = oa.fine_tuning.jobs.cancel(created[0].id)
    assert cancelled.status == "cancelled"
    assert oa.fine_tuning.jobs.list_events(created[0].id).data[0].message == "Fine-tuning job cancelled"
    failed = pipeline(app, created[1].id)
    reconcile(app, **{children(app, failed)["dataset"].submission_id: Status.FAILED})
    job = oa.fine_tuning.jobs.retrieve(created[1].id)
    assert job.status == "failed" and job.error.message.startswith("dataset job")


def test_what_raysft_cannot_honour_is_refused_with_the_field_and_the_fix(http):
    oa = client(http)
    training = oa.files.create(file=("train.jsonl", TRAINING), purpose="fine-tune")
    refusals = {
        "model: 'gpt-4o-mini' cannot be fine-tuned here; base models: tiny": {"model": "gpt-4o-mini"},
        "method.type: Input should be 'supervised'": {"method": {"type": "dpo"}},
        "integrations: raysft does not run OpenAI's integrations": {
            "integrations": [{"type": "wandb", "wandb": {"project": "p"}}]},
        "hyperparameters.batch_size: 5 does not split over the 2 workers": {"hyperparameters": {"batch_size": 5}},
        "hyperparameters.n_epochs: must be 'auto' or between 1 and 1024": {
            "hyperparameters": {"n_epochs": 0}},
        "validation_file: no file file-missing: upload it first": {"validation_file": "file-missing"},
        "hyperparameters: given twice": {"hyperparameters": {"n_epochs": 1},
                                         "method": {"type": "supervised", "supervised": {"hyperparameters": {}}}},
    }
    for message, fields in refusals.items():
        with pytest.raises(openai.UnprocessableEntityError) as refused:
            oa.fine_tuning.jobs.create(**{"model": "tiny", "training_file": training.id} | fields)
        assert message in refused.value.body["message"], (message, refused.value.body)
    with pytest.raises(openai.UnprocessableEntityError, match="purpose"):
        oa.files.create(file=("x.jsonl", TRAINING), purpose="batch")
    assert [f.id for f in oa.files.list()] == [training.id]  # the refused upload left nothing


def test_another_tenants_key_finds_nothing(app, http):
    acme, globex = client(http), client(http, "globex")
    training = acme.files.create(file=("train.jsonl", TRAINING), purpose="fine-tune")
    job = acme.fine_tuning.jobs.create(model="tiny", training_file=training.id)
    native = http.post("/v1/datasets", headers={"Authorization": f"Bearer {http.keys['acme']}"},
                       json={"name": "n", "sources": [{"uri": f"file:{training.id.removeprefix('file-')}"}],
                             "tokenizer": app.state.core.settings.openai_models["tiny"].uri}).json()
    for read in (lambda: globex.files.retrieve(training.id), lambda: globex.files.content(training.id),
                 lambda: globex.files.delete(training.id), lambda: globex.fine_tuning.jobs.retrieve(job.id),
                 lambda: globex.fine_tuning.jobs.cancel(job.id), lambda: globex.fine_tuning.jobs.list_events(job.id),
                 lambda: globex.fine_tuning.jobs.checkpoints.list(job.id),
                 lambda: acme.fine_tuning.jobs.retrieve(f"ftjob-{native['id']}"),  # native jobs are not OpenAI's
                 lambda: globex.fine_tuning.jobs.create(model="tiny", training_file=training.id)):
        with pytest.raises((openai.NotFoundError, openai.UnprocessableEntityError)) as refused:
            read()
        assert "no " in refused.value.body["message"]
    assert globex.fine_tuning.jobs.list().data == [] and globex.files.list().data == []
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url="http://testserver/openai/v1", api_key="rsk_wrong", http_client=http,
                      max_retries=0).models.list()
