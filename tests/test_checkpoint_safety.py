"""Checkpoints are published atomically, checked before loading, and pruned safely.

In-process tests of the checkpoint manager on a small model with real DCP
files; the end-to-end kill tests are in test_crash_resume.py.
"""

from __future__ import annotations

import logging
import os
import random
import re
import threading
import time

import numpy as np
import pytest
import torch
from torchtitan.components.lr_scheduler import build_lr_schedulers
from torchtitan.components.optimizer import OptimizersContainer
from torchtitan.config.job_config import Checkpoint, LRScheduler

from swallow_titan.checkpoint.manager import (
    AtomicCheckpointManager,
    CheckpointError,
    load_entry_if_present,
)
from swallow_titan.checkpoint.integrity import (
    MANIFEST_NAME,
    checkpoint_problems,
    checkpoints_to_prune,
    deleting_name,
    staging_name,
)
from swallow_titan.checkpoint.rng import RNG, RngState

# torchtitan's own step discovery and pruning look for this anywhere in a name.
TORCHTITAN_STEP_PATTERN = r"step-(\d+)"


class Progress:
    """Stands in for the train state and the dataloader: one number."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step = state["step"]


class Job:
    """A model, optimizer, LR schedule and an AtomicCheckpointManager over ``folder``."""

    def __init__(
        self,
        folder,
        keep_latest_k: int = 0,
        publish_delay_s: float = 0.0,
        extra: dict[str, Progress] | None = None,
    ):
        torch.manual_seed(0)
        self.model = torch.nn.Linear(8, 8)
        self.optimizers = OptimizersContainer([self.model], torch.optim.AdamW, {"lr": 1e-2})
        self.progress = Progress()
        self.manager = AtomicCheckpointManager(
            dataloader=Progress(),
            model_parts=[self.model],
            optimizers=self.optimizers,
            lr_schedulers=build_lr_schedulers(self.optimizers, LRScheduler(warmup_steps=1), 10),
            states={"train_state": self.progress, RNG: RngState(rank=0), **(extra or {})},
            checkpoint_config=Checkpoint(
                enable=True, folder="checkpoint", interval=1, keep_latest_k=keep_latest_k
            ),
            sd_adapter=None,
            base_folder=str(folder),
            optional_entries=(RNG, *(extra or {})),
            publish_delay_s=publish_delay_s,
        )
        self.folder = folder / "checkpoint"

    def train_and_save(self, step: int) -> None:
        self.model(torch.randn(2, 8)).sum().backward()
        self.optimizers.step()
        self.progress.step = step
        self.manager.save(step)

    def entries(self) -> list[str]:
        self.manager.close()  # lets background deletions finish
        return sorted(os.listdir(self.folder))

    def truncate(self, step: int) -> str:
        path = self.folder / f"step-{step}" / "__0_0.distcp"
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
        return path.name


@pytest.fixture(autouse=True)
def _quiet_single_process_dcp_warnings():
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def test_staging_and_deleting_names_never_match_torchtitans_step_discovery():
    for step in (0, 7, 10, 25035):
        assert re.search(TORCHTITAN_STEP_PATTERN, staging_name(step)) is None
        assert re.search(TORCHTITAN_STEP_PATTERN, deleting_name(step, "123")) is None


def test_a_checkpoint_is_invisible_until_it_is_complete(tmp_path):
    job = Job(tmp_path, publish_delay_s=1.0)
    # (entries, whether step-1's manifest existed right after that listing)
    seen_while_saving: list[tuple[list[str], bool]] = []
    saver = threading.Thread(target=job.train_and_save, args=(1,))
    saver.start()
    while saver.is_alive():
        if job.folder.exists():
            entries = os.listdir(job.folder)
            complete = (job.folder / "step-1" / MANIFEST_NAME).is_file()
            seen_while_saving.append((entries, complete))
        time.sleep(0.05)
    saver.join()
    # Fully written but unpublished for a second: only the staging name existed.
    assert [staging_name(1)] in [entries for entries, _ in seen_while_saving]
    # The saving thread may still run after publication (on a loaded machine it
    # is seen doing so): step-1 may show up then, but never incomplete.
    assert all(complete for entries, complete in seen_while_saving if "step-1" in entries)
    assert job.entries() == ["step-1"]
    assert (job.folder / "step-1" / MANIFEST_NAME).is_file()
    assert checkpoint_problems(str(job.folder / "step-1")) == []


def test_a_truncated_file_is_reported_against_the_manifest(tmp_path):
    job = Job(tmp_path)
    job.train_and_save(1)
    name = job.truncate(1)
    problems = checkpoint_problems(str(job.folder / "step-1"))
    assert any(name in p and "the manifest says" in p for p in problems), problems


def test_a_truncated_file_is_reported_from_dcp_metadata_without_a_manifest(tmp_path):
    job = Job(tmp_path)
    job.train_and_save(1)
    os.remove(job.folder / "step-1" / MANIFEST_NAME)
    name = job.truncate(1)
    problems = checkpoint_problems(str(job.folder / "step-1"))
    assert any(name in p and "references bytes up to" in p for p in problems), problems


def test_a_checkpoint_without_metadata_is_reported(tmp_path):
    job = Job(tmp_path)
    job.train_and_save(1)
    os.remove(job.folder / "step-1" / ".metadata")
    problems = checkpoint_problems(str(job.folder / "step-1"))
    assert any(".metadata" in p for p in problems), problems


def test_a_checkpoint_whose_metadata_cannot_be_read_is_reported(tmp_path):
    job = Job(tmp_path)
    job.train_and_save(1)
    metadata = job.folder / "step-1" / ".metadata"
    # Same size, so the manifest is satisfied: only reading DCP's metadata can tell.
    metadata.write_bytes(b"\0" * metadata.stat().st_size)
    problems = checkpoint_problems(str(job.folder / "step-1"))
    assert any(".metadata is unreadable" in p for p in problems), problems


def test_an_empty_step_folder_is_reported_and_skipped(tmp_path, caplog):
    job = Job(tmp_path)
    job.train_and_save(1)
    job.manager.close()
    (job.folder / "step-2").mkdir()  # neither DCP's .metadata nor an HF index
    problems = checkpoint_problems(str(job.folder / "step-2"))
    assert any("neither .metadata nor" in p for p in problems), problems
    resumed = Job(tmp_path)
    with caplog.at_level(logging.WARNING):
        assert resumed.manager.load()
    assert resumed.manager.resumed_from == 1
    assert any("Skipping checkpoint" in r.message and "step-2" in r.message for r in caplog.records)


def test_resume_skips_a_corrupted_newest_checkpoint_with_a_warning(tmp_path, caplog):
    job = Job(tmp_path)
    for step in (1, 2, 3):
        job.train_and_save(step)
    job.manager.close()
    job.truncate(3)

    resumed = Job(tmp_path)
    with caplog.at_level(logging.WARNING):
        assert resumed.manager.load()
    assert resumed.progress.step == 2
    assert resumed.manager.resumed_from == 2
    assert any("Skipping checkpoint" in r.message and "step-3" in r.message for r in caplog.records)


def test_resume_stops_when_checkpoints_exist_but_none_is_complete(tmp_path):
    job = Job(tmp_path)
    job.train_and_save(1)
    job.manager.close()
    job.truncate(1)
    with pytest.raises(CheckpointError, match="none of the checkpoints"):
        Job(tmp_path).manager.load()


def test_an_interrupted_save_is_cleaned_up_and_the_run_starts_fresh(tmp_path):
    staging = tmp_path / "checkpoint" / staging_name(5)
    staging.mkdir(parents=True)
    (staging / "__0_0.distcp").write_bytes(b"half written")
    job = Job(tmp_path)
    assert job.manager.load() is False
    # No checkpoint was ever published: the folder is gone, so a configured
    # checkpoint.initial_load_path would be honoured.
    assert not (tmp_path / "checkpoint").exists()


def test_a_new_save_replaces_a_broken_checkpoint_of_the_same_step(tmp_path):
    job = Job(tmp_path)
    for step in (1, 2):
        job.train_and_save(step)
    job.manager.close()
    job.truncate(2)
    resumed = Job(tmp_path)
    resumed.manager.load()
    resumed.train_and_save(2)
    assert resumed.entries() == ["step-1", "step-2"]
    assert checkpoint_problems(str(resumed.folder / "step-2")) == []


def test_keep_latest_k_keeps_the_newest_complete_checkpoints(tmp_path):
    job = Job(tmp_path, keep_latest_k=2)
    for step in range(1, 6):
        job.train_and_save(step)
    assert job.entries() == ["step-4", "step-5"]


def test_pruning_after_resume_keeps_the_checkpoint_the_run_resumed_from(tmp_path):
    job = Job(tmp_path, keep_latest_k=2)
    for step in (1, 2, 3):
        job.train_and_save(step)
    job.manager.close()
    job.truncate(3)  # the run resumes from step 2
    resumed = Job(tmp_path, keep_latest_k=2)
    resumed.manager.load()
    for step in (3, 4, 5):
        resumed.train_and_save(step)
    assert resumed.entries() == ["step-2", "step-4", "step-5"]


@pytest.mark.parametrize(
    "complete, keep, protected, pruned",
    [
        # the k newest complete ones stay
        ({1: True, 2: True, 3: True, 4: True}, 2, set(), [1, 2]),
        # broken newer ones do not count: the newest complete one stays
        ({1: True, 2: True, 3: False, 4: False}, 2, set(), []),
        ({1: True, 2: True, 3: False, 4: False}, 1, set(), [1]),
        # the one the run resumed from stays
        ({1: True, 2: True, 3: True, 4: True}, 2, {1}, [2]),
        # broken ones older than the newest complete one go
        ({1: False, 2: True, 3: True}, 2, set(), [1]),
        # nothing complete: nothing is deleted
        ({1: False, 2: False}, 2, set(), []),
        # keep_latest_k = 0 keeps everything
        ({1: True, 2: True}, 0, set(), []),
    ],
)
def test_pruning_policy(complete, keep, protected, pruned):
    assert checkpoints_to_prune(complete, keep, protected) == pruned


def _draws() -> tuple:
    return (torch.rand(3).tolist(), random.random(), float(np.random.rand()))


def test_random_generators_are_restored_on_resume(tmp_path):
    job = Job(tmp_path)
    job.train_and_save(1)
    after_save = _draws()
    torch.manual_seed(123)  # a restart re-seeds the generators
    random.seed(123)
    np.random.seed(123)
    resumed = Job(tmp_path)
    resumed.manager.load()
    assert _draws() == after_save


def test_a_rank_without_saved_generator_state_keeps_its_own(tmp_path):
    job = Job(tmp_path)
    job.train_and_save(1)
    torch.manual_seed(5)
    expected = torch.rand(2).tolist()
    torch.manual_seed(5)
    assert load_entry_if_present(RNG, RngState(rank=1), str(job.folder / "step-1")) is False
    assert torch.rand(2).tolist() == expected


def test_a_checkpoint_without_an_optional_entry_still_loads(tmp_path, caplog):
    # Written before the entry existed (e.g. by an older version).
    Job(tmp_path).train_and_save(1)
    added = Progress()
    added.step = 7
    resumed = Job(tmp_path, extra={"guard": added})
    with caplog.at_level(logging.WARNING):
        assert resumed.manager.load()
    assert resumed.progress.step == 1
    assert added.step == 7  # kept its own state
    assert any("no 'guard' entry" in r.message for r in caplog.records)
