"""The stop-signal handler: records the first signal only, and gives the process
its previous handlers back (a restart in the same process, tests, notebooks)."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from swallow_titan.runtime.preemption import STOP_SIGNALS, PreemptionSignal

SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)


@pytest.fixture
def previous_handlers():
    """A recording handler on each signal, as a launcher might have set; restored after."""
    seen: list[int] = []
    saved = {sig: signal.signal(sig, lambda signum, frame: seen.append(signum)) for sig in SIGNALS}
    yield seen
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_the_first_signal_is_recorded_and_a_later_one_does_not_replace_it(previous_handlers):
    stop = PreemptionSignal(SIGNALS)
    try:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGUSR2)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.requested and stop.received == signal.SIGUSR2
        assert previous_handlers == []  # taken over while installed
    finally:
        stop.restore()


def test_restore_gives_every_signal_its_previous_handler_back(previous_handlers):
    before = {sig: signal.getsignal(sig) for sig in SIGNALS}
    stop = PreemptionSignal(SIGNALS)
    assert all(signal.getsignal(sig) != before[sig] for sig in SIGNALS)
    stop.restore()
    assert {sig: signal.getsignal(sig) for sig in SIGNALS} == before
    os.kill(os.getpid(), signal.SIGUSR1)
    assert previous_handlers == [signal.SIGUSR1] and not stop.requested
    stop.restore()  # a second restore changes nothing
    assert {sig: signal.getsignal(sig) for sig in SIGNALS} == before


def test_outside_the_main_thread_no_handler_is_installed():
    before = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    made: list[PreemptionSignal] = []
    thread = threading.Thread(target=lambda: made.append(PreemptionSignal()))
    thread.start()
    thread.join()
    assert {sig: signal.getsignal(sig) for sig in STOP_SIGNALS} == before
    made[0].restore()
    assert {sig: signal.getsignal(sig) for sig in STOP_SIGNALS} == before
