"""The shipped recipe's own option set trains on CPU, on 1 and 2 processes.

``train_configs/swallow_8b_v05.toml`` is run with only what cannot work on a
2-core CPU replaced: sizes (tiny flavor, short sequences, 3 steps), paths (the
shipped sample data, validation files and tokenizer, no HF start) and the
device-bound options (float8 emulated, which torchtitan allows only without a
compiled model; SDPA causal attention, as FlexAttention has no CPU backward;
Triton's interpreter for the kernels). Everything else is the recipe's: AdamW
settings, fp32 master weights with bf16 compute (AMP autocast on 1 process,
FSDP2 mixed precision on 2), float8 with the FSDP float8 all-gather, both
kernels, selective AC, async checkpoints, per-domain validation, TensorBoard,
guard, end-of-run HF export. An option combination torchtitan refuses fails
here, not on the cluster.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from support import REPO
from support.runs import run_training

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

RECIPE = REPO / "train_configs" / "swallow_8b_v05.toml"

SOURCES = "".join(
    f'[[data.sources]]\nname = "{name}_sample"\ndomain = "{name}"\nweight = {w}\n'
    f'path = "./assets/samples/{name}.jsonl"\n\n'
    for name, w in (("ja", 0.4), ("en", 0.2), ("code", 0.2), ("math", 0.2))
)
VALIDATION_SETS = "".join(
    f'[[validation.sets]]\nname = "{name}"\npath = "./assets/samples/val/{name}.jsonl"\n'
    "sequences = 4\n\n"
    for name in ("ja", "en")
)

# Sizes and paths.
SIZES_AND_PATHS = [
    "--model.flavor", "tiny",
    "--model.hf_assets_path", "./assets/tokenizer",
    "--hf.load_path", "",
    "--training.seq_len", "64",
    "--training.local_batch_size", "2",
    "--training.global_batch_size", "4",
    "--training.steps", "3",
    "--lr_scheduler.warmup_steps", "1",
    "--validation.seq_len", "64",
    "--validation.freq", "3",
    "--training.dataloader.num_workers", "1",
    "--metrics.log_freq", "1",
    "--debug.seed", "7",
    # [eval]: the shipped Japanese tasks instead of the hub's, 2 examples each.
    "--eval.tasks", "swallow_ja_mc_sample,swallow_ja_qa_sample",
    "--eval.include_path", "./assets/eval_tasks",
    "--eval.limit", "2",
    "--eval.max_gen_toks", "8",
    "--eval.freq", "3",
]
# What a CPU cannot do as the recipe asks.
DEVICE_BOUND = [
    "--model.attn_type", "sdpa",
    "--model.attn_mask_type", "causal",
    "--quantize.linear.float8.emulate", "true",
    "--compile.enable", "false",
]


def recipe_with_local_data(tmp_path: Path, recipe: Path = RECIPE) -> Path:
    """The recipe's text with its data sources and validation sets (placeholder
    paths and hub datasets) replaced by the shipped samples; nothing else changed."""
    text = recipe.read_text()
    sources = re.compile(r"^\[\[data\.sources\]\].*?(?=^\[parallelism\])", re.M | re.S)
    sets = re.compile(r"^\[\[validation\.sets\]\].*?(?=^\[guard\])", re.M | re.S)
    assert sources.search(text) and sets.search(text), "recipe layout changed"
    text = sources.sub(lambda _: SOURCES, text, count=1)
    text = sets.sub(lambda _: VALIDATION_SETS, text, count=1)
    path = tmp_path / f"{recipe.stem}_cpu.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("nproc", [1, 2])
def test_recipe_trains_with_only_sizes_paths_and_device_options_changed(tmp_path, nproc):
    config = recipe_with_local_data(tmp_path)
    run = run_training(
        tmp_path / "run", *SIZES_AND_PATHS, *DEVICE_BOUND,
        nproc=nproc, config=config, fast=False, env={"TRITON_INTERPRET": "1"},
    ).check()
    assert sorted(run.losses) == [1, 2, 3]
    assert all(math.isfinite(v) for v in run.losses.values())
    assert "Float8 tensorwise scaled training active" in run.output
    assert "Triton kernels: rmsnorm = 'triton', loss = 'fused_linear_ce'" in run.output
    assert 3 in run.validation_losses
    assert re.search(r"eval step:\s+3\s+swallow_ja_mc_sample/acc: ", run.output)
    if nproc == 1:
        assert "Mixed precision training is handled by AMP" in run.output
    else:
        assert "Mixed precision training is handled by fully_shard" in run.output
        assert "enable_fsdp_float8_all_gather=True" in run.output
    assert (tmp_path / "run" / "checkpoint" / "step-3").is_dir()
    assert (tmp_path / "run" / "hf" / "step-3" / "config.json").is_file()
    # [averaging]: the recipe's EMA is validated and exported beside the final weights.
    assert re.search(r"validate ema step:\s+3\s+loss:", run.output)
    assert (tmp_path / "run" / "hf" / "step-3-ema" / "config.json").is_file()


def test_70b_recipe_trains_with_only_sizes_paths_and_device_options_changed(tmp_path):
    """train_configs/swallow_70b.toml's options (FSDP x TP, float8, both kernels,
    selective AC, ...) with the tiny flavor on 2 processes: TP 8 x FSDP 16 becomes
    TP 2 (and so no FSDP) over the 2 processes (sizes); everything else is the
    recipe's. FSDP with float8 is covered by the 8B recipe's 2-process run."""
    config = recipe_with_local_data(tmp_path, RECIPE.parent / "swallow_70b.toml")
    run = run_training(
        tmp_path / "run", *SIZES_AND_PATHS, *DEVICE_BOUND,
        "--parallelism.tensor_parallel_degree", "2",
        nproc=2, config=config, fast=False, env={"TRITON_INTERPRET": "1"},
    ).check()
    assert sorted(run.losses) == [1, 2, 3]
    assert all(math.isfinite(v) for v in run.losses.values())
    assert "Float8 tensorwise scaled training active" in run.output
    assert "Tensor Parallelism to the model" in run.output
    assert (tmp_path / "run" / "checkpoint" / "step-3").is_dir()
