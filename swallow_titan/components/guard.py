"""The numerical guard: what a step with a NaN/Inf loss or gradient norm does.

Every step, after the gradients are clipped and before the optimizer runs,
the trainer asks every rank whether its loss and the (global) gradient norm
are finite (one all-reduce of a few flags, see ``trainer.py``) and hands the
answer to :class:`NonfiniteGuard`, which applies the ``[guard]`` policy:

- ``on_nonfinite = "skip"``: the optimizer does not step and the gradients
  are dropped; the step's data is consumed and the LR schedule and step
  counter advance as usual, so the schedule and checkpoint cadence stay tied
  to the step number. ``max_consecutive_skips`` non-finite steps in a row end
  the run with :class:`NonfiniteError`.
- ``on_nonfinite = "stop"``: the first non-finite step ends the run.

Either way the model and optimizer never see the bad update, and the trainer
checks the state is finite before it writes any checkpoint
(:func:`state_is_finite`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torchtitan.tools.logging import logger


class NonfiniteError(RuntimeError):
    """The run must stop: non-finite values under the ``[guard]`` policy."""


class NonfiniteGuard:
    """Applies ``[guard]`` to each step's verdict and counts skipped steps."""

    def __init__(self, on_nonfinite: str, max_consecutive_skips: int):
        self.on_nonfinite = on_nonfinite
        self.max_consecutive_skips = max_consecutive_skips
        self.skipped_steps = 0
        self.consecutive_skips = 0

    @classmethod
    def from_config(cls, job_config: Any) -> "NonfiniteGuard":
        g = job_config.guard
        return cls(g.on_nonfinite, g.max_consecutive_skips)

    def judge(self, step: int, loss_finite: bool, grad_norm_finite: bool) -> bool:
        """Whether to apply the step's update; raises NonfiniteError to stop."""
        if loss_finite and grad_norm_finite:
            self.consecutive_skips = 0
            return True
        what = " and ".join(
            name
            for name, ok in (("loss", loss_finite), ("gradient norm", grad_norm_finite))
            if not ok
        )
        if self.on_nonfinite == "stop":
            raise NonfiniteError(
                f"step {step}: the {what} is NaN or Inf; stopping ([guard] "
                'on_nonfinite = "stop"). The model was not updated at this step and '
                "no checkpoint was written from it; restart to resume from the last "
                'checkpoint, or set on_nonfinite = "skip" to skip such steps.'
            )
        self.skipped_steps += 1
        self.consecutive_skips += 1
        if self.consecutive_skips >= self.max_consecutive_skips:
            raise NonfiniteError(
                f"step {step}: the {what} is NaN or Inf for "
                f"{self.consecutive_skips} steps in a row ([guard] "
                f"max_consecutive_skips = {self.max_consecutive_skips}); stopping. "
                "No checkpoint was written from a non-finite state; lower the "
                "learning rate or check the data, then resume from the last checkpoint."
            )
        logger.warning(
            f"step {step}: the {what} is NaN or Inf; skipping the update "
            f"({self.consecutive_skips} in a row, {self.skipped_steps} in total)"
        )
        return False

    def state_dict(self) -> dict[str, int]:
        return {
            "skipped_steps": self.skipped_steps,
            "consecutive_skips": self.consecutive_skips,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.skipped_steps = state["skipped_steps"]
        self.consecutive_skips = state["consecutive_skips"]


class NonfiniteInjector:
    """Test hook (``[debug] inject_nonfinite_at_steps``): a loss that turns NaN at given steps.

    Wraps the loss function; its other attributes are the wrapped function's.
    """

    def __init__(self, loss_fn: Callable, steps: Iterable[int], current_step: Callable[[], int]):
        self.loss_fn = loss_fn
        self.steps = set(steps)
        self.current_step = current_step

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        loss = self.loss_fn(*args, **kwargs)
        if self.current_step() in self.steps:
            return loss * float("nan")
        return loss

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loss_fn, name)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def state_is_finite(
    model_parts: list[torch.nn.Module], optimizers: Any, device: torch.device
) -> bool:
    """Whether every parameter and optimizer-state tensor on every rank is finite.

    Collective over the default process group. One pass over this rank's
    shards, run only before a checkpoint is written.
    """
    tensors = [_local(p.detach()) for m in model_parts for p in m.parameters()]
    for optimizer in getattr(optimizers, "optimizers", [optimizers]):
        for state in optimizer.state.values():
            tensors += [
                _local(v) for v in state.values()
                if isinstance(v, torch.Tensor) and v.is_floating_point()
            ]
    bad = torch.zeros((), dtype=torch.int32, device=device)
    for t in tensors:
        if t.numel():
            bad = torch.maximum(bad, (~torch.isfinite(t)).any().to(device, torch.int32))
    if dist.is_initialized():
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return not bool(bad.item())
