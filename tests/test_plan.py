"""`python -m swallow_titan.plan` resolves the recipe's numbers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from support import REPO

RECIPE = REPO / "train_configs" / "swallow_8b_v05.toml"


def run_plan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "swallow_titan.plan", *args],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )


@pytest.fixture(scope="module")
def recipe_plan() -> dict:
    proc = run_plan(str(RECIPE), "--ngpu", "8", "--nnodes", "8", "--json")
    # Placeholder paths make it a plan with problems (exit 1), still complete.
    assert proc.returncode == 1, proc.stderr
    return json.loads(proc.stdout)


def llama31_8b_params() -> int:
    """Llama-3.1-8B's parameter count from its published dimensions."""
    dim, layers, heads, kv_heads, ffn, vocab = 4096, 32, 32, 8, 14336, 128256
    head_dim = dim // heads
    attention = dim * dim * 2 + 2 * dim * kv_heads * head_dim  # wq, wo, wk, wv
    block = attention + 3 * dim * ffn + 2 * dim  # SwiGLU + two RMSNorms
    return 2 * vocab * dim + layers * block + dim


def test_recipe_model_is_llama31_8b(recipe_plan):
    assert recipe_plan["params"] == llama31_8b_params()
    # torchtitan's FLOPs/token: 6 x non-embedding params + attention term.
    # (q.k and attn.v: 2 x head_dim 128 per head).
    expected = 6 * (llama31_8b_params() - 128256 * 4096) + 6 * 32 * 32 * 256 * 8192
    assert recipe_plan["flops_per_token"] == expected


def test_recipe_batch_and_schedule(recipe_plan):
    p = recipe_plan
    assert p["seq_len"] == 8192
    assert p["global_batch_sequences"] == 1024
    assert p["global_batch_tokens"] == 1024 * 8192
    assert p["layout"]["dp"] == 64
    assert p["local_batch_size"] * 64 * p["grad_accum_steps"] == 1024
    assert 209e9 < p["total_tokens"] < 211e9
    assert p["total_tokens"] == p["steps"] * 1024 * 8192


def test_recipe_optimizer(recipe_plan):
    p = recipe_plan
    assert p["lr"] == pytest.approx(2.5e-5)
    assert p["min_lr"] == pytest.approx(2.5e-6)
    assert p["warmup_steps"] == 1000
    assert p["lr_decay"] == "cosine"
    assert p["weight_decay"] == pytest.approx(0.1)
    assert p["grad_clip"] == pytest.approx(1.0)
    assert p["adam_betas"] == pytest.approx([0.9, 0.95])
    assert p["adam_eps"] == pytest.approx(1e-8)
    # LR reaches its peak at the end of warm-up and the floor at the end.
    assert p["lr_at_step"]["1000"] == pytest.approx(2.5e-5)
    assert p["lr_at_step"][str(p["steps"])] == pytest.approx(2.5e-6, rel=1e-3)


def test_recipe_precision_and_features(recipe_plan):
    p = recipe_plan
    assert p["dtype"] == {"params": "float32", "compute": "bfloat16", "reduce": "float32"}
    assert p["compile"] and p["float8"]
    assert p["activation_checkpoint"] == "selective"
    assert sum(s["share"] for s in p["sources"]) == pytest.approx(1.0)
    assert {s["domain"] for s in p["sources"]} == {"ja", "en", "code", "math"}


def test_recipe_validates_each_domain_every_500_steps(recipe_plan):
    validation = recipe_plan["validation"]
    assert validation["enable"] and validation["freq"] == 500
    assert {v["name"] for v in validation["sets"]} == {"ja", "en", "code", "math"}


def test_recipe_states_its_averaging_and_the_plan_shows_it(recipe_plan):
    from swallow_titan.plan import format_plan

    assert recipe_plan["averaging"]["kinds"] == ["ema"]
    assert recipe_plan["averaging"]["ema_decay"] == 0.999
    # One fp32 copy of the parameter shards (the recipe's parameters are fp32 too).
    memory = recipe_plan["memory_gib"]
    assert memory["averaging"] == pytest.approx(memory["parameters"])
    text = format_plan(recipe_plan)
    assert "averaging     EMA decay 0.999 (~1,000-step horizon)" in text
    assert f"averages {memory['averaging']:.1f}" in text


def test_recipe_states_its_spike_policy_and_the_cost_of_a_rollback(recipe_plan):
    guard = recipe_plan["guard"]
    assert guard["on_spike"] == "rollback" and guard["spike_metrics"] == ["loss"]
    assert (guard["spike_window"], guard["spike_threshold"], guard["max_rollbacks"]) == (128, 6.0, 3)
    # Back to the newest checkpoint: at most checkpoint.interval steps, as many batches.
    cost = guard["rollback_at_most"]
    assert cost["steps_redone"] == 500
    assert cost["tokens_skipped"] == 500 * recipe_plan["global_batch_tokens"]
    text = run_plan(str(RECIPE), "--ngpu", "8", "--nnodes", "8").stdout
    assert "spikes: rollback when loss > 6 robust std above the median of the last 128 steps" in text
    assert "after 3 the next spike stops the run (exit status 6)" in text


def test_recipe_placeholders_are_listed_as_problems(recipe_plan):
    problems = "\n".join(recipe_plan["problems"])
    assert "model.hf_assets_path" in problems
    assert "/path/to/swallow-corpus-v2" in problems


def test_plan_memory_shrinks_with_more_gpus():
    one_node = json.loads(run_plan(str(RECIPE), "--ngpu", "8", "--json").stdout)
    eight_nodes = json.loads(
        run_plan(str(RECIPE), "--ngpu", "8", "--nnodes", "8", "--json").stdout
    )
    assert eight_nodes["memory_gib"]["optimizer"] < one_node["memory_gib"]["optimizer"]
    assert one_node["grad_accum_steps"] == 8 * eight_nodes["grad_accum_steps"]


def test_plan_of_tiny_config_has_no_problems():
    proc = run_plan("train_configs/tiny_cpu.toml", "--ngpu", "1")
    assert proc.returncode == 0, proc.stderr
    assert "tiny" in proc.stdout and "grad-accum 2" in proc.stdout


def test_plan_without_ngpu_counts_the_visible_gpus_like_run_train_sh():
    from swallow_titan.runtime.device import default_ngpu

    proc = run_plan("train_configs/tiny_cpu.toml", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["layout"]["ngpu"] == default_ngpu()


def test_plan_reports_config_errors_with_file_and_key():
    proc = run_plan("train_configs/tiny_cpu.toml", "--ngpu", "3")
    assert proc.returncode == 2
    assert "train_configs/tiny_cpu.toml: training.global_batch_size" in proc.stderr
