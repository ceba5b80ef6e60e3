"""The model as a run builds it, in-process."""

from __future__ import annotations

import copy
from collections import Counter
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torchtitan.protocols.train_spec import get_train_spec

import swallow_titan.train_spec  # noqa: F401  (registers the TrainSpecs)
from support import TINY_CONFIG
from swallow_titan.config.manager import load_job_config


def build_model(*overrides: str, device: str = "cpu") -> tuple[torch.nn.Module, Any]:
    """The model (and its config) as torchtitan's Trainer builds it: the spec's
    flavor arguments updated from the config; the family is its ``[model] name``."""
    config = load_job_config(TINY_CONFIG, list(overrides))
    spec = get_train_spec(config.model.name)
    args = copy.deepcopy(spec.model_args[config.model.flavor])
    args.update_from_config(config)
    with torch.device(device):
        return spec.model_cls(args), config


class OpsCalled(TorchDispatchMode):
    """Counts every op dispatched while active, by name (``counts``)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def kernel_ops_of_train_step(model: torch.nn.Module, with_labels: bool) -> Counter[str]:
    """How often each of the project's Triton ops (``swallow.*``) ran in one
    forward and backward of ``model`` on 16 random tokens (given ``labels``:
    the fused loss's, else a sum of the logits' logsumexp)."""
    ids = torch.randint(0, 4096, (1, 16), generator=torch.Generator().manual_seed(0))
    with OpsCalled() as ops:
        out = model(ids, labels=ids) if with_labels else model(ids)
        (out[0] if with_labels else out.float().logsumexp(-1).sum()).backward()
    return Counter({name: n for name, n in ops.counts.items() if name.startswith("swallow.")})
