"""Shared fixtures: a scaffold model directory (no hub) and its tokenizer, built once per session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import yaml
from support import REPO

from jobs import scaffold_model
from jobs.common import tokenizer_files

# The interpreter's own tools first, as in an activated virtualenv, for every process the tests
# start (Ray jobs get the same from service.local_ray). DeepSpeed JIT-builds its CPU comm op with
# the first `ninja` on PATH, and a system ninja (1.11) and the venv's (1.13, which changed the
# build log's hash) each take the other's build for stale: every switch rebuilt it, 45 s each.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if not has_cuda:
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


def pytest_terminal_summary(terminalreporter):
    """What the tests measured with `record_property` (times to detect and recover from faults,
    the soak's figures), one line per test at the end of the run: docs/reliability.md quotes them."""
    reports = [r for r in terminalreporter.stats.get("passed", []) + terminalreporter.stats.get("failed", [])
               if r.when == "call" and r.user_properties]
    if reports:
        terminalreporter.section("measured")
        for report in reports:
            terminalreporter.line(f"{report.nodeid}: " + ", ".join(f"{k}={v}" for k, v in report.user_properties))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny-model")
    scaffold_model.scaffold(out)
    return out


@pytest.fixture(scope="session")
def tokenizer(tiny_model):
    return tokenizer_files.load(tokenizer_files.fetch(str(tiny_model)))


@pytest.fixture(scope="session")
def example_spec(tiny_model):
    """configs/datasets/NAME.yaml with absolute source paths, the scaffold tokenizer and a given output."""

    def make(name, output, **overrides) -> dict:
        spec = yaml.safe_load((REPO / f"configs/datasets/{name}.yaml").read_text())
        for source in spec["sources"]:
            source["uri"] = str(REPO / source["uri"])
        return spec | {"tokenizer": str(tiny_model), "output": str(output)} | overrides

    return make


@pytest.fixture(scope="session")
def demo_spec(example_spec):
    return lambda output, **overrides: example_spec("demo", output, **overrides)


@pytest.fixture
def s3_server(monkeypatch):
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    yield env
    server.stop()


@pytest.fixture(scope="session")
def prepared(tiny_model, example_spec, tmp_path_factory) -> Path:
    """The demo spec's datasets, prepared by a real `jobs.prepare` run for the scaffold model."""
    from support.jobs import run

    out = tmp_path_factory.mktemp("prepared") / "demo"
    run("jobs.prepare", example_spec("demo", out))
    return out


@pytest.fixture(scope="module")
def ray_head():
    """A real Ray head with token auth and its job API on loopback (the embedded default's)."""
    from service import local_ray

    head = local_ray.start(num_cpus=4)
    yield head
    head.stop()
