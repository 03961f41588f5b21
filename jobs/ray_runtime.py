"""Connect to the Ray cluster a job should run on, or start a local one.

Under `ray job submit` (or with RAY_ADDRESS set) the job joins that cluster. Otherwise it starts a
private local cluster sized by `num_cpus`, with the dashboard off: nothing listens beyond what the
job itself needs. Token auth settings (`RAY_AUTH_MODE`, `RAY_AUTH_TOKEN`) pass through from the
environment unchanged.
"""

from __future__ import annotations

import os

import ray


def init(num_cpus: int | None = None) -> None:
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
    else:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
    ctx = ray.data.DataContext.get_current()
    # Rows are never silently dropped: a failing block fails the job (Ray Data's default is 0 too,
    # set here so a cluster-wide override cannot change it).
    ctx.max_errored_blocks = 0


def cluster_cpus() -> int:
    return max(1, int(ray.cluster_resources().get("CPU", 1)))
