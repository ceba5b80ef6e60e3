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
