"""`python -m swallow_titan.data` reports and dumps what the pipeline reads;
the plan shows each source's planned tokens and, when its size is known, epochs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from support import REPO, SAMPLES, TINY_CONFIG, tiny_tokenizer
from swallow_titan.config.manager import load_job_config
from swallow_titan.data.source_size import format_source_line, plan_sources

RECIPE = REPO / "train_configs" / "swallow_8b_v05.toml"


def run_data_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "swallow_titan.data", *args],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
    )


def test_cli_reads_as_one_data_parallel_rank_of_the_layout_on_ngpu():
    # tiny_cpu.toml shards data over every rank: 2 GPUs -> rank 0 of 2 reads
    # half of each global batch of 16 sequences.
    proc = run_data_cli(str(TINY_CONFIG), "--batches", "1", "--ngpu", "2", "--json",
                        "--training.seq_len", "64")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["sequences"] == 8


def test_cli_reports_per_source_and_dumps_the_packed_sequences(tmp_path):
    dump = tmp_path / "seqs.jsonl"
    proc = run_data_cli(str(TINY_CONFIG), "--batches", "3", "--dp-rank", "1", "--dp-size", "2",
                        "--dump", str(dump), "--json", "--training.seq_len", "64")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    # Rank 1 of 2 reads half of each global batch of 16 sequences.
    assert report["sequences"] == 3 * 8 and report["tokens_per_s"] > 0
    sources = {s["name"]: s for s in report["sources"]}
    assert set(sources) == {"ja_sample", "en_sample", "code_sample", "math_sample"}
    for s in sources.values():
        assert set(s) == {"name", "domain", "weight", "tokens", "documents", "share",
                          "epochs", "skipped"}
    assert sum(s["tokens"] for s in sources.values()) == 24 * 64
    assert sum(s["share"] for s in sources.values()) == pytest.approx(1.0)

    lines = [json.loads(line) for line in dump.read_text().splitlines()]
    assert len(lines) == 24
    bos = tiny_tokenizer().bos_id
    for line in lines:
        tokens, segments = line["tokens"], line["segments"]
        assert len(tokens) == 65
        assert segments[0]["start"] == 0 and segments[-1]["end"] == 65
        assert all(a["end"] == b["start"] for a, b in zip(segments, segments[1:]))
        assert all(tokens[s["start"]] == bos for s in segments[1:])
        assert len({s["source"] for s in segments}) == 1 and segments[0]["source"] in sources


def test_cli_names_a_hub_source_that_cannot_be_reached(tmp_path):
    config = tmp_path / "job.toml"
    text = TINY_CONFIG.read_text()
    old = 'path = "./assets/samples/math.jsonl"'
    assert old in text
    config.write_text(text.replace(old, 'hf_dataset = "no-such-org/no-such-math"'))
    proc = run_data_cli(str(config), env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2
    assert "'math_sample': cannot open hf_dataset = 'no-such-org/no-such-math'" in proc.stderr


def test_plan_gives_epochs_from_the_users_source_size():
    config = load_job_config(RECIPE, [])
    total = 25035 * 1024 * 8192
    sources = {s["name"]: s for s in plan_sources(config, total, 1024)}
    code = sources["code_swallowcode"]
    assert code["available_tokens"] == 16_100_000_000 and code["available_from"] == "num_tokens"
    assert code["planned_tokens"] == round(total * code["share"])
    assert code["epochs"] == pytest.approx(code["planned_tokens"] / 16.1e9)
    assert 1.5 < sources["math_swallowmath"]["epochs"] < 2.5
    # A hub source without num_tokens is not looked up: its size stays unknown.
    assert sources["en_dclm"]["available_tokens"] is None and sources["en_dclm"]["epochs"] is None
    assert "1.94 epochs, repeats" in format_source_line(code, lambda n: f"{n / 1e9:.2f}B")


def test_plan_estimates_the_size_of_local_sources_from_a_sample():
    config = load_job_config(TINY_CONFIG, [])
    tok = tiny_tokenizer()
    for s in plan_sources(config, total_tokens=1_000_000, slots=16):
        name = s["name"].removesuffix("_sample")
        true = sum(len(tok.encode(json.loads(line)["text"])) + 2
                   for line in (SAMPLES / f"{name}.jsonl").open())
        assert s["available_from"] == "estimate"
        assert s["available_tokens"] == pytest.approx(true, rel=0.05)
        assert s["epochs"] == pytest.approx(s["planned_tokens"] / s["available_tokens"])
