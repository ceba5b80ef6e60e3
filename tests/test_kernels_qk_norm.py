"""The Triton RMSNorm as Qwen3's per-head q/k norm: [batch, seq, heads, head_dim]
with a [head_dim] weight, against float64 PyTorch and torchtitan's qwen3 attention.

Runs under Triton's interpreter (``tests/conftest.py``); tiny shapes, but the
real head_dim of 128 (the width the head-dim autotune configs are for).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from kernels import rms_norm_heads, rms_norm_reference
from swallow_titan.model.transformer import TritonQKNorm, use_triton_qk_norms

EPS = 1e-6
# fp32 against float64: fp32 rounding; fp16 a few fp16 roundings (as
# tests/test_kernels_rmsnorm.py), relative to the largest reference value.
TOL = {torch.float32: 2e-5, torch.float16: 4e-3}


def _close(actual, expected, dtype):
    scale = expected.abs().max().clamp(min=1.0).item()
    torch.testing.assert_close(actual.double(), expected, rtol=0, atol=TOL[dtype] * scale)


def _heads(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(dtype).requires_grad_()
    w = (1 + 0.3 * torch.randn(shape[-1], generator=g)).to(dtype).requires_grad_()
    dy = torch.randn(shape, generator=g).to(dtype)
    return x, w, dy


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_per_head_norm_matches_float64_forward_and_backward(dtype):
    x, w, dy = _heads((2, 3, 4, 128), dtype)  # batch, seq, heads, head_dim
    y = rms_norm_heads(x, w, EPS)
    y.backward(dy)
    x64, w64 = (t.detach().double().requires_grad_() for t in (x, w))
    y64 = rms_norm_reference(x64, w64, EPS)
    y64.backward(dy.double())
    assert y.shape == x.shape and y.dtype == dtype
    _close(y, y64, dtype)
    _close(x.grad, x64.grad, dtype)
    # The weight gradient sums over every (token, head) row.
    _close(w.grad, w64.grad, dtype)


def test_each_head_is_normalised_on_its_own():
    x, w, _ = _heads((1, 2, 3, 128), torch.float32, seed=1)
    x = x.detach()
    x[:, :, 1] *= 1000.0  # one loud head must not change the others
    y = rms_norm_heads(x, w.detach(), EPS)
    quiet = rms_norm_heads(x[:, :, [0, 2]].contiguous(), w.detach(), EPS)
    torch.testing.assert_close(y[:, :, [0, 2]], quiet)


def test_heads_viewed_out_of_a_transposed_tensor():
    # [batch, heads, seq, head_dim] transposed: not contiguous.
    base, w, dy = _heads((2, 4, 3, 128), torch.float32, seed=2)
    x = base.transpose(1, 2)
    y = rms_norm_heads(x, w, EPS)
    y.backward(dy.transpose(1, 2))
    b64, w64 = (t.detach().double().requires_grad_() for t in (base, w))
    y64 = rms_norm_reference(b64.transpose(1, 2), w64, EPS)
    y64.backward(dy.double().transpose(1, 2))
    _close(y, y64, torch.float32)
    _close(base.grad, b64.grad, torch.float32)
    _close(w.grad, w64.grad, torch.float32)


@pytest.mark.parametrize(
    "x, w, message",
    [
        (torch.randn(3, 128), torch.ones(128), "batch, seq, heads, head_dim"),
        (torch.randn(1, 2, 3, 128), torch.ones(64), r"expected \(128,\)"),
    ],
)
def test_wrong_shapes_are_refused(x, w, message):
    with pytest.raises(ValueError, match=message):
        rms_norm_heads(x, w, EPS)


def _tiny_qwen3_attention():
    from torchtitan.models.qwen3.model.args import Qwen3ModelArgs
    from torchtitan.models.qwen3.model.model import Attention, precompute_rope_cache

    args = Qwen3ModelArgs(dim=64, n_heads=4, n_kv_heads=2, head_dim=128, max_seq_len=8)
    torch.manual_seed(0)
    attention = Attention(args)
    with torch.no_grad():
        attention.init_weights(0.02)
        # Norm weights away from 1, so a dropped weight would show.
        attention.q_norm.weight.add_(0.3 * torch.randn(128))
        attention.k_norm.weight.add_(0.3 * torch.randn(128))
    rope = precompute_rope_cache(args.head_dim, args.max_seq_len, args.rope_theta)
    return attention, rope


def test_qwen3_attention_with_triton_qk_norms_matches_eager():
    eager, rope = _tiny_qwen3_attention()
    triton_attn = copy.deepcopy(eager)
    use_triton_qk_norms(triton_attn)
    assert isinstance(triton_attn.q_norm, TritonQKNorm)
    assert isinstance(triton_attn.k_norm, TritonQKNorm)
    # Same parameter names (checkpoints, TP plans), same Parameter objects kept.
    assert [n for n, _ in triton_attn.named_parameters()] == [
        n for n, _ in eager.named_parameters()
    ]
    x = torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(3))
    out_e = eager(x, rope, None)
    out_t = triton_attn(x, rope, None)
    out_e.square().sum().backward()
    out_t.square().sum().backward()
    # Both fp32: the kernel and nn.RMSNorm differ by fp32 rounding only.
    torch.testing.assert_close(out_t, out_e, rtol=1e-5, atol=1e-6)
    grads_e = dict(eager.named_parameters())
    for name, p in triton_attn.named_parameters():
        torch.testing.assert_close(p.grad, grads_e[name].grad, rtol=1e-4, atol=1e-6,
                                   msg=name)


def test_the_swapped_norm_holds_the_original_parameter():
    attention, _ = _tiny_qwen3_attention()
    q_weight = attention.q_norm.weight
    use_triton_qk_norms(attention)
    assert attention.q_norm.weight is q_weight
    assert attention.q_norm.eps == EPS


def test_a_module_without_qk_norm_is_left_alone():
    module = nn.Module()
    module.q_norm = None
    module.k_norm = None
    use_triton_qk_norms(module)
    assert module.q_norm is None and module.k_norm is None
