"""The numerical guard: NaN/Inf steps are skipped or stop the run, never checkpointed."""

from __future__ import annotations

import math
import re

import pytest
import torch

from support.runs import from_seed, run_training
from swallow_titan.components.guard import NonfiniteError, NonfiniteGuard, state_is_finite


def test_skip_policy_skips_and_counts():
    guard = NonfiniteGuard("skip", max_consecutive_skips=3)
    assert guard.judge(1, True, True) is True
    assert guard.judge(2, False, True) is False
    assert guard.judge(3, True, False) is False
    assert (guard.skipped_steps, guard.consecutive_skips) == (2, 2)
    assert guard.judge(4, True, True) is True
    assert (guard.skipped_steps, guard.consecutive_skips) == (2, 0)


def test_skip_policy_stops_after_too_many_skips_in_a_row():
    guard = NonfiniteGuard("skip", max_consecutive_skips=2)
    guard.judge(1, False, False)
    with pytest.raises(NonfiniteError, match="2 steps in a row"):
        guard.judge(2, False, False)


def test_stop_policy_stops_at_the_first_nonfinite_step():
    guard = NonfiniteGuard("stop", max_consecutive_skips=5)
    with pytest.raises(NonfiniteError, match="step 7: the gradient norm is NaN or Inf"):
        guard.judge(7, True, False)


def test_guard_counters_survive_a_checkpoint():
    guard = NonfiniteGuard("skip", max_consecutive_skips=5)
    guard.judge(1, False, True)
    restored = NonfiniteGuard("skip", max_consecutive_skips=5)
    restored.load_state_dict(guard.state_dict())
    assert (restored.skipped_steps, restored.consecutive_skips) == (1, 1)


def test_state_is_finite_detects_a_nan_parameter_and_optimizer_state():
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    assert state_is_finite([model], optimizer, torch.device("cpu"))
    with torch.no_grad():
        next(iter(optimizer.state.values()))["exp_avg"][0, 0] = float("inf")
    assert not state_is_finite([model], optimizer, torch.device("cpu"))


# ------------------------------------------------------------------ end to end

@pytest.mark.slow
def test_a_nan_step_is_skipped_and_training_continues(tmp_path):
    result = run_training(
        tmp_path / "run",
        "--training.steps", "5",
        "--guard.on_nonfinite", "skip",
        "--debug.inject_nonfinite_at_steps", "3",
        "--checkpoint.enable", "true",
        "--checkpoint.interval", "5",
    ).check()
    assert math.isnan(result.losses[3])
    assert "step 3: the loss and gradient norm is NaN or Inf; skipping" in result.output
    # Had the NaN update been applied, every later loss would be NaN.
    assert all(math.isfinite(result.losses[s]) for s in (4, 5)), result.losses
    assert "skipped: 1" in result.output
    assert (tmp_path / "run" / "checkpoint" / "step-5" / ".metadata").is_file()


@pytest.mark.slow
def test_stop_policy_exits_with_an_error_and_writes_no_checkpoint(tmp_path):
    result = run_training(
        tmp_path / "run",
        "--training.steps", "5",
        "--guard.on_nonfinite", "stop",
        "--debug.inject_nonfinite_at_steps", "2",
        "--checkpoint.enable", "true",
        "--checkpoint.interval", "2",
    )
    assert result.returncode != 0
    assert re.search(r"exitcode\s*:\s*4\b", result.output)  # torchrun's failure report
    assert 'step 2: the loss and gradient norm is NaN or Inf; stopping' in result.output
    assert sorted(result.losses) == [1]  # step 2 was not logged as taken
    assert not (tmp_path / "run" / "checkpoint" / "step-2").exists()


@pytest.mark.slow
def test_a_nonfinite_state_is_never_checkpointed(seed_checkpoint, tmp_path):
    """Weights that hold a NaN from the start: "skip" skips the step, but the
    checkpoint after it is refused (status 4) instead of written."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save, torch_save_to_dcp

    dcp_to_torch_save(seed_checkpoint, tmp_path / "seed.pt")
    state = torch.load(tmp_path / "seed.pt", weights_only=False)
    weights = state.get("model", state)
    weights["norm.weight"][0] = float("nan")
    torch.save(state, tmp_path / "poisoned.pt")
    torch_save_to_dcp(tmp_path / "poisoned.pt", tmp_path / "poisoned")

    result = run_training(
        tmp_path / "run",
        "--training.steps", "3",
        "--guard.on_nonfinite", "skip",
        *from_seed(tmp_path / "poisoned"),
        "--checkpoint.load_only", "false",
        "--checkpoint.interval", "1",
    )
    assert re.search(r"exitcode\s*:\s*4\b", result.output), result.output[-3000:]
    assert "step 1: the loss and gradient norm is NaN or Inf; skipping" in result.output
    assert "step 1: the model or optimizer state holds NaN/Inf; refusing" in result.output
    assert not list((tmp_path / "run" / "checkpoint").glob("*step*1*"))
