"""kernels.fused_linear_cross_entropy against float64 PyTorch.

Runs on CPU through Triton's interpreter (``TRITON_INTERPRET=1``, set by
``tests/conftest.py``); bf16 is checked on a GPU by ``benchmarks/kernels.py``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels import fused_linear_cross_entropy, fused_linear_cross_entropy_reference

IGNORE = -100
LLAMA3_VOCAB = 128_256
# (tokens, hidden, vocab, tokens per chunk); 0 = the default chunk.
SHAPES = [
    (1, 8, 11, 0),
    (13, 24, 37, 0),
    (33, 64, 1000, 8),  # several chunks, the last one partial
    (5, 16, LLAMA3_VOCAB, 0),  # the real vocabulary, few tokens
]
# Error bound relative to the largest reference value (sums over up to 128k
# vocabulary entries in fp32; fp16 inputs are rounded at the start).
TOL = {torch.float32: 1e-4, torch.float16: 2e-3}


# Rounding of a value to the dtype, relative (half an ulp); fp32 GEMMs are
# covered by the fp32 tolerances.
UNIT_ROUNDOFF = {torch.float32: 0.0, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def _max_abs_logit(hidden, weight) -> float:
    return (hidden.detach().double() @ weight.detach().double().t()).abs().max().item()


def _max_abs_lse(hidden, weight) -> float:
    logits = hidden.detach().double() @ weight.detach().double().t()
    return torch.logsumexp(logits, dim=-1).abs().max().item()


def _inputs(n, h, v, dtype, seed=0, ignore_every=3):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) / h**0.5 * 4).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g)
    if ignore_every:
        targets[::ignore_every] = IGNORE
    return hidden, weight, targets


def _reference(hidden, weight, targets, z_loss=0.0, grad_scale=1.0):
    h64 = hidden.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    loss, z = fused_linear_cross_entropy_reference(h64, w64, targets, IGNORE, z_loss)
    (loss * grad_scale).backward()
    return loss, z, h64.grad, w64.grad


def _assert_close(actual, expected, dtype):
    scale = expected.abs().max().clamp(min=1.0).item()
    torch.testing.assert_close(actual.double(), expected, rtol=0, atol=TOL[dtype] * scale)


@pytest.mark.parametrize("z_loss", [0.0, 1e-4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_loss_and_gradients_match_float64_reference(shape, dtype, z_loss):
    n, h, v, chunk = shape
    hidden, weight, targets = _inputs(n, h, v, dtype)
    loss, z = fused_linear_cross_entropy(
        hidden, weight, targets, IGNORE, z_loss, chunk_tokens=chunk
    )
    # An upstream gradient other than 1, as the trainer's 1 / token count.
    (loss * 0.37).backward()
    ref_loss, ref_z, ref_dh, ref_dw = _reference(hidden, weight, targets, z_loss, 0.37)

    assert loss.dtype == torch.float32 and loss.shape == ()
    # The GEMMs run in the input dtype: on CPU (no out_dtype GEMM) each logit is
    # rounded to it, a relative error of at most u. lse and the target logit
    # move by at most u * max|logit| each, so a token's CE by twice that and
    # its z-term by z * 2 |lse| * u * max|logit| (to first order).
    u = UNIT_ROUNDOFF[dtype]
    counted = (targets != IGNORE).sum().item()
    logit_err = u * _max_abs_logit(hidden, weight)
    lse_max = _max_abs_lse(hidden, weight)
    torch.testing.assert_close(
        loss.double(), ref_loss.detach(), rtol=1e-5, atol=1e-5 + counted * 2 * logit_err
    )
    torch.testing.assert_close(
        z.double(), ref_z, rtol=1e-5,
        atol=1e-8 + z_loss * counted * 2 * (lse_max + logit_err) * logit_err,
    )
    assert hidden.grad.dtype == dtype and weight.grad.dtype == dtype
    _assert_close(hidden.grad, ref_dh, dtype)
    _assert_close(weight.grad, ref_dw, dtype)


def test_equals_torch_cross_entropy_sum_without_z_loss():
    hidden, weight, targets = _inputs(17, 32, 300, torch.float32, seed=1)
    loss, z = fused_linear_cross_entropy(hidden, weight, targets)
    expected = F.cross_entropy(
        hidden @ weight.t(), targets, reduction="sum", ignore_index=IGNORE
    )
    torch.testing.assert_close(loss, expected)
    assert z.item() == 0.0


def test_z_loss_is_coefficient_times_squared_logsumexp_of_counted_tokens():
    hidden, weight, targets = _inputs(9, 16, 50, torch.float32, seed=2)
    with torch.no_grad():
        loss, z = fused_linear_cross_entropy(hidden, weight, targets, z_loss=1e-2)
        plain, _ = fused_linear_cross_entropy(hidden, weight, targets)
    counted = targets != IGNORE
    lse = torch.logsumexp(hidden @ weight.t(), dim=-1)[counted]
    torch.testing.assert_close(z, 1e-2 * (lse**2).sum())
    torch.testing.assert_close(loss, plain + z)
    assert not z.requires_grad


def test_ignored_tokens_contribute_nothing():
    hidden, weight, targets = _inputs(12, 16, 40, torch.float32, seed=3, ignore_every=2)
    loss, _ = fused_linear_cross_entropy(hidden, weight, targets, z_loss=1e-3)
    loss.backward()
    counted = targets != IGNORE
    kept, _ = fused_linear_cross_entropy(
        hidden[counted].detach(), weight.detach(), targets[counted], z_loss=1e-3
    )
    torch.testing.assert_close(loss.detach(), kept)
    assert torch.all(hidden.grad[~counted] == 0)


def test_batch_with_every_target_ignored_gives_zero_loss_and_zero_gradients():
    hidden, weight, _ = _inputs(6, 16, 40, torch.float32, seed=4)
    targets = torch.full((6,), IGNORE)
    loss, z = fused_linear_cross_entropy(hidden, weight, targets, z_loss=1e-4)
    loss.backward()
    assert loss.item() == 0.0 and z.item() == 0.0
    assert torch.equal(hidden.grad, torch.zeros_like(hidden))
    assert torch.equal(weight.grad, torch.zeros_like(weight))


def test_chunk_size_does_not_change_results():
    results = []
    for chunk in (0, 1, 7):
        hidden, weight, targets = _inputs(20, 16, 90, torch.float32, seed=5)
        loss, _ = fused_linear_cross_entropy(hidden, weight, targets, chunk_tokens=chunk)
        loss.backward()
        results.append((loss.detach(), hidden.grad, weight.grad))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b)


def test_leading_dimensions_are_flattened():
    hidden, weight, targets = _inputs(12, 16, 30, torch.float32, seed=6)
    flat, _ = fused_linear_cross_entropy(hidden, weight, targets)
    batched, _ = fused_linear_cross_entropy(
        hidden.view(3, 4, 16), weight, targets.view(3, 4)
    )
    torch.testing.assert_close(flat, batched)


def test_frozen_weight_gets_no_gradient_and_hidden_still_does():
    hidden, weight, targets = _inputs(8, 16, 30, torch.float32, seed=7)
    weight.requires_grad_(False)
    loss, _ = fused_linear_cross_entropy(hidden, weight, targets)
    loss.backward()
    _, _, ref_dh, _ = _reference(hidden, weight, targets)
    _assert_close(hidden.grad, ref_dh, torch.float32)
    assert weight.grad is None


def test_forward_without_grad_computes_the_loss_only():
    hidden, weight, targets = _inputs(8, 16, 30, torch.float32, seed=8)
    with torch.no_grad():
        loss, _ = fused_linear_cross_entropy(hidden, weight, targets)
    ref_loss, _, _, _ = _reference(hidden, weight, targets)
    torch.testing.assert_close(loss.double(), ref_loss.detach())
    assert not loss.requires_grad


@pytest.mark.parametrize("grads", [(True, True), (True, False), (False, False)])
def test_opcheck(grads):
    hidden, weight, targets = _inputs(6, 8, 11, torch.float32, seed=9)
    # The op computes exactly the gradients its flags ask for.
    hidden.requires_grad_(grads[0])
    weight.requires_grad_(grads[1])
    args = (hidden, weight, targets, IGNORE, 1e-3, *grads, 4, 0, "", torch.float32)
    torch.library.opcheck(torch.ops.swallow.fused_linear_cross_entropy.default, args)


def test_compile_fullgraph_forward_and_backward_with_ignored_targets():
    # Liger's fused loss was wrong under torch.compile with ignore_index.
    hidden, weight, targets = _inputs(10, 16, 45, torch.float32, seed=10, ignore_every=2)

    def loss_fn(hidden, weight, targets):
        loss, _ = fused_linear_cross_entropy(hidden, weight, targets, z_loss=1e-3)
        return loss / (targets != IGNORE).sum()

    loss = torch.compile(loss_fn, fullgraph=True)(hidden, weight, targets)
    loss.backward()
    ref_loss, _, ref_dh, ref_dw = _reference(
        hidden, weight, targets, 1e-3, 1 / (targets != IGNORE).sum().item()
    )
    torch.testing.assert_close(
        loss.double(), ref_loss.detach() / (targets != IGNORE).sum()
    )
    _assert_close(hidden.grad, ref_dh, torch.float32)
    _assert_close(weight.grad, ref_dw, torch.float32)


def test_only_sum_reduction_is_offered():
    hidden, weight, targets = _inputs(4, 8, 10, torch.float32)
    with pytest.raises(ValueError, match="reduction must be 'sum'"):
        fused_linear_cross_entropy(hidden, weight, targets, reduction="mean")


def test_mismatched_targets_are_refused():
    hidden, weight, targets = _inputs(4, 8, 10, torch.float32)
    with pytest.raises(ValueError, match="3 targets for 4 tokens"):
        fused_linear_cross_entropy(hidden, weight, targets[:3])


def test_second_backward_through_one_forward_is_refused():
    # The precomputed gradients are scaled in place by the first backward.
    hidden, weight, targets = _inputs(4, 8, 10, torch.float32)
    loss, _ = fused_linear_cross_entropy(hidden, weight, targets)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()


def test_bf16_weight_gradient_error_does_not_grow_with_the_number_of_chunks():
    # The weight gradient is summed over token chunks in fp32 and rounded to
    # bf16 once; summed in bf16 instead, each chunk would add a rounding of the
    # running sum (error growing with the chunk count).
    hidden, weight, targets = _inputs(256, 32, 64, torch.bfloat16, seed=11, ignore_every=0)
    _, _, _, ref_dw = _reference(hidden, weight, targets)
    errors = {}
    for chunks in (1, 4, 16, 64):
        weight.grad = None
        loss, _ = fused_linear_cross_entropy(
            hidden, weight, targets, chunk_tokens=256 // chunks
        )
        loss.backward()
        assert weight.grad.dtype == torch.bfloat16
        errors[chunks] = ((weight.grad.double() - ref_dw).norm() / ref_dw.norm()).item()
    # The one-chunk error is the rounding of the logit gradient and of the
    # result to bf16; more chunks only reorder fp32 sums (relative ~1e-7).
    assert max(errors.values()) <= errors[1] * 1.05 + 1e-6, errors


def _bf16_operands(device):
    g = torch.Generator().manual_seed(12)
    h = torch.randn(24, 16, generator=g).bfloat16().to(device)
    w = torch.randn(40, 16, generator=g).bfloat16().to(device)
    dlogits = torch.randn(24, 40, generator=g).bfloat16().to(device)
    return h, w, dlogits


def test_without_out_dtype_gemms_logits_round_like_eager_and_weight_grad_stays_fp32():
    from kernels.cross_entropy import _add_weight_grad, _chunk_logits, out_dtype_gemm_available

    assert not out_dtype_gemm_available(torch.device("cpu"))  # CUDA-only in torch
    h, w, dlogits = _bf16_operands("cpu")
    # Fallback: logits rounded to bf16 by their GEMM, exactly eager's linear.
    assert torch.equal(_chunk_logits(h, w), torch.mm(h, w.t()).float())
    dw = torch.ones(40, 16)
    _add_weight_grad(dw, dlogits, h)
    # Products of bf16 values are exact in fp32: only fp32 summation error.
    exact = 1 + dlogits.t().double() @ h.double()
    torch.testing.assert_close(dw.double(), exact, rtol=1e-6, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="out_dtype GEMMs are CUDA-only")
def test_out_dtype_gemms_give_fp32_logits_and_fp32_weight_grad_on_cuda():
    from kernels.cross_entropy import _add_weight_grad, _chunk_logits, out_dtype_gemm_available

    device = torch.device("cuda")
    assert out_dtype_gemm_available(device)
    h, w, dlogits = _bf16_operands(device)
    exact = h.double() @ w.double().t()
    logits = _chunk_logits(h, w)
    assert logits.dtype == torch.float32
    # Not rounded to bf16: fp32 summation error only.
    torch.testing.assert_close(logits.double(), exact, rtol=1e-6, atol=1e-5)
    dw = torch.ones(40, 16, device=device)
    _add_weight_grad(dw, dlogits, h)
    torch.testing.assert_close(
        dw.double(), 1 + dlogits.t().double() @ h.double(), rtol=1e-6, atol=1e-5
    )
