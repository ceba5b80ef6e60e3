"""End to end: a run resumed on another number of processes (same global batch)
continues the same global stream, so its losses match an uninterrupted run."""

from __future__ import annotations

import pytest

from support.runs import resume_from, run_training

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

COMMON = [
    "--checkpoint.enable", "true",
    "--checkpoint.interval", "2",
    "--lr_scheduler.total_steps", "6",
    # Global batch 8 = local 4 x 2 processes, or x 2 accumulation steps on one.
    "--training.global_batch_size", "8",
]


def test_resuming_1_to_2_and_2_to_1_processes_continues_the_uninterrupted_run(tmp_path):
    full = run_training(tmp_path / "full", *COMMON, "--training.steps", "6").check()
    assert sorted(full.losses) == [1, 2, 3, 4, 5, 6]

    # 1 -> 2: the 1-process run's step-2 checkpoint, continued by 2 processes.
    two = resume_from(tmp_path / "full" / "checkpoint" / "step-2", tmp_path / "two")
    on_two = run_training(two, *COMMON, "--training.steps", "4", nproc=2).check()
    assert "Loading the checkpoint" in on_two.output
    assert sorted(on_two.losses) == [3, 4]
    assert on_two.losses == pytest.approx({s: full.losses[s] for s in (3, 4)}, rel=1e-4)

    # 2 -> 1: the 2-process run's step-4 checkpoint, continued by 1 process.
    one = resume_from(two / "checkpoint" / "step-4", tmp_path / "one")
    on_one = run_training(one, *COMMON, "--training.steps", "6").check()
    assert sorted(on_one.losses) == [5, 6]
    assert on_one.losses == pytest.approx({s: full.losses[s] for s in (5, 6)}, rel=1e-4)
