"""Service factories with a fault injected, for tests that run the service under uvicorn
(`uvicorn --factory fault_injection:<name> --app-dir tests`). The product code has no hooks."""

from __future__ import annotations

import os

from service.app import create_app
from service.ray_jobs import RayJobs


def create_app_dying_after_ray_submit():
    """The service, killed the moment Ray accepts a job and before the database records that it
    did: the window a crash between the two calls leaves."""
    submit = RayJobs.submit

    def submit_then_die(self, *args, **kwargs):
        submit(self, *args, **kwargs)
        os._exit(137)

    RayJobs.submit = submit_then_die
    return create_app()
