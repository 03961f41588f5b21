"""The embedded default's Ray: a local head with token auth, its dashboard (the job API) bound to
127.0.0.1, started by `raysft serve` and stopped when it exits. Tests and scripts use it too.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LocalRay:
    address: str  # the dashboard / job API
    token: str
    process: subprocess.Popen
    temp_dir: str

    @property
    def env(self) -> dict[str, str]:
        """What a client of this head needs (the service, `ray job submit`)."""
        return {"RAY_ADDRESS": self.address, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}

    def stop(self, grace_s: float = 5) -> None:
        """SIGTERM the head and every process under it (GCS, raylet, dashboard, workers), then
        SIGKILL what is left after `grace_s`. `ray start --block` alone does not stop its children
        promptly on SIGTERM, and they run in sessions of their own."""
        import psutil

        try:
            root = psutil.Process(self.process.pid)
            processes = [*root.children(recursive=True), root]
        except psutil.NoSuchProcess:
            processes = []
        for process in processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.terminate()
        _, alive = psutil.wait_procs(processes, timeout=grace_s)
        for process in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        psutil.wait_procs(alive, timeout=grace_s)
        self.process.poll()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def default_num_cpus() -> int:
    """At least 4 logical CPUs, even on a 2-core machine: a 2-worker training plus the Ray Data
    tasks that feed it would otherwise wait on each other forever."""
    return max(os.cpu_count() or 1, 4)


def start(num_cpus: int | None = None, log_path: Path | None = None, timeout_s: float = 120,
          dashboard_port: int | None = None, token: str | None = None) -> LocalRay:
    """Start a head (`ray start --head --block`) and wait until its job API answers. The token
    is `token`, else RAY_AUTH_TOKEN, else a new random one."""
    token = token or os.environ.get("RAY_AUTH_TOKEN") or secrets.token_hex(16)
    # Ray's socket paths live under the temp dir and must stay short (AF_UNIX: 107 bytes).
    temp_dir = tempfile.mkdtemp(prefix="raysft-", dir="/tmp")
    dashboard = dashboard_port or free_port()
    # Jobs run `python -m jobs...`: this interpreter, the one with raysft installed, comes first.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {
        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0", "PATH": path}
    ray = str(Path(sys.executable).with_name("ray"))
    # Every port picked free, so two heads can share a machine (tests, a restart beside a stopping one).
    ports = [f"--{name}={free_port()}" for name in (
        "port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
        "runtime-env-agent-port", "node-manager-port", "object-manager-port", "ray-client-server-port")]
    command = [ray, "start", "--head", "--block", *ports, "--dashboard-host=127.0.0.1",
               f"--dashboard-port={dashboard}", "--include-dashboard=true", f"--temp-dir={temp_dir}"]
    if num_cpus is not None:
        command.append(f"--num-cpus={num_cpus}")
    log = open(log_path or Path(temp_dir) / "head.log", "w")  # noqa: SIM115 - the head writes to it until stopped
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    head = LocalRay(f"http://127.0.0.1:{dashboard}", token, process, temp_dir)
    request = urllib.request.Request(f"{head.address}/api/version", headers={"Authorization": f"Bearer {token}"})
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        try:
            urllib.request.urlopen(request, timeout=2)
            return head
        except OSError:
            time.sleep(1)
    head.stop()
    raise RuntimeError(f"the local Ray head did not start within {timeout_s:.0f} s (log: {log.name})")
