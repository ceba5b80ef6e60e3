"""torchtitan's ``[profiling]`` on a machine without a GPU.

torchtitan 0.2.2 builds its profiler with ``activities=[CPU, <gpu or None>]``
and torch rejects the ``None`` on a CPU-only machine, so ``enable_profiling``
crashes there. :func:`maybe_enable_profiling` is a profiler context with the
same TOML semantics (``profile_freq``, ``profiler_warmup``,
``profiler_active``, traces under ``<dump_folder>/<save_traces_folder>/
iteration_<step>/rank<r>_trace.json``) that records the activities present.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
from torchtitan.tools import profiling as titan_profiling
from torchtitan.tools.logging import logger

from swallow_titan.runtime.ranks import process_rank


def available_activities() -> list[torch.profiler.ProfilerActivity]:
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    return activities


@contextlib.contextmanager
def maybe_enable_profiling(
    profiling_config, *, global_step: int = 0, base_folder: str = "", leaf_folder: str = ""
) -> Iterator[torch.profiler.profile | None]:
    """A torch profiler over the configured steps, or None when profiling is off."""
    if not profiling_config.enable_profiling:
        yield None
        return
    trace_dir = os.path.join(base_folder, profiling_config.save_traces_folder)
    warmup, active = profiling_config.profiler_warmup, profiling_config.profiler_active
    wait = profiling_config.profile_freq - warmup - active
    if wait < 0:
        raise ValueError(
            "profiling.profile_freq must be >= profiler_warmup + profiler_active"
        )
    rank = process_rank()

    def write_trace(prof: torch.profiler.profile) -> None:
        folder = os.path.join(trace_dir, f"iteration_{prof.step_num}", leaf_folder)
        os.makedirs(folder, exist_ok=True)
        prof.export_chrome_trace(os.path.join(folder, f"rank{rank}_trace.json"))
        logger.info(f"Wrote profiler trace of step {prof.step_num} to {folder}")

    with torch.profiler.profile(
        activities=available_activities(),
        schedule=torch.profiler.schedule(wait=wait, warmup=warmup, active=active),
        on_trace_ready=write_trace,
        record_shapes=True,
    ) as profiler:
        profiler.step_num = global_step
        yield profiler


def profiling_context(profiling_config, **kwargs: Any):
    """torchtitan's profiler with a GPU, this module's without one."""
    if torch.cuda.is_available():
        return titan_profiling.maybe_enable_profiling(profiling_config, **kwargs)
    return maybe_enable_profiling(profiling_config, **kwargs)
