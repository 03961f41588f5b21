"""The `raysft` CLI against the real API (a TestClient in place of the HTTP client, Ray stood in):
help on every command with the environment it reads, each refusal with its next step, exit codes
a script can trust, and the metric history as a table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from support.service import ADMIN_KEY, RecordingRay, dataset_body, service_settings, training_body
from typer.main import get_command
from typer.testing import CliRunner

from service import cli, store
from service.app import create_app
from service.core import files
from service.core.reconcile import reconcile_once

runner = CliRunner()  # stdout and stderr apart: a created key is alone on stdout


@pytest.fixture
def service(tmp_path, tiny_model, monkeypatch):
    """The CLI's HTTP client, pointed at the app in this process."""
    app = create_app(service_settings(tmp_path / "data", tiny_model), ray=RecordingRay(), reconcile=False)

    def client():
        key = cli.os.environ.get("RAYSFT_API_KEY", "")
        return TestClient(app, base_url=cli.service_url(), headers={"Authorization": f"Bearer {key}"} if key else {})

    monkeypatch.setattr(cli, "client", client)
    with TestClient(app), app.state.core.sessions() as session:  # the lifespan creates the schema
        # the tenant whose prefix holds the example inputs
        monkeypatch.setenv("RAYSFT_API_KEY", store.create_api_key(session, "acme"))
    app.data_dir = tmp_path / "data"
    return app


def run(*args: str):
    return runner.invoke(cli.app, list(args))


def every_command(group=None, path=()):
    group = group or get_command(cli.app)
    for name, command in group.commands.items():
        if hasattr(command, "commands"):
            yield from every_command(command, (*path, name))
        else:
            yield (*path, name), command


def test_every_command_and_option_has_help_and_clients_name_their_environment():
    commands = dict(every_command())
    assert ("jobs", "metrics") in commands and ("jobs", "list") in commands and ("serve",) in commands
    for path, command in commands.items():
        assert command.help, path
        for parameter in command.params:
            assert getattr(parameter, "help", None), (path, parameter.name)
        if path[0] in ("jobs", "submit"):
            text = run(*path, "--help").output
            assert "RAYSFT_URL" in text and "RAYSFT_API_KEY" in text, path


def test_an_unreachable_service_says_how_to_reach_one(monkeypatch):
    monkeypatch.setenv("RAYSFT_URL", "http://127.0.0.1:9")  # discard: nothing listens
    result = run("jobs", "list")
    assert result.exit_code == 3
    assert "the service at http://127.0.0.1:9 is not reachable" in result.output
    assert "next: start one with `raysft serve`, or set RAYSFT_URL" in result.output


def test_refusals_exit_2_with_the_next_step(service, monkeypatch, tmp_path):
    missing = run("jobs", "get", "nope")
    assert missing.exit_code == 2 and "error: 404: no job nope" in missing.output
    assert "next: `raysft jobs list` shows your tenant's jobs" in missing.output

    spec = tmp_path / "bad.yaml"
    spec.write_text(json.dumps(dataset_body(service.data_dir, max_seq_length=-1, template="nope")))
    invalid = run("submit", "dataset", str(spec))
    assert invalid.exit_code == 2 and "error: 422:" in invalid.output and "next: fix what is listed" in invalid.output
    assert invalid.output.count("\n  ") >= 2  # every problem, one per line

    monkeypatch.setenv("RAYSFT_API_KEY", "rsk_wrong")
    refused = run("jobs", "list")
    assert refused.exit_code == 2 and "next: set RAYSFT_API_KEY to an API key of your tenant" in refused.output


def test_submit_list_cancel_and_an_empty_metric_history(service, tmp_path):
    spec = tmp_path / "demo.yaml"
    spec.write_text(json.dumps(dataset_body(service.data_dir)))
    submitted = run("submit", "dataset", str(spec))
    assert submitted.exit_code == 0, submitted.output
    job_id = submitted.output.strip()
    listed = run("jobs", "list", "--kind", "dataset")
    assert job_id in listed.output and "1 of 1" in listed.output
    assert run("jobs", "metrics", job_id).output.strip() == "no metrics yet"
    assert run("jobs", "cancel", job_id).output.strip() == "CANCELLED"


def test_submit_force_prepares_again_and_only_a_preparation_takes_it(service, tmp_path):
    spec = tmp_path / "demo.yaml"
    spec.write_text(json.dumps(dataset_body(service.data_dir)))
    submitted = run("submit", "dataset", str(spec), "--force")
    assert submitted.exit_code == 0, submitted.output
    [job] = service.state.core.ray.jobs.values()
    assert job["entrypoint"].endswith(" --force")
    refused = run("submit", "training", str(spec), "--force")
    assert refused.exit_code == 2 and "--force prepares a dataset again" in refused.output


def test_the_metric_history_prints_as_aligned_columns():
    history = [{"step": 2, "loss": 7.632313, "lr": 0.01, "tokens_per_s": 615.659798, "time": 1.0},
               {"step": 4, "loss": 7.535213, "lr": 0.009999, "eval_loss": 7.51002, "perplexity": 1826.26,
                "tokens_per_s": 7255.95, "generations": []}]
    header, first, second = cli.metrics_table(history).splitlines()
    assert header.split() == ["step", "loss", "lr", "eval", "loss", "perplexity", "tokens/s"]
    assert first.split() == ["2", "7.632", "0.01", "615.7"]  # no eval at step 2: blank cells
    assert second.split() == ["4", "7.535", "0.009999", "7.51", "1826", "7256"]
    assert len({len(line) for line in (header, second)}) == 1  # right-aligned to one width


def test_the_readme_lists_every_jobs_command():
    readme = (Path(__file__).parents[3] / "README.md").read_text()
    (line,) = [line for line in readme.splitlines() if "raysft jobs list" in line]
    words = set(line.replace("|", " ").split())
    assert {path[1] for path, _ in every_command() if path[0] == "jobs"} <= words, line


def test_an_admin_creates_a_tenant_and_a_key_lists_and_revokes_it(service, monkeypatch):
    monkeypatch.setenv("RAYSFT_API_KEY", ADMIN_KEY)
    assert run("admin", "tenants", "create", "globex").output.strip() == "globex"
    created = run("admin", "keys", "create", "globex", "--name", "ci")
    assert created.exit_code == 0, created.output
    key = created.stdout.strip()
    assert key.startswith("rsk_") and "not shown again" in created.stderr
    assert "globex  1 active key(s)" in run("admin", "tenants", "list").output
    [listed] = run("admin", "keys", "list", "globex").output.splitlines()
    key_id = listed.split()[0]
    assert f"{key[:8]}…  ci" in listed and "active" in listed and key not in listed

    monkeypatch.setenv("RAYSFT_API_KEY", key)
    assert run("jobs", "list").output.strip() == "0 of 0"  # the new tenant's key works
    refused = run("admin", "tenants", "list")
    assert refused.exit_code == 2 and "403" in refused.output  # and is no admin's

    monkeypatch.setenv("RAYSFT_API_KEY", ADMIN_KEY)
    assert run("admin", "keys", "revoke", key_id).output.startswith("revoked 20")
    monkeypatch.setenv("RAYSFT_API_KEY", key)
    assert run("jobs", "list").exit_code == 2
    monkeypatch.setenv("RAYSFT_API_KEY", ADMIN_KEY)
    duplicate = run("admin", "tenants", "create", "globex")
    assert duplicate.exit_code == 2 and "error: 409: tenant globex exists" in duplicate.output


def test_files_upload_with_progress_list_and_delete(service, tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_bytes(b'{"instruction": "Say hi", "output": "Hi!"}\n' * 2000)
    other = tmp_path / "more.jsonl"
    other.write_bytes(b'{"instruction": "Say bye", "output": "Bye!"}\n' * 10)
    uploaded = run("files", "upload", str(data), str(other))
    assert uploaded.exit_code == 0, uploaded.output
    lines = [line.split() for line in uploaded.stdout.splitlines() if "sha256" in line]
    ids = [line[0] for line in lines]
    assert [line[-1] for line in lines] == [str(data), str(other)] and lines[0][1] == str(data.stat().st_size)
    listed = run("files", "list")
    assert all(i in listed.output for i in ids) and "2 of 2" in listed.output
    [stored] = Path(files.directory(service.state.core, "acme", ids[0])).glob("*")
    assert stored.read_bytes() == data.read_bytes()  # streamed whole into the tenant's prefix
    assert run("files", "delete", ids[0]).exit_code == 0
    assert "1 of 1" in run("files", "list").output
    assert run("files", "upload", str(tmp_path / "missing.jsonl")).exit_code == 2  # typer: no such file


def test_submit_set_overrides_a_field_without_editing_the_file(service, tmp_path):
    spec = tmp_path / "demo.yaml"
    spec.write_text(json.dumps(dataset_body(service.data_dir)))
    submitted = run("submit", "dataset", str(spec), "--set", "max_seq_length=512", "--set", "name=demo-512")
    assert submitted.exit_code == 0, submitted.output
    job = json.loads(run("jobs", "get", submitted.output.strip()).output)
    assert job["spec"]["max_seq_length"] == 512 and job["spec"]["name"] == "demo-512"
    malformed = run("submit", "dataset", str(spec), "--set", "max_seq_length")
    assert malformed.exit_code == 2 and "write path.to.field=value" in malformed.output
    invalid = run("submit", "dataset", str(spec), "--set", "max_seq_length=-1")
    assert invalid.exit_code == 2 and "max_seq_length" in invalid.output


def test_submit_sweep_prints_its_id_then_one_training_per_run(service, tmp_path):
    dataset = tmp_path / "demo.yaml"
    dataset.write_text(json.dumps(dataset_body(service.data_dir)))
    dataset_id = run("submit", "dataset", str(dataset)).output.strip()
    service.state.core.ray.set(f"raysft-{dataset_id}", store.Status.SUCCEEDED)
    reconcile_once(service.state.core)
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(json.dumps({"training": training_body(service.data_dir, datasets=[{"uri": f"job:{dataset_id}"}]),
                                 "runs": [{"optim.lr": 1e-4}, {"optim.lr": 2e-4}]}))
    submitted = run("submit", "sweep", str(sweep))
    assert submitted.exit_code == 0, submitted.output
    sweep_id, *trainings = submitted.output.split()
    assert len(trainings) == 2
    assert [json.loads(run("jobs", "get", t).output)["sweep_id"] for t in trainings] == [sweep_id] * 2
