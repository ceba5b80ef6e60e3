"""Random-generator state in checkpoints, one entry per rank.

torchtitan 0.2.2 saves model, optimizer, LR schedule, data position and step
but not the random generators: a resumed run restarts them from
``[debug] seed``. Anything random after the restart (dropout, sampling
noise, random data augmentation) would then differ from an uninterrupted run.
``RngState`` saves Python's, NumPy's, torch's CPU and the accelerator's
generators of every rank under its own key (``rng.rank_<r>``) and restores
them on resume (an optional entry: a rank without one, e.g. because the job
grew, keeps its seeded state; see ``AtomicCheckpointManager.dcp_load``).
"""

from __future__ import annotations

import pickle
import random
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint.stateful import Stateful

RNG = "rng"


def _device_module(device_type: str):
    return None if device_type == "cpu" else torch.get_device_module(device_type)


class RngState(Stateful):
    """This rank's random generators, as a checkpoint entry."""

    def __init__(self, rank: int, device_type: str = "cpu"):
        self.rank = rank
        self.device_type = device_type

    @property
    def key(self) -> str:
        return f"rank_{self.rank}"

    def capture(self) -> dict[str, Any]:
        device = _device_module(self.device_type)
        return {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "torch_cpu": torch.get_rng_state(),
            "device": device.get_rng_state() if device is not None else None,
        }

    def restore(self, state: dict[str, Any]) -> None:
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch_cpu"])
        device = _device_module(self.device_type)
        if device is not None and state["device"] is not None:
            device.set_rng_state(state["device"])

    def state_dict(self) -> dict[str, Any]:
        # Bytes: DCP stores each rank's differently named object once.
        return {self.key: pickle.dumps(self.capture())}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.restore(pickle.loads(state_dict[self.key]))

