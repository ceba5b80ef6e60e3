"""CI (issue 19, item 9): the shipped 8B recipe at 8 nodes x 8 GPUs, simulated.

The recipe's own option set (FSDP over 64 ranks, float8 with the float8
all-gather, selective AC, fused AdamW, both Triton kernels through their fake
implementations, local batch 2 x 8,192) runs two full steps on a 64-rank fake
process group. For speed it is simulated with 1 and 2 transformer blocks and
2 of its 8 microbatches, and extrapolated (each block adds the same; from the
second microbatch on each starts from the same memory: see test_simulate.py
and docs/simulate.md). Checked: the state rank 0 holds equals the per-rank
arithmetic for the full 32-block model, the peak fits an H200, and plan's
formula is within 10% of it.
"""

from __future__ import annotations

import pytest

from support import REPO
from swallow_titan.config.manager import load_job_config
from swallow_titan.plan import build_plan, sharded_state_bytes
from swallow_titan.simulate import GPUS, SimulationOptions, simulate

RECIPE = REPO / "train_configs" / "swallow_8b_v05.toml"


@pytest.mark.slow
def test_recipe_at_8x8_holds_its_arithmetic_and_fits_an_h200():
    config = load_job_config(RECIPE)
    opts = SimulationOptions(ngpu=8, nnodes=8, layers=(1, 2))
    result = simulate(config, opts, str(RECIPE))
    assert result.world_size == 64 and result.layout["dp_shard"] == 64
    assert result.grad_accum == 8 and result.simulated_microbatches == 2
    assert result.n_params == 8_030_261_248
    expected = sharded_state_bytes(config, 64, 0)
    assert result.state_bytes == {
        "params": expected.params,
        "grads": expected.grads,
        "optimizer": expected.optimizer,
    }
    # Roughly 16 bytes per parameter / 64 ranks is sharded state; the rest is
    # activations and temporaries, far above it.
    assert result.peak_bytes > sum(result.state_bytes.values())
    assert result.peak_bytes < GPUS["h200"].memory_bytes
    assert result.fits
    # plan's formula, recalibrated against the simulation, is within 10% of it.
    formula = build_plan(config, 8, 8, str(RECIPE))["memory_gib"]["total"]
    simulated = result.peak_bytes / 1024**3
    assert abs(formula - simulated) <= 0.10 * simulated
    # The step's collectives: FSDP gathers and reduce-scatters over all 64 ranks.
    fsdp = {c["op"]: c for c in result.collectives if c["dim"] == "fsdp"}
    assert fsdp["all_gather"]["group_size"] == 64 and fsdp["all_gather"]["nodes"] == 8
    assert fsdp["reduce_scatter"]["count"] > 0


# Rank 0's simulated peak in bytes for the rows of docs/simulate.md's table
# (python -m swallow_titan.simulate train_configs/swallow_8b_v05.toml --ngpu 8
# --nnodes N with the overrides and --layers shown there). Recorded, not rerun
# here: the nine simulations take minutes of CPU together, beyond this suite's
# budget; the recipe row is re-simulated by the test above. 1 x 8 and HSDP are
# recorded to 0.1 GiB only (the table's figure).
RECORDED_PEAKS = [
    ("8x8 FSDP (recipe)", 8, [], 39_945_645_588),
    ("1x8 FSDP", 1, [], int(50.3 * 1024**3)),
    ("8x8 HSDP", 8, ["--parallelism.data_parallel_replicate_degree", "8"], int(50.3 * 1024**3)),
    ("8x8 FSDP x TP 2", 8, ["--parallelism.tensor_parallel_degree", "2"], 27_622_814_260),
    ("8x8 FSDP x TP 8", 8, ["--parallelism.tensor_parallel_degree", "8"], 11_938_589_284),
    ("8x8 FSDP, float8 off", 8, ["--model.converters", ""], 39_945_644_276),
    ("8x8 FSDP, full AC", 8, ["--activation_checkpoint.mode", "full"], 15_249_583_220),
    ("8x8 FSDP, local batch 1", 8, ["--training.local_batch_size", "1"], 25_181_400_596),
    ("8x8 FSDP, local batch 4", 8, ["--training.local_batch_size", "4"], 69_847_600_742),
]
# The 70B recipe at 16 x 8 (FSDP 16 x TP 8, --layers 2 3): not used to
# calibrate the formula, so a check of it on another model.
RECIPE_70B = REPO / "train_configs" / "swallow_70b.toml"


@pytest.mark.parametrize("label,nnodes,overrides,simulated", RECORDED_PEAKS, ids=[r[0] for r in RECORDED_PEAKS])
def test_formula_within_10_percent_of_recorded_simulations(label, nnodes, overrides, simulated):
    """Issue 19, item 5: plan's formula against the simulator's table rows.

    The simulated figures are the recorded ones above (not re-simulated here);
    the formula is computed now. The formula's ``[averaging]`` copy is left
    out: the simulation runs the training step, which does not hold it. A
    formula that ignored an option (TP's activation split, full AC's block
    input, the batch-independent output-weight gradient) misses some row by
    more than 10% (the formula before recalibration did: TP 2, full AC, local
    batch 1).
    """
    config = load_job_config(RECIPE, overrides)
    memory = build_plan(config, 8, nnodes, str(RECIPE))["memory_gib"]
    formula = memory["total"] - memory["averaging"]
    assert abs(formula - simulated / 1024**3) <= 0.10 * simulated / 1024**3


def test_formula_within_10_percent_of_the_recorded_70b_simulation():
    """The 70B recipe's recorded simulated peak (docs/simulate.md), which the
    formula was not calibrated on: a check on another model size and TP 8."""
    config = load_job_config(RECIPE_70B)
    memory = build_plan(config, 8, 16, str(RECIPE_70B))["memory_gib"]
    formula = memory["total"] - memory["averaging"]
    simulated = 53_708_364_036 / 1024**3
    assert abs(formula - simulated) <= 0.10 * simulated
