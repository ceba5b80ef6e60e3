"""Crash-proof resume, end to end: kills, pre-emption and corruption on real runs.

Every interrupted run is restarted with the same command and must then print
exactly the per-step losses of an uninterrupted run (model, optimizer, LR
schedule, data position and random generators restored).
"""

from __future__ import annotations

import os
import re
import shutil
import signal

import pytest

from support.overrides import FSDP2
from support.runs import TrainingProcess, loaded_step, run_training, series
from support.tensorboard import scalars
from swallow_titan.checkpoint.integrity import MANIFEST_NAME, checkpoint_problems, staging_name

pytestmark = pytest.mark.slow

STEPS = 8
RESUMABLE = (
    "--training.steps", str(STEPS),
    "--checkpoint.enable", "true",
    "--checkpoint.interval", "2",
    "--checkpoint.keep_latest_k", "3",
    "--metrics.enable_tensorboard", "true",
)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("uninterrupted") / "run"
    result = run_training(folder, *RESUMABLE).check()
    assert sorted(result.losses) == list(range(1, STEPS + 1))
    return folder, result.losses


def _published(folder) -> list[str]:
    return sorted(n for n in os.listdir(folder / "checkpoint") if n.startswith("step-"))


def _assert_continues_exactly(result, resumed_from: int, reference: dict[int, float]) -> None:
    assert loaded_step(result.output) == resumed_from, result.output[-3000:]
    assert result.losses == {s: reference[s] for s in range(resumed_from + 1, STEPS + 1)}


def test_keep_latest_k_leaves_the_newest_checkpoints(uninterrupted):
    folder, _ = uninterrupted
    assert _published(folder) == ["step-4", "step-6", "step-8"]
    for name in _published(folder):
        assert checkpoint_problems(str(folder / "checkpoint" / name)) == []


def test_sigkill_mid_run_then_restart_reproduces_the_losses(uninterrupted, tmp_path):
    reference_folder, reference = uninterrupted
    run = TrainingProcess(tmp_path / "run", *RESUMABLE)
    run.wait_for_step(5)
    run.kill()
    killed = run.wait()
    assert STEPS not in killed.losses, "the run finished before it was killed"
    newest = max(int(n.split("-")[1]) for n in _published(tmp_path / "run"))

    resumed = run_training(tmp_path / "run", *RESUMABLE).check()
    _assert_continues_exactly(resumed, newest, reference)
    # TensorBoard hides what the killed attempt logged after its checkpoint:
    # the curve equals the uninterrupted one, value for value.
    assert scalars(tmp_path / "run", "train/loss") == scalars(reference_folder, "train/loss")
    # So does the run log: each step once (series() refuses a repeated step),
    # with the uninterrupted run's loss.
    assert series(resumed.history, "train/loss") == reference


def test_sigkill_during_a_checkpoint_save_resumes_from_the_previous_one(
    uninterrupted, tmp_path
):
    _, reference = uninterrupted
    folder = tmp_path / "run"
    # The step-4 checkpoint is fully written but waits 2 s before publication.
    run = TrainingProcess(folder, *RESUMABLE, "--debug.checkpoint_publish_delay_s", "2")
    run.wait_for_path(folder / "checkpoint" / staging_name(4) / ".metadata")
    run.kill()
    run.wait()
    assert _published(folder) == ["step-2"]

    resumed = run_training(folder, *RESUMABLE).check()
    assert f"Removing {folder / 'checkpoint' / staging_name(4)}" in resumed.output
    _assert_continues_exactly(resumed, 2, reference)


def test_a_corrupted_checkpoint_is_skipped_with_a_warning(uninterrupted, tmp_path):
    reference_folder, reference = uninterrupted
    folder = tmp_path / "run"
    shutil.copytree(reference_folder, folder)
    data_file = folder / "checkpoint" / "step-8" / "__0_0.distcp"
    with open(data_file, "r+b") as f:
        f.truncate(1000)

    resumed = run_training(folder, *RESUMABLE).check()
    assert re.search(r"Skipping checkpoint \S*step-8: it is incomplete or corrupted", resumed.output)
    _assert_continues_exactly(resumed, 6, reference)
    # The re-written step-8 replaced the broken one.
    assert checkpoint_problems(str(folder / "checkpoint" / "step-8")) == []


def test_unreadable_metadata_and_an_empty_step_folder_are_skipped(uninterrupted, tmp_path):
    reference_folder, reference = uninterrupted
    folder = tmp_path / "run"
    shutil.copytree(reference_folder, folder)
    metadata = folder / "checkpoint" / "step-8" / ".metadata"
    # Same size: the manifest agrees, only reading DCP's metadata shows the damage.
    metadata.write_bytes(b"\0" * metadata.stat().st_size)
    (folder / "checkpoint" / "step-9").mkdir()  # neither .metadata nor an HF index

    resumed = run_training(folder, *RESUMABLE).check()
    for step in (9, 8):
        assert re.search(
            rf"Skipping checkpoint \S*step-{step}: it is incomplete or corrupted", resumed.output
        ), resumed.output[-3000:]
    _assert_continues_exactly(resumed, 6, reference)


def test_no_usable_checkpoint_exits_with_status_5_and_deletes_nothing(uninterrupted, tmp_path):
    reference_folder, _ = uninterrupted
    folder = tmp_path / "run"
    shutil.copytree(reference_folder, folder)
    for name in _published(folder):
        with open(folder / "checkpoint" / name / "__0_0.distcp", "r+b") as f:
            f.truncate(1000)

    result = run_training(folder, *RESUMABLE)
    assert result.returncode != 0
    assert re.search(r"exitcode\s*:\s*5\b", result.output), result.output[-3000:]
    assert "none of the checkpoints" in result.output
    assert result.losses == {}  # it did not start over from scratch
    assert _published(folder) == ["step-4", "step-6", "step-8"]


def test_sigterm_writes_a_checkpoint_and_the_restart_continues_exactly(
    uninterrupted, tmp_path
):
    _, reference = uninterrupted
    folder = tmp_path / "run"
    run = TrainingProcess(folder, *RESUMABLE)
    run.wait_for_step(3)
    run.signal_all(signal.SIGTERM)  # torchrun and the worker, as SLURM does
    stopped = run.wait()
    match = re.search(r"Stopped after step (\d+) on SIGTERM", stopped.output)
    assert match, stopped.output[-3000:]
    step = int(match.group(1))
    assert 3 <= step < STEPS
    assert max(stopped.losses) == step  # the step in flight was finished, nothing more
    assert "Training finished" in stopped.output  # the worker exited normally
    assert checkpoint_problems(str(folder / "checkpoint" / f"step-{step}")) == []

    resumed = run_training(folder, *RESUMABLE).check()
    _assert_continues_exactly(resumed, step, reference)


@pytest.mark.distributed
def test_sigterm_to_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    folder = tmp_path / "run"
    run = TrainingProcess(
        folder, *RESUMABLE, *FSDP2, nproc=2
    )
    rank1 = run.worker_pid(1)
    run.wait_for_step(2)
    os.kill(rank1, signal.SIGTERM)
    result = run.wait()
    assert result.returncode == 0, result.output[-3000:]
    # Rank 0 (whose log this is) did not get the signal but stopped too.
    match = re.search(r"Stopped after step (\d+) on a stop signal on another rank", result.output)
    assert match, result.output[-3000:]
    step = int(match.group(1))
    assert step < STEPS
    checkpoint = folder / "checkpoint" / f"step-{step}"
    assert checkpoint_problems(str(checkpoint)) == []
    assert {"__0_0.distcp", "__1_0.distcp"} <= set(os.listdir(checkpoint))


def test_async_checkpoints_are_published_complete(uninterrupted, tmp_path):
    _, reference = uninterrupted
    folder = tmp_path / "run"
    result = run_training(folder, *RESUMABLE, "--checkpoint.async_mode", "async").check()
    assert result.losses == reference
    assert _published(folder) == ["step-4", "step-6", "step-8"]
    assert not [n for n in os.listdir(folder / "checkpoint") if n.startswith(".")]
    for name in _published(folder):
        assert (folder / "checkpoint" / name / MANIFEST_NAME).is_file()
        assert checkpoint_problems(str(folder / "checkpoint" / name)) == []
