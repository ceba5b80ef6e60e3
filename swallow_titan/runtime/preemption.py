"""Pre-emption: SIGTERM asks the run to stop after the current step, with a checkpoint.

SLURM (``scancel``, pre-emption, ``--signal=TERM@<seconds>``), Kubernetes and
cloud spot reclaims send SIGTERM, then SIGKILL after a grace period. The
handler only records the request; the trainer folds it into the flags it
all-reduces every step (``trainer.py``), so a signal that reached any rank
stops every rank after the same step. The trainer then writes a full
checkpoint of that step and exits with status 0, losing no finished step.

torchrun forwards SIGTERM to its workers and kills them after
``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` seconds (30 by default; ``run_train.sh``
raises it): the current step plus one checkpoint write must fit in it.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

from torchtitan.tools.logging import logger

STOP_SIGNALS = (signal.SIGTERM,)


class PreemptionSignal:
    """Records whether a stop signal arrived; installed for the trainer's lifetime."""

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS):
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, object] = {}
        # Signal handlers can only be set from the main thread.
        if threading.current_thread() is threading.main_thread():
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signal.Signals(signum)
            logger.warning(
                f"Received {self.received.name}: finishing the current step, then "
                "writing a checkpoint and exiting"
            )

    @property
    def requested(self) -> bool:
        return self.received is not None

    def restore(self) -> None:
        """Give the signals their previous handlers back."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
