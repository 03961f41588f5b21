"""The shape of the code, checked: no import cycle among the project's modules (function-level
imports included), `service` imports `jobs` and never the reverse, and the run layout is
spelled in one module."""

import ast
from pathlib import Path

from support import REPO

PACKAGES = ("jobs", "service")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")
            if "migrations" not in p.parts}


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (anywhere in it), and the packages that imports
    run first (`import a.b.c` executes a/__init__ and a/b/__init__)."""
    modules = project_modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                            for a in node.names}
        edges = set()
        for target in targets:
            parts = target.split(".")
            edges |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & modules.keys()
        graph[name] = edges - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 40  # the walk found the project
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_jobs_never_import_the_service():
    leaks = {m: sorted(e) for m, e in import_graph().items() if m.startswith("jobs") and any(x.startswith("service") for x in e)}
    assert not leaks


def test_the_checkpoint_naming_lives_in_the_run_layout_only():
    spelled = [str(p.relative_to(REPO)) for p in project_modules().values() if '"step_"' in p.read_text()]
    assert spelled == ["jobs/common/run_layout.py"]
