"""Mixture stages (``[[data.stages]]``): which weights apply at which step.

Stage ``i`` runs from the step after stage ``i - 1``'s ``until_step`` to its
own ``until_step``; the last stage runs to the end of training. Step ``s``
trains on global batch ``s - 1``, so a stage's first batch is the previous
stage's ``until_step``. Without stages the sources' ``weight`` is one stage
for the whole run. The schedule itself is ``schedule.StagedSchedule``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from swallow_titan.config.sections import DataSource, MixtureStage
from swallow_titan.data.sources import DataSourceError


@dataclass(frozen=True)
class Stage:
    """A stage resolved against the sources: its name, first global batch,
    last step (None: to the end) and one weight per source (0: unused)."""

    name: str
    first_batch: int
    until_step: int | None
    weights: tuple[float, ...]


def resolve_stages(sources: Sequence[DataSource], stages: Sequence[MixtureStage]) -> list[Stage]:
    """The run's stages in order (one, named "", when ``stages`` is empty)."""
    if not stages:
        return [Stage("", 0, None, tuple(s.weight for s in sources))]
    out = []
    first = 0
    for i, stage in enumerate(stages):
        last = i == len(stages) - 1
        weights = tuple(float(stage.weights.get(s.name, 0.0)) for s in sources)
        out.append(Stage(stage.name, first, None if last else stage.until_step, weights))
        first = stage.until_step
    return out


def check_stages(
    sources: Sequence[DataSource], stages: Sequence[MixtureStage], steps: int, where: str
) -> None:
    """Refuse stages that are out of order, weight unknown sources, weight
    nothing, or never run within ``steps``; messages name the entry and key."""
    names = {s.name for s in sources}
    seen: set[str] = set()
    previous = 0
    for i, stage in enumerate(stages):
        at = f"{where}.stages[{i}]"
        last = i == len(stages) - 1
        if not stage.name:
            raise DataSourceError(f"{at}.name: every stage needs a name")
        if stage.name in seen:
            raise DataSourceError(f"{at}.name: {stage.name!r} is used twice")
        seen.add(stage.name)
        unknown = sorted(set(stage.weights) - names)
        if unknown:
            raise DataSourceError(
                f"{at}.weights: {unknown[0]!r} is not a [[data.sources]] name "
                f"(sources: {sorted(names)})"
            )
        negative = [n for n, w in stage.weights.items() if w < 0]
        if negative:
            raise DataSourceError(f"{at}.weights.{negative[0]}: must be >= 0")
        if not any(w > 0 for w in stage.weights.values()):
            raise DataSourceError(f"{at}.weights: give at least one source a positive weight")
        if not last:
            if stage.until_step <= previous:
                raise DataSourceError(
                    f"{at}.until_step: must be after the previous stage's last step "
                    f"({previous}), got {stage.until_step}"
                )
            if stage.until_step >= steps:
                raise DataSourceError(
                    f"{at}.until_step: {stage.until_step} leaves no step for the stages "
                    f"after it (training.steps = {steps}); the last stage runs to the end"
                )
            previous = stage.until_step
        elif stage.until_step and stage.until_step < steps:
            raise DataSourceError(
                f"{at}.until_step: the last stage runs to the end of training "
                f"(training.steps = {steps}); leave until_step out, got {stage.until_step}"
            )


def plan_stages(
    sources: Sequence[DataSource], stages: Sequence[MixtureStage], steps: int,
    global_batch_tokens: int,
) -> list[dict]:
    """The plan's ``stages`` entries: name, first and last step, and the
    tokens each source gets in the stage (its share of the stage's steps)."""
    out = []
    resolved = resolve_stages(sources, stages)
    for stage in resolved:
        first = stage.first_batch + 1
        last = min(stage.until_step or steps, steps)
        total = sum(stage.weights) or 1.0
        tokens = max(last - first + 1, 0) * global_batch_tokens
        out.append(
            {
                "name": stage.name,
                "first_step": first,
                "last_step": last,
                "tokens": {
                    s.name: round(tokens * w / total)
                    for s, w in zip(sources, stage.weights)
                    if w > 0
                },
            }
        )
    return out
