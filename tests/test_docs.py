"""The front page and the manual (``README.md``, ``docs/*.md``) name only things that exist.

What counts as a repository path (the rule :func:`named_paths` applies to the whole text,
prose, backticks and code blocks alike):

- a token starting with one of :data:`ROOTS` (``swallow_titan/``, ``kernels/``, ``tests/``,
  ``benchmarks/``, ``scripts/``, ``train_configs/``, ``assets/``, ``docs/``, ``.ci/``),
  optionally written as ``./ROOT/...``, and not glued to a longer path before it
  (``/data/tests/x`` or ``hf://...`` are not ours);
- a top-level file written as ``./name`` (``./setup.sh``, ``./run_train.sh``);
- a relative markdown link target ``[text](target)``, resolved against the file's own
  folder; its ``#anchor``, if any, must be GitHub's anchor of a heading of that file.

A bare file name without a folder (``config.json``, ``tiny_cpu.toml``) is *not* a path:
such names mostly describe files a run or an export writes. A ``pytest`` node id keeps
only its file (``tests/test_x.py::test_y``). Trailing sentence punctuation is dropped.
A path holding ``*`` is a glob, and ``<...>`` a placeholder standing for ``*``: it must
match at least one file. Everything else must exist as a file or folder.

Commands: every ``-m swallow_titan.<module>`` (after ``python`` or ``torchrun ...``) must
answer ``--help`` with exit status 0. All of them run in one fresh interpreter, one after
the other through :func:`runpy.run_module` as ``__main__``, so torch is imported once.

Two parts of the manual mirror the code and are checked against it: ``docs/layout.md``
names every module of ``swallow_titan/`` and ``kernels/`` (and no module that does not
exist), and the mutation-check table in ``docs/testing.md`` lists exactly the mutations
of ``scripts/mutation_check.py``.
"""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROOTS = (
    "swallow_titan/", "kernels/", "tests/", "benchmarks/", "scripts/",
    "train_configs/", "assets/", "docs/", ".ci/",
)
README_MAX_LINES = 200

_ROOT_PATH = re.compile(
    r"(?<![\w./:<>-])(?:\./)?((?:" + "|".join(re.escape(r) for r in ROOTS) + r")[\w./*<>-]*)"
)
_TOP_LEVEL = re.compile(r"(?<![\w./-])\./([\w-]+\.[\w]+)")
_LINK = re.compile(r"\]\(([^)\s]+)\)")
_COMMAND = re.compile(r"-m\s+(swallow_titan(?:\.\w+)+)")  # a placeholder (.<command>) is no command


def doc_files(root: Path = ROOT) -> list[Path]:
    """The front page and every file of the manual."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def _clean(token: str) -> str:
    token = token.split("::")[0]
    return token.rstrip(".,;:")


def named_paths(text: str) -> set[str]:
    """Repository paths ``text`` names, relative to the repository root (module docstring's rule)."""
    found = {_clean(m.group(1)) for m in _ROOT_PATH.finditer(text)}
    found |= {_clean(m.group(1)) for m in _TOP_LEVEL.finditer(text)}
    return found


def link_targets(text: str) -> set[str]:
    """Relative markdown link targets in ``text``, without their anchors (web links skipped)."""
    targets = set()
    for match in _LINK.finditer(text):
        target = match.group(1).split("#")[0]
        if target and "://" not in target and not target.startswith("mailto:"):
            targets.add(target)
    return targets


def anchors(text: str) -> set[str]:
    """GitHub's anchors for the headings of ``text`` (fenced code skipped): lower case,
    punctuation dropped, spaces to hyphens."""
    found, fenced = set(), False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (heading := re.match(r"#{1,6}\s+(.*)", line)):
            found.add(re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-"))
    return found


def broken_anchors(doc: Path) -> list[str]:
    """Links of ``doc`` to ``file.md#anchor`` (or ``#anchor``) whose anchor no heading has."""
    broken = []
    for match in _LINK.finditer(doc.read_text(encoding="utf-8")):
        target, _, anchor = match.group(1).partition("#")
        if not anchor or "://" in target:
            continue
        page = (doc.parent / target) if target else doc
        if page.suffix == ".md" and page.exists() and anchor not in anchors(page.read_text(encoding="utf-8")):
            broken.append(match.group(1))
    return broken


def missing(paths: set[str], base: Path) -> list[str]:
    """The paths of ``paths`` (relative to ``base``) that name nothing there."""
    absent = []
    for path in sorted(paths):
        pattern = re.sub(r"<[^>]*>", "*", path)
        if "*" in pattern:
            if not glob.glob(str(base / pattern)):
                absent.append(path)
        elif not (base / pattern).exists():
            absent.append(path)
    return absent


def named_commands(texts: list[str]) -> set[str]:
    """Every ``swallow_titan`` module the texts run with ``-m``."""
    return {m.group(1) for text in texts for m in _COMMAND.finditer(text)}


def test_the_path_finder_finds_paths_and_reports_missing_ones(tmp_path):
    (tmp_path / "swallow_titan" / "hf").mkdir(parents=True)
    (tmp_path / "swallow_titan" / "hf" / "config.py").write_text("")
    (tmp_path / "setup.sh").write_text("")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "data.md").write_text("")
    text = (
        "See `swallow_titan/hf/config.py`, then swallow_titan/hf/gone.py.\n"
        "Run ./setup.sh, then `tests/test_x.py::test_y`; `config.json` is written.\n"
        "Not ours: /data/tests/x.jsonl and hf://datasets/tests/y.\n"
        "Globs: `swallow_titan/hf/*.py`, `kernels/*.py`, `swallow_titan/<name>/config.py`.\n"
        "```bash\npython benchmarks/nothing.py --flag\n```\n"
        "[data](docs/data.md#stages) [away](docs/away.md) [web](https://example.com/a.md)\n"
    )
    paths = named_paths(text)
    assert paths == {
        "swallow_titan/hf/config.py", "swallow_titan/hf/gone.py", "setup.sh",
        "tests/test_x.py", "swallow_titan/hf/*.py", "kernels/*.py",
        "swallow_titan/<name>/config.py", "benchmarks/nothing.py", "docs/data.md",
        "docs/away.md",
    }
    assert missing(paths, tmp_path) == [
        "benchmarks/nothing.py", "docs/away.md", "kernels/*.py",
        "swallow_titan/hf/gone.py", "tests/test_x.py",
    ]
    assert link_targets(text) == {"docs/data.md", "docs/away.md"}
    assert missing(link_targets(text), tmp_path) == ["docs/away.md"]
    page = tmp_path / "docs" / "page.md"
    page.write_text("# Crashes, pre-emption and NaNs\n```bash\n# not a heading\n```\n"
                    "[ok](#crashes-pre-emption-and-nans) [bad](#not-a-heading) [ok](data.md)\n")
    assert anchors(page.read_text()) == {"crashes-pre-emption-and-nans"}
    assert broken_anchors(page) == ["#not-a-heading"]
    assert named_commands(["python -m swallow_titan.plan X", "torchrun -m  swallow_titan.evaluate",
                           "python -m swallow_titan.<command>"]) == {
        "swallow_titan.plan", "swallow_titan.evaluate",
    }


@pytest.mark.parametrize("doc", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_repository_path_named_exists(doc):
    paths = named_paths(doc.read_text(encoding="utf-8"))
    assert paths, f"{doc.name} names no repository path: the finder is broken"
    assert missing(paths, ROOT) == [], f"{doc.relative_to(ROOT)} names paths that do not exist"


@pytest.mark.parametrize("doc", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(doc):
    targets = link_targets(doc.read_text(encoding="utf-8"))
    assert missing(targets, doc.parent) == [], f"{doc.relative_to(ROOT)} has broken links"
    assert broken_anchors(doc) == [], f"{doc.relative_to(ROOT)} links to headings that do not exist"


def test_every_docs_file_is_reachable_from_the_front_page_or_the_index():
    linked = set()
    for index in (ROOT / "README.md", ROOT / "docs" / "README.md"):
        linked |= {(index.parent / t).resolve() for t in link_targets(index.read_text(encoding="utf-8"))}
    unlinked = [p.name for p in doc_files()[1:] if p.resolve() not in linked and p.name != "README.md"]
    assert unlinked == []


def test_the_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES


_HELP_DRIVER = """
import contextlib, io, json, runpy, sys
answers = {}
for module in sys.argv[1:]:
    sys.argv = [module, "--help"]
    out = io.StringIO()
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except BaseException as error:
        code, _ = 1, out.write(repr(error))
    text = out.getvalue()
    answers[module] = {"code": code, "usage": "usage" in text.lower(), "tail": text[-400:]}
print("HELP-ANSWERS " + json.dumps(answers))
"""


def test_every_named_command_answers_help():
    commands = sorted(named_commands([p.read_text(encoding="utf-8") for p in doc_files()]))
    assert "swallow_titan.train" in commands or "swallow_titan.plan" in commands
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-c", _HELP_DRIVER, *commands],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    line = next((l for l in done.stdout.splitlines() if l.startswith("HELP-ANSWERS ")), None)
    assert line is not None, done.stdout[-2000:] + done.stderr[-2000:]
    answers = json.loads(line.removeprefix("HELP-ANSWERS "))
    assert sorted(answers) == commands
    # Exit 0 alone would pass a module that ignores its arguments: it must print a usage.
    failed = {m: a["tail"] for m, a in answers.items() if a["code"] != 0 or not a["usage"]}
    assert failed == {}


def test_the_layout_names_every_module_and_only_modules_that_exist():
    layout = (ROOT / "docs" / "layout.md").read_text(encoding="utf-8")
    named = set(re.findall(r"(?<![\w/.])(\w+\.py)\b", layout))
    modules = [p for d in ("swallow_titan", "kernels") for p in (ROOT / d).rglob("*.py")]
    unnamed = sorted(str(p.relative_to(ROOT)) for p in modules if p.name != "__init__.py" and p.name not in named)
    assert unnamed == [], "docs/layout.md does not describe these modules"
    existing = {p.name for p in ROOT.rglob("*.py") if ".venv" not in p.parts}
    assert sorted(named - existing) == [], "docs/layout.md names modules that do not exist"


def test_the_mutation_table_lists_the_scripts_mutations():
    listed = subprocess.run(
        [sys.executable, "scripts/mutation_check.py", "--list"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=True,
    ).stdout.splitlines()
    script = {tuple(line.split()[:2]) for line in listed if line.strip()}
    testing = (ROOT / "docs" / "testing.md").read_text(encoding="utf-8")
    table = set(re.findall(r"^\| ([\w-]+) \| ([\w/.]+\.py) \|", testing, flags=re.M))
    assert len(script) > 0
    assert table == script, "re-run scripts/mutation_check.py and copy its table into docs/testing.md"
    caught = re.search(r"\*\*(\d+) of (\d+) caught\*\*", testing)
    assert caught is not None and int(caught.group(2)) == len(script)
