"""The dashboard's server side: its files served from the package with a strict content policy and
no key, and the dataset report it shows (a preparation's manifest, rendered examples split where
training starts and stops, and a few raw rows of each reject reason)."""

from __future__ import annotations

import json
import re
import tomllib
from collections import Counter
from fnmatch import fnmatch
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from support import REPO
from support.prepared import build_manifest
from support.service import RecordingRay, dataset_body, service_settings, training_body

from jobs.common import tokenizer_files
from jobs.common.contract import IGNORE_INDEX, MANIFEST_FILE, REJECTS_DIR
from jobs.prepare import manifest as mf
from jobs.prepare.inputs import Inputs
from jobs.prepare.spec import DatasetSpec
from jobs.prepare.templates import build_template
from service import job_outputs, store
from service.app import UI_DIR, create_app
from service.core.reconcile import reconcile_once
from service.store import Status


@pytest.fixture
def client(tmp_path, tiny_model):
    ray = RecordingRay()
    app = create_app(service_settings(tmp_path / "data", tiny_model), ray=ray, reconcile=False)
    with TestClient(app) as c:
        c.ray = ray
        with app.state.core.sessions() as session:
            c.headers["Authorization"] = f"Bearer {store.create_api_key(session, 'acme')}"
        c.data_dir = tmp_path / "data"
        yield c


def test_the_pages_need_no_key_and_run_only_their_own_files(client):
    home = client.get("/", headers={"Authorization": ""}, follow_redirects=False)
    assert home.status_code == 307 and home.headers["location"] == "/ui/"
    page = client.get("/ui/", headers={"Authorization": ""})
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "script-src 'self'" in policy and "connect-src 'self'" in policy
    assert page.headers["referrer-policy"] == "no-referrer" and page.headers["x-content-type-options"] == "nosniff"
    # Every file the page loads is served from /ui/, none from another host, none inline.
    local = re.findall(r'(?:src|href)="([^"#]+)"', page.text)
    assert {"app.js", "style.css"} <= set(local) and not [u for u in local if "//" in u]
    assert "<script>" not in page.text and " style=" not in page.text
    for name in ("app.js", "api.js", "dom.js", "chart.js", "style.css"):
        served = client.get(f"/ui/{name}", headers={"Authorization": ""})
        assert served.status_code == 200 and served.text == (UI_DIR / name).read_text()
    assert "javascript" in client.get("/ui/app.js").headers["content-type"]
    assert client.get("/ui/../service/app.py").status_code == 404


def test_no_script_reaches_another_host_or_builds_html_from_text():
    for script in UI_DIR.glob("*.js"):
        text = script.read_text()
        assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", text), script.name
        assert "innerHTML" not in text and "insertAdjacentHTML" not in text and "eval(" not in text, script.name
    # The key travels in a header only: no script puts it in a URL.
    api = (UI_DIR / "api.js").read_text()
    assert "Authorization: `Bearer ${apiKey.get()}`" in api and "searchParams.set(\"key\"" not in api


def test_the_package_ships_every_dashboard_file():
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["service"]
    shipped = [p for p in UI_DIR.rglob("*") if p.is_file()]
    assert shipped and all(any(fnmatch(str(p.relative_to(UI_DIR.parent)), pat) for pat in patterns) for p in shipped)


def write_prepared(output: Path, tiny_model: Path, tokenizer, rejects: list[dict]) -> None:
    """A preparation's output as `jobs.prepare` lays it out: manifest (with examples) and rejects."""
    spec = DatasetSpec.model_validate({"name": "shown", "sources": [{"uri": "a.jsonl"}], "tokenizer": str(tiny_model),
                                       "output": str(output), "max_seq_length": 16})
    files = tokenizer_files.fetch(str(tiny_model))
    inputs = Inputs(files, tokenizer, build_template(spec.template, tokenizer), files=[], total_bytes=0)
    ids = np.arange(10, 16, dtype=np.int32)
    labels = np.where(np.arange(6) >= 4, ids, IGNORE_INDEX).astype(np.int32)
    manifest = build_manifest(spec, inputs, {"train": [(ids, labels)]}, Counter(r["reason"] for r in rejects),
                              rows_read=1 + len(rejects), seconds=0.5,
                              examples=[mf.trained_segments(tokenizer, ids, labels)])
    output.mkdir(parents=True)
    (output / REJECTS_DIR).mkdir()
    (output / REJECTS_DIR / "part-00000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rejects))
    (output / MANIFEST_FILE).write_text(manifest.to_json())


def test_a_dataset_report_shows_trained_segments_and_a_few_rows_per_reason(client, tiny_model, tokenizer):
    job = client.post("/v1/datasets", json=dataset_body(client.data_dir)).json()
    assert client.get(f"/v1/jobs/{job['id']}/dataset").status_code == 404  # no manifest yet
    rejects = [{"source": "a.jsonl", "path": "a.jsonl", "line": n, "reason": "duplicate" if n % 2 else "empty",
                "detail": "", "raw": f"row {n} " + "x" * 3000} for n in range(8)]
    write_prepared(Path(job["spec"]["output"]), tiny_model, tokenizer, rejects)

    report = client.get(f"/v1/jobs/{job['id']}/dataset")
    assert report.status_code == 200, report.text
    manifest, shown = report.json()["manifest"], report.json()["rejects"]
    assert manifest["counts"]["rejected"] == {"duplicate": 4, "empty": 4}
    [segments] = manifest["examples"]
    assert [s["trained"] for s in segments] == [False, True]
    assert segments[1]["text"] == tokenizer.decode(list(range(14, 16)))
    assert [r["line"] for r in shown["duplicate"]] == [1, 3, 5] and [r["line"] for r in shown["empty"]] == [0, 2, 4]
    assert all(len(r["raw"]) == job_outputs.RAW_CHARS for rows in shown.values() for r in rows)
    # Another tenant's key finds no such job.
    with client.app.state.core.sessions() as session:
        other = store.create_api_key(session, "globex")
    assert client.get(f"/v1/jobs/{job['id']}/dataset", headers={"Authorization": f"Bearer {other}"}).status_code == 404


def test_a_training_has_no_dataset_report_and_a_pipeline_has_its_preparations(client, tiny_model, tokenizer):
    prepared = client.post("/v1/datasets", json=dataset_body(client.data_dir)).json()
    client.ray.set(f"raysft-{prepared['id']}", Status.SUCCEEDED)
    reconcile_once(client.app.state.core)
    training = client.post("/v1/trainings", json=training_body(client.data_dir,
                                                               datasets=[{"uri": f"job:{prepared['id']}"}])).json()
    missing = client.get(f"/v1/jobs/{training['id']}/dataset")
    assert missing.status_code == 404 and "prepares no dataset" in missing.json()["detail"]
    pipeline = client.post("/v1/pipelines", json={"dataset": dataset_body(client.data_dir),
                                                  "training": training_body(client.data_dir)}).json()
    [dataset_id] = pipeline["children"]
    dataset = client.get(f"/v1/jobs/{dataset_id}").json()
    write_prepared(Path(dataset["spec"]["output"]), tiny_model, tokenizer, [])
    report = client.get(f"/v1/jobs/{pipeline['id']}/dataset").json()
    assert report["manifest"]["name"] == "shown" and report["rejects"] == {}


def test_reject_examples_stop_reading_once_every_reason_has_its_share(tmp_path, monkeypatch):
    output = tmp_path / "out"
    (output / REJECTS_DIR).mkdir(parents=True)
    lines = [json.dumps({"reason": "duplicate", "line": n, "raw": "r"}) for n in range(200_000)]
    (output / REJECTS_DIR / "part-00000.jsonl").write_text("\n".join(lines) + "\n")
    (output / REJECTS_DIR / "part-00003.jsonl").write_text(json.dumps({"reason": "empty", "line": 7, "raw": ""}) + "\n")
    reads = []
    original = job_outputs.storage.filesystem

    def counting(uri):
        fs, path = original(uri)

        class Counted:
            def get_file_info(self, selector):
                return fs.get_file_info(selector)

            def open_input_stream(self, p):
                stream = fs.open_input_stream(p)
                real_read = stream.read

                class Wrapped:
                    def __enter__(self):
                        return self

                    def __exit__(self, *exc):
                        stream.close()

                    def read(self, n):
                        reads.append(n)
                        return real_read(n)
                return Wrapped()
        return Counted(), path

    monkeypatch.setattr(job_outputs.storage, "filesystem", counting)
    shown = job_outputs.reject_examples(str(output), {"duplicate"})
    assert [r["line"] for r in shown["duplicate"]] == [0, 1, 2]
    assert len(reads) == 1  # the file is about 8 MB; one 1 MiB read found all three
    # A reason only the next input file's rejects hold: the scan reads on into it.
    reads.clear()
    shown = job_outputs.reject_examples(str(output), {"duplicate", "empty"})
    assert shown["duplicate"][2]["line"] == 2 and [r["line"] for r in shown["empty"]] == [7]
    assert len(reads) > 5
    assert job_outputs.reject_examples(str(tmp_path / "none"), {"x"}) == {}
