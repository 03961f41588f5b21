"""`ray job submit -- python -m jobs.prepare` against a real local cluster with token auth."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path):
    # Ray's socket paths live under the temp dir and must stay short (AF_UNIX limit: 107 bytes).
    temp_dir = tempfile.mkdtemp(prefix="raysft-", dir="/tmp")
    dashboard = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {
        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16), "RAY_USAGE_STATS_ENABLED": "0"}
    log = open(tmp_path / "head.log", "w")  # noqa: SIM115 - closed after the head stops
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--port={free_port()}", "--num-cpus=2",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--include-dashboard=true",
         f"--temp-dir={temp_dir}"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    request = urllib.request.Request(f"{address}/api/version",
                                     headers={"Authorization": f"Bearer {env['RAY_AUTH_TOKEN']}"})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(request, timeout=2)
            break
        except OSError:
            time.sleep(1)
    else:
        pytest.fail(f"the Ray head did not start within 120 s:\n{(tmp_path / 'head.log').read_text()[-3000:]}")
    yield address, env
    head.send_signal(signal.SIGTERM)  # --block: the head stops every process it started
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
    log.close()
    shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_runs_prepare(ray_head, demo_spec, tmp_path):
    address, env = ray_head
    (tmp_path / "spec.json").write_text(json.dumps(demo_spec(tmp_path / "out")))

    unauthenticated = subprocess.run(
        [RAY, "job", "list", "--address", address],
        env={k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN"} | {"HOME": str(tmp_path)},
        capture_output=True, text=True, timeout=120)
    assert unauthenticated.returncode != 0  # token auth is on: no token, no access

    proc = subprocess.run(
        [RAY, "job", "submit", "--address", address, "--submission-id", "prep-1", "--",
         sys.executable, "-m", "jobs.prepare", "--spec", str(tmp_path / "spec.json")],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "succeeded" in proc.stdout and "packing bfd@512" in proc.stdout
    manifest = json.loads((tmp_path / "out/manifest.json").read_text())
    assert manifest["status"] == "succeeded" and manifest["counts"]["rows_read"] == 330
