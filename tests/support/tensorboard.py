"""Read a run's TensorBoard events the way TensorBoard does (restart purges included)."""

from __future__ import annotations

from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def events(run_folder: Path, tb_folder: str = "tb") -> EventAccumulator:
    accumulator = EventAccumulator(
        str(run_folder / tb_folder), size_guidance={"scalars": 0, "tensors": 0}
    )
    accumulator.Reload()
    return accumulator


def scalars(run_folder: Path, tag: str) -> dict[int, float]:
    """step -> value of one scalar tag."""
    return {e.step: e.value for e in events(run_folder).Scalars(tag)}
