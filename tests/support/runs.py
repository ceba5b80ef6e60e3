"""Real training jobs from tests: torchrun in a subprocess, losses read from its run log.

``run_training`` runs one to the end; ``TrainingProcess`` runs one in the
background that a test can watch, signal and kill.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from support import REPO, TINY_CONFIG
from swallow_titan.config.paths import METRICS_LOG
from swallow_titan.components.metrics import SCALARS, read_run_log

ANSI = re.compile(r"\x1b\[[0-9;]*m")

# Small, fast and deterministic: no TensorBoard, no validation, no checkpoint,
# unless a test turns them on again.
FAST = [
    "--metrics.log_freq", "1",
    "--metrics.enable_tensorboard", "false",
    "--validation.enable", "false",
    "--checkpoint.enable", "false",
    "--training.seq_len", "64",
    "--training.local_batch_size", "4",
    "--training.global_batch_size", "8",
    "--lr_scheduler.warmup_steps", "2",
    "--debug.seed", "7",
    "--debug.deterministic", "true",
]


@dataclass
class RunResult:
    """A finished training command.

    ``losses`` / ``validation_losses``: step -> loss of the steps this command
    logged, read from the run log (``<dump_folder>/metrics.jsonl``); ``history``
    is the whole log after it, earlier attempts included.
    """

    returncode: int
    output: str
    losses: dict[int, float]
    validation_losses: dict[int, float]
    history: list[dict]

    def check(self) -> "RunResult":
        if self.returncode != 0:
            raise AssertionError(
                f"training exited with {self.returncode}; last output:\n"
                + self.output[-6000:]
            )
        return self


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def series(records: list[dict], tag: str) -> dict[int, float]:
    """step -> value of ``tag`` in run-log records; a step may appear once only."""
    out: dict[int, float] = {}
    for record in records:
        if tag in record:
            assert record["step"] not in out, f"step {record['step']} logged twice: {records}"
            out[record["step"]] = record[tag]
    return out


def run_log(dump_folder: Path, since: float = 0.0) -> list[dict]:
    """The run log's records written at or after the wall time ``since``."""
    return [r for r in read_run_log(dump_folder / METRICS_LOG) if r["time"] >= since]


def finished(proc_returncode: int, output: str, dump_folder: Path, started: float) -> RunResult:
    """The result of a training command started at wall time ``started``."""
    history = run_log(dump_folder)
    mine = [r for r in history if r["time"] >= started]
    return RunResult(
        proc_returncode, output, series(mine, SCALARS["loss"]), series(mine, "val/loss"), history
    )


def training_command(
    dump_folder: Path,
    *overrides: str,
    nproc: int = 1,
    config: Path = TINY_CONFIG,
    fast: bool = True,
) -> list[str]:
    """The torchrun command line ``run_training`` runs (for tests that start it themselves)."""
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", "1",
        "--nproc_per_node", str(nproc),
        "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()),
        "--local-ranks-filter", "0",
        "--role", "rank", "--tee", "3",
        "-m", "swallow_titan.train",
        "--job.config_file", str(config),
        "--job.dump_folder", str(dump_folder),
        *(FAST if fast else []),
        *overrides,
    ]


def training_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of training subprocesses: this repository first on PYTHONPATH."""
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
        ),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        **(env or {}),
    }


def run_checks_script(script: Path, *, nproc: int = 2, env: dict[str, str] | None = None) -> str:
    """Run a script of checks on ``nproc`` processes with torchrun; its output.

    Asserts that it exits with 0 and that every rank printed ``CHECKS PASSED``
    (the scripts' last line), so a rank that skipped its checks fails too.
    """
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", "1", "--nproc_per_node", str(nproc),
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        str(script),
    ]
    proc = subprocess.run(
        cmd, cwd=REPO, env=training_env({"OMP_NUM_THREADS": "1", **(env or {})}),
        capture_output=True, text=True, timeout=300,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    assert output.count("CHECKS PASSED") == nproc, output[-6000:]
    return output


def run_training(
    dump_folder: Path,
    *overrides: str,
    nproc: int = 1,
    config: Path = TINY_CONFIG,
    fast: bool = True,
    timeout: float = 600,
    env: dict[str, str] | None = None,
) -> RunResult:
    """Train with torchrun in a subprocess; returns exit code, log and losses."""
    started = time.time()
    proc = subprocess.run(
        training_command(dump_folder, *overrides, nproc=nproc, config=config, fast=fast),
        cwd=REPO,
        env=training_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )
    return finished(proc.returncode, proc.stdout, dump_folder, started)


def from_seed(seed_checkpoint: Path) -> list[str]:
    """Overrides that start a run from the weights of ``seed_checkpoint``.

    Identical starting weights for runs of different layouts: DTensor's
    sharded initialisation on a CPU mesh differs from the unsharded one.
    ``load_only`` keeps the runs from writing checkpoints of their own.
    """
    return [
        "--checkpoint.enable", "true",
        "--checkpoint.initial_load_path", str(seed_checkpoint),
        "--checkpoint.initial_load_model_only", "true",
        "--checkpoint.load_only", "true",
    ]


def resume_from(checkpoint: Path, folder: Path) -> Path:
    """A fresh run folder whose only checkpoint is ``checkpoint``: a run in it
    resumes from there (on any number of processes)."""
    shutil.copytree(checkpoint, folder / "checkpoint" / checkpoint.name)
    return folder


class TrainingProcess:
    """torchrun + its workers in their own process group, output collected as it comes."""

    def __init__(
        self, dump_folder: Path, *overrides: str, nproc: int = 1, config: Path = TINY_CONFIG
    ):
        self.dump_folder = dump_folder
        self.started = time.time()
        self.proc = subprocess.Popen(
            training_command(dump_folder, *overrides, nproc=nproc, config=config),
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
