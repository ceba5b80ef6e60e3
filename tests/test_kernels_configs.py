"""Every GPU autotune config of every kernel computes the right numbers.

On a GPU the autotuner picks any config of the list, so each must be correct,
not only the interpreter's single one. Here each GPU config in turn is made the
kernel's only config and run under Triton's interpreter in fp32 against the
float64 reference, on odd shapes that exercise every loop and mask: more rows
than one program takes (and a last program with fewer), rows narrower than the
block, a vocabulary spanning several blocks with a partial last one. (num_warps
has no meaning under the interpreter; the sm_90 compile of every config is
checked in test_kernels_aot.py.)
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

from kernels import cross_entropy, rmsnorm
from kernels import fused_linear_cross_entropy, fused_linear_cross_entropy_reference
from kernels import rms_norm, rms_norm_reference


@contextmanager
def only_config(kernel, config):
    """Make ``config`` the autotuned ``kernel``'s only config for the block."""
    saved = kernel.configs
    kernel.configs = [config]
    kernel.cache.clear()
    try:
        yield
        # The autotuner records what it launched.
        assert kernel.best_config.kwargs == config.kwargs
    finally:
        kernel.configs = saved
        kernel.cache.clear()


def _name(config) -> str:
    return ",".join(f"{k}={v}" for k, v in config.kwargs.items()) + f",w{config.num_warps}"


def _close(actual, expected, rel=2e-5):
    # fp32 against float64: fp32 rounding relative to the largest value.
    scale = expected.abs().max().clamp(min=1.0).item()
    torch.testing.assert_close(actual.double(), expected, rtol=0, atol=rel * scale)


@pytest.mark.parametrize("config", rmsnorm.GPU_CONFIGS, ids=_name)
@pytest.mark.parametrize("residual", [False, True])
def test_every_rmsnorm_config_matches_float64(config, residual):
    # 19 rows: not a multiple of BLOCK_M; the backward's 4 programs take 5
    # rows each (the last 4), more than one BLOCK_M step. Width 37 < BLOCK_N 64.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(19, 37, generator=g).requires_grad_()
    r = torch.randn(19, 37, generator=g).requires_grad_() if residual else None
    w = (1 + 0.3 * torch.randn(37, generator=g)).requires_grad_()
    dy = torch.randn(19, 37, generator=g)
    with only_config(rmsnorm._rms_norm_fwd_kernel, config), only_config(
        rmsnorm._rms_norm_bwd_kernel, config
    ):
        out = rms_norm(x, w, 1e-5, residual=r)
        y = out[0] if residual else out
        (y * dy).sum().backward()

    x64, w64 = (t.detach().double().requires_grad_() for t in (x, w))
    r64 = r.detach().double().requires_grad_() if residual else None
    out64 = rms_norm_reference(x64, w64, 1e-5, residual=r64)
    y64 = out64[0] if residual else out64
    (y64 * dy.double()).sum().backward()
    _close(y, y64)
    _close(x.grad, x64.grad)
    _close(w.grad, w64.grad)
    if residual:
        _close(out[1], out64[1])
        _close(r.grad, r64.grad)


@pytest.mark.parametrize("config", cross_entropy.GPU_CONFIGS, ids=_name)
def test_every_cross_entropy_config_matches_float64(config):
    # Vocabulary 2 x 8192 + 3: two full blocks of the widest config and a
    # partial third (nine blocks of the narrowest).
    n, h, v = 5, 8, 2 * 8192 + 3
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(n, h, generator=g).requires_grad_()
    weight = (torch.randn(v, h, generator=g) / h**0.5 * 4).requires_grad_()
    targets = torch.tensor([3, -100, v - 1, 8192, 0])
    with only_config(cross_entropy._ce_rows_kernel, config):
        loss, z = fused_linear_cross_entropy(hidden, weight, targets, z_loss=1e-3)
        (loss * 0.5).backward()

    h64, w64 = (t.detach().double().requires_grad_() for t in (hidden, weight))
    ref, ref_z = fused_linear_cross_entropy_reference(h64, w64, targets, z_loss=1e-3)
    (ref * 0.5).backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z.double(), ref_z, rtol=1e-5, atol=1e-8)
    _close(hidden.grad, h64.grad, rel=1e-4)
    _close(weight.grad, w64.grad, rel=1e-4)
