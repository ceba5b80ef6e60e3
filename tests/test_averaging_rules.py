"""``[averaging]`` without training: the tail windows and the config checks (the recipe's
settings in the plan: tests/test_plan.py)."""

from __future__ import annotations

import pytest

from support import TINY_CONFIG
from swallow_titan.components.averaging import tail_window
from swallow_titan.components.preflight import check_structure
from swallow_titan.config.manager import ConfigError, load_job_config


def windows(last_step: int, every: int, length: int) -> dict[int, list[int]]:
    """Window end -> the steps averaged into it."""
    out: dict[int, list[int]] = {}
    for step in range(1, last_step + 1):
        end, n = tail_window(step, every, length, last_step)
        if n:
            out.setdefault(end, []).append(step)
            assert n == len(range(max(end - length, (step - 1) // every * every) + 1, end + 1))
    return out


def test_tail_windows_hold_the_last_steps_before_every_end():
    assert windows(12, 4, 2) == {4: [3, 4], 8: [7, 8], 12: [11, 12]}


def test_tail_window_at_a_last_step_between_ends_never_reaches_back_past_the_previous_end():
    # Ends 4, 8 and the last step 10: its window is 9-10, not 8-10.
    assert windows(10, 4, 3) == {4: [2, 3, 4], 8: [6, 7, 8], 10: [9, 10]}


def test_tail_window_as_long_as_the_period_takes_every_step():
    assert windows(6, 3, 3) == {3: [1, 2, 3], 6: [4, 5, 6]}


def test_each_window_knows_its_length_at_its_first_step():
    # The weight 1/n is fixed at the window's first step: n is the window's size.
    for step in (9, 10):
        assert tail_window(step, 4, 3, 10) == (10, 2)


@pytest.mark.parametrize(
    "overrides, key, problem",
    [
        (["--averaging.ema_decay", "1.0"], "averaging.ema_decay", "must be in [0, 1)"),
        (["--averaging.ema_decay", "-0.1"], "averaging.ema_decay", "must be in [0, 1)"),
        (["--averaging.tail_steps", "-1"], "averaging.tail_steps", "must be >= 0"),
        (["--averaging.tail_steps", "40"], "averaging.tail_steps", "longer than the 30 steps"),
        (["--averaging.tail_steps", "5", "--averaging.tail_every", "4"],
         "averaging.tail_steps", "(averaging.tail_every)"),
    ],
)
def test_bad_averaging_settings_are_refused_naming_the_key(overrides, key, problem):
    config = load_job_config(TINY_CONFIG, overrides)
    with pytest.raises(ConfigError) as e:
        check_structure(config, 1, str(TINY_CONFIG))
    assert f"{TINY_CONFIG}: {key}" in str(e.value) and problem in str(e.value)
