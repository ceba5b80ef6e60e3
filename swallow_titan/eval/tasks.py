"""Finding and checking lm-eval tasks (imports lm-eval; see ``swallow_titan.eval``)."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

from lm_eval.tasks import TaskManager


class TaskError(ValueError):
    """A task that cannot be evaluated; the message names the task and why."""


def task_manager(names: list[str], include_path: str = "") -> TaskManager:
    """lm-eval's TaskManager for ``names``, with ``include_path``'s YAML files.

    Indexing lm-eval's ~15,000 built-in tasks takes seconds; when every name is
    one of ``include_path``'s own, and so is every member of its groups (at
    any depth), only that folder is indexed. A group of ``include_path`` that
    names a built-in task gets the full index: without it lm-eval would take
    the member for an inline task with no dataset.
    """
    if include_path and not os.path.isdir(include_path):
        raise TaskError(f"include_path {include_path!r} is not a folder")
    if include_path:
        own = _indexed(include_path, False)
        if _all_own(names, own):
            return own
    return _indexed(include_path, True)


def _all_own(names: list[str], own: TaskManager) -> bool:
    """Whether ``names`` and every member of their groups, at any depth, are in ``own``'s index."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        entry = own.task_index.get(name)
        if entry is None:
            return False
        if name in own.all_groups:
            todo += group_members((entry.cfg or {}).get("task"))
    return True


def group_members(members: Any) -> list[str]:
    """The task, group and tag names a group's ``task:`` list refers to.

    Entries are names, ``{task: name, <overrides>}``, ``{group: name}`` or an
    inline group ``{group: new_name, task: [...]}`` (whose members count).
    """
    if isinstance(members, str):
        return [members]
    names: list[str] = []
    for item in members or []:
        if isinstance(item, str):
            names.append(item)
        elif isinstance(item, dict) and "group" in item:
            names += group_members(item["task"]) if "task" in item else [item["group"]]
        elif isinstance(item, dict) and "task" in item:
            names.append(item["task"])
    return names


@functools.lru_cache(maxsize=4)
def _indexed(include_path: str, defaults: bool) -> TaskManager:
    # One index per process and folder: the start-up check, every in-loop
    # evaluation and the CLI reuse it.
    return TaskManager(include_path=include_path or None, include_defaults=defaults)


@functools.lru_cache(maxsize=None)
def built_task(name: str, include_path: str = "") -> tuple[Any, ...]:
    """lm-eval's objects for one task, group or tag name, built once per process.

    Building parses the task's YAML and loads its dataset (a download for
    lm-eval's own tasks), so it happens once, at the start-up check, and every
    evaluation reuses the objects: none needs the network, and every rank
    keeps what it loaded at start-up. lm-eval builds each evaluation's
    requests afresh from them (``build_all_requests``).
    """
    loaded = task_manager([name], include_path).load([name])
    if name in loaded["groups"]:
        return (loaded["groups"][name],)
    if name in loaded["tasks"]:
        return (loaded["tasks"][name],)
    return tuple(loaded["tasks"].values())  # a tag: its tasks


def built_tasks(names: list[str], include_path: str = "") -> list[Any]:
    """:func:`built_task` of each name, in order (what ``simple_evaluate`` takes as ``tasks``)."""
    return [obj for name in names for obj in built_task(name, include_path)]


def unreadable_yaml(include_path: str) -> list[str]:
    """``file: error`` for each YAML file under ``include_path`` that lm-eval cannot parse.

    lm-eval's task index skips such files silently; their tasks then look unknown.
    """
    from lm_eval.tasks._yaml_loader import load_yaml  # lm-eval's own loader (!function tags)

    broken = []
    for path in sorted(Path(include_path).rglob("*.yaml")):
        try:
            load_yaml(path, resolve_func=False)
        except Exception as e:  # noqa: BLE001 - yaml and lm-eval raise several kinds
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            broken.append(f"{path}: {first_line}")
    return broken


def check_tasks(names: list[str], include_path: str = "", load_data: bool = True) -> list[str]:
    """Problems with the tasks, one message per task, naming it; empty when all is well.

    Unknown names are reported with nearby names; with ``load_data`` every
    task is built as lm-eval builds it for an evaluation (its YAML parsed,
    its dataset loaded), so a malformed YAML or a dataset that cannot be
    read is found before training starts.
    """
    try:
        manager = task_manager(names, include_path)
    except TaskError as e:
        return [str(e)]
    problems = []
    known = set(manager.all_tasks)
    broken = unreadable_yaml(include_path) if include_path else []
    for name in names:
        if name not in known:
            close = sorted(t for t in known if name.lower() in t.lower() or t.lower() in name.lower())
            problems.append(
                f"task {name!r}: lm-eval knows no such task or group"
                + (f" (similar: {', '.join(close[:5])})" if close else "")
                + (f"; include_path {include_path!r} was searched too" if include_path else "")
                + (
                    "; these YAML files there are malformed and were skipped: " + "; ".join(broken)
                    if broken
                    else ""
                )
            )
            continue
        if load_data:
            try:
                built_task(name, include_path)
            except Exception as e:  # noqa: BLE001 - any failure means the task cannot run
                problems.append(f"task {name!r} cannot be loaded: {type(e).__name__}: {e}")
    return problems


def flatten_results(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """``eval/<task>/<metric>`` scalars from simple_evaluate's ``results``.

    lm-eval's metric keys are ``<metric>,<filter>`` (e.g. ``acc,none``,
    ``exact_match,strip``); the filter is kept unless it is "none". Standard
    errors, aliases and non-numbers are left out.
    """
    scalars: dict[str, float] = {}
    for task, metrics in results.items():
        for key, value in metrics.items():
            if "," not in key or "_stderr" in key:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            metric, filter_name = key.split(",", 1)
            name = metric if filter_name == "none" else f"{metric}_{filter_name}"
            scalars[f"eval/{task}/{name}"] = float(value)
    return scalars
