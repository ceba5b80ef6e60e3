"""DTensor checks of the kernels, run by tests/test_kernels_dtensor.py under torchrun.

Two processes (gloo, CPU, Triton's interpreter). Each check compares the
kernels on DTensors with a single-process float64 reference or with PyTorch's
own module under the same parallel style; the script prints CHECKS PASSED.
"""

from __future__ import annotations

import os

import swallow_titan  # noqa: F401  (device selection)
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import SequenceParallel, parallelize_module

from kernels import fused_linear_cross_entropy, fused_linear_cross_entropy_reference
from kernels.rmsnorm import rms_norm
from swallow_titan.model.transformer import TritonRMSNorm


def close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(
        actual.double(), expected.double(), rtol=1e-5, atol=1e-5, msg=what
    )


def sequence_parallel_norm_matches_torch(mesh, rank: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 8, 32)
    attn = torch.randn(2, 8, 32)
    weight = torch.linspace(0.5, 1.5, 32)
    shard = slice(rank * 4, rank * 4 + 4)
    results = {}
    for cls in (nn.RMSNorm, TritonRMSNorm):
        norm = cls(32, eps=1e-5)
        with torch.no_grad():
            norm.weight.copy_(weight)
        parallelize_module(norm, mesh, SequenceParallel())
        x_local = x[:, shard].clone().requires_grad_()
        attn_local = attn[:, shard].clone().requires_grad_()
        if cls is TritonRMSNorm:
            # The fused variant, as FusedNormBlock calls it: a plain residual.
            y, h = norm(attn_local, residual=x_local)
        else:
            h = attn_local + x_local
            y = norm(h)
        h = h.to_local() if isinstance(h, DTensor) else h
        loss = (y.to_local() * torch.arange(32.0)).sum() + h.square().sum()
        loss.backward()
        g = norm.weight.grad
        assert isinstance(g, DTensor) and g.placements == (Partial(),), g.placements
        results[cls] = (y.to_local(), x_local.grad, attn_local.grad, g.full_tensor())
    for name, a, b in zip(
        ("y", "dx", "dattn", "dweight"), results[TritonRMSNorm], results[nn.RMSNorm]
    ):
        close(a, b, f"sequence parallel norm: {name}")


def sharded_norm_weight_is_refused(mesh) -> None:
    x = DTensor.from_local(torch.randn(2, 4, 8), mesh, [Shard(1)])
    weight = distribute_tensor(torch.ones(8), mesh, [Shard(0)])
    try:
        rms_norm(x, weight)
    except ValueError as e:
        assert "replicated" in str(e), e
    else:
        raise AssertionError("a sharded norm weight was accepted")


def vocab_parallel_loss_matches_reference(mesh) -> None:
    torch.manual_seed(1)
    vocab, hidden_dim = 11, 16  # uneven: 6 + 5 rows
    weight = torch.randn(vocab, hidden_dim)
    hidden = torch.randn(2, 5, hidden_dim)
    targets = torch.randint(0, vocab, (2, 5))
    targets[0, 0] = -100
    targets[1, 4] = vocab - 1

    w = nn.Parameter(distribute_tensor(weight, mesh, [Shard(0)]))
    h_local = hidden.clone().requires_grad_()
    h = DTensor.from_local(h_local, mesh, [Replicate()], run_check=False)
    loss, z = fused_linear_cross_entropy(h, w, targets, z_loss=1e-2)
    assert loss.placements == (Replicate(),)
    (loss * 0.5).backward()

    w64 = weight.double().requires_grad_()
    h64 = hidden.double().requires_grad_()
    ref_loss, ref_z = fused_linear_cross_entropy_reference(h64, w64, targets, z_loss=1e-2)
    (ref_loss * 0.5).backward()
    close(loss.to_local(), ref_loss.detach(), "vocab parallel: loss")
    close(z.to_local(), ref_z, "vocab parallel: z-loss")
    close(h_local.grad, h64.grad, "vocab parallel: d hidden")
    close(w.grad.full_tensor(), w64.grad, "vocab parallel: d weight")


def token_sharded_loss_matches_reference(mesh, rank: int) -> None:
    torch.manual_seed(2)
    weight = torch.randn(9, 8)
    hidden = torch.randn(6, 8)
    targets = torch.randint(0, 9, (6,))
    rows = slice(rank * 3, rank * 3 + 3)

    w = nn.Parameter(DTensor.from_local(weight.clone(), mesh, [Replicate()]))
    h_local = hidden[rows].clone().requires_grad_()
    h = DTensor.from_local(h_local, mesh, [Shard(0)])
    loss, _ = fused_linear_cross_entropy(h, w, targets[rows])
    assert loss.placements == (Partial(),)
    loss.full_tensor().backward()

    w64 = weight.double().requires_grad_()
    h64 = hidden.double().requires_grad_()
    ref_loss, _ = fused_linear_cross_entropy_reference(h64, w64, targets)
    ref_loss.backward()
    close(loss.full_tensor(), ref_loss.detach(), "token sharded: loss")
    close(h_local.grad, h64.grad[rows], "token sharded: d hidden")
    close(w.grad.full_tensor(), w64.grad, "token sharded: d weight")


def main() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (2,))
    sequence_parallel_norm_matches_torch(mesh, rank)
    sharded_norm_weight_is_refused(mesh)
    vocab_parallel_loss_matches_reference(mesh)
    token_sharded_loss_matches_reference(mesh, rank)
    dist.barrier()
    print(f"rank {rank}: CHECKS PASSED", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
