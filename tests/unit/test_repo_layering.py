"""The repo's shape, checked from the code's own imports (parsed, not run).

Imports only go down: no circle among the modules of protocol/, coordinator/ and tvmagent/ (module
level imports; those under `if TYPE_CHECKING:` and inside functions do not run at import time),
tvmagent/ and protocol/ import nothing of coordinator/, protocol/ nothing of tvmagent/, the
coordinator imports tvmagent/ only from its CLI, no mixin classes, no module over 700 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("protocol", "coordinator", "tvmagent")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _top_level_imports(mod: str, path: Path, known: set[str]) -> set[str]:
    tree = ast.parse(path.read_text())
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    found: set[str] = set()
    for node in tree.body:  # module level only
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                absmod = ".".join(base + ([node.module] if node.module else []))
            else:
                absmod = node.module or ""
            names = [absmod] + [f"{absmod}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != mod:
                found.add(name)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {m: _top_level_imports(m, p, known) for m, p in mods.items()}


def _package_edges_ok(src: str, dst: str) -> bool:
    if dst.startswith(src):  # a package's __init__ re-exporting its own modules
        return True
    if src.startswith(("protocol",)) and not dst.startswith("protocol"):
        return False
    if src.startswith("tvmagent") and dst.startswith("coordinator"):
        return False
    if src.startswith("coordinator") and dst.startswith("tvmagent"):
        return src.startswith("coordinator.cli")
    return True


def test_no_import_circles() -> None:
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt not in graph or nxt.startswith(node + "."):
                continue  # a package importing its own submodules is not a circle
            if state.get(nxt) == 1:
                circles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not circles, circles


def test_imports_only_go_down_between_packages() -> None:
    bad = [
        (src, dst)
        for src, dsts in _graph().items()
        for dst in dsts
        if not _package_edges_ok(src, dst)
    ]
    assert not bad, bad


def test_no_mixins_and_no_module_over_700_lines() -> None:
    for mod, path in _modules().items():
        text = path.read_text()
        assert text.count("\n") <= 700, f"{mod}: {text.count(chr(10))} lines"
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef):
                assert not node.name.endswith("Mixin"), f"{mod}.{node.name}"


def test_the_checker_reads_real_edges() -> None:
    # The check above could pass by reading nothing: make sure it finds real edges.
    graph = _graph()
    assert "coordinator.core.facade" in graph["coordinator.runtime.service"] or any(
        d.startswith("coordinator.core") for d in graph["coordinator.runtime.service"]
    )
    assert "protocol.messages" in graph["tvmagent.state"] or any(
        d.startswith("protocol") for d in graph["tvmagent.state"]
    )
