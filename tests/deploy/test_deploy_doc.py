"""docs/deploy.md: every command in it exists in this repository or in the tools it names, the
values file it writes passes the chart's lint, and the Kubernetes objects it names are the ones the
chart and the RayJob manifest create."""

from __future__ import annotations

import importlib.util
import re
import shlex

import pytest
import typer
import yaml
from support.deploy import CHART, REPO, helm, render

from service.cli import app

DOC = REPO / "docs" / "deploy.md"
TOOLS = {"docker", "helm", "kubectl", "aws", "export", "cat", "base64", ".venv/bin/raysft", ".venv/bin/python", ".venv/bin/ray",
         "make", "podman", "sudo"}
IMAGE_ROOT = "/opt/raysft/"  # where the Dockerfile puts configs/


def bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", DOC.read_text(), re.S)


def commands() -> list[list[str]]:
    """Each simple command of the doc's bash blocks, heredoc bodies left out, `\\` lines joined."""
    out = []
    for block in bash_blocks():
        block = re.sub(r"<<'EOF'\n.*?\nEOF\n", "\n", block, flags=re.S).replace("\\\n", " ")
        for line in block.splitlines():
            for part in re.split(r"&&|;|\|", line.removesuffix("&")):
                if part.strip():
                    words = shlex.split(part.replace("$(", "").replace(")", ""))
                    if words[0] == "export" and len(words) > 2 and words[1].split("=", 1)[1] in TOOLS:
                        words = [words[1].split("=", 1)[1], *words[2:]]  # export X=$(command ...)
                    out.append(words)
    return out


def heredoc(name: str) -> str:
    return re.search(rf"cat > {re.escape(name)} <<'EOF'\n(.*?)\nEOF", DOC.read_text(), re.S).group(1)


def test_every_command_is_a_named_tool_and_its_repository_parts_exist():
    click_app = typer.main.get_command(app)
    for words in commands():
        tool = words[0]
        assert tool in TOOLS, words
        if tool == ".venv/bin/raysft":
            command = click_app
            for word in words[1:]:
                if word.startswith("-") or not hasattr(command, "commands"):
                    break
                assert word in command.commands, f"raysft has no command {word!r}: {words}"
                command = command.commands[word]
        for i, word in enumerate(words):
            if word == "-m":
                assert importlib.util.find_spec(words[i + 1]), words
            if word.startswith(IMAGE_ROOT):
                assert (REPO / word.removeprefix(IMAGE_ROOT)).is_file(), word
            if re.match(r"^(configs|helm|ray_cluster|docs)/", word):
                assert (REPO / word).exists(), word


def test_the_values_file_it_writes_lints_and_the_objects_it_names_exist(tmp_path):
    values = tmp_path / "my-values.yaml"
    values.write_text(heredoc("my-values.yaml"))
    result = helm("lint", "--strict", str(CHART), values=[values])
    assert result.returncode == 0, result.stdout
    install = next(w for w in commands() if w[:2] == ["helm", "install"] and w[3] == "helm/raysft")
    release, namespace = install[2], install[install.index("--namespace") + 1]
    objects = render(values, release=release)
    rayjob = [d for d in yaml.safe_load_all((REPO / "ray_cluster/kuberay/rayjob.yaml").read_text()) if d]
    names = {(o["kind"], o["metadata"]["name"]) for o in objects + rayjob}
    names |= {("Service", f"{name}-head-svc") for kind, name in names if kind == "RayCluster"}
    names |= {("Job", name) for kind, name in names if kind == "RayJob"}  # KubeRay's submitter
    kinds = {"svc": "Service", "deployment": "Deployment", "secret": "Secret", "rayjob": "RayJob", "job": "Job"}
    named = 0
    for words in commands():
        if words[0] != "kubectl":
            continue
        assert words[1:3] == ["-n", namespace] or words[1] == "create" and words[2] == "namespace", words
        for i, word in enumerate(words):
            if "/" in word and word.split("/")[0] in kinds:
                kind, name = word.split("/", 1)
            elif word in kinds and i + 1 < len(words) and words[i - 1] in ("get", "logs") and words[i + 1][0] != "-":
                kind, name = word, words[i + 1]
            else:
                continue
            named += 1
            secrets_created_by_hand = {"raysft-s3", "raysft-postgres"}
            if not (kind == "secret" and name in secrets_created_by_hand):
                assert (kinds[kind], name) in names, f"{word} {name}: not an object the chart or the RayJob creates"
    assert named >= 7


@pytest.mark.parametrize("spec", ["configs/pipelines/bucket-demo.yaml"])
def test_the_pipeline_it_submits_uses_the_default_bucket_under_the_admin_prefix(spec):
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    prefix = f"{defaults['artifacts']['root']}/tenants/admin/"
    text = (REPO / spec).read_text()
    uris = re.findall(r"s3://[^\s,}]+", text)
    assert uris and all(uri.startswith(prefix) for uri in uris)
    uploads = [w for w in commands() if w[:2] == ["aws", "--endpoint-url"] and "cp" in w]
    targets = [w[-1] for w in uploads]
    assert all(any(uri.startswith(target) for target in targets) for uri in uris), (uris, targets)
