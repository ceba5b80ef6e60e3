"""Kernel tests that only pass when the kernel under test really ran and is exact.

Beside the kernel owners' tests (tests/test_kernels_*.py): these close the
gaps a mutation check found. ``[kernels]`` from the TOML must reach the model
and its Triton ops must run in forward and backward; the RMSNorm backward must
be right when a program loops over several row blocks; the fused add+norm must
normalise exactly the residual it returns.
"""

from __future__ import annotations

import torch

from kernels import rms_norm
from kernels.rmsnorm import rms_norm_reference
from support import TINY_CONFIG
from support.model import build_model, kernel_ops_of_train_step
from support.overrides import KERNELS_ON
from swallow_titan.components.preflight import check_job_config
from swallow_titan.config.manager import ConfigError, load_job_config
from swallow_titan.model.transformer import FusedLossOutput, FusedNormBlock, TritonRMSNorm

EPS32 = torch.finfo(torch.float32).eps


def test_kernels_from_the_toml_reach_the_model_and_their_ops_run():
    model, _ = build_model(*KERNELS_ON, "--model.flavor", "tiny")
    norms = [m for m in model.modules() if isinstance(m, torch.nn.RMSNorm)]
    assert len(norms) == 2 * len(model.layers) + 1
    assert all(type(m) is TritonRMSNorm for m in norms)
    assert all(type(block) is FusedNormBlock for block in model.layers.values())
    assert type(model.output) is FusedLossOutput
    called = set(kernel_ops_of_train_step(model, with_labels=True))
    assert {"swallow.rms_norm", "swallow.rms_norm_residual", "swallow.rms_norm_backward"} <= called
    assert any("cross_entropy" in name for name in called), called


def test_with_kernels_off_no_triton_op_runs():
    model, _ = build_model("--model.flavor", "tiny")
    assert not any(isinstance(m, TritonRMSNorm) for m in model.modules())
    assert not kernel_ops_of_train_step(model, with_labels=False)


def test_rmsnorm_backward_when_each_program_loops_over_several_row_blocks():
    # On the interpreter the backward runs 4 programs of 32-row blocks, so 300
    # rows give each program 75 rows: two full blocks and a partial one. 96
    # columns leave the last column block partly masked.
    rows, cols = 300, 96
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, cols, generator=g, requires_grad=True)
    w = (1 + 0.1 * torch.randn(cols, generator=g)).requires_grad_()
    dy = torch.randn(rows, cols, generator=g)
    rms_norm(x, w).backward(dy)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    rms_norm_reference(x64, w64).backward(dy.double())
    # fp32 sums of n terms carry at most n * eps of the sum of their magnitudes
    # (the usual worst-case bound for recursive summation).
    x_hat = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5)
    dw_bound = rows * EPS32 * (dy.double() * x_hat).abs().sum(0)
    assert ((w.grad.double() - w64.grad).abs() <= dw_bound + EPS32).all()
    dx_bound = 4 * cols * EPS32 * (dy.double().abs() * w64.abs()).sum(-1, keepdim=True)
    assert ((x.grad.double() - x64.grad).abs() <= dx_bound).all()


def test_fused_add_norm_normalises_exactly_the_residual_it_returns():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(70, 96, generator=g).to(torch.bfloat16)
    r = torch.randn(70, 96, generator=g).to(torch.bfloat16)
    w = (1 + 0.1 * torch.randn(96, generator=g)).to(torch.bfloat16)
    y, h = rms_norm(x, w, residual=r)
    # The same kernel on the returned (rounded) residual: bit for bit the same,
    # since both normalise the same bf16 values with the same arithmetic.
    assert torch.equal(y, rms_norm(h, w))
    # And the residual is the sum rounded once: within half a bf16 ulp of the
    # exact sum (round to nearest on GPUs), or one ulp (the interpreter truncates).
    exact = x.double() + r.double()
    ulp = torch.finfo(torch.bfloat16).eps * exact.abs()
    assert ((h.double() - exact).abs() <= ulp).all()


def test_fused_add_norm_residual_is_the_exact_float32_sum():
    g = torch.Generator().manual_seed(2)
    x, r = torch.randn(40, 96, generator=g), torch.randn(40, 96, generator=g)
    _, h = rms_norm(x, torch.ones(96), residual=r)
    assert torch.equal(h, x + r)  # one fp32 add, the same in both


def test_fused_loss_with_context_parallel_is_refused():
    config = load_job_config(
        TINY_CONFIG, [*KERNELS_ON, "--parallelism.context_parallel_degree", "2",
                      "--parallelism.data_parallel_shard_degree", "1"]
    )
    try:
        check_job_config(config, 2, str(TINY_CONFIG))
    except ConfigError as e:
        message = str(e)
    else:
        raise AssertionError("context parallel with the fused loss was accepted")
    assert "context_parallel_degree" in message and "fused_linear_ce" in message
