"""Apply torchtitan's parallelisms to the model, plus what CPU training needs.

Each model family uses torchtitan's own recipe (``parallelize_llama``,
``parallelize_qwen3``). torchtitan's ``parallelize_llama`` applies tensor parallel, activation
checkpointing, torch.compile and FSDP2/HSDP as the TOML asks. It also sets
FSDP's gradient divide factor to 1 (the loss is already normalised by the
global token count), and FSDP then reduces gradients with
``ReduceOp.PREMUL_SUM(1.0)``, which gloo lacks. With a divide factor of 1 a
plain SUM is the same arithmetic, so on gloo we force SUM.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.fsdp import FSDPModule
from torchtitan.distributed import ParallelDims
from torchtitan.models.llama3.infra.parallelize import parallelize_llama
from torchtitan.models.qwen3 import parallelize_qwen3
from torchtitan.tools.logging import logger
from torchtitan.tools.utils import device_type

from swallow_titan.runtime.seams import use_cpu_attention_sharding, use_cpu_expert_permutation


def uses_gloo() -> bool:
    return (
        torch.distributed.is_initialized()
        and torch.distributed.get_backend() == "gloo"
    )


def force_sum_reduction(model: nn.Module) -> int:
    """Make every FSDP module reduce gradients with SUM; returns how many."""
    count = 0
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_force_sum_reduction_for_comms(True)
            count += 1
    return count


def parallelize_swallow(
    model: nn.Module, parallel_dims: ParallelDims, job_config
) -> nn.Module:
    """TrainSpec ``parallelize_fn``: torchtitan's llama3 recipe, gloo-safe."""
    model = parallelize_llama(model, parallel_dims, job_config)
    if parallel_dims.fsdp_enabled and uses_gloo():
        force_sum_reduction(model)
    return model


class _SumGradientOverGroup(torch.autograd.Function):
    """Identity whose backward all-reduces (sums) the gradient over a process group."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


def sum_router_gradients_over_tp(model: nn.Module, tp_mesh) -> int:
    """Make every MoE router's gradient the sum over the tensor-parallel ranks.

    torchtitan 0.2.2 replicates the router gate over TP (``NoParallel``) and
    returns its output as a local tensor marked replicated; but each TP rank
    computes only part of the gradient of the routing scores (its experts'
    shard, or its share of the tokens), so the gate's gradient is never summed
    and the gate drifts apart on the TP ranks. Upstream fixed this in
    NoParallel's output (``to_local(grad_placements=(Partial(),))``, torchtitan
    issue #2387 / PR #2416; the "TP gradients below the experts" class of
    PR #4054). Here a forward hook on each gate, run after torchtitan's, sums
    the gradient of its local output over the TP group, which is what that
    Partial placement makes DTensor do. Returns how many gates it hooked.
    """
    group = tp_mesh.get_group()
    count = 0
    for block in model.layers.values():
        if getattr(block, "moe_enabled", False):
            block.moe.router.gate.register_forward_hook(
                lambda module, inputs, output: _SumGradientOverGroup.apply(output, group)
            )
            count += 1
    return count


def replicate_positions_over_tp(model: nn.Module, tp_mesh) -> int:
    """Hand per-document positions to the attention as a replicated DTensor.

    torchtitan 0.2.2's Qwen3 TP plan makes the attention's RoPE cache a
    replicated DTensor but leaves ``positions`` (``data.reset_position_ids``)
    a plain tensor unless context parallel is on, and the RoPE lookup then
    mixes the two and fails. Every TP rank reads the same batch, so the
    positions are the same on each: a forward pre-hook on each attention,
    run after torchtitan's input preparation, wraps them as ``Replicate()``,
    as torchtitan's plan does under context parallel. Returns how many
    attention modules it hooked.
    """
    from torch.distributed.tensor import DTensor, Replicate

    def wrap(module: nn.Module, args: tuple) -> tuple | None:
        if len(args) < 4 or args[3] is None or isinstance(args[3], DTensor):
            return None
        positions = DTensor.from_local(args[3], tp_mesh, [Replicate()], run_check=False)
        return (*args[:3], positions, *args[4:])

    for block in model.layers.values():
        block.attention.register_forward_pre_hook(wrap)
    return len(model.layers)


def _detach_tied_ends(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """Take the tied embedding and output layer out of the model (see below)."""
    ends = (model.tok_embeddings, model.output)
    model.tok_embeddings = None
    model.output = None
    return ends


def _shard_tied_ends(
    model: nn.Module, ends: tuple[nn.Module, nn.Module], parallel_dims: ParallelDims, job_config
) -> None:
    """Put the tied embedding and output layer back, as one FSDP group.

    torchtitan 0.2.2's FSDP recipe for Qwen3 (llama4's ``apply_fsdp``) shards
    ``tok_embeddings`` and ``[norm, output]`` as two groups, which FSDP2 refuses
    when the two share their weight (the tied 0.6B-4B models). They are taken
    out while torchtitan shards the rest and then sharded together, with the
    same mesh, mixed precision and (summed) gradient reduction.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torchtitan.config import TORCH_DTYPE_MAP

    embeddings, output = ends
    model.tok_embeddings, model.output = embeddings, output
    output.weight = embeddings.weight
    names = ["dp_replicate", "fsdp"] if parallel_dims.dp_replicate_enabled else ["fsdp"]
    training = job_config.training
    fully_shard(
        [embeddings, output],
        mesh=parallel_dims.get_mesh(names),
        mp_policy=MixedPrecisionPolicy(
            param_dtype=TORCH_DTYPE_MAP[training.mixed_precision_param],
            reduce_dtype=TORCH_DTYPE_MAP[training.mixed_precision_reduce],
        ),
    )
    # As torchtitan's groups: the loss is already normalised by the global token count.
    embeddings.set_gradient_divide_factor(1.0)


# Logged when Qwen3 tensor parallelism runs on CPU (tests look for it).
CPU_ATTENTION_SHARDING_MESSAGE = (
    "Tensor parallel attention on CPU: DTensor sharding rule for the CPU flash-attention "
    "kernel in use (heads sharded)"
)


def parallelize_swallow_qwen3(
    model: nn.Module, parallel_dims: ParallelDims, job_config
) -> nn.Module:
    """TrainSpec ``parallelize_fn`` of Qwen3: torchtitan's qwen3 recipe (TP, EP,
    AC, compile, FSDP2), gloo-safe, with the MoE router's TP gradient summed
    (:func:`sum_router_gradients_over_tp`) and, on CPU, a DTensor rule for the
    CPU attention kernel (:func:`~swallow_titan.runtime.seams.use_cpu_attention_sharding`)."""
    if parallel_dims.ep_enabled and device_type == "cpu":
        use_cpu_expert_permutation()
    if parallel_dims.tp_enabled and device_type == "cpu":
        # torchtitan's Qwen3 TP plan runs SDPA on DTensors (Llama's hands it local tensors).
        use_cpu_attention_sharding()
        logger.info(CPU_ATTENTION_SHARDING_MESSAGE)
    tied = parallel_dims.fsdp_enabled and model.model_args.enable_weight_tying
    ends = _detach_tied_ends(model) if tied else None
    model = parallelize_qwen3(model, parallel_dims, job_config)
    if ends is not None:
        _shard_tied_ends(model, ends, parallel_dims, job_config)
    if parallel_dims.tp_enabled:
        replicate_positions_over_tp(model, parallel_dims.get_mesh("tp"))
        sum_router_gradients_over_tp(model, parallel_dims.get_mesh("tp"))
    if parallel_dims.fsdp_enabled and uses_gloo():
        force_sum_reduction(model)
    return model
