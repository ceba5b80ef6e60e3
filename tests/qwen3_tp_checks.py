"""Qwen3 tensor parallelism at the layer level, run by tests/test_qwen3_moe.py under torchrun.

Two processes (gloo, CPU), two checks:

- Attention on DTensors: SDPA of query, key and value sharded on the heads
  (GQA, causal, as torchtitan's Qwen3 TP plan calls it) fails on CPU without
  our sharding rule for the CPU flash-attention kernel, and with it
  (``use_cpu_attention_sharding``) gives the unsharded output and gradients,
  kept sharded on the heads.
- MoE router gradient: torchtitan 0.2.2's MoE layer, parallelized with its
  own ``apply_moe_ep_tp`` over a TP mesh of 2 (experts split by hidden size,
  router replicated), gets the same input as an unsharded copy. The router
  gate's gradient must equal the unsharded one; without
  ``sum_router_gradients_over_tp`` it does not (upstream issue #2387).

Prints CHECKS PASSED.
"""

from __future__ import annotations

import copy

import swallow_titan  # noqa: F401  (device selection)
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torchtitan.models.llama4.infra.parallelize import apply_moe_ep_tp
from torchtitan.models.moe import MoE

from swallow_titan.model.parallelize import sum_router_gradients_over_tp
from swallow_titan.model.qwen3 import QWEN3_FLAVORS
from swallow_titan.runtime.seams import use_cpu_attention_sharding

DIM, SEQ = 128, 16


class Block(nn.Module):
    def __init__(self, moe: nn.Module):
        super().__init__()
        self.moe_enabled = True
        self.moe = moe


class Layers(nn.Module):
    """What apply_moe_ep_tp walks: ``.layers`` of blocks with ``.moe``."""

    def __init__(self, moe: nn.Module):
        super().__init__()
        self.layers = nn.ModuleDict({"0": Block(moe)})


def gate_gradient(moe: nn.Module, x: torch.Tensor, target: torch.Tensor, mesh, fix: bool) -> torch.Tensor:
    model = Layers(copy.deepcopy(moe))
    apply_moe_ep_tp(model, tp_mesh=mesh, ep_mesh=None, etp_mesh=None, ep_etp_mesh=None)
    if fix:
        sum_router_gradients_over_tp(model, mesh)
    rank = mesh.get_local_rank()
    half = SEQ // 2
    local_x = x[:, rank * half : (rank + 1) * half].clone()  # sequence-sharded input
    out = model.layers["0"].moe(local_x)
    local_out = out.to_local() if hasattr(out, "to_local") else out
    (local_out * target[:, rank * half : (rank + 1) * half]).sum().backward()
    grad = model.layers["0"].moe.router.gate.weight.grad
    return grad.to_local() if hasattr(grad, "to_local") else grad


def sharded_attention(q, k, v, mesh):
    """SDPA as torchtitan's Qwen3 attention calls it, on head-sharded DTensors."""
    q, k, v = (distribute_tensor(t, mesh, [Shard(1)]).requires_grad_() for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), (q, k, v)


def check_attention_on_dtensors(mesh) -> None:
    args = QWEN3_FLAVORS["tiny"]
    shapes = [(2, args.n_heads, SEQ, args.head_dim)] + [(2, args.n_kv_heads, SEQ, args.head_dim)] * 2
    q, k, v = (torch.randn(shape, dtype=torch.float64) for shape in shapes)
    try:
        sharded_attention(q, k, v, mesh)
    except NotImplementedError as e:
        assert "_scaled_dot_product_flash_attention_for_cpu" in str(e), e
    else:
        raise AssertionError(
            "torch now shards CPU flash attention on DTensors itself: "
            "use_cpu_attention_sharding can go"
        )
    assert use_cpu_attention_sharding() and not use_cpu_attention_sharding()  # once

    out, inputs = sharded_attention(q, k, v, mesh)
    assert isinstance(out, DTensor) and out.placements == (Shard(1),), out.placements
    grad_out = torch.randn(out.shape, dtype=torch.float64)
    out.backward(distribute_tensor(grad_out, mesh, [Shard(1)]))
    reference = [t.clone().requires_grad_() for t in (q, k, v)]
    expected = F.scaled_dot_product_attention(*reference, is_causal=True, enable_gqa=True)
    expected.backward(grad_out)
    # float64, one kernel on both sides: the same sums over the same keys.
    torch.testing.assert_close(out.full_tensor(), expected, rtol=1e-12, atol=1e-12)
    for sharded, plain in zip(inputs, reference):
        assert sharded.grad.placements == (Shard(1),), sharded.grad.placements
        torch.testing.assert_close(sharded.grad.full_tensor(), plain.grad, rtol=1e-12, atol=1e-12)


def main() -> None:
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    torch.manual_seed(0)
    check_attention_on_dtensors(mesh)
    args = QWEN3_FLAVORS["tiny_moe"]
    moe_args = copy.deepcopy(args.moe_args)
    moe_args.load_balance_coeff = None
    moe = MoE(moe_args, dim=DIM, hidden_dim=args.moe_inter_dim)
    with torch.no_grad():
        moe.init_weights(0.02, torch.device("cpu"))
    x = torch.randn(2, SEQ, DIM)
    target = torch.randn(2, SEQ, DIM)

    reference = copy.deepcopy(moe)
    (reference(x) * target).sum().backward()
    expected = reference.router.gate.weight.grad
    scale = expected.abs().max().item()

    fixed = gate_gradient(moe, x, target, mesh, fix=True)
    torch.testing.assert_close(fixed, expected, rtol=1e-5, atol=1e-6 * scale)
    stock = gate_gradient(moe, x, target, mesh, fix=False)
    assert (stock - expected).abs().max().item() > 1e-3 * scale, (
        "torchtitan's own TP router gradient is now right: the seam "
        "sum_router_gradients_over_tp can go"
    )
    print("CHECKS PASSED", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
