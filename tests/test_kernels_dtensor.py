"""The kernels on DTensors across 2 processes: sequence-parallel RMSNorm (partial
weight gradient), vocabulary-parallel and token-sharded fused cross-entropy.

The checks themselves are in ``dtensor_kernel_checks.py``, run with torchrun.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from support import REPO
from support.runs import free_port

pytestmark = [pytest.mark.distributed]


def test_kernels_on_dtensors_match_single_process_references():
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", "1", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        str(REPO / "tests" / "dtensor_kernel_checks.py"),
    ]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
        ),
        "TRITON_INTERPRET": "1",
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.run(
        cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    assert output.count("CHECKS PASSED") == 2, output[-6000:]
