"""The guard: what a step with a NaN/Inf loss or gradient norm, or a loss spike, does.

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

Loss spikes (:class:`SpikeGuard`, ``[guard] on_spike``): a finite step whose
global loss or gradient norm lies more than ``spike_threshold`` robust
standard deviations above the median of its rolling window
(:class:`SpikeDetector`) is logged, skipped like a non-finite step, or rolled
back (the trainer reloads the newest checkpoint and keeps the data position,
so the batches since it are skipped). The windows, the events and the
rollback count are checkpointed (entry ``SPIKES_ENTRY``). docs/stability.md
describes the policy and where the events go.
"""

from __future__ import annotations

import json
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


# ------------------------------------------------------------------ loss spikes

# How much one robust deviation is worth in standard deviations: for normally
# distributed values 1.4826 x MAD estimates the standard deviation, so
# ``spike_threshold`` reads like OLMo-core's ``threshold_std``.
MAD_TO_STD = 1.4826
# The spread is never taken below this fraction of the median: a window of
# nearly equal values would otherwise flag any tiny rise.
MIN_RELATIVE_SPREAD = 1e-3
# The checkpoint entry of the spike guard's state (rolling windows, events).
SPIKES_ENTRY = "spikes"


class SpikeError(RuntimeError):
    """The run must stop: loss spikes under the ``[guard]`` policy (exit status 6)."""


def robust_score(value: float, history: list[float]) -> tuple[float, float, float]:
    """``(median, spread, score)`` of ``value`` against ``history``.

    ``spread`` is 1.4826 x the median absolute deviation (the standard
    deviation for normal data), floored at ``MIN_RELATIVE_SPREAD`` x |median|;
    ``score`` = (value - median) / spread, in those "robust standard
    deviations". One outlier in the window moves neither the median nor the
    spread much, unlike a mean and a standard deviation.
    """
    ordered = sorted(history)
    median = _median(ordered)
    spread = MAD_TO_STD * _median(sorted(abs(v - median) for v in ordered))
    spread = max(spread, MIN_RELATIVE_SPREAD * abs(median), 1e-12)
    return median, spread, (value - median) / spread


def _median(ordered: list[float]) -> float:
    n = len(ordered)
    mid = n // 2
    return ordered[mid] if n % 2 else (ordered[mid - 1] + ordered[mid]) / 2


class SpikeDetector:
    """Rolling windows of the last ``window`` finite values of each watched metric.

    A value is a spike when it lies more than ``threshold`` robust standard
    deviations above its window's median (:func:`robust_score`); only upward
    jumps count. Nothing is judged until a window is full, as in OLMo-core's
    stability monitor. Every judged value joins its window, spike or not, so a
    lasting change of level (a new data stage) is learned within half a window.
    """

    def __init__(self, window: int, threshold: float, metrics: Iterable[str]):
        self.window = window
        self.threshold = threshold
        self.metrics = tuple(metrics)
        self.history: dict[str, list[float]] = {m: [] for m in self.metrics}

    def observe(self, values: dict[str, float]) -> dict[str, dict[str, float]]:
        """Judge and record this step's values; returns the spiking metrics'
        ``{"value", "median", "score"}`` (empty: no spike)."""
        spikes = {}
        for metric in self.metrics:
            value = float(values[metric])
            history = self.history[metric]
            if len(history) >= self.window:
                median, _, score = robust_score(value, history)
                if score > self.threshold:
                    spikes[metric] = {"value": value, "median": median, "score": score}
            history.append(value)
            del history[: -self.window]
        return spikes

    def state_dict(self) -> dict[str, list[float]]:
        return {m: list(h) for m, h in self.history.items()}

    def load_state_dict(self, state: dict[str, list[float]]) -> None:
        for metric in self.metrics:
            self.history[metric] = list(state.get(metric, []))[-self.window :]


class SpikeGuard:
    """Applies ``[guard] on_spike`` to each step's spike verdict; keeps the events.

    The events (every detected spike, what was done, the per-domain losses)
    and the counters are checkpointed, so they describe the trajectory that led
    to a checkpoint: a rollback's event stays, the steps it undid go.
    """

    def __init__(
        self,
        action: str,
        window: int,
        threshold: float,
        metrics: Iterable[str],
        max_rollbacks: int,
        max_consecutive_skips: int,
    ):
        self.action = action
        self.max_rollbacks = max_rollbacks
        self.max_consecutive_skips = max_consecutive_skips
        self.detector = SpikeDetector(window, threshold, metrics)
        self.events: list[dict[str, Any]] = []
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self.rollbacks = 0

    @classmethod
    def from_config(cls, job_config: Any) -> "SpikeGuard":
        g = job_config.guard
        return cls(
            g.on_spike, g.spike_window, g.spike_threshold, g.spike_metrics,
            g.max_rollbacks, g.max_consecutive_skips,
        )

    @property
    def enabled(self) -> bool:
        return self.action != "off"

    def judge(self, step: int, values: dict[str, float]) -> dict[str, Any] | None:
        """The event of a spike at ``step`` (None: no spike), its ``action`` decided.

        Raises :class:`SpikeError` when the policy says stop: a spike with
        ``max_rollbacks`` rollbacks already done, or ``max_consecutive_skips``
        skipped spikes in a row.
        """
        spikes = self.detector.observe(values)
        if not spikes:
            self.consecutive_skips = 0
            return None
        what = ", ".join(
            f"{m} {s['value']:.4g} is {s['score']:.1f} robust std above the median "
            f"{s['median']:.4g}"
            for m, s in spikes.items()
        )
        if self.action == "rollback" and self.rollbacks >= self.max_rollbacks:
            raise SpikeError(
                f"step {step}: loss spike ({what}) after {self.rollbacks} rollback(s) "
                f"([guard] max_rollbacks = {self.max_rollbacks}); stopping. The newest "
                "checkpoint holds the state before the spike and the data position after "
                "the windows skipped so far; look at the data of this step (its domain "
                "losses are in the log above), then resume or raise max_rollbacks."
            )
        if self.action == "skip":
            streak = self.consecutive_skips + 1
            if streak >= self.max_consecutive_skips:
                raise SpikeError(
                    f"step {step}: loss spike ({what}) for {streak} steps "
                    f"in a row ([guard] max_consecutive_skips = {self.max_consecutive_skips}); "
                    "stopping: this is a change of level, not a spike. Resume from the last "
                    'checkpoint with on_spike = "log", or check the data.'
                )
            self.consecutive_skips = streak
            self.skipped_steps += 1
        event: dict[str, Any] = {"step": step, "action": self.action, "spikes": spikes}
        logger.warning(f"step {step}: loss spike: {what}; action: {self.action}")
        return event

    def skip_instead(self, event: dict[str, Any]) -> None:
        """Turn a rollback ``event`` into a skip (there is no checkpoint to go back to)."""
        event["action"] = "skip"
        self.skipped_steps += 1

    def record(self, event: dict[str, Any]) -> None:
        """Keep ``event`` (completed by the trainer) in the checkpointed history."""
        if event["action"] == "rollback":
            self.rollbacks += 1
        self.events.append(event)

    def state_dict(self) -> dict[str, Any]:
        # JSON bytes: DCP stores them as one opaque entry, like the data state.
        return {
            "state": json.dumps(
                {
                    "history": self.detector.state_dict(),
                    "events": self.events,
                    "skipped_steps": self.skipped_steps,
                    "consecutive_skips": self.consecutive_skips,
                    "rollbacks": self.rollbacks,
                }
            ).encode()
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raw = state["state"]
        saved = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
        self.detector.load_state_dict(saved["history"])
        self.events = saved["events"]
        self.skipped_steps = saved["skipped_steps"]
        self.consecutive_skips = saved["consecutive_skips"]
        self.rollbacks = saved["rollbacks"]


def spike_events(state: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The spike events in a checkpoint's ``SPIKES_ENTRY`` entry (``[]`` if it has none)."""
    if not state or "state" not in state:
        return []
    raw = state["state"]
    return json.loads(raw.decode() if isinstance(raw, bytes) else raw)["events"]


def describe_spike(event: dict[str, Any]) -> str:
    """One line for people: what spiked at which step, what was done, the domains."""
    parts = [
        f"{metric} {found['value']:.4g} (median {found['median']:.4g}, "
        f"{found['score']:.1f} robust std)"
        for metric, found in event["spikes"].items()
    ]
    text = f"step {event['step']} (data batch {event['data_batch']}): " + "; ".join(parts)
    text += f"; action: {event['action']}"
    if event["action"] == "rollback":
        first, last = event["skipped_batches"]
        text += f" to step {event['rolled_back_to']}, data batches {first}-{last} skipped"
    domains = event.get("domain_losses") or {}
    if domains:
        text += "; loss by domain: " + ", ".join(f"{d} {v:.4g}" for d, v in domains.items())
    return text
