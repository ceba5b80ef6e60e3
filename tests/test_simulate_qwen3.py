"""``python -m swallow_titan.simulate`` for Qwen3, dense and MoE (issue 20, item 1).

The checks of tests/test_simulate.py, on the Qwen3 family:

- Fake vs real tensors: the same config on the same layout, run with real
  tensors (``--real``, in one process on the fake process group) and tracked
  the same way, gives the same peak, parts, state and collectives. Tolerance:
  0 bytes, as for Llama (the tracker adds storage sizes; a fake kernel with a
  wrong output size is what this catches). For MoE both runs route by the
  simulation's assumption (balanced round-robin, ``debug.moe_force_load_balance``),
  so the real run's expert counts are real values and the fake run's are
  :class:`~swallow_titan.simulate.KnownExpertCounts`'s.
- Arithmetic: the parameter, gradient and optimizer bytes a simulated rank holds
  equal ``swallow_titan.plan.sharded_state_bytes`` -- tied embeddings held once,
  experts split by EP first and then FSDP-sharded over the other ranks (on dim 0,
  or dim 1 when there are fewer local experts than those ranks), with FSDP2's
  padding; on ranks where the padding shows.
- Expert parallelism's all-to-alls are in the collectives, with the count and
  bytes that balanced routing gives: per MoE layer and microbatch, forward sends
  the counts (E int64) and the routed tokens (tokens x top_k rows of dim) out and
  back, backward sends both token gradients again.
"""

from __future__ import annotations

import pytest

from support import TINY_CONFIG
from swallow_titan.config.manager import load_job_config
from swallow_titan.model.qwen3 import QWEN3_FLAVORS
from swallow_titan.plan import sharded_state_bytes
from swallow_titan.simulate import ROUTING_ASSUMPTION, SimulationOptions, simulate

SEQ, BATCH = 64, 2
QWEN3 = [
    "--model.name", "swallow_qwen3",
    "--training.seq_len", str(SEQ),
    "--training.local_batch_size", str(BATCH),
    "--optimizer.implementation", "foreach",
    "--validation.enable", "false",
]


def _config(flavor: str, *overrides: str):
    return load_job_config(TINY_CONFIG, [*QWEN3, "--model.flavor", flavor, *overrides])


def _figures(result) -> tuple:
    return (
        result.peak_bytes,
        result.peak_parts,
        result.state_bytes,
        [(c["op"], c["dim"], c["count"], c["bytes"]) for c in result.collectives],
    )


def _state(config, world_size: int, rank: int) -> dict[str, int]:
    expected = sharded_state_bytes(config, world_size, rank)
    return {"params": expected.params, "grads": expected.grads, "optimizer": expected.optimizer}


@pytest.mark.parametrize(
    "flavor, overrides",
    [
        ("tiny", ["--training.global_batch_size", "8"]),
        ("tiny_moe", ["--training.global_batch_size", "8", "--parallelism.expert_parallel_degree", "2"]),
    ],
    ids=["dense-tied", "moe-ep2"],
)
def test_fake_tensors_measure_what_real_tensors_use(flavor, overrides):
    config = _config(flavor, *overrides)
    fake = simulate(config, SimulationOptions(ngpu=4, rank=3), str(TINY_CONFIG))
    real = simulate(config, SimulationOptions(ngpu=4, rank=3, real=True), str(TINY_CONFIG))
    assert _figures(fake) == _figures(real)
    assert fake.state_bytes == _state(config, 4, 3)
    args = QWEN3_FLAVORS[flavor]
    moe = {c["op"]: c for c in fake.collectives if c["dim"] == "ep"}
    if not args.moe_enabled:
        assert not moe and ROUTING_ASSUMPTION not in fake.stand_ins
        return
    assert ROUTING_ASSUMPTION in fake.stand_ins
    # tiny_cpu.toml computes in float32 (CPU): 4 bytes per routed element.
    tokens, k, e = BATCH * SEQ, args.moe_args.top_k, args.moe_args.num_experts
    layers, accum = args.n_layers, fake.grad_accum
    a2a = moe["all_to_all"]
    assert a2a["group_size"] == 2
    assert a2a["count"] == layers * accum * 5
    assert a2a["bytes"] == layers * accum * (e * 8 + 4 * tokens * k * args.dim * 4)


@pytest.mark.parametrize(
    "flavor, ngpu, rank, overrides",
    [
        # Tied embedding and output held once; the k/v projections' 64 rows are
        # 11 per rank over 6, rank 5 holds 9 rows in 11 rows of storage.
        ("tiny", 6, 5, ["--training.global_batch_size", "12"]),
        # EP 2 x 3 expert-FSDP ranks: 4 local experts over 3 ranks (2, 2, 0 rows).
        ("tiny_moe", 6, 4, ["--training.global_batch_size", "12",
                            "--parallelism.expert_parallel_degree", "2"]),
        # EP 4 x 4 expert-FSDP ranks on 8 experts: 2 local experts < 4 ranks, so
        # FSDP shards the experts on dim 1.
        ("tiny_moe", 16, 13, ["--training.global_batch_size", "32",
                              "--parallelism.expert_parallel_degree", "4"]),
    ],
    ids=["dense-fsdp6-rank5", "moe-ep2-fsdp6-rank4", "moe-ep4-dim1-rank13"],
)
def test_sharded_state_matches_arithmetic(flavor, ngpu, rank, overrides):
    config = _config(flavor, *overrides)
    result = simulate(config, SimulationOptions(ngpu=ngpu, rank=rank), str(TINY_CONFIG))
    assert result.state_bytes == _state(config, ngpu, rank)
    assert result.peak_parts["Sharded Param"] == result.state_bytes["params"]


# Rank 0's simulated peak in bytes at 8 x 8 (python -m swallow_titan.simulate
# CONFIG --ngpu 8 --nnodes 8 --layers 1 2 [overrides], docs/simulate.md).
# Recorded, not rerun here (40 s to 2 minutes each). The 30B-A3B recipe's
# full AC (per-op selective AC with EP is refused, docs/simulate.md).
RECORDED_PEAKS = [
    ("qwen3_swallow_8b.toml", [], 64_194_238_844),
    ("qwen3_swallow_30b_a3b.toml", [], 42_322_171_748),
    # Llama's recipe with torchtitan's loss instead of the fused one: the same
    # non-fused loss term as both Qwen3 recipes.
    ("swallow_8b_v05.toml", ["--kernels.loss", "torch"], 57_538_653_732),
]


@pytest.mark.parametrize("recipe, overrides, simulated", RECORDED_PEAKS, ids=[r[0] for r in RECORDED_PEAKS])
def test_formula_within_3_percent_of_recorded_simulations(recipe, overrides, simulated):
    """plan's formula against the simulated Qwen3 recipes (and Llama without the
    fused loss). 3%: the formula is within 2.3% of each row; before its
    non-fused loss term was corrected (10 -> 12 bytes per logit) it was 7.8%
    (Llama), 9% (Qwen3 8B) and 14% (30B-A3B) low, which this rejects."""
    from support import REPO
    from swallow_titan.plan import build_plan

    path = REPO / "train_configs" / recipe
    config = load_job_config(path, overrides)
    memory = build_plan(config, 8, 8, str(path))["memory_gib"]
    formula = memory["total"] - memory["averaging"]
    assert abs(formula - simulated / 1024**3) <= 0.03 * simulated / 1024**3


def test_selective_op_ac_with_expert_parallelism_is_refused_naming_the_fields():
    """Per-op selective AC with EP fails in backward in torchtitan 0.2.2 -- in a
    real run too -- and the simulation refuses it up front (the preflight's
    structure check) instead of a replay-mismatch traceback."""
    from swallow_titan.config.errors import ConfigError

    config = _config(
        "tiny_moe", "--training.global_batch_size", "8",
        "--parallelism.expert_parallel_degree", "2",
        "--activation_checkpoint.mode", "selective",
        "--activation_checkpoint.selective_ac_option", "op",
    )
    with pytest.raises(ConfigError) as e:
        simulate(config, SimulationOptions(ngpu=4), str(TINY_CONFIG))
    message = str(e.value)
    assert "activation_checkpoint.mode" in message and "expert_parallel_degree = 2" in message


@pytest.mark.slow
def test_qwen3_8b_recipe_at_8x8_holds_its_arithmetic_and_fits_an_h200():
    """The shipped Qwen3 8B recipe's own option set (FSDP over 64 ranks, float8
    emulated, selective AC, fused AdamW, local batch 2 x 8,192) at 8 x 8, 1 and 2
    blocks of the real flavor extrapolated to 36 (as the Llama recipe's test).
    (The 30B-A3B recipe at 8 x 8 takes about 30 s more: its row is recorded
    above and in docs/simulate.md.)"""
    from support import REPO
    from swallow_titan.plan import build_plan
    from swallow_titan.simulate import GPUS

    recipe = REPO / "train_configs" / "qwen3_swallow_8b.toml"
    config = load_job_config(recipe)
    result = simulate(config, SimulationOptions(ngpu=8, nnodes=8, layers=(1, 2)), str(recipe))
    assert result.layout["dp_shard"] == 64 and result.grad_accum == 8
    assert result.n_params == QWEN3_FLAVORS["8B"].get_nparams_and_flops(
        _meta_model("8B"), 8192)[0]
    assert result.state_bytes == _state(config, 64, 0)
    assert sum(result.state_bytes.values()) < result.peak_bytes < GPUS["h200"].memory_bytes
    memory = build_plan(config, 8, 8, str(recipe))["memory_gib"]
    formula = memory["total"] - memory["averaging"]
    simulated = result.peak_bytes / 1024**3
    assert abs(formula - simulated) <= 0.03 * simulated
    fsdp = {c["op"]: c for c in result.collectives if c["dim"] == "fsdp"}
    assert fsdp["all_gather"]["group_size"] == 64 and fsdp["all_gather"]["nodes"] == 8
    assert not any(c["dim"] == "ep" for c in result.collectives)


def _meta_model(flavor: str):
    import torch

    from swallow_titan.model.qwen3 import SwallowQwen3Model

    with torch.device("meta"):
        return SwallowQwen3Model(QWEN3_FLAVORS[flavor])
