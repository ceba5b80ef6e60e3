"""``[averaging]``: averaged weights kept beside the trained ones while training.

Two kinds, each one fp32 copy of this rank's parameter shards (a DTensor's
local shard stays local: the averages are DTensors with the parameters'
placements, updated elementwise, so no communication):

- **EMA** (``ema_decay = d``): after step 1 of the run it is the weights;
  after every later step ``ema = ema * d + w * (1 - d)``.
- **Tail window** (``tail_steps = K``, OLMo-core's checkpoint merging): the
  uniform mean of the weights after each of the last K steps before every
  window end (every ``tail_every`` steps, default ``checkpoint.interval``,
  and the last step). A window never reaches back past the previous end
  (then, and at the start of training, it is shorter). The sum is kept with
  each term already divided by the window's length, with
  :func:`swallow_titan.checkpoint.average.accumulate` - the offline
  average's arithmetic - so the in-loop tail equals ``python -m
  swallow_titan.average`` of the same steps' checkpoints bit for bit.

Both are in every checkpoint (entry ``averaging``), so a resume continues
them exactly. Validation runs on each complete average after the raw
weights' (``val/ema/...``, ``val/tail/...``), ``[eval]`` after the last
step before them (``eval/ema/...``, ``eval/tail/...``), and then each is
written as a model-weights DCP checkpoint ``<checkpoint folder>/<kind>-step-N``
with the run record saying which average it holds and with what settings
(so its export's model card says so), and exported beside the last weights
with ``hf.export_at_end``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torchtitan.tools.logging import logger

from swallow_titan.checkpoint.average import accumulate
from swallow_titan.config.paths import RunPaths, step_folder_name
from swallow_titan.hf.run_record import read_run_record
from swallow_titan.model.state import model_state, set_model_state
from swallow_titan.runtime.ranks import process_rank

# Checkpoint entry of the averages.
AVERAGING = "averaging"
EMA = "ema"
TAIL = "tail"
AVERAGE_KINDS = (EMA, TAIL)


def averaged_folder(config: Any, kind: str, step: int) -> str:
    """``<checkpoint folder>/<kind>-step-N``: the averaged weights written after the last step."""
    return os.path.join(RunPaths.of(config).checkpoints, f"{kind}-{step_folder_name(step)}")


def tail_window(step: int, every: int, length: int, last_step: int) -> tuple[int, int]:
    """(end, number of steps) of the tail window ``step`` falls in, or (end, 0) if none.

    Windows end at every multiple of ``every`` and at ``last_step``; each
    holds the last ``length`` steps up to its end, after the previous end.
    """
    end = min(math.ceil(step / every) * every, last_step)
    previous_end = (step - 1) // every * every
    first = max(previous_end, end - length) + 1
    return end, (end - first + 1 if step >= first else 0)


class WeightAveraging:
    """The EMA and the tail average of the model's parameters; a checkpoint ``Stateful``."""

    def __init__(self, config: Any, model_parts: list[nn.Module]):
        settings = config.averaging
        self.ema_decay: float = settings.ema_decay
        self.tail_steps: int = settings.tail_steps
        self.tail_every: int = settings.tail_every or config.checkpoint.interval
        self.last_step: int = config.training.steps
        self.config = config
        self.model_parts = model_parts
        self.ema: dict[str, torch.Tensor] | None = None
        self.tail: dict[str, torch.Tensor] | None = None
        # Steps summed into `tail`, and the end of its window (complete when equal).
        self.tail_count = 0
        self.tail_end = 0

    @property
    def enabled(self) -> bool:
        return self.ema_decay > 0 or self.tail_steps > 0

    # ------------------------------------------------------------ each step

    def _weights(self) -> dict[str, torch.Tensor]:
        # The checkpoint's names (wrappers such as torch.compile's removed),
        # this rank's shards; read each time, as the optimizer updates them in place.
        return model_state(self.model_parts)

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold the weights after ``step`` into the averages."""
        weights = self._weights()
        if self.ema_decay > 0:
            if self.ema is None:
                self.ema = {n: w.to(torch.float32, copy=True) for n, w in weights.items()}
            else:
                d = self.ema_decay
                for name, w in weights.items():
                    # Two rounded operations, as the docstring's recurrence reads.
                    self.ema[name].mul_(d).add_(w.to(torch.float32) * (1 - d))
        if self.tail_steps > 0:
            end, length = tail_window(step, self.tail_every, self.tail_steps, self.last_step)
            if length:
                first = end != self.tail_end
                if first:
                    self.tail_end, self.tail_count = end, 0
                self.tail = {
                    name: accumulate(None if first else self.tail[name], w, 1 / length)
                    for name, w in weights.items()
                }
                self.tail_count += 1
                if step == end:
                    logger.info(f"[averaging] tail average of steps {end - length + 1}-{end} complete")

    def complete(self) -> dict[str, dict[str, torch.Tensor]]:
        """The averages ready to use now: the EMA once started, the tail at the end of its window."""
        ready = {}
        if self.ema is not None:
            ready[EMA] = self.ema
        if self.tail is not None and self.tail_count == self._window_length(self.tail_end):
            ready[TAIL] = self.tail
        return ready

    def _window_length(self, end: int) -> int:
        return tail_window(end, self.tail_every, self.tail_steps, self.last_step)[1]

    # ------------------------------------------------------ using an average

    @contextmanager
    @torch.no_grad()
    def swapped_in(self, average: dict[str, torch.Tensor]) -> Iterator[None]:
        """The model holds ``average`` (in the parameters' dtype) inside the block."""
        saved = {name: w.clone() for name, w in self._weights().items()}
        try:
            set_model_state(self.model_parts, average)
            yield
        finally:
            set_model_state(self.model_parts, saved)

    def validate(self, validator: Any, model_parts: list[nn.Module], step: int) -> None:
        """Validation of each complete average, logged as ``val/<kind>/...``."""
        for kind, average in self.complete().items():
            with self.swapped_in(average):
                validator.validate(model_parts, step, prefix=f"val/{kind}")

    def description(self, kind: str, step: int) -> dict[str, Any]:
        """Which average ``kind`` holds at ``step`` and with what settings (run record, model card)."""
        if kind == EMA:
            return {"kind": EMA, "step": step, "ema_decay": self.ema_decay}
        length = self._window_length(self.tail_end)
        return {
            "kind": TAIL,
            "step": step,
            "tail_steps": self.tail_steps,
            "first_step": self.tail_end - length + 1,
        }

    def evaluate(self, evaluator: Any, step: int) -> None:
        """``[eval]`` of each complete average, logged as ``eval/<kind>/<task>/<metric>``.

        Collective like the evaluation itself: every rank holds the same
        complete averages (same steps), so all swap in and evaluate together.
        """
        for kind, average in self.complete().items():
            with self.swapped_in(average):
                evaluator.evaluate(step, prefix=f"eval/{kind}")

    def save_final(self, step: int) -> list[str]:
        """Write each complete average as a model-weights DCP checkpoint; collective.

        Beside the tensors, rank 0 writes the run's record with the average's
        description (``averaged_in_loop``): an export reads it from there.
        """
        written = []
        run_record = read_run_record(RunPaths.of(self.config).checkpoints)
        for kind, average in self.complete().items():
            path = averaged_folder(self.config, kind, step)
            dcp.save(dict(average), checkpoint_id=path)
            if run_record is not None and process_rank() == 0:
                replace(run_record, averaged_in_loop=self.description(kind, step)).write(path)
            logger.info(f"[averaging] {kind} weights of step {step} written to {path}")
            written.append(path)
        return written

    # ------------------------------------------------------------ checkpoint

    def state_dict(self) -> dict[str, Any]:
        # Flat keys ("ema.<name>"): the checkpoint manager checks an optional
        # entry's presence key by key.
        state: dict[str, Any] = {"tail_count": self.tail_count, "tail_end": self.tail_end}
        if self.ema_decay > 0:
            state["ema_started"] = self.ema is not None
            ema = self.ema if self.ema is not None else self._zeros()
            state.update((f"{EMA}.{n}", t) for n, t in ema.items())
        if self.tail_steps > 0:
            tail = self.tail if self.tail is not None else self._zeros()
            state.update((f"{TAIL}.{n}", t) for n, t in tail.items())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tail_count = int(state["tail_count"])
        self.tail_end = int(state["tail_end"])
        names = list(self._weights())
        if self.ema_decay > 0:
            started = bool(state["ema_started"])
            self.ema = {n: state[f"{EMA}.{n}"] for n in names} if started else None
        if self.tail_steps > 0:
            self.tail = {n: state[f"{TAIL}.{n}"] for n in names} if self.tail_count else None

    def _zeros(self) -> dict[str, torch.Tensor]:
        # Load targets of the right shapes and placements.
        return {n: torch.zeros_like(w, dtype=torch.float32) for n, w in self._weights().items()}
