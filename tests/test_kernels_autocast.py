"""[kernels] under bf16 autocast without FSDP (one process, or DDP): torchtitan's AMP path.

There the parameters stay fp32 and torchtitan wraps the step in
``torch.autocast(dtype=bfloat16)``: the embedding's output (the residual stream)
is fp32 while attention returns bf16, and custom ops are invisible to autocast.
CPU autocast supports bf16, so this runs here, with the kernels under Triton's
interpreter (``tests/conftest.py``).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from support import TINY_CONFIG
from support.overrides import KERNELS_ON
from support.runs import run_training
from kernels import rms_norm, rms_norm_reference
from swallow_titan.config.manager import load_job_config
from swallow_titan.components.loss import SwallowLoss
from swallow_titan.model.args import FLAVORS
from swallow_titan.model.transformer import SwallowTransformer

# bf16 keeps 8 significant bits: rounding to it moves a value by at most this
# fraction of its magnitude.
BF16_U = 2.0**-8


class SwallowOps(TorchDispatchMode):
    """Records the swallow:: custom ops that run, with their arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "swallow":
            self.calls.append((func._opname, args))
        return func(*args, **(kwargs or {}))


def test_fused_add_norm_takes_an_fp32_residual_and_a_bf16_input():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 64, generator=g).bfloat16().requires_grad_()
    residual = torch.randn(5, 64, generator=g).requires_grad_()
    weight = (1 + 0.3 * torch.randn(64, generator=g)).requires_grad_()
    y, h = rms_norm(x, weight, 1e-5, residual=residual)
    (y * torch.linspace(-1, 1, 64)).sum().backward()

    # Eager semantics: x + residual is promoted to fp32, and so is its norm.
    assert y.dtype == h.dtype == torch.float32
    x64, r64, w64 = (t.detach().double().requires_grad_() for t in (x, residual, weight))
    y64, h64 = rms_norm_reference(x64, w64, 1e-5, residual=r64)
    (y64 * torch.linspace(-1, 1, 64).double()).sum().backward()
    # fp32 arithmetic on bf16-exact inputs: fp32 rounding only.
    torch.testing.assert_close(h.double(), h64, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
    # Each input gets the sum's gradient in its own dtype (bf16: one rounding).
    assert x.grad.dtype == torch.bfloat16 and residual.grad.dtype == torch.float32
    torch.testing.assert_close(residual.grad.double(), r64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        x.grad.double(), r64.grad, rtol=BF16_U, atol=1e-5
    )


def _models():
    args = replace(FLAVORS["tiny"], n_layers=2, max_seq_len=32)
    torch.manual_seed(0)
    plain = SwallowTransformer(args)
    with torch.no_grad():
        plain.init_weights()
    fused = SwallowTransformer(
        replace(args, rmsnorm_impl="triton", loss_impl="fused_linear_ce")
    )
    fused.load_state_dict(plain.state_dict())
    return plain, fused


def test_kernels_under_bf16_autocast_give_the_losses_of_the_eager_model():
    plain, fused = _models()
    loss_fn = SwallowLoss(load_job_config(TINY_CONFIG))
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, plain.vocab_size, (2, 16), generator=g)
    labels = torch.randint(0, plain.vocab_size, (2, 16), generator=g)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = plain(tokens)
        expected = loss_fn(logits, labels)
        with SwallowOps() as ops:
            loss = loss_fn(fused(tokens, labels=labels), labels)
    expected.backward()
    loss.backward()

    names = [name for name, _ in ops.calls]
    # The Triton path ran: both norms of each block (the second fused with the
    # residual add), the final norm, and the fused loss.
    assert names.count("rms_norm_residual") == 2 and names.count("rms_norm") == 3
    assert names.count("fused_linear_cross_entropy") == 1
    # The fused loss's GEMMs ran in autocast's dtype (its last argument).
    flce_args = next(a for n, a in ops.calls if n == "fused_linear_cross_entropy")
    assert flce_args[-1] == torch.bfloat16
    assert logits.dtype == torch.bfloat16

    # Both paths feed bf16 operands to the output GEMM; at worst they differ by
    # one bf16 rounding of each logit (u |logit|), which moves a token's
    # lse - logit[target] by at most 2 u max|logit|; the summed loss by N times that.
    bound = labels.numel() * 2 * BF16_U * logits.float().abs().max().item()
    assert abs(loss.item() - expected.item()) <= bound, (
        loss.item(), expected.item(), bound
    )
    # Gradients in fp32 parameters (cast once from the fp32 accumulation).
    grads = dict(plain.named_parameters())
    for name, p in fused.named_parameters():
        assert p.grad.dtype == torch.float32, name
        ref = grads[name].grad
        # Each side rounds the logit gradient to bf16 for its GEMMs (the
        # interpreter truncates: up to 2u; eager rounds: u) and the backward
        # GEMMs' other operands once more (u each): 8u covers these four.
        err = (p.grad - ref).norm().item()
        assert err <= 8 * BF16_U * ref.norm().item(), (name, err, ref.norm().item())


def test_one_process_bf16_training_with_kernels_matches_kernels_off(tmp_path):
    # One process: FSDP is off and torchtitan trains under bf16 autocast.
    common = [
        "--training.steps", "3",
        "--training.mixed_precision_param", "bfloat16",
        "--training.local_batch_size", "2",
        "--training.global_batch_size", "2",
    ]
    off = run_training(tmp_path / "off", *common).check()
    on = run_training(
        tmp_path / "on", *common, *KERNELS_ON,
        env={"TRITON_INTERPRET": "1"},
    ).check()
    assert "Mixed precision training is handled by AMP" in on.output
    assert "Triton kernels: rmsnorm = 'triton', loss = 'fused_linear_ce'" in on.output
    assert sorted(on.losses) == sorted(off.losses) == [1, 2, 3]
    for step, expected in off.losses.items():
        # Same weights and data; the paths differ by bf16 roundings of the
        # logits (see the model-level test): 2u max|logit| per token, and at
        # this size max|logit| stays below the mean loss (about ln(vocab)).
        assert abs(on.losses[step] - expected) <= 2 * BF16_U * expected, (
            step, on.losses, off.losses
        )
