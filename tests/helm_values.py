"""The chart's values reference, read from the `# --` comments of helm/raysft/values.yaml
(helm-docs style): a comment starting `# --` documents the key right below it, with that key's
whole subtree; an undocumented key must be a mapping whose children are all documented.

`python tests/helm_values.py` rewrites the table in helm/raysft/README.md; a test keeps it in sync.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass

import yaml
from deploy_facts import CHART

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
