"""``python -m swallow_titan.simulate`` (issue 19): is what it measures true?

- Arithmetic (item 4a): the parameter, gradient and optimizer-state bytes a
  simulated rank holds equal the plan's per-rank arithmetic -- each weight's
  TP shard, then FSDP2's ``ceil(rows / shards)`` padded rows -- for FSDP, HSDP
  and FSDP x TP, on ranks where the padding shows.
- Fake vs real tensors (item 4b): the same config on the same 4-rank layout
  run with real tensors and tracked the same way gives the same peak and parts.
- Fake vs real process group (item 4c): rank 0 of a real 2-process gloo run
  (torchrun) holds the state and issues the collectives a 2-rank simulation
  gives; its peak is higher by at most one reduce-scatter input (gloo's
  reduce-scatter works on a copy; NCCL's, which the fake group models, does not).
- Blocks (item 9's speed-up): a third block count lands exactly on the line
  through two others, so ``--layers A B`` extrapolation is exact.
- ``swallow_titan.train --comm.mode fake_backend`` is refused, naming simulate (item 8).

Tolerance for 4b (and 4c's state and collectives): zero bytes. The tracker adds up storage sizes (no
allocator rounding on CPU); a fake tensor has the size the real kernel's
output has, and the fake process group's collectives allocate the buffers a
real one does, so the same step on the same shapes must give the same sum.
Any difference is a fake kernel or collective with a different output size,
which is exactly what these tests are to catch.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from support import REPO, TINY_CONFIG
from support.runs import free_port, training_env
from swallow_titan.config.manager import load_job_config
from swallow_titan.plan import sharded_state_bytes
from swallow_titan.simulate import SimulationOptions, extrapolate, measure, simulate

# Small and quick: fake tensors cost per op, not per element, but real-tensor
# runs (4b, 4c) do the arithmetic.
TINY = [
    "--training.seq_len", "64",
    "--training.local_batch_size", "2",
    "--optimizer.implementation", "foreach",
    "--validation.enable", "false",
]


def _simulate(ngpu: int, nnodes: int = 1, rank: int = 0, *overrides: str, **kw):
    config = load_job_config(TINY_CONFIG, [*TINY, *overrides])
    opts = SimulationOptions(ngpu=ngpu, nnodes=nnodes, rank=rank, **kw)
    return simulate(config, opts, str(TINY_CONFIG)), config


@pytest.mark.parametrize(
    "ngpu, nnodes, rank, overrides",
    [
        # FSDP over 6: the KV projections' 64 rows are 11 per rank, rank 5 holds 9
        # rows in 11 rows of storage.
        (6, 1, 5, ["--training.global_batch_size", "12"]),
        # HSDP: 2 replicas (nodes) x 4 shards.
        (4, 2, 7, ["--parallelism.data_parallel_replicate_degree", "2",
                   "--training.global_batch_size", "16"]),
        # FSDP 3 x TP 2: TP halves rows (column-wise) or columns (row-wise) first.
        (6, 1, 5, ["--parallelism.tensor_parallel_degree", "2",
                   "--training.global_batch_size", "6"]),
    ],
    ids=["fsdp6-rank5", "hsdp2x4-rank7", "fsdp3xtp2-rank5"],
)
def test_sharded_state_matches_arithmetic(ngpu, nnodes, rank, overrides):
    result, config = _simulate(ngpu, nnodes, rank, *overrides)
    expected = sharded_state_bytes(config, ngpu * nnodes, rank)
    assert result.state_bytes == {
        "params": expected.params,
        "grads": expected.grads,
        "optimizer": expected.optimizer,
    }
    # The tracker's own account of the sharded parameters at the peak agrees.
    assert result.peak_parts["Sharded Param"] == expected.params


def test_fake_tensors_measure_what_real_tensors_use():
    overrides = ["--parallelism.tensor_parallel_degree", "2", "--training.global_batch_size", "8"]
    fake, _ = _simulate(4, 1, 0, *overrides)
    real, _ = _simulate(4, 1, 0, *overrides, real=True)
    assert fake.peak_bytes == real.peak_bytes
    assert fake.peak_parts == real.peak_parts
    assert fake.state_bytes == real.state_bytes
    assert [(c["op"], c["dim"], c["count"], c["bytes"]) for c in fake.collectives] == [
        (c["op"], c["dim"], c["count"], c["bytes"]) for c in real.collectives
    ]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize(
    "overrides",
    [
        ["--training.global_batch_size", "8"],
        # Qwen3 MoE with expert parallelism over both ranks: the all-to-alls'
        # split sizes come from a real all-to-all of the counts here and from
        # the simulation's assumption (every rank routes as this one) there.
        ["--training.global_batch_size", "8", "--model.name", "swallow_qwen3",
         "--model.flavor", "tiny_moe", "--parallelism.expert_parallel_degree", "2"],
    ],
    ids=["llama", "qwen3-moe-ep2"],
)
def test_two_rank_simulation_equals_rank0_of_a_real_gloo_run(tmp_path, overrides):
    simulated, _ = _simulate(2, 1, 0, *overrides)
    out = tmp_path / "real.json"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
        "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()),
        "-m", "swallow_titan.simulate", str(TINY_CONFIG), "--real",
        "--output", str(out), *TINY, *overrides,
    ]
    proc = subprocess.run(
        cmd, cwd=REPO, env=training_env(), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    real = json.loads(out.read_text())
    assert real["world_size"] == 2 and real["rank"] == 0
    assert simulated.state_bytes == real["state_bytes"]
    # gloo has no native reduce-scatter: torch's gloo backend reduces a copy of
    # the input, so a real gloo run can hold at most one reduce-scatter input
    # more than the fake (NCCL-like) group at its peak; nothing else differs.
    copy = max(c["largest"] for c in simulated.collectives if c["op"] == "reduce_scatter")
    assert 0 <= real["peak_bytes"] - simulated.peak_bytes <= copy
    assert [(c["op"], c["dim"], c["count"], c["bytes"]) for c in simulated.collectives] == [
        (c["op"], c["dim"], c["count"], c["bytes"]) for c in real["collectives"]
    ]
    if "--parallelism.expert_parallel_degree" in overrides:
        assert any(c["op"] == "all_to_all" and c["dim"] == "ep" for c in real["collectives"])


def test_two_microbatches_stand_for_all():
    """Why a simulation runs 2 microbatches of a step's N: from the second on,
    each starts from the same memory (all gradients exist) and issues the same
    collectives. Running all 3 and running 2 (counting the collectives 3 times)
    give the same figures, except for what the trainer keeps per microbatch
    for the whole step: the loaded batch (host memory on a GPU) and the 4-byte
    fp32 loss."""
    overrides = ["--training.global_batch_size", "12"]
    every, _ = _simulate(2, 1, 0, *overrides, microbatches=None)
    capped, _ = _simulate(2, 1, 0, *overrides, microbatches=2)
    assert (every.simulated_microbatches, capped.simulated_microbatches) == (3, 2)
    assert every.grad_accum == capped.grad_accum == 3
    per_microbatch = capped.microbatch_bytes + 4
    assert every.peak_bytes - capped.peak_bytes == per_microbatch
    assert capped.state_bytes == every.state_bytes
    assert [(c["op"], c["dim"], c["count"], c["bytes"]) for c in capped.collectives] == [
        (c["op"], c["dim"], c["count"], c["bytes"]) for c in every.collectives
    ]
    # FSDP gathers every block in forward and backward of each microbatch.
    gathers = {c["op"]: c["count"] for c in every.collectives if c["dim"] == "fsdp"}
    assert gathers["all_gather"] % 3 == 0 and gathers["all_gather"] > 0


def test_block_count_extrapolation_is_exact():
    """Each block adds the same parameters, state, saved activations and
    collectives: on an FSDP layout a third block count lands on the line through
    two others, to the byte. (The peak is the largest of several such lines, one
    per point of the step; see docs/simulate.md for when they cross.)"""
    overrides = ["--training.global_batch_size", "4"]
    runs = {
        layers: measure(
            load_job_config(TINY_CONFIG, [*TINY, *overrides]),
            SimulationOptions(ngpu=2),
            str(TINY_CONFIG),
            layers,
        )
        for layers in (1, 2, 3)
    }
    line = extrapolate(runs[1], runs[2], 1, 2, 3)
    assert runs[3].peak_bytes > runs[2].peak_bytes > runs[1].peak_bytes
    assert line.peak_bytes == runs[3].peak_bytes
    assert line.peak_parts == runs[3].peak_parts
    assert line.state_bytes == runs[3].state_bytes
    assert line.n_params == runs[3].n_params
    assert [(c["op"], c["dim"], c["count"], c["bytes"]) for c in line.collectives] == [
        (c["op"], c["dim"], c["count"], c["bytes"]) for c in runs[3].collectives
    ]


def test_train_refuses_fake_backend_and_names_simulate(capsys):
    from swallow_titan.config.errors import ExitCode
    from swallow_titan.train import main

    code = main(["--job.config_file", str(TINY_CONFIG), "--comm.mode", "fake_backend"])
    assert code == ExitCode.BAD_INPUT
    err = capsys.readouterr().err
    assert "comm.mode" in err and "python -m swallow_titan.simulate" in err


def test_plan_says_formula_or_simulated_and_warns_past_the_gpu():
    from swallow_titan.plan import build_plan, format_plan

    recipe = REPO / "train_configs" / "swallow_8b_v05.toml"
    config = load_job_config(recipe, ["--training.local_batch_size", "8"])
    plan = build_plan(config, 8, 1, str(recipe), gpu="h100")
    assert plan["memory_gib"]["source"] == "formula"
    assert plan["memory_gib"]["total"] > plan["gpu"]["memory_gib"]
    text = format_plan(plan)
    assert "(formula; --simulate measures it)" in text
    assert "WARNING: exceeds H100 80GB" in text
    # A simulated peak replaces the formula's figure and is what is checked.
    simulated = {"peak_bytes": 60 * 1024**3, "peak_parts": {"Activation": 50 * 1024**3}}
    plan = build_plan(config, 8, 1, str(recipe), gpu="h100", simulated=simulated)
    assert plan["memory_gib"]["source"] == "simulated" and plan["gpu"]["fits"]
    text = format_plan(plan)
    assert "60.0 GiB peak (simulated" in text and "fits H100 80GB" in text
