"""Connect to the Ray cluster a job should run on, or start a local one.

Under `ray job submit` (or with RAY_ADDRESS set) the job joins that cluster. Otherwise it starts a
private local cluster sized by `num_cpus`, with the dashboard off: nothing listens beyond what the
job itself needs. Token auth settings (`RAY_AUTH_MODE`, `RAY_AUTH_TOKEN`) pass through from the
environment unchanged.
"""

from __future__ import annotations

import logging
import os

import ray

# Ray Train's placement-group cleaner asks the State API every second whether the controller
# lives. Without a dashboard there is no State API, and each failed ask logs a warning.
PG_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


def init(num_cpus: int | None = None) -> None:
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
    else:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=True,
                 runtime_env={"worker_process_setup_hook": quiet_without_state_api})
    ctx = ray.data.DataContext.get_current()
    # Rows are never silently dropped: a failing block fails the job (Ray Data's default is 0 too,
    # set here so a cluster-wide override cannot change it).
    ctx.max_errored_blocks = 0
    # A job's log is read, not watched: Ray Data redraws its bars with carriage returns, and each
    # training worker's pass over the validation split would add dozens of lines to it.
    ctx.enable_progress_bars = False


def quiet_without_state_api() -> None:
    """Run in every worker of a private local cluster: only the cleaner's errors get through."""
    logging.getLogger(PG_CLEANER_LOGGER).setLevel(logging.ERROR)


def cluster_cpus() -> int:
    return max(1, int(ray.cluster_resources().get("CPU", 1)))
