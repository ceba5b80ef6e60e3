"""benchmarks/kernels.py runs its whole code path on CPU (--cpu-smoke).

This checks the script (correctness part, timing and report), not performance.
"""

from __future__ import annotations

import json

from benchmarks import kernels as kernel_benchmark


def test_cpu_smoke_runs_the_checks_and_prints_one_table(tmp_path, capsys):
    code = kernel_benchmark.main(["--cpu-smoke", "--no-compile", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "FAIL" not in printed
    report = json.loads((tmp_path / "kernels.json").read_text())
    variants = {(r["section"].split()[0], r["variant"]) for r in report["rows"]}
    assert ("rmsnorm", "ours (Triton)") in variants
    assert ("add+rmsnorm", "ours, fused residual") in variants
    assert ("linear+CE", "ours (fused, Triton)") in variants
    assert ("linear+CE", "3 bare GEMMs (floor)") in variants
    assert (tmp_path / "kernels.txt").read_text().strip() in printed
