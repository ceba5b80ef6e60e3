"""MoE router gradient under tensor parallelism, run by tests/test_qwen3_moe.py under torchrun.

Two processes (gloo, CPU). torchtitan 0.2.2's MoE layer, parallelized with
its own ``apply_moe_ep_tp`` over a TP mesh of 2 (experts split by hidden
size, router replicated), gets the same input as an unsharded copy. The
router gate's gradient must equal the unsharded one; without
``sum_router_gradients_over_tp`` it does not (upstream issue #2387). Prints
CHECKS PASSED.
"""

from __future__ import annotations

import copy

import swallow_titan  # noqa: F401  (device selection)
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh
from torchtitan.models.llama4.infra.parallelize import apply_moe_ep_tp
from torchtitan.models.moe import MoE

from swallow_titan.model.parallelize import sum_router_gradients_over_tp
from swallow_titan.model.qwen3 import QWEN3_FLAVORS

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


def main() -> None:
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    torch.manual_seed(0)
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
