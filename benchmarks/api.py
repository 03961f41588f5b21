"""Benchmark of the control plane: GET latency under 50 concurrent clients, and POST to RUNNING.

    python benchmarks/api.py [--clients 50] [--requests 40] [--jobs 1000]

One run, one machine, over loopback: the service under uvicorn (one process, SQLite in WAL
mode, the reconcile loop on) beside a real local Ray head with token auth.
  1. `GET /v1/jobs/{id}` and `GET /v1/jobs?limit=50`: `--clients` concurrent clients, each sending
     `--requests` requests back to back, over a database holding `--jobs` job records; p50, p99.
  2. POST /v1/datasets to the Ray job RUNNING (as the service reports it), for 5 jobs in turn.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jobs import scaffold_model  # noqa: E402
from service import local_ray, store  # noqa: E402

KEY = "rsk_benchmark"


def seed(url: str, jobs: int) -> list[str]:
    """Job records straight into the database (finished, so the reconcile loop leaves them)."""
    store.migrate(url)
    sessions = store.session_factory(store.make_engine(url))
    ids = []
    with sessions() as session:
        store.create_api_key(session, "bench", KEY)
        for i in range(jobs):
            job = store.Job(id=store.new_id(), tenant_id="bench", kind=store.Kind.DATASET, status=store.Status.SUCCEEDED,
                            spec={"name": f"d{i}", "sources": [{"uri": "s3://b/k"}]}, request_hash="x",
                            progress={"stage": "prepare", "percent": 100.0, "rows": 1000})
            session.add(job)
            ids.append(job.id)
        session.commit()
    return ids


async def latencies(base: str, paths: list[str], clients: int, requests: int) -> list[float]:
    out: list[float] = []

    async def client(n: int) -> None:
        rng = random.Random(n)
        async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as c:
            for _ in range(requests):
                started = time.perf_counter()
                response = await c.get(rng.choice(paths))
                out.append(time.perf_counter() - started)
                assert response.status_code == 200, response.text

    await asyncio.gather(*(client(n) for n in range(clients)))
    return out


def summary(samples: list[float]) -> dict:
    ms = np.array(samples) * 1000
    return {"requests": len(ms), "p50_ms": round(float(np.percentile(ms, 50)), 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 2), "max_ms": round(float(ms.max()), 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--jobs", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="raysft-apibench-") as tmp:
        data = Path(tmp) / "data"
        scaffold_model.scaffold(data / "models/tiny")
        inputs = data / "artifacts/tenants/bench/inputs"
        inputs.mkdir(parents=True)
        (inputs / "alpaca.jsonl").write_bytes((REPO / "configs/data/alpaca.jsonl").read_bytes())
        ids = seed(f"sqlite:///{data / 'raysft.db'}", args.jobs)
        head = local_ray.start(num_cpus=4)
        port = local_ray.free_port()
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | head.env | {
            "RAYSFT_DATA_DIR": str(data), "RAYSFT_SHARED_READ_PREFIXES": json.dumps([str(data / "models")]),
            # One tenant stands for all the clients: its request rate is not what is measured.
            "RAYSFT_TENANT_REQUESTS_PER_S": "100000", "RAYSFT_TENANT_REQUEST_BURST": "100000"}
        server = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "service.app:create_app",
                                   "--port", str(port), "--log-level", "warning"], cwd=REPO, env=env)
        base = f"http://127.0.0.1:{port}"
        try:
            for _ in range(100):
                try:
                    httpx.get(f"{base}/healthz")
                    break
                except httpx.TransportError:
                    time.sleep(0.3)
            results = {"clients": args.clients, "jobs_in_database": args.jobs,
                       "get_job": summary(asyncio.run(latencies(base, [f"/v1/jobs/{i}" for i in ids], args.clients, args.requests))),
                       "list_jobs": summary(asyncio.run(latencies(base, ["/v1/jobs?limit=50"], args.clients, args.requests)))}
            http = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
            to_running = []
            for n in range(5):
                body = {"name": f"b{n}", "sources": [{"uri": str(inputs / "alpaca.jsonl"), "format": "alpaca"}],
                        "tokenizer": str(data / "models/tiny"), "template": "chatml", "seed": n}
                started = time.perf_counter()
                job = http.post("/v1/datasets", json=body).json()
                while http.get(f"/v1/jobs/{job['id']}").json()["status"] == "QUEUED":
                    time.sleep(0.05)
                to_running.append(time.perf_counter() - started)
                http.post(f"/v1/jobs/{job['id']}/cancel")
            results["post_to_running_s"] = [round(t, 2) for t in to_running]
            results["get_p99_target_25ms_met"] = max(results["get_job"]["p99_ms"], results["list_jobs"]["p99_ms"]) < 25
        finally:
            server.terminate()
            server.wait(timeout=30)
            head.stop()
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
