"""The first-GPU-run script is checked on CPU: arguments, time plan, tree-killing timeouts."""

from __future__ import annotations

import os
import subprocess
import time

from support import REPO

from benchmarks.proctree import run_with_timeout


def test_gpu_run_check_passes_on_cpu_without_wheels():
    # The wheels (benchmarks/fetch_wheels.sh) are not in CI; everything else is.
    proc = subprocess.run(
        ["bash", "benchmarks/gpu_run.sh", "--check-no-wheels"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for stage in ("e2e", "kernels", "throughput"):
        assert f"  {stage}: ok" in proc.stdout
    assert "check: ok" in proc.stdout


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_timeout_kills_a_grandchild_in_a_session_of_its_own(tmp_path):
    # As torchrun's workers: started with setsid, outside the launcher's group.
    pid_file = tmp_path / "pid"
    script = f"setsid sleep 120 & echo $! > {pid_file}; sleep 120"
    begin = time.monotonic()
    code, output = run_with_timeout(["bash", "-c", script], timeout=2)
    assert code == 124 and "TIMEOUT" in output
    assert time.monotonic() - begin < 30
    grandchild = int(pid_file.read_text())
    for _ in range(50):
        if not _alive(grandchild):
            break
        time.sleep(0.1)
    assert not _alive(grandchild)
