"""The data benchmarks run: data_throughput.py takes the tokenizer folders
[model] hf_assets_path takes; pretokenize_throughput.py prints its table."""

from __future__ import annotations

import shutil
import subprocess
import sys

from support import REPO


def run_benchmark(tokenizer_dir) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "benchmarks/data_throughput.py", "--tokenizer", str(tokenizer_dir),
         "--tokens", "4000", "--seq-len", "64"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )


def test_a_tokenizer_only_under_original_is_found(tmp_path):
    (tmp_path / "original").mkdir()
    shutil.copy(REPO / "assets" / "tokenizer" / "tokenizer.model", tmp_path / "original")
    proc = run_benchmark(tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith(("ja ", "en "))]
    assert len(rows) == 2 and all("swallow-titan" in r for r in rows)  # ja, en
    assert "no tokenizer.json" in proc.stdout


def test_a_folder_without_a_tokenizer_is_refused_by_name(tmp_path):
    proc = run_benchmark(tmp_path)
    assert proc.returncode == 2
    assert "--tokenizer" in proc.stderr and "holds no tokenizer" in proc.stderr


def test_the_pretokenize_benchmark_prints_a_row_per_worker_count():
    proc = subprocess.run(
        [sys.executable, "benchmarks/pretokenize_throughput.py", "--tokenizer",
         str(REPO / "assets" / "tokenizer"), "--mb", "1", "--shard-mb", "0.25",
         "--workers", "1,2"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [line.split() for line in proc.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert [r[0] for r in rows] == ["1", "2"]
    assert rows[0][1] == rows[1][1]  # the same tokens whatever the worker count
    assert rows[0][-1] == "1.00x"
