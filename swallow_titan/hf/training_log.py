"""The last logged value of a training metric, read from TensorBoard event files.

The model card reports final losses from what the run logged. Tag names
change as logging is extended, so callers pass the tags they accept, in order
of preference, and get None when none was recorded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

TRAINING_LOSS_TAGS = ("loss_metrics/global_avg_loss", "loss/train", "train/loss")
# "val/loss": the mean over [[validation.sets]] (swallow_titan.components.metrics).
# [eval] (swallow_titan.components.metrics.log_eval): eval/<task>/<metric>, and its duration.
EVAL_PREFIX = "eval/"
EVAL_TIME_TAG = "eval/time_s"
VALIDATION_LOSS_TAGS = ("val/loss", "validation_metrics/loss", "validation/loss", "loss/validation")


@dataclass(frozen=True)
class LoggedValue:
    """One scalar as logged: which tag, at which step, what value."""

    tag: str
    step: int
    value: float


def _points(
    tensorboard_folder: str | Path, wanted: Callable[[str], bool]
) -> dict[str, list[tuple[int, float, float]]]:
    """(step, wall time, value) of every scalar tag ``wanted`` accepts, from every event file."""
    folder = Path(tensorboard_folder)
    if not folder.is_dir():
        return {}
    from tensorboard.backend.event_processing.event_accumulator import (
        SCALARS,
        EventAccumulator,
    )

    points: dict[str, list[tuple[int, float, float]]] = {}
    for events in sorted(folder.rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events), size_guidance={SCALARS: 0})
        try:
            accumulator.Reload()
        except Exception:  # noqa: BLE001  (a truncated file from a crash)
            continue
        for tag in accumulator.Tags().get("scalars", []):
            if wanted(tag):
                for event in accumulator.Scalars(tag):
                    points.setdefault(tag, []).append(
                        (event.step, event.wall_time, event.value)
                    )
    return points


def last_logged_value(
    tensorboard_folder: str | Path, tags: tuple[str, ...], max_step: int | None = None
) -> LoggedValue | None:
    """The value at the highest step <= ``max_step`` of the first tag that has any.

    Every event file under the folder is read (each start of a run writes a
    new one); on equal steps the later write wins.
    """
    points = _points(tensorboard_folder, lambda tag: tag in tags)
    for tag in tags:
        candidates = [
            p for p in points.get(tag, []) if max_step is None or p[0] <= max_step
        ]
        if candidates:
            step, _, value = max(candidates)
            return LoggedValue(tag, step, float(value))
    return None


def last_evaluation(
    tensorboard_folder: str | Path,
    max_step: int | None = None,
    prefix: str = EVAL_PREFIX,
    exclude: tuple[str, ...] = (),
) -> tuple[int, dict[str, float]] | None:
    """The latest ``[eval]`` at a step <= ``max_step``: (step, {"<task>/<metric>": value}).

    Read from the ``<prefix><task>/<metric>`` scalars (``<prefix>time_s`` left
    out), without tags starting with one of ``exclude`` (e.g. an average's,
    ``eval/ema/...``, for the trained weights' evaluation).
    """
    points = _points(
        tensorboard_folder,
        lambda tag: tag.startswith(prefix)
        and tag != f"{prefix}time_s"
        and not tag.startswith(exclude),
    )
    steps = [p[0] for ps in points.values() for p in ps if max_step is None or p[0] <= max_step]
    if not steps:
        return None
    step = max(steps)
    values = {}
    for tag, ps in sorted(points.items()):
        at_step = [p for p in ps if p[0] == step]
        if at_step:
            values[tag.removeprefix(prefix)] = float(max(at_step)[2])
    return step, values
