"""The package layout rules, read from the source with ``ast``.

- ``swallow_titan/config/`` sits at the bottom: it imports nothing from the
  rest of ``swallow_titan`` (or from ``kernels``).
- No two modules of ``swallow_titan`` import each other, directly or in a
  loop, counting imports inside functions too.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "swallow_titan"

# Known cycles being removed elsewhere, each one a sorted pair of modules.
ALLOWED_CYCLES: set[frozenset[str]] = {
    # data/records.py <-> data/sources.py (a deferred import): it goes with
    # the legacy mixture path; remove this entry then.
    frozenset({"swallow_titan.data.records", "swallow_titan.data.sources"}),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported_names(path: Path, modules: dict[str, Path]) -> dict[str, int]:
    """First-party modules ``path`` imports (anywhere in it) -> line of the first import."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: dict[str, int] = {}
    this = module_name(path)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import mod` imports the module pkg.mod when there is one.
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                for alias in node.names
            ]
        for target in targets:
            if target.split(".")[0] in ("swallow_titan", "kernels"):
                found.setdefault(target, node.lineno)
    return found


def test_config_imports_nothing_from_the_rest_of_the_package():
    modules = all_modules()
    offending = []
    for name, path in modules.items():
        if not name.startswith("swallow_titan.config"):
            continue
        for target, line in imported_names(path, modules).items():
            if target.startswith("swallow_titan.config"):
                continue
            # Importing swallow_titan.config.x runs swallow_titan/__init__.py
            # (device selection) first; that is not a dependency on the rest.
            offending.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert not offending, "swallow_titan/config/ must sit at the bottom:\n" + "\n".join(
        offending
    )


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def test_no_import_cycles_in_the_package():
    modules = all_modules()
    graph = {
        name: {
            target
            for target in imported_names(path, modules)
            if target in modules and target != name
        }
        for name, path in modules.items()
    }
    for pair in ALLOWED_CYCLES:
        a, b = sorted(pair)
        graph[a].discard(b)
        graph[b].discard(a)
    cycles = import_cycles(graph)
    assert not cycles, "import cycles (each line: modules that import each other):\n" + (
        "\n".join(" <-> ".join(c) for c in cycles)
    )


def test_the_cycle_finder_finds_a_cycle():
    # The test above passes on an empty answer; make sure it can fail.
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert import_cycles(graph) == [["a", "b", "c"]]
