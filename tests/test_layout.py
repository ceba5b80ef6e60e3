"""``swallow_titan/config/`` sits at the bottom of the package, read from the source with ``ast``.

It describes the run and imports nothing it configures: no module of
``swallow_titan`` outside ``config/`` (nor ``kernels``), counting imports
inside functions too. (No import cycles anywhere: ``test_import_cycles.py``.)
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "swallow_titan"


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported_names(
    path: Path, modules: dict[str, Path], root: Path = ROOT
) -> dict[str, int]:
    """First-party modules ``path`` imports (anywhere in it) -> line of the first import."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: dict[str, int] = {}
    this = module_name(path, root)
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
            offending.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert not offending, "swallow_titan/config/ must sit at the bottom:\n" + "\n".join(
        offending
    )


def test_the_rule_sees_a_deferred_import(tmp_path):
    # The test above passes on an empty list: make sure an import inside a
    # function, relative or absolute, is found.
    module = tmp_path / "swallow_titan" / "config" / "late.py"
    module.parent.mkdir(parents=True)
    module.write_text(
        "def f():\n    from ..data import sources\n    import swallow_titan.hf.hub\n"
    )
    modules = {"swallow_titan.data.sources": module, "swallow_titan.hf.hub": module}
    assert set(imported_names(module, modules, root=tmp_path)) == set(modules)
