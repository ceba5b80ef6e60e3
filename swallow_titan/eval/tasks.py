"""Finding and checking lm-eval tasks (imports lm-eval; see ``swallow_titan.eval``)."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

from lm_eval.tasks import TaskManager, get_task_dict


class TaskError(ValueError):
    """A task that cannot be evaluated; the message names the task and why."""


def task_manager(names: list[str], include_path: str = "") -> TaskManager:
    """lm-eval's TaskManager for ``names``, with ``include_path``'s YAML files.

    Indexing lm-eval's ~15,000 built-in tasks takes seconds; when every name is
    one of ``include_path``'s own tasks, only that folder is indexed.
    """
    if include_path and not os.path.isdir(include_path):
        raise TaskError(f"include_path {include_path!r} is not a folder")
    if include_path:
        own = _indexed(include_path, False)
        if all(name in own.all_tasks for name in names):
            return own
    return _indexed(include_path, True)


@functools.lru_cache(maxsize=4)
def _indexed(include_path: str, defaults: bool) -> TaskManager:
    # One index per process and folder: the start-up check, every in-loop
    # evaluation and the CLI reuse it.
    return TaskManager(include_path=include_path or None, include_defaults=defaults)


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
                get_task_dict([name], manager)
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
