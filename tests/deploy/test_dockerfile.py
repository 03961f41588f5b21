"""The container image, checked by parsing the Dockerfile with Docker's own parser
(the `dockerfile` package wraps moby/buildkit's). No Docker engine is needed."""

from __future__ import annotations

import re

import pytest
from support.deploy import REPO, arg_default, dockerfile_commands


@pytest.fixture(scope="module")
def commands():
    return dockerfile_commands()


def stages(commands) -> list[list]:
    out: list[list] = []
    for command in commands:
        if command.cmd == "FROM":
            out.append([])
        if out:
            out[-1].append(command)
    return out


def test_built_on_rays_image_of_the_pinned_version_cpu_by_default(commands):
    pinned = re.search(r"^ray==(\S+)$", (REPO / "requirements/constraints.txt").read_text(), re.M).group(1)
    assert arg_default(commands, "RAY_VERSION") == pinned
    assert arg_default(commands, "RAY_VARIANT").endswith("-cpu")
    # One build argument swaps the base (make image bootstraps one where no registry is reachable).
    assert arg_default(commands, "BASE") == "rayproject/ray:${RAY_VERSION}-${RAY_VARIANT}"
    bases = [c.value[0] for c in commands if c.cmd == "FROM"]
    assert bases == ["${BASE}"] * 2  # multi-stage, same base


def test_final_stage_runs_as_non_root_without_compilers_with_healthcheck_and_labels(commands):
    build, final = stages(commands)
    # Nothing installed or compiled in the final stage: its one RUN gives a bare base Ray's user.
    [add_user] = [c.original for c in final if c.cmd == "RUN"]
    assert "useradd --uid 1000" in add_user and not re.search(r"apt|pip|gcc|make", add_user)
    assert any(c.cmd == "RUN" and "build-essential" in c.original for c in build)
    users = [c.value[0] for c in final if c.cmd == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert any(c.cmd == "COPY" and "--from=build" in c.flags for c in final)
    [health] = [c for c in final if c.cmd == "HEALTHCHECK"]
    assert "/healthz" in health.original
    labels = " ".join(c.original for c in final if c.cmd == "LABEL")
    for key in ("title", "description", "source", "licenses", "version"):
        assert f"org.opencontainers.image.{key}=" in labels


def test_install_commands_are_the_ones_the_makefile_and_ci_use(commands):
    makefile = (REPO / "Makefile").read_text()
    runs = " ".join(c.original for c in commands if c.cmd == "RUN")
    torch_pin = re.search(r"torch==[\d.]+", makefile).group(0)
    assert torch_pin in runs
    for fragment in ("DS_BUILD_OPS=0", "--no-build-isolation -c requirements/constraints.txt"):
        assert fragment in makefile and fragment in runs
    assert runs.count("pip install --no-cache-dir") >= 3  # no pip cache left in the image
    assert "DS_BUILD_SHM_COMM=1" in runs  # DeepSpeed's CPU op built ahead of time, not at run time


def test_dependencies_install_in_a_layer_before_the_sources_are_copied(commands):
    build, _ = stages(commands)
    order = [(c.cmd, c.original) for c in build if c.cmd in ("RUN", "COPY")]
    [deps] = [i for i, (cmd, text) in enumerate(order) if cmd == "RUN" and "torch==" in text]
    sources = [i for i, (cmd, text) in enumerate(order) if cmd == "COPY" and re.search(r"\b(jobs|service)/", text)]
    assert sources and deps < min(sources)  # a change to the sources reuses the dependencies' layer
    assert "--no-deps" in order[-1][1] and max(sources) < len(order) - 1  # then the sources alone


def test_dockerignore_sends_only_what_the_image_needs():
    lines = [line for line in (REPO / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    assert lines[0] == "*"
    assert {line[1:].rstrip("/") for line in lines if line.startswith("!")} == {
        "pyproject.toml", "README.md", "requirements", "jobs", "service", "configs"}
