"""The Qwen3 recipes' own option sets train on CPU with the tiny Qwen3 flavors.

As ``test_recipe_on_cpu`` does for the Llama recipe: the recipe file with only
sizes, paths and device-bound options replaced (tiny / tiny_moe flavor, the
shipped samples and tokenizer, no HF start, SDPA causal attention, emulated
float8, no compile, EP over the processes there are). Everything else is the
recipe's: optimizer and schedule, precision, AC, async checkpoints, [moe]
load balancing, per-domain validation, in-loop evaluation, guard, HF export.
"""

from __future__ import annotations

import json
import math

import pytest

from support import REPO
from support.runs import run_training, series
from test_recipe_on_cpu import DEVICE_BOUND, SIZES_AND_PATHS, recipe_with_local_data

pytestmark = [pytest.mark.slow]

RECIPES = {
    # recipe -> (tiny flavor, processes, overrides for the CPU run). The MoE
    # recipe runs on 2 processes with EP 2 (its EP 8 over the processes there
    # are): its activation checkpointing must work with expert parallelism,
    # which a 1-process run (EP 1) would not show.
    "qwen3_swallow_8b": ("tiny", 1, []),
    "qwen3_swallow_30b_a3b": ("tiny_moe", 2, ["--parallelism.expert_parallel_degree", "2"]),
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_qwen3_recipe_trains_with_only_sizes_paths_and_device_options_changed(tmp_path, name):
    flavor, nproc, overrides = RECIPES[name]
    config = recipe_with_local_data(tmp_path, REPO / "train_configs" / f"{name}.toml")
    sizes = [v if v != "tiny" else flavor for v in SIZES_AND_PATHS]
    run = run_training(
        tmp_path / "run", *sizes, *DEVICE_BOUND, *overrides, config=config, fast=False,
        nproc=nproc,
    ).check()
    assert sorted(run.losses) == [1, 2, 3]
    assert all(math.isfinite(v) for v in run.losses.values())
    assert f"Building swallow_qwen3 {flavor}" in run.output
    assert 3 in run.validation_losses
    assert "eval step:" in run.output
    exported = json.loads((tmp_path / "run" / "hf" / "step-3" / "config.json").read_text())
    if flavor == "tiny_moe":
        assert exported["model_type"] == "qwen3_moe"
        assert sorted(series(run.history, "moe/aux_loss")) == [1, 2, 3]
    else:
        assert exported["model_type"] == "qwen3"
        assert "Float8 tensorwise scaled training active" in run.output
