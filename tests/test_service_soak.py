"""Soak (issue 6, item 8): 50 dataset jobs submitted at once by 5 tenants to the service on a real
local Ray cluster, small inputs. Every job ends terminal, none is duplicated or lost, each tenant
sees only its own, and GETs stay fast while the cluster is busy. The figures are recorded with
`record_property` (printed at the end of the run, quoted in docs/reliability.md)."""

from __future__ import annotations

import contextlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import psutil
import pytest
from service_fixtures import REPO, TERMINAL, Service, dataset_body

from service import local_ray, store

# About 10 jobs a minute on 2 cores: some 5 minutes, too long for CI beside the rest of the suite.
pytestmark = [pytest.mark.integration, pytest.mark.soak, pytest.mark.timeout(1200)]
TENANTS, JOBS_PER_TENANT = 5, 10
# The target is 25 ms (docs/benchmarks.md), not met on 2 cores shared with ten job drivers: the
# soak measured 290 ms. This bound catches a return to what it measured before the fixes it
# prompted (590-930 ms).
GET_P99_BOUND_S = 0.5


def yield_cpu_to_the_service(head: local_ray.LocalRay) -> None:
    """Deployed, the control plane has a pod and CPUs of its own; here it shares two cores with
    ten job drivers. The cluster's processes run at nice 19 (the workers and drivers its raylet
    starts later inherit it), so the service answers as it would on its own CPU."""
    root = psutil.Process(head.process.pid)
    for process in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.nice(19)


def test_fifty_jobs_from_five_tenants_all_end_none_lost_none_shared(tmp_path, tiny_model, record_property):
    data_dir = tmp_path / "data"
    head = local_ray.start(num_cpus=4)
    yield_cpu_to_the_service(head)
    # Two active jobs per tenant: ten Ray job drivers at most on this 2-core machine; the rest wait
    # their turn behind 429s, as a client of the service would.
    service = Service(data_dir, tiny_model, head, tenant_max_active_jobs=2, tenant_request_burst=1000,
                      tenant_requests_per_s=1000)
    try:
        sessions = store.session_factory(store.make_engine(f"sqlite:///{data_dir.absolute() / 'raysft.db'}"))
        keys = {}
        rows = (REPO / "configs/data/alpaca.jsonl").read_text().splitlines()[:12]
        for n in range(TENANTS):
            tenant = f"tenant{n}"
            with sessions() as session:
                keys[tenant] = store.create_api_key(session, tenant)
            inputs = data_dir / f"artifacts/tenants/{tenant}/inputs"
            inputs.mkdir(parents=True)
            (inputs / "small.jsonl").write_text("\n".join(rows) + "\n")
        # Idle connections are dropped before uvicorn's 5 s keep-alive ends them: reusing one the
        # server is closing reads a reset.
        clients = {t: httpx.Client(base_url=service.http.base_url, timeout=60, headers={"Authorization": f"Bearer {k}"},
                                   limits=httpx.Limits(keepalive_expiry=2))
                   for t, k in keys.items()}

        def submit(tenant: str, n: int) -> str:
            body = dataset_body(data_dir, name=f"soak-{n}", sources=[
                {"uri": str(data_dir / f"artifacts/tenants/{tenant}/inputs/small.jsonl"), "format": "alpaca"}])
            while True:  # a client that honours 429 + Retry-After
                response = clients[tenant].post("/v1/datasets", json=body, headers={"Idempotency-Key": f"soak-{n}"})
                if response.status_code != 429:
                    assert response.status_code == 202, response.text
                    return response.json()["id"]
                time.sleep(int(response.headers["Retry-After"]))

        started = time.monotonic()
        latencies: list[float] = []
        submitted: dict[str, list[str]] = {t: [] for t in keys}
        done = threading.Event()

        def watch(tenant: str) -> None:
            """The tenant's dashboard: polls its jobs the whole time, timing every GET."""
            while not done.is_set():
                for job_id in list(submitted[tenant]):
                    t0 = time.perf_counter()
                    response = clients[tenant].get(f"/v1/jobs/{job_id}")
                    latencies.append(time.perf_counter() - t0)
                    assert response.status_code == 200
                time.sleep(0.2)

        watchers = [threading.Thread(target=watch, args=(t,), daemon=True) for t in keys]
        for watcher in watchers:
            watcher.start()
        with ThreadPoolExecutor(TENANTS * JOBS_PER_TENANT) as pool:
            futures = {pool.submit(submit, t, n): t for n, t in enumerate(sorted(keys) * JOBS_PER_TENANT)}
            for future, tenant in futures.items():
                submitted[tenant].append(future.result(timeout=900))
        ids = {t: set(v) for t, v in submitted.items()}
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            jobs = {t: clients[t].get("/v1/jobs", params={"limit": 500}).json() for t in keys}
            if all(job["status"] in TERMINAL for page in jobs.values() for job in page["items"]):
                break
            time.sleep(1)
        done.set()
        elapsed = time.monotonic() - started

        statuses = [job["status"] for page in jobs.values() for job in page["items"]]
        for tenant, page in jobs.items():  # each tenant sees exactly its own ten
            assert page["total"] == JOBS_PER_TENANT and {j["id"] for j in page["items"]} == ids[tenant]
        assert statuses == ["SUCCEEDED"] * TENANTS * JOBS_PER_TENANT, statuses
        # Ray ran each job once: one Ray job per record, none without a record.
        ray_jobs = httpx.get(f"{head.address}/api/jobs/", headers={"Authorization": f"Bearer {head.token}"}).json()
        recorded = [j["metadata"].get("raysft_job_id") for j in ray_jobs]
        assert sorted(recorded) == sorted(set().union(*ids.values()))
        p50, p99 = np.percentile(latencies, [50, 99])
        figures = {"jobs": len(statuses), "wall_s": round(elapsed, 1), "jobs_per_min": round(60 * len(statuses) / elapsed, 1),
                   "gets": len(latencies), "get_p50_ms": round(1000 * p50, 1), "get_p99_ms": round(1000 * p99, 1),
                   "get_max_ms": round(1000 * max(latencies), 1)}
        for name, value in figures.items():
            record_property(name, value)
        assert p99 < GET_P99_BOUND_S, figures
    finally:
        service.kill()
        head.stop()
