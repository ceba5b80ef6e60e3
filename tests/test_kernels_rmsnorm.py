"""kernels.rms_norm: Triton RMSNorm (and fused residual add) against float64 PyTorch.

Runs on CPU through Triton's interpreter (``TRITON_INTERPRET=1``, set by
``tests/conftest.py`` before triton is imported). bf16 is checked by
``benchmarks/kernels.py`` on a GPU: the interpreter mishandles bf16 arithmetic.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels import rms_norm, rms_norm_reference

EPS = 1e-5
SHAPES = [(1, 8), (7, 37), (3, 5, 64), (4, 1000), (2, 4096)]
# Error bound relative to the largest reference value: fp32 to ~1e-6, fp16 to
# a few fp16 roundings.
TOL = {torch.float32: 2e-5, torch.float16: 4e-3}


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype) -> None:
    scale = expected.abs().max().clamp(min=1.0).item()
    torch.testing.assert_close(
        actual.double(), expected, rtol=0, atol=TOL[dtype] * scale
    )


def _inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(dtype).requires_grad_()
    w = (1 + 0.3 * torch.randn(shape[-1], generator=g)).to(dtype).requires_grad_()
    r = torch.randn(shape, generator=g).to(dtype).requires_grad_()
    return x, w, r


def _as_f64(*tensors):
    return [t.detach().double().requires_grad_() for t in tensors]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_backward_match_float64_reference(shape, dtype):
    x, w, _ = _inputs(shape, dtype)
    dy = torch.randn(shape).to(dtype)
    y = rms_norm(x, w, EPS)
    y.backward(dy)

    x64, w64 = _as_f64(x, w)
    y64 = rms_norm_reference(x64, w64, EPS)
    y64.backward(dy.double())

    assert y.dtype == dtype and y.shape == x.shape
    _assert_close(y, y64, dtype)
    _assert_close(x.grad, x64.grad, dtype)
    _assert_close(w.grad, w64.grad, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(7, 37), (3, 5, 64), (2, 4096)])
def test_fused_residual_matches_add_then_norm(shape, dtype):
    x, w, r = _inputs(shape, dtype, seed=1)
    dy, dh = torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)
    y, h = rms_norm(x, w, EPS, residual=r)
    torch.autograd.backward([y, h], [dy, dh])

    x64, w64, r64 = _as_f64(x, w, r)
    y64, h64 = rms_norm_reference(x64, w64, EPS, residual=r64)
    torch.autograd.backward([y64, h64], [dy.double(), dh.double()])

    _assert_close(y, y64, dtype)
    _assert_close(h, h64, dtype)
    for got, want in ((x, x64), (r, r64), (w, w64)):
        _assert_close(got.grad, want.grad, dtype)


def test_fused_residual_sum_is_rounded_like_eager_add():
    x, w, r = _inputs((5, 96), torch.float16, seed=2)
    y, h = rms_norm(x, w, EPS, residual=r)
    eager_h = x + r
    assert torch.equal(h, eager_h)
    _assert_close(y, rms_norm(eager_h, w, EPS).double(), torch.float16)


def test_matches_torch_rms_norm_in_float32():
    x, w, _ = _inputs((6, 256), torch.float32, seed=3)
    torch.testing.assert_close(rms_norm(x, w, EPS), F.rms_norm(x, (256,), w, EPS))


def test_non_contiguous_input():
    x, w, _ = _inputs((8, 64), torch.float32, seed=4)
    xt = x.detach().t().contiguous().t()[:, :48]  # strided rows
    torch.testing.assert_close(
        rms_norm(xt, w[:48].detach(), EPS),
        rms_norm_reference(xt, w[:48].detach(), EPS),
    )


def test_empty_input():
    x = torch.empty(0, 16, requires_grad=True)
    w = torch.ones(16, requires_grad=True)
    y = rms_norm(x, w, EPS)
    y.sum().backward()
    assert y.shape == (0, 16)
    assert torch.equal(w.grad, torch.zeros(16))


def test_opcheck_forward_ops():
    x, w, r = _inputs((3, 40), torch.float32, seed=5)
    torch.library.opcheck(torch.ops.swallow.rms_norm.default, (x, w, EPS))
    torch.library.opcheck(torch.ops.swallow.rms_norm_residual.default, (x, r, w, EPS))


def test_opcheck_backward_op():
    x, w, _ = _inputs((3, 40), torch.float32, seed=6)
    x, w = x.detach(), w.detach()
    _, rstd = torch.ops.swallow.rms_norm(x, w, EPS)
    dy = torch.randn(3, 40)
    op = torch.ops.swallow.rms_norm_backward.default
    torch.library.opcheck(op, (dy, x, w, rstd, None))
    torch.library.opcheck(op, (dy, x, w, rstd, torch.randn(3, 40)))


def test_compile_fullgraph_forward_and_backward():
    x, w, r = _inputs((4, 64), torch.float32, seed=7)

    def add_norm(x, w, r):
        y, h = rms_norm(x, w, EPS, residual=r)
        return rms_norm(y * h, w, EPS)

    compiled = torch.compile(add_norm, fullgraph=True)
    out = compiled(x, w, r)
    out.square().sum().backward()
    grads = [t.grad.clone() for t in (x, w, r)]
    for t in (x, w, r):
        t.grad = None
    eager = add_norm(x, w, r)
    eager.square().sum().backward()
    torch.testing.assert_close(out, eager)
    for got, t in zip(grads, (x, w, r)):
        torch.testing.assert_close(got, t.grad)


def test_weight_of_wrong_size_is_refused():
    with pytest.raises(ValueError, match="weight has shape"):
        rms_norm(torch.randn(2, 8), torch.ones(9))


def test_cpu_without_interpreter_is_refused_with_advice(monkeypatch):
    monkeypatch.setattr("kernels.runtime.INTERPRET", False)
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        rms_norm(torch.randn(2, 8), torch.ones(8))
