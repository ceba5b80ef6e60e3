"""Training with [kernels] on gives the losses of training with them off.

Two processes on CPU (gloo), Triton's interpreter for the kernels, the tiny
model at a small batch so that each run takes seconds. Both runs use the same
seed and deterministic mode, hence the same initial weights and data, and a
z-loss so that both z-loss paths are covered.
"""

from __future__ import annotations

import pytest

from support.overrides import FSDP2, KERNELS_ON, TP2
from support.runs import RunResult, run_training

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

# On top of support.runs.FAST (seq 64, no checkpoint/validation/TensorBoard, seed).
SMALL_RUN = [
    "--training.steps", "3",
    "--lr_scheduler.warmup_steps", "1",
    "--training.local_batch_size", "2",
    "--training.global_batch_size", "4",
    "--kernels.z_loss", "1e-4",
]
INTERPRETER = {"TRITON_INTERPRET": "1"}


def _assert_same_losses(on: RunResult, off: RunResult) -> None:
    # The [kernels] options reached the model of the run with them on (it logs
    # the Triton modules it swapped in), and only that one.
    assert "Triton kernels: rmsnorm = 'triton', loss = 'fused_linear_ce'" in on.output
    assert "Triton kernels:" not in off.output
    assert sorted(on.losses) == sorted(off.losses) == [1, 2, 3]
    for step in off.losses:
        assert on.losses[step] == pytest.approx(off.losses[step], rel=2e-5), (step, on, off)


def test_fsdp2_losses_match_with_kernels_on_and_off(tmp_path):
    off = run_training(tmp_path / "off", *SMALL_RUN, *FSDP2, nproc=2).check()
    on = run_training(
        tmp_path / "on", *SMALL_RUN, *FSDP2, *KERNELS_ON, nproc=2, env=INTERPRETER
    ).check()
    _assert_same_losses(on, off)


def test_tensor_parallel_losses_match_with_kernels_on_and_off(tmp_path):
    # Sequence-parallel norms (partial weight gradients) and the vocabulary-
    # parallel fused loss.
    off = run_training(tmp_path / "off", *SMALL_RUN, *TP2, nproc=2).check()
    on = run_training(
        tmp_path / "on", *SMALL_RUN, *TP2, *KERNELS_ON, nproc=2, env=INTERPRETER
    ).check()
    _assert_same_losses(on, off)
