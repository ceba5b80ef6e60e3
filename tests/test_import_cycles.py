"""No two modules of swallow_titan/ import each other, directly or through others.

Every import counts, also one deferred into a function body: a deferred import
hides a cycle from Python, not from a reader who must understand one module
before the other.
"""

from __future__ import annotations

import ast
from pathlib import Path

from helpers import REPO

PACKAGE = REPO / "swallow_titan"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, name: str, is_package: bool, modules: set[str]) -> set[str]:
    """The ``modules`` that module ``name`` (text ``source``) imports anywhere in its body."""
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source, name)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # "from pkg import mod" imports the module pkg.mod when there is one.
            targets = [f"{base}.{alias.name}" for alias in node.names]
            targets = [t for t in targets if t in modules] or [base]
        else:
            continue
        found.update(t for t in targets if t in modules and t != name)
    return found


def import_graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(f) for f in files}
    return {
        module_name(f): imported_modules(
            f.read_text(), module_name(f), f.name == "__init__.py", modules
        )
        for f in files
    }


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_deferred_and_relative_imports_are_edges():
    source = (
        "import p.a\n"
        "from . import b\n"
        "from .c import thing\n"
        "def f():\n"
        "    from p.d import other\n"
    )
    modules = {"p.a", "p.b", "p.c", "p.d", "p.e", "p"}
    assert imported_modules(source, "p.e", False, modules) == {"p.a", "p.b", "p.c", "p.d"}


def test_the_graph_holds_the_real_imports():
    # A walker that found no edges would pass the cycle test vacuously.
    graph = import_graph()
    assert "swallow_titan.data.sources" in graph["swallow_titan.data.records"]
    assert "swallow_titan.data.records" in graph["swallow_titan.data.sharding"]
    assert len(graph) > 20 and sum(map(len, graph.values())) > 40


def test_no_module_of_swallow_titan_is_part_of_an_import_cycle():
    found = cycles(import_graph())
    assert not found, "import cycles in swallow_titan/:\n" + "\n".join(
        " -> ".join(c) for c in found
    )


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
