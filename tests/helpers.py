"""Run real training jobs from tests: torchrun in a subprocess, losses parsed from its log."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TINY_CONFIG = REPO / "train_configs" / "tiny_cpu.toml"

# The step line: "step:  5  loss:  7.91995 ..." (torchtitan) or "step:  5/60  loss: ..."
# (swallow-titan's progress line), ANSI colours removed.
_STEP_LINE = re.compile(r"step:\s*(\d+)(?:/\d+)?\s+loss:\s*([-+0-9.eEnaif]+)")
_VALIDATION_LINE = re.compile(r"validate step:\s*(\d+)\s+loss:\s*([-+0-9.eEnaif]+)")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")

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
    returncode: int
    output: str
    losses: dict[int, float]
    validation_losses: dict[int, float]

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


def parse_losses(output: str) -> tuple[dict[int, float], dict[int, float]]:
    clean = _ANSI.sub("", output)
    train, val = {}, {}
    for line in clean.splitlines():
        if m := _VALIDATION_LINE.search(line):
            val[int(m.group(1))] = float(m.group(2))
        elif m := _STEP_LINE.search(line):
            train[int(m.group(1))] = float(m.group(2))
    return train, val


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
    proc = subprocess.run(
        training_command(dump_folder, *overrides, nproc=nproc, config=config, fast=fast),
        cwd=REPO,
        env=training_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )
    train, val = parse_losses(proc.stdout)
    return RunResult(proc.returncode, proc.stdout, train, val)


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
