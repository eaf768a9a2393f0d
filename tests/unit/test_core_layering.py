"""The pure core's shape, checked from its source with `ast`: no I/O or concurrency libraries, imports
between its modules only go one way (no cycles), no mixins, no silenced attribute errors, no module
over 700 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[2] / "coordinator" / "core"
FORBIDDEN = {
    "trio",
    "anyio",
    "asyncio",
    "socket",
    "sqlite3",
    "subprocess",
    "threading",
    "multiprocessing",
    "logging",
    "structlog",
    "loguru",
}
MODULES = sorted(CORE.glob("*.py"))


def _imports(path: Path) -> list[tuple[str, int]]:
    """(absolute-ish module name, relative level) of every import in the file, nested ones too."""
    out: list[tuple[str, int]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(alias.name, 0) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level and node.module is None:  # from . import x
                out += [(alias.name, node.level) for alias in node.names]
            else:
                out.append((node.module or "", node.level))
    return out


def test_core_has_modules():
    assert len(MODULES) > 10


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_no_io_or_concurrency_imports(path: Path):
    bad = [name for name, level in _imports(path) if level == 0 and name.split(".")[0] in FORBIDDEN]
    assert bad == [], f"{path.name} imports {bad}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_module_size_and_no_mixins(path: Path):
    text = path.read_text()
    assert len(text.splitlines()) <= 700
    assert "ignore[attr-defined]" not in text
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ClassDef):
            assert "Mixin" not in node.name
            assert len(node.bases) <= 1, f"{path.name}: {node.name} inherits from several classes"


def _core_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    names = {p.stem for p in MODULES}
    for path in MODULES:
        deps: set[str] = set()
        for name, level in _imports(path):
            if level == 1:
                target = name.split(".")[0]
            elif level == 0 and name.startswith("coordinator.core."):
                target = name.split(".")[2]
            else:
                continue
            if target in names and target != path.stem:
                deps.add(target)
        graph[path.stem] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return [*path[path.index(node) :], node]
        if node in done:
            return None
        for dep in sorted(graph.get(node, ())):
            cycle = visit(dep, [*path, node])
            if cycle:
                return cycle
        done.add(node)
        return None

    for node in sorted(graph):
        cycle = visit(node, [])
        if cycle:
            return cycle
    return None


def test_core_imports_have_no_cycles():
    graph = _core_graph()
    assert graph["facade"]  # the facade composes the areas: the graph is not empty
    assert find_cycle(graph) is None


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_only_the_package_surface_is_imported_from_outside():
    # The shell uses coordinator.core (and its records); nothing imports the old mixin modules.
    root = CORE.parent
    for path in root.glob("*.py"):
        for name, _level in _imports(path):
            assert not name.startswith(("_core_", "coordinator._core_")), path.name
            assert name not in ("state", "coordinator.state"), path.name
