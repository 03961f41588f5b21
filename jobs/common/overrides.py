"""Pure: `--set path.to.field=value` overrides on a spec document, before it is validated.

A learning-rate sweep or a one-off change needs no edited copy of the spec file:
`python -m jobs.train --spec run.yaml --set optim.lr=2e-4 --set epochs=3`. A path walks mappings
by key and lists by index (`datasets.0.weight=2`); a missing mapping on the way is created, so
the spec models still name a wrong key. The value is JSON where it parses as JSON (numbers,
`true`, `null`, `[...]`, `{...}`), else a YAML list or mapping (`[a, b]`, `{k: v}`), else the text
as it is (`Translate: hello` stays text).
"""

from __future__ import annotations

import argparse
import copy
import json
from collections.abc import Iterable
from typing import Any

import yaml

from jobs.common.spec import SpecError


def parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        pass
    if text.startswith(("[", "{")):  # YAML's flow collections; plain text is never YAML ("Q: A" stays text)
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError:
            pass
    return text


def _set(document: dict[str, Any], path: list[str], value: Any) -> str | None:
    """Set one value in place; returns what is wrong with the path, if anything."""
    node: Any = document
    for depth, key in enumerate(path):
        where, parent, last = ".".join(path[:depth + 1]), ".".join(path[:depth]) or "the spec", depth == len(path) - 1
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                return f"{where}: {parent} is a list of {len(node)}: use an index below it"
            key = int(key)
        elif not isinstance(node, dict):
            return f"{where}: {parent} is a value, not a mapping"
        if last:
            node[key] = value
        else:
            node = node[key] if isinstance(node, list) else node.setdefault(key, {})
    return None


def set_fields(document: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """The document with each `path: value` set (values as they are, already parsed); every bad
    path is reported at once."""
    out, problems = copy.deepcopy(document), []
    for path, value in values.items():
        keys = str(path).strip().split(".")
        if not all(keys):
            problems.append(f"{path!r}: write a field path such as optim.lr")
        elif problem := _set(out, keys, value):
            problems.append(problem)
    if problems:
        raise SpecError(problems)
    return out


def apply_overrides(document: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """The document with every `path=value` applied (the input is left alone); every malformed
    override is reported at once."""
    out, problems = copy.deepcopy(document), []
    for override in overrides:
        path, sep, text = override.partition("=")
        keys = path.strip().split(".")
        if not sep or not all(keys):
            problems.append(f"--set {override!r}: write path.to.field=value (for example optim.lr=2e-4)")
            continue
        if problem := _set(out, keys, parse_value(text.strip())):
            problems.append(f"--set {problem}")
    if problems:
        raise SpecError(problems)
    return out


def job_arguments(prog: str, description: str, kind: str, example: str) -> argparse.ArgumentParser:
    """The arguments every job takes: its spec, `--set` overrides, and the size of a local cluster."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--spec", required=True, help=f"{kind} spec: a YAML/JSON file or inline JSON")
    parser.add_argument("--set", action="append", default=[], metavar="PATH=VALUE", dest="overrides",
                        help=f"override a spec field, e.g. --set {example} (repeatable)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray cluster (ignored with RAY_ADDRESS)")
    return parser
