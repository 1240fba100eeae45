"""The package's shape: no import cycles between fastres modules, and the planning, report and
configuration modules start without the training stack (torch's trainer, FFCV)."""

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Folder -> the package it installs as (pyproject.toml's package-dir).
PACKAGES = {"fastres": "fastres", "loaders": "fastres.loaders", "kernels": "fastres.kernels"}


def modules() -> dict[str, Path]:
    found = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            name = ".".join((package, *parts))
            found[name.removesuffix(".__init__")] = path
    return found


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def top_level_imports(path: Path) -> list[str]:
    """Modules imported when `path` is imported: module-scope statements, including those in
    if/try blocks and class bodies, but not in functions or under `if TYPE_CHECKING:`."""
    names: list[str] = []

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.Import):
                names.extend(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.append(node.module)
                names.extend(f"{node.module}.{a.name}" for a in node.names)  # a submodule?
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            elif isinstance(node, ast.If) and _type_checking(node):
                visit(node.orelse)
            else:
                for field in ("body", "orelse", "finalbody", "handlers"):
                    visit(getattr(node, field, []) or [])

    visit(ast.parse(path.read_text(), str(path)).body)
    return names


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: {n for n in top_level_imports(p) if n in mods and n != m}
            for m, p in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def dfs(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (cycle := dfs(n)):
                return cycle
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := dfs(m)):
            return cycle
    return None


def test_the_graph_sees_the_modules():
    graph = import_graph()
    assert {"fastres.run.train", "fastres.loaders.cifar", "fastres.kernels._common"} <= set(graph)
    assert "fastres.loaders.augment" in graph["fastres.loaders.cifar"]
    assert "fastres.run.config" in graph["fastres.grid.plan"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def loaded_after(*names: str) -> set[str]:
    """sys.modules after importing `names` in a fresh interpreter."""
    code = (f"import sys, json\nfor n in {list(names)!r}:\n    __import__(n)\n"
            "print(json.dumps(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True, timeout=120).stdout
    return set(json.loads(out))


def test_reports_and_planning_start_without_the_training_stack():
    """A report reads SQLite and draws: no trainer, no FFCV, not even torch."""
    loaded = loaded_after("fastres.report.command", "fastres.grid.plan", "fastres.run.config",
                          "fastres.run.records", "fastres.study.protocol", "fastres.run.signals")
    heavy = {"ffcv", "fastres.run.train", "torch"} & loaded
    assert not heavy, sorted(heavy)


def test_planning_and_configuration_import_no_torch():
    loaded = loaded_after("fastres.grid.plan", "fastres.run.config", "fastres.run.records",
                          "fastres.study.protocol", "fastres.study.structures")
    heavy = {"torch", "ffcv", "triton"} & loaded
    assert not heavy, sorted(heavy)
