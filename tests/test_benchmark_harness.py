"""The throughput benchmark's CPU smoke mode runs the same harness end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from support import REPO

pytestmark = pytest.mark.slow

# Stock torchtitan, ours with kernels, ours with float8 and kernels: each kind
# of configuration the harness builds (plain "bf16" is "bf16+kernels" with the
# kernels off; left out to keep CI under 30 minutes).
SMOKE_CONFIGS = "stock,bf16+kernels,fp8+kernels"


def test_cpu_smoke_reports_every_configuration_and_a_profile(tmp_path):
    proc = subprocess.run(
        [sys.executable, "benchmarks/throughput.py", "--cpu-smoke",
         "--configs", SMOKE_CONFIGS, "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "throughput.json").read_text())
    results = {r["name"]: r for r in report["results"]}
    assert list(results) == SMOKE_CONFIGS.split(",")
    for r in results.values():
        assert r["ok"] and r["tokens_per_s"] > 0 and r["steps_measured"] == 2
        assert r["peak_memory_gib"] > 0
    assert results["stock"]["vs_stock"] == pytest.approx(1.0)
    assert report["top_kernels"], "the profiled run produced no operator table"
    assert "vs stock" in proc.stdout and "top" in proc.stdout
    log = (tmp_path / "throughput.log").read_text()
    # The float8 configuration really trained with float8 layers.
    fp8_run = log.split("===== fp8+kernels:")[1].split("\n===== ")[0]
    assert "Swapped to Float8Linear layers" in fp8_run
    assert "Swapped to Float8Linear" not in log.split("===== bf16+kernels:")[1].split("\n===== ")[0]
