"""A training run in the background that a test can watch, signal and kill."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

from helpers import REPO, RunResult, finished, run_log, training_command, training_env
from swallow_titan.metrics import SCALARS


class TrainingProcess:
    """torchrun + its workers in their own process group, output collected as it comes."""

    def __init__(self, dump_folder: Path, *overrides: str, nproc: int = 1):
        self.dump_folder = dump_folder
        self.started = time.time()
        self.proc = subprocess.Popen(
            training_command(dump_folder, *overrides, nproc=nproc),
            cwd=REPO,
            env=training_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # a group we can signal as a whole, like SLURM
        )
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._lock:
                self._lines.append(line)

    @property
    def output(self) -> str:
        with self._lock:
            return "".join(self._lines)

    def wait_for(self, condition, what: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"training ended (status {self.proc.returncode}) before {what}:\n"
                    + self.output[-5000:]
                )
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"timed out waiting for {what}:\n" + self.output[-5000:])
            time.sleep(0.02)

    def wait_for_step(self, step: int, timeout: float = 180) -> None:
        """Until this run has logged ``step`` (or a later one) to the run log."""
        self.wait_for(
            lambda: any(
                r["step"] >= step and SCALARS["loss"] in r
                for r in run_log(self.dump_folder, self.started)
            ),
            f"step {step}",
            timeout,
        )

    def wait_for_path(self, path: Path, timeout: float = 180) -> None:
        self.wait_for(path.exists, f"{path} to appear", timeout)

    def signal_all(self, sig: signal.Signals) -> None:
        """Send ``sig`` to torchrun and every worker (what SLURM does to a job step).

        torchrun starts each worker in a session of its own, so the workers
        are signalled one by one.
        """
        for pid in [*_descendants(self.proc.pid), self.proc.pid]:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        """SIGKILL everything; returns when no worker is left."""
        workers = _descendants(self.proc.pid)
        self.signal_all(signal.SIGKILL)
        deadline = time.monotonic() + 30
        while any(Path(f"/proc/{pid}").exists() for pid in workers):
            if time.monotonic() > deadline:
                raise AssertionError(f"workers {workers} survived SIGKILL")
            time.sleep(0.05)

    def worker_pid(self, rank: int, timeout: float = 120) -> int:
        """The pid of the worker process with ``RANK=rank``."""
        found: list[int] = []

        def look() -> bool:
            for pid in _children(self.proc.pid):
                try:
                    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                except OSError:
                    continue
                if f"RANK={rank}".encode() in environ:
                    found.append(pid)
                    return True
            return False

        self.wait_for(look, f"the rank-{rank} worker", timeout)
        return found[0]

    def wait(self, timeout: float = 300) -> RunResult:
        self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return finished(self.proc.returncode, self.output, self.dump_folder, self.started)


def _descendants(pid: int) -> list[int]:
    found = []
    for child in _children(pid):
        found += [child, *_descendants(child)]
    return found


def _children(pid: int) -> list[int]:
    children = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return children


def loaded_step(output: str) -> int | None:
    """The step a run resumed from, read from its log (None: it started fresh)."""
    match = re.search(r"Loading the checkpoint from \S*step-(\d+)", output)
    return int(match.group(1)) if match else None
