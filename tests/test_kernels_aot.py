"""Every Triton kernel and GPU autotune config compiles for sm_90 (H100/H200) without
spills or over-subscribed registers or shared memory; no GPU or driver needed.

The compile runs in a subprocess without ``TRITON_INTERPRET`` (this test session
interprets the kernels, see ``tests/conftest.py``).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import triton

from support import REPO
from kernels.aot import REGISTERS_PER_SM, SMEM_PER_BLOCK, CompileJob, CompileResult


def _result(warps: int, registers: int, spills: int = 0, smem: int = 0, error: str = ""):
    config = triton.Config({"BLOCK_M": 1}, num_warps=warps)
    job = CompileJob("k", "v", config, None, {}, {}, {})
    return CompileResult(job, registers, spills, smem, error)


@pytest.mark.parametrize(
    "result, finding",
    [
        (_result(8, 255, spills=64), "spills 64 bytes"),
        (_result(16, 130), f"> {REGISTERS_PER_SM}"),  # 130 x 512 threads
        (_result(4, 40, smem=SMEM_PER_BLOCK + 1), "shared memory"),
        (_result(4, -1, error="CompilationError: x"), "compile error"),
    ],
)
def test_each_limit_is_a_finding(result, finding):
    assert any(finding in p for p in result.problems())


def test_a_config_within_every_limit_has_no_finding():
    assert _result(8, REGISTERS_PER_SM // 256, smem=SMEM_PER_BLOCK).problems() == []


def test_every_kernel_and_config_compiles_for_sm90_within_the_limits():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "kernels_aot.py")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-4000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ")][1:]
    kernels = {row.split("|")[1].strip() for row in rows}
    assert kernels == {
        "rms_norm_fwd[N=4096]", "rms_norm_bwd[N=4096]",
        "rms_norm_fwd[N=128]", "rms_norm_bwd[N=128]",
        "ce_rows[V=128256]", "ce_rows[V=16032]",
    }
    from kernels import cross_entropy, rmsnorm

    # Per norm kernel two variants x two dtype layouts (FSDP bf16, AMP) at the
    # hidden width, and the q/k norm variant x two layouts at head_dim 128 (with
    # every config that fits there, the head-dim ones included); three variants
    # per vocabulary for the loss kernel.
    hidden = rmsnorm.configs_for_width(rmsnorm.GPU_CONFIGS, 4096)
    head_dim = rmsnorm.configs_for_width(rmsnorm.GPU_CONFIGS, 128)
    assert all(c in head_dim for c in rmsnorm.HEAD_DIM_CONFIGS)
    expected = (2 * 4 * len(hidden) + 2 * 2 * len(head_dim)
                + 2 * 3 * len(cross_entropy.GPU_CONFIGS))
    assert len(rows) == expected
    assert all(row.rstrip(" |").endswith("ok") for row in rows)


def _warps_and_rows(configs):
    return [(c.kwargs["BLOCK_M"], c.num_warps) for c in configs]


def test_rmsnorm_autotuning_keeps_only_configs_that_fit_the_width():
    from kernels.rmsnorm import GPU_CONFIGS, HEAD_DIM_CONFIGS, HIDDEN_CONFIGS, configs_for_width

    # Recipe width: every hidden config compiles clean (test above), none is
    # pruned; the many-row head-dim configs are.
    assert configs_for_width(GPU_CONFIGS, 4096) == HIDDEN_CONFIGS
    # Qwen3's head_dim 128: everything fits, the head-dim configs included.
    assert configs_for_width(GPU_CONFIGS, 128) == GPU_CONFIGS
    assert all(c not in configs_for_width(GPU_CONFIGS, 256) for c in HEAD_DIM_CONFIGS)
    # 8192: the 4-warp and BLOCK_M=2 configs spill on sm_90 (kernels_aot.py --hidden 8192).
    assert _warps_and_rows(configs_for_width(GPU_CONFIGS, 8192)) == [(1, 8), (1, 16)]
    # Wider than anything fits: the lightest config is still offered.
    assert _warps_and_rows(configs_for_width(GPU_CONFIGS, 65536)) == [(1, 16)]


def test_both_norm_kernels_prune_by_width_when_autotuning():
    from kernels import rmsnorm

    for kernel, flag in ((rmsnorm._rms_norm_fwd_kernel, "HAS_RESIDUAL"),
                         (rmsnorm._rms_norm_bwd_kernel, "HAS_DH")):
        # Called the way Triton's Autotuner calls it: (configs, named args, **launch kwargs).
        kept = kernel.early_config_prune(rmsnorm.GPU_CONFIGS, {}, BLOCK_N=8192, **{flag: True})
        assert _warps_and_rows(kept) == [(1, 8), (1, 16)]
