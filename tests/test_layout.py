"""The package's shape (issue 20): fastres/ in four rooms along the data's way, imports running one
way between them, no import cycle, the torch-free modules torch-free, and the public entry points
and documented names still where users find them.

The rooms, lowest first (a module may import its own room and the rooms below it, never above):

    fastres.study    the protocol, structures, CIFAR-10, the eager models      (what is computed)
    fastres.kernels  Triton ops, the Triton models, the eager/Triton switch    (fast versions)
    fastres.loaders  FFCV and device-resident loaders, device augmentation
    fastres.run      one run: config, steps, loops, checkpoints, the store
    fastres.report   tables, HTML, figures, TensorBoard from the store        (read-only)
    fastres.grid     the plan, local and Ray runners, live display: the main job

Above them: the old-path aliases (fastres.train, fastres.models, fastres.structures), which only
users import. Imports inside functions count (a lazy import is still an import); those under
`if TYPE_CHECKING:` do not (they never run).
"""

import ast
import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
# Folder -> the package it installs as (pyproject.toml's package-dir).
PACKAGES = {"fastres": "fastres", "loaders": "fastres.loaders", "kernels": "fastres.kernels"}
ROOMS = ["fastres.study", "fastres.kernels", "fastres.loaders", "fastres.run", "fastres.report",
         "fastres.grid"]
# The old homes kept for users (issue 20): the -m entry points and documented names.
ALIASES = {"fastres.train": "fastres.run.train", "fastres.structures": "fastres.study.structures",
           "fastres.models": "fastres.study.models"}
ENTRY_POINTS = ["fastres.grid", "fastres.train", "fastres.report", "fastres.structures"]


def modules() -> dict[str, Path]:
    found = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            found[".".join((package, *parts)).removesuffix(".__init__")] = path
    return found


def _type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def imports(path: Path, module_level_only: bool = False) -> list[tuple[str, int]]:
    """(name, line) for each module `path` imports, and for `from m import x` also m.x (x may be
    a submodule). Skips `if TYPE_CHECKING:` bodies; with module_level_only, also functions."""
    found: list[tuple[str, int]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            found.extend((a.name, node.lineno) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.append((node.module, node.lineno))
            found.extend((f"{node.module}.{a.name}", node.lineno) for a in node.names)
        if module_level_only and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                   ast.Lambda)):
            return
        for child in ast.iter_child_nodes(node):
            if _type_checking(child):
                for stmt in child.orelse:
                    visit(stmt)
            else:
                visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return found


def import_graph(module_level_only: bool = False) -> dict[str, set[str]]:
    mods = modules()
    return {m: {n for n, _ in imports(p, module_level_only) if n in mods and n != m}
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


def rank(module: str) -> int | None:
    """The module's room, lowest 0; len(ROOMS) for the aliases above them; None for the bare
    package (`fastres`, whose __init__ imports nothing) and anything unplaced."""
    for i, room in enumerate(ROOMS):
        if module == room or module.startswith(room + "."):
            return i
    return len(ROOMS) if module in ALIASES else None


def upward_imports(edges: dict[str, list[tuple[str, int]]]) -> list[str]:
    """Each import of a room above the importer's own, as 'importer:line -> imported'."""
    bad = []
    for m, names in sorted(edges.items()):
        for n, line in names:
            rm, rn = rank(m), rank(n)
            if n != "fastres" and rm is not None and (rn is None or rn > rm):
                bad.append(f"{m}:{line} -> {n}")
    return bad


def test_the_graph_sees_the_modules_and_their_lazy_imports():
    graph = import_graph()
    assert {"fastres.run.train", "fastres.loaders.cifar", "fastres.kernels._common",
            "fastres.grid.command", "fastres.study.models"} <= set(graph)
    assert "fastres.loaders.augment" in graph["fastres.loaders.cifar"]
    assert "fastres.run.config" in graph["fastres.grid.plan"]
    # Inside a function: counted by default, not at module level.
    assert "fastres.run.train" in graph["fastres.grid.runner"]
    assert "fastres.run.train" not in import_graph(module_level_only=True)["fastres.grid.runner"]
    # Under TYPE_CHECKING: never counted (it never runs).
    assert "fastres.run.results" not in graph["fastres.grid.plan"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_the_direction_check_finds_an_upward_import():
    """The check itself can fail: the study importing a run, a run importing the grid (even
    lazily), a room importing an alias or an unplaced module; not the other way round."""
    edges = {"fastres.study.models": [("fastres.run.steps", 3)],
             "fastres.run.train": [("fastres.grid.plan", 9), ("fastres.study.models", 2)],
             "fastres.kernels.conv": [("fastres.models", 4), ("fastres.elsewhere", 5)],
             "fastres.grid.command": [("fastres.report.tensorboard", 1), ("fastres", 2)]}
    assert upward_imports(edges) == [
        "fastres.kernels.conv:4 -> fastres.models", "fastres.kernels.conv:5 -> fastres.elsewhere",
        "fastres.run.train:9 -> fastres.grid.plan", "fastres.study.models:3 -> fastres.run.steps"]


def test_imports_run_down_the_rooms():
    mods = modules()
    edges = {m: [(n, line) for n, line in imports(p) if n in mods and n != m]
             for m, p in mods.items()}
    bad = upward_imports(edges)
    assert not bad, "imports against the rooms' order " + " < ".join(ROOMS) + ":\n" + "\n".join(bad)


def test_every_module_is_in_a_room():
    """fastres/ holds the rooms, the bare package and the old-path aliases, nothing loose: a new
    module must say where it belongs (and so which imports it may make)."""
    loose = [m for m in modules() if m != "fastres" and rank(m) is None]
    assert not loose, f"modules in no room: {loose}"


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_rooms_say_what_they_hold_and_import_little():
    """Each room's __init__ has a docstring saying what it holds and may import; importing one
    module of a room imports nothing else of it (kernels' __init__ holds the switch `build`, and
    imports only the torch-free choice and structures)."""
    mods = modules()
    for room in ROOMS:
        path = mods[room]
        doc = ast.get_docstring(ast.parse(path.read_text()))
        assert doc and "import" in doc, f"{path}: docstring must say what the room may import"
        assert {n for n, _ in imports(path, module_level_only=True) if n in mods} <= {
            "fastres.kernels.choice", "fastres.study.structures"}, path


def test_aliases_are_the_modules_themselves():
    """The old homes are the new modules (one module: patches and isinstance agree), except
    fastres.models, which re-exports the model's names and the switch `build` it used to hold."""
    for old, new in ALIASES.items():
        if old == "fastres.models":
            continue
        assert importlib.import_module(old) is importlib.import_module(new), old
    import fastres.models
    import fastres.study.models
    from fastres.kernels import build
    assert fastres.models.from_seed_checkpoint is fastres.study.models.from_seed_checkpoint
    assert fastres.models.ResNet is fastres.study.models.ResNet
    assert fastres.models.build is build
    import fastres.run.train
    import fastres.train
    assert fastres.train.train is fastres.run.train.train


def test_every_package_folder_is_installed():
    """A subpackage missing from pyproject's package list works in an editable checkout and is
    missing from a wheel; every folder with an __init__ must be listed."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
                 ["packages"])
    found = {m for m, p in modules().items() if p.name == "__init__.py"}
    assert found == listed


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_entry_point_help(entry):
    """Each `python -m` entry point users know starts and prints its usage, from a fresh
    interpreter (as a user runs it), with the program name it is invoked by."""
    out = subprocess.run([sys.executable, "-m", entry, "--help"], capture_output=True, text=True,
                         cwd=ROOT, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("usage: "), out.stdout[:500]
    assert "Traceback" not in out.stderr


# A dotted fastres name in the docs: a module path, maybe followed by attributes (e.g.
# fastres.run.steps.Steps, fastres.kernels.build). File paths (fastres/...) are checked apart.
DOC_NAME = re.compile(r"(?<![\w/.-])fastres(?:\.[A-Za-z_]\w*)+")
DOC_PATH = re.compile(r"(?<![\w/.-])((?:fastres|kernels|loaders|benchmarks|tests|scripts)/"
                      r"[\w/.*-]*[\w*])")


def _resolves(name: str) -> bool:
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return False
        return True
    return False


@pytest.mark.parametrize("doc", ["README.md", "benchmarks/README.md"])
def test_documented_names_and_paths_exist(doc):
    """Every fastres.* name and every repository path the README and the benchmarks' README
    mention exists: a move that leaves the docs behind fails here."""
    text = (ROOT / doc).read_text()
    names = sorted({n.rstrip(".") for n in DOC_NAME.findall(text)})
    assert len(names) >= 5
    missing = [n for n in names if not _resolves(n)]
    assert not missing, f"{doc} names what does not exist: {missing}"
    paths = sorted({p.rstrip(".") for p in DOC_PATH.findall(text)})
    gone = [p for p in paths if not (any(ROOT.glob(p)) if "*" in p else (ROOT / p).exists())]
    assert not gone, f"{doc} points at paths that do not exist: {gone}"


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
                          "fastres.run.records", "fastres.study.protocol", "fastres.run.signals",
                          "fastres.run.cell", "fastres.kernels.choice", "fastres.kernels")
    heavy = {"ffcv", "fastres.run.train", "torch", "triton"} & loaded
    assert not heavy, sorted(heavy)


def test_planning_and_configuration_import_no_torch():
    loaded = loaded_after("fastres.grid.plan", "fastres.run.config", "fastres.run.records",
                          "fastres.study.protocol", "fastres.study.structures")
    heavy = {"torch", "ffcv", "triton"} & loaded
    assert not heavy, sorted(heavy)
