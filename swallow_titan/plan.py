"""Check a config and print the run it describes, without training.

    python -m swallow_titan.plan CONFIG [--ngpu N] [--nnodes M] [--json] [--section.key value ...]

Prints parameter count, FLOPs per token, the parallel layout, batch sizes and
gradient accumulation, steps and tokens, the learning rate along the schedule,
the data mixture in tokens and an estimate of per-GPU memory. Structural
errors (unknown key, wrong type, impossible layout) stop it with a message
naming the file and key; files the config names but the disk lacks are listed
as problems after the plan, and make the exit status 1.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from typing import Any

import swallow_titan  # noqa: F401  (device selection before torchtitan loads)
import torch
from torchtitan.components.lr_scheduler import build_lr_schedulers

from kernels.cross_entropy import default_chunk_tokens

from swallow_titan.config.checks import (
    Layout,
    global_batch_sequences,
    grad_accum_steps,
    resolve_layout,
)
from swallow_titan.config.errors import ExitCode
from swallow_titan.config.manager import ConfigError, load_job_config
from swallow_titan.config.paths import RunPaths
from swallow_titan.config.sections import FUSED_LOSS
from swallow_titan.data.source_size import format_source_line, plan_sources
from swallow_titan.data.stages import plan_stages
from swallow_titan.runtime.device import add_process_arguments
from swallow_titan.eval.cost import estimate_eval_cost
from swallow_titan.model.family import LLAMA, family_of_args, is_moe
from swallow_titan.components.preflight import check_structure, file_problems, model_args

GIB = 1024**3

# Elements (x model width, in the mixed-precision dtype) that one block keeps
# per token for backward, by activation-checkpointing mode, at TP 1. Without
# AC a block keeps about 16 x dim for attention (norm, q/k/v, output, the
# residual) and 10 x ffn_dim for the SwiGLU MLP (see _block_kept). Full AC
# keeps only the block's input: 1 x dim (measured by `python -m
# swallow_titan.simulate`: 8,192 bytes per token per block for dim 4,096).
# Selective op-level AC (torchtitan's policy: the outputs of every second
# matmul and of attention) was measured at 55,296 bytes per token per block
# for the 8B recipe = 6.75 x dim in bf16: the block input, q, v, the attention
# output and the first FFN projection (1 + 1 + kv/heads + 1 + ffn/dim).
_KEPT_FULL_AC = 1.0
@dataclass
class MemoryEstimate:
    """Approximate per-GPU memory in GiB (the largest pipeline stage)."""

    parameters: float
    gradients: float
    optimizer: float
    gathered_params: float
    activations: float
    logits: float
    averaging: float = 0.0
    """The ``[averaging]`` copies: fp32, sharded like the parameters, one per kind."""

    @property
    def total(self) -> float:
        return sum(asdict(self).values())


@dataclass
class ModelCounts:
    """Parameters and training FLOPs per token of a model (torchtitan's conventions)."""

    params: int
    """Every parameter once (tied embeddings count once)."""
    active_params: int
    """Parameters one token uses: all but the experts it is not routed to."""
    embedding_params: int
    """The input embedding (also the output layer when tied)."""
    flops_per_token: int


def count_model(args: Any, seq_len: int) -> ModelCounts:
    """Parameter counts and FLOPs/token, on a meta-device model of ``args``' family.

    Llama: torchtitan's own count. Qwen3: counted here, as torchtitan's MoE
    count does (6 x active non-embedding parameters + 12 x layers x heads x
    head_dim x seq_len), except that with tied embeddings the output layer's
    matmul is counted: torchtitan 0.2.2 subtracts the (deduplicated) tied
    embedding from the parameters a second time and leaves the LM head out of
    the FLOPs.
    """
    family = family_of_args(args)
    with torch.device("meta"):
        model = family.model_cls(args)
    embedding = model.tok_embeddings.weight.numel()
    if family is LLAMA:
        params, flops = args.get_nparams_and_flops(model, seq_len)
        return ModelCounts(params, params, embedding, flops)
    params = experts = 0
    for name, p in model.named_parameters():  # a tied weight is listed once
        params += p.numel()
        if "moe.experts" in name:
            experts += p.numel()
    active = params
    if is_moe(args):
        active -= experts - experts * args.moe_args.top_k // args.moe_args.num_experts
    # The embedding lookup costs no FLOPs; a tied weight is also the LM head, which does.
    matmul_params = active - (0 if args.enable_weight_tying else embedding)
    flops = 6 * matmul_params + 12 * args.n_layers * args.n_heads * args.head_dim * seq_len
    return ModelCounts(params, active, embedding, flops)


def _block_sizes(args: Any, layout: Layout, ep: int) -> tuple[int, int, int]:
    """``(attention width, FFN width a token's activations have, FFN parameters
    FSDP gathers per block)`` of one block, for the memory estimate."""
    if family_of_args(args) is LLAMA:
        ffn = _ffn_dim(args)
        attention = int(4 * args.dim * args.dim * (1 + (args.n_kv_heads or args.n_heads) / args.n_heads) / 2)
        return attention, ffn, 3 * args.dim * ffn
    kv = args.n_kv_heads or args.n_heads
    attention = 2 * args.dim * args.head_dim * (args.n_heads + kv)
    if not is_moe(args):
        return attention, args.hidden_dim, 3 * args.dim * args.hidden_dim
    m = args.moe_args
    # Each token passes through top_k experts; EP splits the experts, and FSDP
    # gathers the experts of this EP rank only.
    return attention, m.top_k * args.moe_inter_dim, 3 * args.dim * args.moe_inter_dim * m.num_experts // ep


def _block_kept(args: Any, ffn: int, mode: str, tp: int) -> float:
    """Elements per token one block keeps for backward (x the compute dtype's bytes)."""
    if mode == "full":
        # The block's input only; sequence parallel shards it over TP.
        return _KEPT_FULL_AC * args.dim / tp
    if mode in ("selective", "memory_budget"):
        heads = args.n_heads
        head_dim = getattr(args, "head_dim", None) or args.dim // heads
        kv = args.n_kv_heads or heads
        # Block input, q, v, the attention output and the first FFN projection.
        kept = args.dim + 2 * heads * head_dim + kv * head_dim + ffn
        if tp == 1:
            return kept
        # Under TP (with sequence parallel) the simulation measured one more
        # width per token sharded over TP and one held at full size by every
        # TP rank (8B recipe: 4.86 x dim at TP 2, 1.94 at TP 8, this gives 4.88
        # and 1.97). Most likely the reduce-scatter outputs torchtitan's policy
        # saves and a sequence-gathered norm output; not traced further.
        return (kept + args.dim) / tp + args.dim
    # No AC: about 16 x dim for attention and 10 x ffn for the SwiGLU MLP.
    return (8 * args.dim + 5 * ffn) / tp


def estimate_memory(
    args: Any, config, layout: Layout, n_params: int
) -> MemoryEstimate:
    """Rough per-GPU memory at the peak of one training step for this layout.

    Parameters, gradients and AdamW's two moments are kept in the training
    dtype and sharded over FSDP, TP and PP. The peak (measured by ``python -m
    swallow_titan.simulate``, docs/simulate.md) is at the start of backward, in
    the output layer: every block's kept activations (by AC mode) are held, no
    block is being recomputed yet, FSDP holds the gathered output weight, and
    the loss has its logits' gradients folded into fp32 gradients of the output
    weight and of its input. Without the fused loss the logits are materialised
    in fp32 with two fp32 gradients at the peak. Each ``[averaging]`` kind (EMA,
    tail) adds an fp32 copy of the parameter shards.
    """
    bytes_param = 4 if config.training.dtype == "float32" else 2
    bytes_compute = 2 if config.training.mixed_precision_param == "bfloat16" else 4
    shards = layout.fsdp_shards * layout.tp * layout.pp
    per_gpu = n_params / shards
    attention, ffn, ffn_params = _block_sizes(args, layout, config.parallelism.expert_parallel_degree)
    block_params = attention + ffn_params
    vocab_local = args.vocab_size / layout.tp
    # FSDP gathers a block (and prefetches the next) in the mixed-precision
    # dtype; at the peak it holds the output layer's weight instead.
    gathered = max(2 * block_params / layout.tp, vocab_local * args.dim) * bytes_compute
    tokens = config.training.local_batch_size * config.training.seq_len / layout.cp
    layers = -(-args.n_layers // layout.pp)
    activations = tokens * layers * _block_kept(args, ffn, config.activation_checkpoint.mode, layout.tp) * bytes_compute
    if config.kernels.loss == FUSED_LOSS:
        # One chunk of fp32 logits and their gradients (kernels/cross_entropy.py)
        # at a time, in forward; in backward, at the peak, the output weight's
        # gradient: the fp32 accumulator the loss kept (4 bytes per element) and
        # 10 bytes per element of temporaries (it rounded to the gradient's dtype,
        # and FSDP's fp32 reduce-scatter copy; measured), plus the fp32 gradient
        # of the loss's input, kept and scaled (2 x 4 bytes per token x dim).
        gemm_dtype = torch.bfloat16 if bytes_compute == 2 else torch.float32
        chunk = min(tokens, default_chunk_tokens(int(vocab_local), gemm_dtype))
        chunk_bytes = chunk * vocab_local * (4 + bytes_compute)
        logits = vocab_local * args.dim * 4 + tokens * args.dim * 4
        logits += max(chunk_bytes, vocab_local * args.dim * 10 + tokens * args.dim * 4)
    else:
        # torchtitan's loss upcasts the logits and the trainer frees the bf16
        # ones before backward; at the peak (log-softmax's backward) it holds
        # the fp32 log-probabilities kept from forward and two fp32 gradients
        # (of the NLL and of the log-softmax): 12 bytes per logit, measured
        # 12.1 (Llama 8B) and 12.3 (Qwen3 8B) with the rest of the step's
        # non-block memory. The earlier 2 + 4 + 4 was 7.8% low for Llama and
        # 9% for Qwen3 (docs/simulate.md).
        logits = tokens * vocab_local * 12
    return MemoryEstimate(
        parameters=per_gpu * bytes_param / GIB,
        gradients=per_gpu * bytes_param / GIB,
        optimizer=per_gpu * 2 * bytes_param / GIB,
        gathered_params=gathered / GIB,
        activations=activations / GIB,
        logits=logits / GIB,
        averaging=per_gpu * 4 * len(averaging_kinds(config)) / GIB,
    )


def averaging_kinds(config) -> list[str]:
    """The ``[averaging]`` averages the run keeps ("ema", "tail")."""
    a = config.averaging
    return [kind for kind, on in (("ema", a.ema_decay > 0), ("tail", a.tail_steps > 0)) if on]


def _averaging_plan(config) -> dict:
    a = config.averaging
    return {
        "kinds": averaging_kinds(config),
        "ema_decay": a.ema_decay,
        # Steps over which the EMA's weights sum to 1 - 1/e.
        "ema_horizon_steps": round(1 / (1 - a.ema_decay)) if a.ema_decay > 0 else None,
        "tail_steps": a.tail_steps,
        "tail_every": a.tail_every or config.checkpoint.interval,
    }


def _averaging_line(plan: dict) -> str:
    if not plan["kinds"]:
        return "  averaging     off"
    parts = []
    if "ema" in plan["kinds"]:
        parts.append(
            f"EMA decay {plan['ema_decay']:g} (~{plan['ema_horizon_steps']:,}-step horizon)"
        )
    if "tail" in plan["kinds"]:
        parts.append(
            f"tail: mean of the last {plan['tail_steps']:,} steps before every "
            f"{plan['tail_every']:,}-th step and the last"
        )
    return (
        "  averaging     " + "; ".join(parts)
        + "; validated as val/<kind>/..., in checkpoints, written after the last step"
    )


@dataclass(frozen=True)
class StateBytes:
    """One rank's parameter, gradient and optimizer-state storage, in bytes."""

    params: int
    grads: int
    optimizer: int


# Which dimension of each weight torchtitan's llama3 tensor-parallel plan
# shards (column-wise: the output rows, dim 0; row-wise: the input columns,
# dim 1; the embedding's vocabulary rows); norms are replicated.
_TP_SHARD_DIM = {
    "tok_embeddings.weight": 0,
    "output.weight": 0,
    "attention.wq.weight": 0,
    "attention.wk.weight": 0,
    "attention.wv.weight": 0,
    "attention.wo.weight": 1,
    "feed_forward.w1.weight": 0,
    "feed_forward.w3.weight": 0,
    "feed_forward.w2.weight": 1,
}


def _chunk(size: int, parts: int, index: int) -> int:
    """Length of ``torch.chunk(size, parts)[index]`` (0 past the last chunk):
    how DTensor's Shard and FSDP2 split a dimension."""
    full = -(-size // parts)
    return max(0, min(size, full * (index + 1)) - full * index)


def sharded_state_bytes(config, world_size: int, rank: int, source: str = "<config>") -> StateBytes:
    """What ``rank`` holds of the parameters, gradients and AdamW state, by arithmetic.

    Each weight is first split by tensor parallel (:data:`_TP_SHARD_DIM`, DTensor's
    ``torch.chunk`` split), then FSDP2 splits the TP-local tensor's dim 0 over
    ``dp_shard x cp`` ranks and stores every shard padded to ``ceil(rows /
    shards)`` rows, so parameters and their gradients (reduce-scattered into the
    same padded layout) cost the padded size. AdamW's two moments are created
    like the unpadded local shard, plus one 4-byte step count per tensor.
    HSDP's replicas hold the same as their shard group. Either family (Llama,
    Qwen3 dense and MoE); expert parallelism splits the experts first (see
    below). Not modelled: pipeline parallel (the whole model is one stage) and
    tensor parallel of experts (ETP; Qwen3 TP needs a GPU).
    """
    layout = resolve_layout(config, world_size, source)
    args = model_args(config, source)
    with torch.device("meta"):
        model = family_of_args(args).model_cls(args)
    tp_rank = rank % layout.tp
    fsdp = layout.fsdp_shards
    fsdp_rank = (rank // layout.tp) % fsdp
    # Expert parallelism (torchtitan's sparse mesh: pp, dp_replicate, efsdp, ep,
    # etp, ep innermost): EP splits each MoE layer's experts (dim 0), then FSDP
    # shards them over the remaining "efsdp" ranks, on dim 1 when there are fewer
    # local experts than efsdp ranks (torchtitan's apply_fsdp).
    ep = config.parallelism.expert_parallel_degree if is_moe(args) else 1
    ep_rank = rank % ep
    efsdp = fsdp * layout.tp // ep
    efsdp_rank = (rank // ep) % efsdp
    p_bytes = 4 if config.training.dtype == "float32" else 2
    padded = unpadded = tensors = 0
    for name, param in model.named_parameters():  # a tied weight is listed once
        shape = list(param.shape)
        shards, index, dim = fsdp, fsdp_rank, 0
        if ep > 1 and ".moe.experts." in name:
            shape[0] = _chunk(shape[0], ep, ep_rank)
            shards, index = efsdp, efsdp_rank
            dim = 1 if efsdp * ep > args.moe_args.num_experts else 0
        elif layout.tp > 1:
            tp_dim = next((d for suffix, d in _TP_SHARD_DIM.items() if name.endswith(suffix)), None)
            if tp_dim is not None:
                shape[tp_dim] = _chunk(shape[tp_dim], layout.tp, tp_rank)
        rest = math.prod(shape) // shape[dim]
        if shards > 1:
            padded += -(-shape[dim] // shards) * rest
            unpadded += _chunk(shape[dim], shards, index) * rest
        else:
            padded += shape[dim] * rest
            unpadded += shape[dim] * rest
        tensors += 1
    return StateBytes(
        params=padded * p_bytes,
        grads=padded * p_bytes,
        optimizer=2 * unpadded * p_bytes + 4 * tensors,
    )


def _ffn_dim(args: Any) -> int:
    hidden = int(2 * 4 * args.dim / 3)
    if args.ffn_dim_multiplier is not None:
        hidden = int(args.ffn_dim_multiplier * hidden)
    return args.multiple_of * ((hidden + args.multiple_of - 1) // args.multiple_of)


def count_params_and_flops(args: Any, seq_len: int) -> tuple[int, int]:
    """Parameter count and FLOPs/token (see :func:`count_model`)."""
    counts = count_model(args, seq_len)
    return counts.params, counts.flops_per_token


def lr_at_steps(config, steps: list[int]) -> dict[int, float]:
    """The LR torchtitan's scheduler gives at each (1-based) step."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=config.optimizer.lr)
    schedulers = build_lr_schedulers(
        [optimizer], config.lr_scheduler, config.training.steps
    )
    factor = schedulers.schedulers[0].lr_lambdas[0]
    return {s: config.optimizer.lr * factor(s - 1) for s in steps}


def output_paths(config) -> dict[str, str]:
    """Where the run writes; "" for what the config switches off."""
    paths = RunPaths.of(config)
    return {
        "dump_folder": paths.dump_folder,
        "tensorboard": paths.tensorboard if config.metrics.enable_tensorboard else "",
        "checkpoints": paths.checkpoints if config.checkpoint.enable else "",
        "hf_export": paths.hf_exports if config.hf.export_at_end else "",
    }


def build_plan(
    config,
    ngpu: int,
    nnodes: int,
    source: str,
    gpu: str = "h200",
    simulated: dict | None = None,
) -> dict:
    """The plan as one JSON-able dict (raises ConfigError on structural errors).

    ``simulated`` is a :func:`swallow_titan.simulate.simulate` result as JSON;
    when given, the memory figure is the simulation's peak, else the formula's.
    """
    world_size = ngpu * nnodes
    layout = check_structure(config, world_size, source)
    args = model_args(config, source)
    seq_len = config.training.seq_len
    counts = count_model(args, seq_len)
    n_params, flops = counts.params, counts.flops_per_token
    accum = grad_accum_steps(config, layout, source)
    global_seqs = global_batch_sequences(config, layout)
    steps = config.training.steps
    warmup = config.lr_scheduler.warmup_steps
    stages = plan_stages(config.data.sources, config.data.stages, steps, global_seqs * seq_len)
    decay_start = None
    if config.lr_scheduler.decay_ratio is not None:
        # torchtitan's warmup-stable-decay: the first step after warm-up whose LR
        # is below the peak, read from the scheduler itself.
        every = lr_at_steps(config, list(range(1, steps + 1)))
        peak = max(every.values())
        decay_start = next(
            (s for s in range(max(warmup, 1) + 1, steps + 1) if every[s] < peak * (1 - 1e-9)),
            None,
        )
    marks = {1, max(warmup, 1), max((steps + 1) // 2, 1), steps}
    marks |= {s["first_step"] for s in stages}
    if decay_start is not None:
        marks.add(max(decay_start, 1))
    lr_points = lr_at_steps(config, sorted(marks))
    for stage in stages:
        stage["lr_at_first_step"] = lr_points[stage["first_step"]]
    total_tokens = steps * global_seqs * seq_len
    memory = estimate_memory(args, config, layout, n_params)
    planned = None
    if config.data.stages:
        planned = {s.name: sum(st["tokens"].get(s.name, 0) for st in stages)
                   for s in config.data.sources}
    sources = plan_sources(config, total_tokens, global_seqs, planned)
    opt = config.optimizer
    return {
        "config": source,
        "model": {
            "name": config.model.name,
            "family": family_of_args(args).label,
            "flavor": config.model.flavor,
        },
        "params": n_params,
        "params_active": counts.active_params,
        "params_non_embedding": n_params - counts.embedding_params,
        "flops_per_token": flops,
        "layout": {
            **asdict(layout),
            "dp": layout.dp,
            "ep": config.parallelism.expert_parallel_degree,
            "ngpu": ngpu,
            "nnodes": nnodes,
        },
        "local_batch_size": config.training.local_batch_size,
        "seq_len": seq_len,
        "grad_accum_steps": accum,
        "global_batch_sequences": global_seqs,
        "global_batch_tokens": global_seqs * seq_len,
        "steps": steps,
        "total_tokens": total_tokens,
        "lr": opt.lr,
        "min_lr": opt.lr * config.lr_scheduler.min_lr_factor,
        "warmup_steps": warmup,
        "lr_decay": config.lr_scheduler.decay_type,
        "lr_at_step": {str(k): v for k, v in lr_points.items()},
        "lr_decay_start_step": decay_start,
        "stages": stages if config.data.stages else [],
        "weight_decay": opt.weight_decay,
        "grad_clip": config.training.max_norm,
        "adam_betas": [opt.beta1, opt.beta2],
        "adam_eps": opt.eps,
        "optimizer": opt.name,
        "dtype": {
            "params": config.training.dtype,
            "compute": config.training.mixed_precision_param,
            "reduce": config.training.mixed_precision_reduce,
        },
        "compile": config.compile.enable,
        "float8": "quantize.linear.float8" in config.model.converters,
        "activation_checkpoint": config.activation_checkpoint.mode,
        "sources": sources,
        "validation": {
            "enable": config.validation.enable,
            "freq": config.validation.freq,
            "sets": [
                {"name": v.name, "sequences": v.sequences} for v in config.validation.sets
            ],
        },
        "eval": _eval_plan(config, global_seqs * seq_len),
        "averaging": _averaging_plan(config),
        "guard": _guard_plan(config, global_seqs * seq_len),
        "memory_gib": _memory_entry(memory, simulated),
        "gpu": _gpu_entry(gpu, simulated, memory),
        "outputs": output_paths(config),
        "problems": file_problems(config, source)
        + [f"{source}: {s['problem']}" for s in sources if s["problem"]],
    }


def _guard_plan(config, tokens_per_step: int) -> dict:
    """The [guard] settings, and what one spike rollback costs at most."""
    g = config.guard
    plan = {
        "on_nonfinite": g.on_nonfinite,
        "max_consecutive_skips": g.max_consecutive_skips,
        "on_spike": g.on_spike,
        "spike_metrics": list(g.spike_metrics),
        "spike_window": g.spike_window,
        "spike_threshold": g.spike_threshold,
        "max_rollbacks": g.max_rollbacks,
    }
    if g.on_spike == "rollback":
        # Back to the newest checkpoint: at most one interval of steps is
        # trained again and that many batches are skipped.
        interval = config.checkpoint.interval
        plan["rollback_at_most"] = {"steps_redone": interval,
                                    "tokens_skipped": interval * tokens_per_step}
    return plan


def _guard_lines(plan: dict) -> list[str]:
    nonfinite = (
        f"NaN/Inf {plan['on_nonfinite']}"
        + (f" (stop after {plan['max_consecutive_skips']} in a row)"
           if plan["on_nonfinite"] == "skip" else "")
    )
    if plan["on_spike"] == "off":
        return [f"  guard         {nonfinite}; spike detection off"]
    lines = [
        f"  guard         {nonfinite}; spikes: {plan['on_spike']} when "
        f"{' or '.join(plan['spike_metrics'])} > {plan['spike_threshold']:g} robust std "
        f"above the median of the last {plan['spike_window']} steps"
    ]
    cost = plan.get("rollback_at_most")
    if cost:
        lines.append(
            f"                a rollback redoes up to {cost['steps_redone']:,} steps and skips "
            f"up to {_tokens(cost['tokens_skipped'])} tokens (checkpoint.interval); "
            f"after {plan['max_rollbacks']} the next spike stops the run (exit status 6)"
        )
    return lines


def _memory_entry(memory: MemoryEstimate, simulated: dict | None) -> dict:
    entry = {**asdict(memory), "total": memory.total, "source": "formula"}
    if simulated is not None:
        entry["source"] = "simulated"
        entry["formula_total"] = memory.total
        entry["total"] = simulated["peak_bytes"] / GIB
        entry["simulated_parts"] = {k: v / GIB for k, v in simulated["peak_parts"].items() if v}
    return entry


def _gpu_entry(gpu: str, simulated: dict | None, memory: MemoryEstimate) -> dict:
    from swallow_titan.simulate import GPUS

    spec = GPUS[gpu]
    total = simulated["peak_bytes"] / GIB if simulated else memory.total
    return {
        "name": spec.name,
        "memory_gib": spec.memory_bytes / GIB,
        "fits": total <= spec.memory_bytes / GIB,
    }


def _eval_plan(config, tokens_per_step: int) -> dict:
    e = config.eval
    tasks = [t.strip() for t in e.tasks if t.strip()]
    plan = {
        "enable": e.enable,
        "freq": e.freq,
        "tasks": tasks,
        "include_path": e.include_path,
        "num_fewshot": e.num_fewshot,
        "limit": e.limit,
        "batch_size": e.batch_size,
    }
    if e.enable and e.freq >= 1:
        a = config.averaging
        plan["cost"] = estimate_eval_cost(
            tasks, e.limit, config.training.steps, e.freq, tokens_per_step,
            averages=int(a.ema_decay > 0) + int(a.tail_steps > 0),
        )
    return plan


def _eval_lines(plan: dict) -> list[str]:
    if not plan["enable"]:
        return ["  eval          off"]
    cost = plan["cost"]
    limit = plan["limit"]
    shown = "all" if limit <= 0 else (f"{limit:g} of each" if limit < 1 else f"{int(limit):,} per task")
    lines = [
        f"  eval          lm-eval every {plan['freq']:,} steps and at the end "
        f"({cost['evaluations']} evaluations"
        + (f", + {cost['average_evaluations']} of the [averaging] weights at the end"
           if cost["average_evaluations"] else "")
        + f"), examples: {shown}, few-shot: "
        + ("each task's" if plan["num_fewshot"] < 0 else str(plan["num_fewshot"])),
        "                tasks: " + ", ".join(plan["tasks"]),
        f"                cost ~{cost['share_of_training_pct']:.2f}% of training time "
        f"(~{cost['per_evaluation_training_steps']:.1f} training steps per evaluation; "
        "estimate: forward FLOPs at a fraction of training's MFU, see swallow_titan/eval/cost.py)",
    ]
    if cost["unestimated_tasks"]:
        lines.append("                not in the estimate: " + ", ".join(cost["unestimated_tasks"]))
    return lines


def _stage_lines(stages: list[dict]) -> list[str]:
    lines = ["  mixture stages"] if stages else []
    for stage in stages:
        tokens = ", ".join(f"{name} {_tokens(n)}" for name, n in stage["tokens"].items())
        lines.append(
            f"    {stage['name']:<16} steps {stage['first_step']:,}-{stage['last_step']:,} "
            f"(lr {stage['lr_at_first_step']:.3g} at its start): {tokens}"
        )
    return lines


def _validation_line(validation: dict) -> str:
    if not validation["enable"] or not validation["sets"]:
        return "  validation    off"
    sets = ", ".join(f"{v['name']} ({v['sequences']:,} seq)" for v in validation["sets"])
    return f"  validation    every {validation['freq']:,} steps: {sets}"


def format_plan(plan: dict) -> str:
    L = plan["layout"]
    m = plan["memory_gib"]
    lines = [
        f"plan of {plan['config']}",
        f"  model         {plan['model']['family']} {plan['model']['flavor']}: "
        f"{plan['params']:,} parameters"
        + (", " if plan["params_active"] != plan["params"] else " ")
        + (
            f"{plan['params_active']:,} active per token "
            if plan["params_active"] != plan["params"]
            else ""
        )
        + f"({plan['params_non_embedding']:,} without the embedding), "
        f"{plan['flops_per_token'] / 1e9:.2f} GFLOP/token",
        f"  layout        {L['nnodes']} node(s) x {L['ngpu']} = {L['world_size']} ranks: "
        f"dp_replicate {L['dp_replicate']} x dp_shard {L['dp_shard']} x cp {L['cp']} x "
        f"tp {L['tp']} x pp {L['pp']}"
        + (f"; experts split over ep {L['ep']} of the dp_shard ranks" if L["ep"] > 1 else ""),
        f"  batch         local {plan['local_batch_size']} x dp {L['dp']} x grad-accum "
        f"{plan['grad_accum_steps']} = {plan['global_batch_sequences']:,} sequences x "
        f"{plan['seq_len']:,} = {plan['global_batch_tokens']:,} tokens/step",
        f"  run           {plan['steps']:,} steps = {plan['total_tokens']:,} tokens "
        f"({_tokens(plan['total_tokens'])})",
        f"  optimizer     {plan['optimizer']} lr {plan['lr']:g} -> min {plan['min_lr']:g}, "
        f"warm-up {plan['warmup_steps']:,} steps, {plan['lr_decay']} decay, betas "
        f"{tuple(plan['adam_betas'])}, eps {plan['adam_eps']:g}, weight decay "
        f"{plan['weight_decay']:g}, clip {plan['grad_clip']:g}",
        "  lr            "
        + ", ".join(f"step {k}: {v:.3g}" for k, v in plan["lr_at_step"].items())
        + (
            f"; decay (lr_scheduler.decay_ratio) from step {plan['lr_decay_start_step']:,}"
            if plan["lr_decay_start_step"] is not None
            else ""
        ),
        f"  precision     params {plan['dtype']['params']}, compute "
        f"{plan['dtype']['compute']}, reduce {plan['dtype']['reduce']}; float8 "
        f"{'on' if plan['float8'] else 'off'}; compile "
        f"{'on' if plan['compile'] else 'off'}; AC {plan['activation_checkpoint']}",
        "  data mixture",
        *(format_source_line(s, _tokens) for s in plan["sources"]),
        *_stage_lines(plan["stages"]),
        _validation_line(plan["validation"]),
        *_eval_lines(plan["eval"]),
        _averaging_line(plan["averaging"]),
        *_guard_lines(plan["guard"]),
        _memory_line(m),
        *_gpu_lines(plan["gpu"]),
        *output_lines(plan["outputs"]),
    ]
    if plan["problems"]:
        lines.append("problems (the run will not start until they are fixed):")
        lines.extend(f"  - {p}" for p in plan["problems"])
    return "\n".join(lines)


def _memory_line(m: dict) -> str:
    if m["source"] == "simulated":
        parts = ", ".join(
            f"{k} {v:.1f}" for k, v in sorted(m["simulated_parts"].items(), key=lambda kv: -kv[1])
        )
        return (
            f"  memory/GPU    {m['total']:.1f} GiB peak (simulated, rank 0, "
            f"python -m swallow_titan.simulate): {parts}; the formula says "
            f"~{m['formula_total']:.1f}"
            + (f"; [averaging] adds {m['averaging']:.1f} (not simulated)" if m["averaging"] else "")
        )
    return (
        f"  memory/GPU    ~{m['total']:.1f} GiB (formula; --simulate measures it): params "
        f"{m['parameters']:.1f}, grads {m['gradients']:.1f}, optimizer {m['optimizer']:.1f}, "
        f"gathered params {m['gathered_params']:.1f}, activations {m['activations']:.1f}, "
        f"logits {m['logits']:.1f}"
        + (f", averages {m['averaging']:.1f}" if m["averaging"] else "")
    )


def _gpu_lines(gpu: dict) -> list[str]:
    if gpu["fits"]:
        return [f"  gpu           fits {gpu['name']} ({gpu['memory_gib']:.1f} GiB)"]
    return [
        f"  gpu           WARNING: exceeds {gpu['name']} ({gpu['memory_gib']:.1f} GiB): "
        "lower training.local_batch_size (more gradient accumulation), use "
        "activation_checkpoint.mode = \"full\", or more GPUs"
    ]


def _tokens(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def output_lines(outputs: dict[str, str]) -> list[str]:
    return [
        f"  outputs       {outputs['dump_folder']}",
        f"  tensorboard   {outputs['tensorboard'] or 'off'}"
        + (f"  (tensorboard --logdir {outputs['tensorboard']})" if outputs["tensorboard"] else ""),
        f"  checkpoints   {outputs['checkpoints'] or 'off'}",
        f"  hf export     {outputs.get('hf_export') or 'off'}",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m swallow_titan.plan", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("config", help="TOML config file")
    add_process_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--gpu", choices=("h100", "h200"), default="h200",
        help="GPU whose memory the plan checks against (default h200)",
    )
    parser.add_argument(
        "--simulate",
        action="store_true",
        help="measure memory with python -m swallow_titan.simulate (1 and 2 blocks, "
        "extrapolated; a few CPU minutes) instead of the formula",
    )
    parser.add_argument(
        "--outputs",
        action="store_true",
        help="print only where logs and checkpoints go (used by run_train.sh)",
    )
    args, overrides = parser.parse_known_args(argv)
    try:
        config = load_job_config(args.config, overrides)
        simulated = None
        if args.simulate:
            from swallow_titan.simulate import SimulationOptions, simulate

            opts = SimulationOptions(ngpu=args.ngpu, nnodes=args.nnodes, gpu=args.gpu, layers=(1, 2))
            simulated = simulate(config, opts, args.config).to_json()
        plan = build_plan(config, args.ngpu, args.nnodes, args.config, args.gpu, simulated)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return ExitCode.BAD_INPUT
    if args.json:
        print(json.dumps(plan, indent=2))
    elif args.outputs:
        print("\n".join(output_lines(plan["outputs"])))
        for problem in plan["problems"]:
            print(f"config error: {problem}", file=sys.stderr)
    else:
        print(format_plan(plan))
    return ExitCode.PROBLEMS if plan["problems"] else ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
