"""The error every configuration problem is reported with, and the exit statuses."""

from __future__ import annotations

from enum import IntEnum


class ConfigError(ValueError):
    """A config problem, phrased for the person who wrote the config."""


def config_error(source: str, key: str | None, problem: str) -> ConfigError:
    """``<source>: <key>: <problem>``: the file, the key in it, what is wrong.

    ``key`` may be a dotted key (``training.steps``), a section
    (``parallelism``) or an entry (``data.sources[2]``); None for a problem of
    the whole file. ``source`` is the config file (or ``<command line>``).
    """
    where = f"{source}: {key}" if key else source
    return ConfigError(f"{where}: {problem}")


class ExitCode(IntEnum):
    """Exit status of swallow-titan's commands (train, plan, data, convert, export)."""

    OK = 0
    """Finished (or, training, stopped on SIGTERM after writing its checkpoint)."""
    PROBLEMS = 1
    """plan: the config names files, weights or data that are missing."""
    BAD_INPUT = 2
    """A config error, or bad input to data / convert / export; nothing was done."""
    PUSH_FAILED = 3
    """The Hub upload failed; the local export is complete."""
    NONFINITE = 4
    """train: the ``[guard]`` policy stopped the run on NaN/Inf."""
    NO_USABLE_CHECKPOINT = 5
    """train: the checkpoint folder holds checkpoints but none is usable."""
    SPIKES = 6
    """train: the ``[guard]`` spike policy stopped the run: a spike after
    ``max_rollbacks`` rollbacks, or ``max_consecutive_skips`` skipped spikes in a
    row. The newest checkpoint is from before the spike."""
