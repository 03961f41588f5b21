"""What several integration modules share: the reference run the slow tests compare against,
trained once per session, and a local Ray head per module."""

from __future__ import annotations

import pytest
from support.jobs import Finished, finished, reference_spec, run

from service import local_ray


@pytest.fixture(scope="module")
def head() -> local_ray.LocalRay:
    """A local Ray head with token auth, as `raysft serve` starts one."""
    ray = local_ray.start(num_cpus=4)
    yield ray
    ray.stop()


@pytest.fixture(scope="session")
def zero2_reference(tiny_model, prepared, tmp_path_factory) -> Finished:
    """The reference spec on ZeRO-2 (the default engine), never interrupted: the resume tests end
    with its adapter, and FSDP2 trains its losses step for step."""
    storage = tmp_path_factory.mktemp("zero2-reference")
    proc = run("jobs.train", reference_spec(tiny_model, prepared, storage, "reference",
                                            strategy={"kind": "deepspeed", "zero_stage": 2}))
    return finished(storage, "reference", proc.stdout)
