"""A Ray cluster of containers of the raysft image, run by podman: a head, workers and the control
plane, each with its own filesystem (no volume shared), on a network of their own with fixed
addresses. The only storage they share is an S3-compatible server (moto) the host runs on that
network's gateway address: the one host address the containers can reach.

`make image` builds the image; `make test-cluster` runs tests/cluster with it."""

from __future__ import annotations

import os
import random
import subprocess
import time
from dataclasses import dataclass, field

import httpx

from support import REPO

IMAGE = os.environ.get("RAYSFT_IMAGE", "localhost/raysft:dev")
ADMIN_KEY = "rsk_cluster_admin"
CONTAINERS_CONF = REPO / ".cache/containers/containers.conf"


def podman(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    env = os.environ | {"CONTAINERS_CONF": os.environ.get("CONTAINERS_CONF", str(CONTAINERS_CONF))}
    result = subprocess.run(["podman", *args], capture_output=True, text=True, env=env, timeout=timeout)
    if check and result.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args)}: {result.stderr[-2000:]}")
    return result


@dataclass
class Cluster:
    """Start with `start_head()` and `start_rest()`, end with `down()`; every container and the
    network are named after `prefix`."""

    token: str
    s3_env: dict[str, str]
    subnet: int = field(default_factory=lambda: random.randint(100, 199))  # 10.89.<subnet>.0/24
    prefix: str = field(default_factory=lambda: f"raysft-test-{random.randrange(16**6):06x}")
    workers: int = 2
    worker_cpus: int = 3  # a 2-CPU training worker fits once per node, so two land on two nodes
    started: list[str] = field(default_factory=list)

    def ip(self, host: int) -> str:
        return f"10.89.{self.subnet}.{host}"

    @property
    def gateway(self) -> str:
        return self.ip(1)

    @property
    def head_ip(self) -> str:
        return self.ip(10)

    @property
    def dashboard(self) -> str:
        return f"http://{self.head_ip}:8265"

    @property
    def api(self) -> str:
        return f"http://{self.ip(20)}:8000"

    def name(self, role: str) -> str:
        return f"{self.prefix}-{role}"

    def env(self) -> dict[str, str]:
        return {"RAY_AUTH_TOKEN": self.token, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"} | self.s3_env

    def run(self, role: str, host: int, *command: str, env: dict[str, str] | None = None) -> str:
        args = ["run", "-d", "--name", self.name(role), "--hostname", role, "--network", self.prefix,
                "--ip", self.ip(host), "--shm-size", "1g"]
        for key, value in (self.env() | (env or {})).items():
            args += ["-e", f"{key}={value}"]
        podman(*args, IMAGE, *command)
        if self.name(role) not in self.started:
            self.started.append(self.name(role))
        return self.name(role)

    def start_head(self) -> None:
        """The network and the head. The network's bridge, and so the gateway address, exists from
        the first container on."""
        podman("network", "create", "--subnet", f"10.89.{self.subnet}.0/24", "--gateway", self.gateway, self.prefix)
        self.run("head", 10, "ray", "start", "--head", "--block", "--port=6379", f"--node-ip-address={self.head_ip}",
                 "--dashboard-host=0.0.0.0", "--dashboard-port=8265", "--num-cpus=0", "--disable-usage-stats")
        self.wait_for_dashboard()

    def start_rest(self, control_plane: dict[str, str]) -> None:
        """The workers, then the control plane."""
        for i in range(self.workers):
            self.start_worker(i)
        self.wait_for_nodes(1 + self.workers)
        self.run("control-plane", 20, "raysft", "serve", "--host", "0.0.0.0", "--port", "8000",
                 env={"RAYSFT_RAY_ADDRESS": self.dashboard, "RAYSFT_ADMIN_API_KEY": ADMIN_KEY,
                      "RAYSFT_RECONCILE_INTERVAL_S": "1"} | control_plane)
        self.wait_for_api()

    def start_worker(self, i: int) -> None:
        self.run(f"worker-{i}", 11 + i, "ray", "start", "--block", f"--address={self.head_ip}:6379",
                 f"--node-ip-address={self.ip(11 + i)}", f"--num-cpus={self.worker_cpus}", "--disable-usage-stats")

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.api, timeout=60, headers={"Authorization": f"Bearer {ADMIN_KEY}"})

    def ray_get(self, path: str) -> dict:
        response = httpx.get(f"{self.dashboard}{path}", headers={"Authorization": f"Bearer {self.token}"}, timeout=30)
        response.raise_for_status()
        return response.json()

    def wait_for_dashboard(self, timeout: float = 120) -> None:
        self._wait(lambda: self.ray_get("/api/version"), timeout, "the head's job API")

    def wait_for_api(self, timeout: float = 120) -> None:
        self._wait(lambda: httpx.get(f"{self.api}/readyz", timeout=5).raise_for_status(), timeout, "the control plane")

    def alive_nodes(self) -> list[dict]:
        nodes = self.ray_get("/api/v0/nodes?limit=100")["data"]["result"]["result"]
        return [n for n in nodes if n["state"] == "ALIVE"]

    def wait_for_nodes(self, count: int, timeout: float = 120) -> None:
        def enough():
            if len(self.alive_nodes()) < count:
                raise RuntimeError(f"fewer than {count} nodes alive")
        self._wait(enough, timeout, f"{count} Ray nodes")

    def _wait(self, probe, timeout: float, what: str) -> None:
        deadline, error = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            try:
                probe()
                return
            except Exception as e:  # noqa: BLE001 - anything short of an answer means not yet
                error = e
                time.sleep(1)
        raise TimeoutError(f"{what} not up after {timeout:.0f} s ({error}); logs:\n{self.logs()}")

    def exec(self, role: str, *command: str, check: bool = True) -> subprocess.CompletedProcess:
        return podman("exec", self.name(role), *command, check=check)

    def logs(self, tail: int = 40) -> str:
        def tail_of(name: str) -> str:
            result = podman("logs", "--tail", str(tail), name, check=False)
            return (result.stdout + result.stderr)[-3000:]

        return "\n".join(f"--- {name}\n{tail_of(name)}" for name in self.started)

    def down(self) -> None:
        for name in self.started:
            podman("rm", "-f", "-t", "0", name, check=False)
        podman("network", "rm", "-f", self.prefix, check=False)


def actors(cluster: Cluster, class_name: str) -> list[dict]:
    """Every actor of a class Ray's state API knows of, dead or alive, with the node it ran on."""
    query = f"/api/v0/actors?limit=1000&detail=1&filter_keys=class_name&filter_predicates=%3D&filter_values={class_name}"
    return cluster.ray_get(query)["data"]["result"]["result"]


def image_exists() -> bool:
    return podman("image", "exists", IMAGE, check=False).returncode == 0
