"""``[metrics] enable_wandb``: W&B gets what TensorBoard gets, one run across restarts.

Offline (``WANDB_MODE=offline``): the runs' ``.wandb`` files are read back
(``support.wandb_offline``).
"""

from __future__ import annotations

import json
import math
import shutil

import pytest

from support.runs import run_training
from support.tensorboard import events
from swallow_titan.config.paths import WANDB_STATE

pytest.importorskip("wandb")
from support.wandb_offline import history, offline_runs, run_id  # noqa: E402

pytestmark = pytest.mark.slow

OFFLINE = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off"}
LOGGING = [
    "--metrics.enable_wandb", "true",
    "--metrics.enable_tensorboard", "true",
    "--checkpoint.enable", "true",
    "--checkpoint.interval", "2",
    "--validation.enable", "true",
    "--validation.freq", "2",
    "--validation.steps", "1",
    "--validation.seq_len", "64",
    "--validation.local_batch_size", "4",
]
W_AND_B_OWN = {"_step", "_timestamp", "_runtime"}


@pytest.fixture(scope="module")
def restarted(tmp_path_factory):
    """Steps 1-3, step 3's checkpoint lost (a crash before it was published), then 3-4 again."""
    dump = tmp_path_factory.mktemp("wandb") / "out"
    run_training(dump, "--training.steps", "3", *LOGGING, env=OFFLINE).check()
    shutil.rmtree(dump / "checkpoint" / "step-3")
    second = run_training(dump, "--training.steps", "4", *LOGGING, env=OFFLINE).check()
    assert sorted(second.losses) == [3, 4]  # resumed from step 2
    return dump


def rows_by_step(folder) -> dict[int, dict]:
    rows: dict[int, dict] = {}
    for row in history(folder):
        step = row["_step"]
        assert step not in rows, f"step {step} sent twice in {folder.name}"
        rows[step] = {k: v for k, v in row.items() if k not in W_AND_B_OWN}
    return rows


def test_a_restart_resumes_the_same_wandb_run(restarted):
    runs = offline_runs(restarted)
    assert len(runs) == 2
    stored = json.loads((restarted / WANDB_STATE).read_text())
    assert {run_id(r) for r in runs} == {stored["run_id"]}
    assert stored["last_step"] == 4


def test_steps_an_earlier_attempt_sent_are_not_sent_again(restarted):
    first, second = (rows_by_step(r) for r in offline_runs(restarted))
    assert sorted(first) == [1, 2, 3]
    assert sorted(second) == [4]  # step 3 was redone, but W&B has it already


def test_wandb_gets_every_tensorboard_scalar_with_the_same_tag_and_step(restarted):
    wandb_rows: dict[int, dict] = {}
    for folder in offline_runs(restarted):
        wandb_rows.update(rows_by_step(folder))
    tb = events(restarted)
    tb_tags: dict[int, set[str]] = {}
    tb_values: dict[tuple[int, str], float] = {}
    for tag in tb.Tags()["scalars"]:
        for event in tb.Scalars(tag):
            tb_tags.setdefault(event.step, set()).add(tag)
            tb_values[event.step, tag] = event.value
    assert sorted(tb_tags) == sorted(wandb_rows) == [1, 2, 3, 4]
    for step, tags in tb_tags.items():
        assert set(wandb_rows[step]) == tags, step
    assert "val/loss" in tags and "train/loss" in tags and any(t.startswith("data/") for t in tags)
    # Loss values agree to TensorBoard's float32 (step 3 was redone exactly: deterministic).
    for step in tb_tags:
        for tag in ("train/loss", "train/grad_norm", "train/lr"):
            assert math.isclose(wandb_rows[step][tag], tb_values[step, tag], rel_tol=2**-23), (step, tag)
