"""Every rank leaves an evaluation together, whether it succeeded or failed.

An evaluation runs collectives (the model's FSDP/TP ones, the adapter's own),
so a rank that fails and goes back to training while the others wait in the
next collective hangs the job until the process-group timeout. The rule that
prevents it:

- Outside the model's forward pass, every collective of an evaluation is a
  *sync point*: one all-reduce (MAX) of ``[value, failed]``
  (:func:`sync`). The adapter starts every request type, every decoding
  step and every exchange of results with one.
- A failure in work between two sync points that is local to a rank (scoring
  logits already gathered, decoding) is held and reported at the next sync
  point, so the rank keeps running the same collectives as the others until
  then (:class:`HeldFailure`). Held work must run no collective itself: the
  adapter gathers vocabulary-sharded logits before it, on every rank.
- A failure anywhere else (lm-eval building requests, computing metrics, a
  dataset) ends ``run`` on that rank; :func:`run_together` then sends one
  ``failed`` sync, which meets the sync point the other ranks wait at. Every
  rank that sees ``failed`` raises :class:`EvaluationAborted`, and all leave.
- :func:`run_together` ends with a last sync (did every rank succeed?), and
  after a failure every rank exchanges its error message, so rank 0 logs them.

What it cannot cover: a failure inside the model's forward pass (out of
memory in the middle of an FSDP all-gather) leaves the other ranks inside a
collective of the model's; the process-group timeout still ends those.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torchtitan.tools.logging import logger

T = TypeVar("T")


class EvaluationAborted(RuntimeError):
    """A rank failed; every rank leaves the evaluation (raised at a sync point)."""


def world() -> bool:
    """Whether evaluation runs on more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def sync(value: int, device: torch.device, failure: BaseException | None = None) -> int:
    """The largest ``value`` over ranks; raises :class:`EvaluationAborted` if any rank failed.

    Every rank calls it at the same point; ``failure`` is this rank's held
    failure, if any (it becomes the ``__cause__`` here).
    """
    failed = failure is not None
    if world():
        t = torch.tensor([value, int(failed)], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        value, failed = int(t[0].item()), bool(t[1].item())
    if failed:
        raise EvaluationAborted("the evaluation failed on a rank") from failure
    return value


class HeldFailure:
    """This rank's first failure since the last sync point, held for the next one."""

    def __init__(self) -> None:
        self.error: BaseException | None = None

    def run(self, work: Callable[[], Any]) -> None:
        """Run local work (no collectives); a failure is kept instead of raised."""
        if self.error is not None:
            return  # this rank already failed: only the collectives go on
        try:
            work()
        except Exception as e:  # noqa: BLE001 - reported at the next sync point
            self.error = e

    def sync(self, value: int, device: torch.device) -> int:
        """:func:`sync`, reporting the held failure; clears it."""
        error, self.error = self.error, None
        return sync(value, device, error)


def run_together(run: Callable[[], T], device: torch.device) -> tuple[T | None, list[str]]:
    """``run()`` on every rank; (its result, []) if it succeeded on every rank.

    Otherwise (None, one ``rank R: Type: message`` per rank that failed), on
    every rank: no rank leaves before all know.
    """
    error: BaseException | None = None
    try:
        result = run()
    except EvaluationAborted as e:
        error = e.__cause__  # this rank's own failure, or None: another rank's
    except Exception as e:  # noqa: BLE001 - any failure ends the evaluation on all ranks
        error = e
        try:
            sync(0, device, e)  # meets the sync point the others wait at
        except EvaluationAborted:
            pass
    else:
        try:
            sync(0, device)
            return result, []
        except EvaluationAborted:
            pass
    mine = None if error is None else f"{type(error).__name__}: {error}"
    if error is not None:  # where it happened, in this rank's own log
        logger.error("[eval] this rank's evaluation failed", exc_info=error)
    if not world():
        return None, [f"rank 0: {mine}"]
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return None, [f"rank {r}: {m}" for r, m in enumerate(everyone) if m is not None]
