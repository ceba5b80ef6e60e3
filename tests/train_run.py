"""Run swallow-titan training in a subprocess and read the losses it logs.

Tests use it to compare runs (kernels on/off, 1 vs 2 processes): each run gets
its own dump folder, no checkpoint, validation or TensorBoard, and the seed and
determinism flags so that runs start from identical weights.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY_CPU = REPO / "train_configs" / "tiny_cpu.toml"

_STEP_LOSS = re.compile(r"step:\s+(\d+)\s+(?:\x1b\[[0-9;]*m)?loss:\s+([0-9.]+)")


class TrainingFailed(AssertionError):
    pass


def run_training(
    dump_folder: Path,
    overrides: list[str],
    nproc: int = 1,
    env: dict[str, str] | None = None,
    config: Path = TINY_CPU,
    timeout: float = 600,
) -> dict[int, float]:
    """Train with ``config`` plus ``overrides`` and return ``{step: loss}`` of rank 0."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        "--local-ranks-filter",
        "0",
        "-m",
        "swallow_titan.train",
        "--job.config_file",
        str(config),
        "--job.dump_folder",
        str(dump_folder),
        "--checkpoint.no-enable",
        "--validation.no-enable",
        "--metrics.no-enable-tensorboard",
        "--metrics.log_freq",
        "1",
        "--debug.seed",
        "42",
        "--debug.deterministic",
        *overrides,
    ]
    run_env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
        ),
        "OMP_NUM_THREADS": "1",
        **(env or {}),
    }
    proc = subprocess.run(
        cmd,
        cwd=REPO,
        env=run_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise TrainingFailed(
            f"training exited with {proc.returncode}:\n{' '.join(cmd)}\n{output[-6000:]}"
        )
    losses = {int(step): float(loss) for step, loss in _STEP_LOSS.findall(output)}
    if not losses:
        raise TrainingFailed(f"no 'step: N loss: X' lines in the output:\n{output[-6000:]}")
    return losses
