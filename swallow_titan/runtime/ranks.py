"""This process's place in the job: its rank and the job's size.

With a process group the answer comes from it; without one (before it is
created, after it is destroyed, or in a tool run outside torchrun) from
torchrun's ``RANK`` / ``WORLD_SIZE``, which are absent in a single process.
"""

from __future__ import annotations

import os

import torch.distributed as dist


def process_rank() -> int:
    """This process's global rank; 0 in a single process."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def job_world_size() -> int:
    """Processes in the job; 1 in a single process."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))
