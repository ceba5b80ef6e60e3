"""Simulate a config at its real world size in one CPU process, before a GPU is spent.

    python -m swallow_titan.simulate CONFIG [--ngpu N] [--nnodes M] [--rank R] [--json]
        [--steps S] [--gpu h100|h200] [--mfu F] [--nvlink-gbps B] [--internode-tbps B]
        [--section.key value ...]

Builds swallow-titan's own trainer (:class:`~swallow_titan.trainer.SwallowTrainer`:
the TrainSpec of the config's family -- Llama's ``swallow`` or Qwen3's
``swallow_qwen3``, dense or MoE -- with its model, flavor, converters,
parallelize, loss, optimizer and LR schedule) on a fake process group of ``ngpu x nnodes`` ranks
(torch's ``fake`` backend: collectives return at once and move no data) under
``FakeTensorMode`` (tensors carry shape, dtype and device but no storage), and
runs ``SwallowTrainer.train_step`` -- every microbatch of gradient accumulation,
clipping, the guard's all-reduce, the optimizer and the LR step -- for
``--steps`` steps as simulated rank ``--rank``. Memory is tracked with torch's
``FSDPMemTracker`` (every storage allocated and freed, by kind); collectives
are recorded as they are issued, per mesh dimension.

What is not the GPU's (listed in the output as stand-ins):

- The device type is the CPU's: torch built without CUDA cannot run backward on
  fake CUDA tensors (its autograd engine asks for a CUDA device guard).
  Attention runs as scaled-dot-product attention on the CPU's flash kernel,
  which keeps the same tensors for backward as FlexAttention (q, k, v, output,
  log-sum-exp); the fused AdamW is the CPU's fused kernel (same state).
- ``torch.compile`` is off (eager), as in torchtitan's own estimator.
- float8 is torchao's emulated float8 (``emulate = true``): the same float8
  casts, scales and FSDP float8 all-gather; the matmul upcasts instead of
  calling ``_scaled_mm``.
- MoE routing is balanced round-robin (``debug.moe_force_load_balance``): the
  experts' token counts are data a fake tensor cannot know; see
  :func:`balanced_counts` and :class:`KnownExpertCounts`. The experts run
  torchtitan's per-expert loop (no grouped GEMM on CPU).
- Data are random token ids (no files are read); the tokenizer is a stand-in
  that only knows the end-of-text id. Checkpoints, validation, [eval], logging
  and TensorBoard are off: they do not run inside a training step.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterator

import swallow_titan  # noqa: F401  (device selection before torchtitan loads)
import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
from torch.distributed._tools.mem_tracker import MemTracker
from torch.distributed.fsdp import FSDPModule
from torch.fx.experimental.symbolic_shapes import ShapeEnv
from torch.testing._internal.distributed.fake_pg import FakeStore
from torch.utils._python_dispatch import TorchDispatchMode
from torchtitan.components.dataloader import BaseDataLoader
from torchtitan.protocols.train_spec import get_train_spec, register_train_spec
from torchtitan.tools.logging import init_logger, logger

import swallow_titan.train_spec  # noqa: F401  (registers the "swallow" TrainSpec)
from swallow_titan.data.dataloader import LabelsInInputs
from swallow_titan.components.preflight import check_structure, model_args
from swallow_titan.config.checks import Layout, grad_accum_steps
from swallow_titan.config.errors import ConfigError, ExitCode
from swallow_titan.config.manager import load_job_config
from swallow_titan.config.sections import FUSED_LOSS, MODEL_NAME, QWEN3_MODEL_NAME
from swallow_titan.runtime.device import add_process_arguments
from swallow_titan.runtime.seams import (
    disable_dispatch_modes,
    dtensor_propagation_in_own_fake_mode,
)
from swallow_titan.model.family import family_of_config, is_moe
from swallow_titan.model.qwen3 import SwallowQwen3Model
from swallow_titan.model.transformer import SwallowTransformer
from swallow_titan.trainer import SwallowTrainer

GIB = 1024**3

# The TrainSpec the simulation registers: the "swallow" spec with the data and
# tokenizer replaced by stand-ins (nothing else differs).
SIMULATED_MODEL_NAME = "swallow_simulated"

FLOAT8_CONVERTER = "quantize.linear.float8"


@dataclass(frozen=True)
class GpuSpec:
    """What the report compares against: memory, dense bf16 peak, links."""

    name: str
    memory_bytes: int
    bf16_tflops: float
    nvlink_gbps: float
    """Per GPU, one direction, in GB/s."""


GPUS: dict[str, GpuSpec] = {
    # NVIDIA H100 SXM5 80 GB / H200 SXM 141 GB: 989 dense bf16 TFLOP/s, NVLink 4
    # at 900 GB/s both directions together (450 GB/s each way).
    "h100": GpuSpec("H100 80GB", 80 * 10**9, 989.0, 450.0),
    "h200": GpuSpec("H200 141GB", 141 * 10**9, 989.0, 450.0),
}


@dataclass(frozen=True)
class SimulationOptions:
    """The simulated machine and how the report judges it."""

    ngpu: int = 8
    nnodes: int = 1
    rank: int = 0
    steps: int = 2
    gpu: str = "h200"
    mfu: float = 0.4
    """Model FLOPs utilisation assumed for compute time."""
    nvlink_gbps: float | None = None
    """Per GPU, one direction (default: the GPU's)."""
    internode_tbps: float = 3.2
    """Per node, one direction, in Tb/s (8 x 400 Gb/s NICs on an H200 node)."""
    layers: tuple[int, int] | None = None
    """Simulate these two block counts and extrapolate to the flavor's."""
    microbatches: int | None = 2
    """Simulate at most this many microbatches per step (None: all of them)."""
    real: bool = False
    """Run with real tensors instead (to check the simulation): on torchrun's
    process group when there is one, else on a fake one in this process."""

    @property
    def world_size(self) -> int:
        return self.ngpu * self.nnodes


# ---------------------------------------------------------------- stand-ins


class StandInTokenizer:
    """What the trainer asks of a tokenizer in a step: the end-of-text id
    (FlexAttention's block-causal mask splits documents at it)."""

    def __init__(self, vocab_size: int) -> None:
        self.eos_id = vocab_size - 1
        self.bos_id = vocab_size - 2
        self.vocab_size = vocab_size

    def get_vocab_size(self) -> int:
        return self.vocab_size


class RandomTokens(BaseDataLoader):
    """Microbatches of random token ids shaped as the data pipeline's.

    ``{"input": [b, s], ("positions": [b, s])}, labels [b, s]`` as
    :mod:`swallow_titan.data.dataloader` yields them (positions when
    ``data.reset_position_ids``). Created inside the fake mode, so they are fake.
    """

    def __init__(self, batch: int, seq_len: int, vocab: int, positions: bool) -> None:
        self.batch, self.seq_len, self.vocab, self.positions = batch, seq_len, vocab, positions

    @property
    def microbatch_bytes(self) -> int:
        """Storage of one microbatch: int64 tokens (inputs and labels are views of
        them) and positions, ``[b, s + 1]`` each, as the data pipeline collates."""
        return (2 if self.positions else 1) * self.batch * (self.seq_len + 1) * 8

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        while True:
            tokens = torch.randint(0, self.vocab, (self.batch, self.seq_len + 1))
            inputs = {"input": tokens[:, :-1]}
            if self.positions:
                positions = torch.arange(self.seq_len + 1).repeat(self.batch, 1)
                inputs["positions"] = positions[:, :-1]
            yield inputs, tokens[:, 1:]

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        del state_dict


def _build_random_tokens(dp_world_size: int, dp_rank: int, tokenizer, job_config, **kwargs):
    del dp_world_size, dp_rank, kwargs
    t = job_config.training
    loader = RandomTokens(
        t.local_batch_size, t.seq_len, tokenizer.vocab_size, job_config.data.reset_position_ids
    )
    return LabelsInInputs(loader) if job_config.kernels.loss == FUSED_LOSS else loader


class SimulatedTransformer(SwallowTransformer):
    """SwallowTransformer whose ``init_weights`` sets only the RoPE buffer.

    Fake tensors hold no values, so initialising weights has no effect on the
    simulation, and torch's ``trunc_normal_`` (rejection sampling: a loop on
    the values) cannot run on them.
    """

    def init_weights(self, buffer_device: torch.device | None = None) -> None:
        with torch.device(buffer_device or self.freqs_cis.device):
            self.freqs_cis = self._precompute_freqs_cis()


class SimulatedQwen3Model(SwallowQwen3Model):
    """SwallowQwen3Model whose ``init_weights`` sets only the RoPE buffer (as
    :class:`SimulatedTransformer`; the MoE buffers keep their shapes)."""

    def init_weights(self, buffer_device: torch.device | None = None) -> None:
        with torch.device(buffer_device or self.rope_cache.device):
            self.rope_cache = self._precompute_rope_cache()


# The model class a simulation builds, per family (``[model] name``).
SIMULATED_MODELS: dict[str, type[torch.nn.Module]] = {
    MODEL_NAME: SimulatedTransformer,
    QWEN3_MODEL_NAME: SimulatedQwen3Model,
}


def _parallelize_outside_fake_mode(parallelize_fn):
    """The family's parallelize_fn, run outside the fake mode: the model is still on
    the meta device there, and the sub-meshes FSDP and TP slice compute their rank
    coordinates from real tensors."""

    def parallelize(model: torch.nn.Module, parallel_dims, job_config):
        with unset_fake_temporarily():
            return parallelize_fn(model, parallel_dims, job_config)

    return parallelize


def _register_simulated_spec(config, source: str, layers: int | None, real: bool) -> None:
    from swallow_titan.components.preflight import model_args

    family = family_of_config(config)
    args = model_args(config, source)
    vocab_size = args.vocab_size
    flavors = dict(family.flavors)
    # A copy: the trainer updates its flavor's arguments in place (Qwen3's MoE
    # arguments included), which must not reach the family's own flavors.
    flavor = copy.deepcopy(family.flavors[config.model.flavor])
    if layers is not None:
        flavor.n_layers = layers
    flavors[config.model.flavor] = flavor
    spec = dataclasses.replace(
        get_train_spec(family.model_name),
        model_args=flavors,
        model_cls=family.model_cls if real else SIMULATED_MODELS[family.model_name],
        parallelize_fn=_parallelize_outside_fake_mode(family.parallelize_fn),
        build_dataloader_fn=_build_random_tokens,
        build_tokenizer_fn=lambda job_config: StandInTokenizer(vocab_size),
        build_validator_fn=None,
    )
    from torchtitan.protocols.train_spec import _extra_train_specs

    _extra_train_specs.pop(SIMULATED_MODEL_NAME, None)
    register_train_spec(SIMULATED_MODEL_NAME, spec)


def apply_stand_ins(config) -> list[str]:
    """Change ``config`` in place to what one CPU process can simulate; return
    one line per change (the output's list of stand-ins)."""
    notes = []
    m = config.model
    # `--model.converters ""` (float8 off on the command line) parses as [""].
    m.converters = [c for c in m.converters if c]
    if m.attn_type != "sdpa":
        notes.append(
            f"attention: {m.attn_type} ({m.attn_mask_type}) -> SDPA causal on the CPU "
            "flash kernel (same saved tensors: q, k, v, output, log-sum-exp)"
        )
        m.attn_type, m.attn_mask_type = "sdpa", "causal"
    if FLOAT8_CONVERTER in m.converters and not config.quantize.linear.float8.emulate:
        config.quantize.linear.float8.emulate = True
        notes.append("float8: torchao emulated (same casts, scales and float8 all-gather)")
    if config.compile.enable:
        config.compile.enable = False
        notes.append("torch.compile: off (eager)")
    from torchtitan.tools.utils import device_type

    if device_type == "cpu":
        notes.append("device type: cpu (fake tensors; CUDA backward needs a CUDA build)")
    else:
        notes.append(f"device type: {device_type} (fake tensors)")
    notes.append("data: random token ids; tokenizer: end-of-text id only")
    if config.debug.seed is None:
        # Rank 0 would broadcast a seed read from its generator: a value.
        config.debug.seed = 0
    if config.guard.on_spike == "rollback":
        # A rollback reloads a checkpoint, and the simulation writes none; the
        # detection's all-reduce still runs (fake values are never a spike).
        config.guard.on_spike = "log"
        notes.append("guard: spike rollback -> log (no checkpoint to roll back to)")
    config.checkpoint.enable = False
    config.validation.enable = False
    config.eval.enable = False
    config.metrics.enable_tensorboard = False
    config.metrics.log_freq = 10**9  # no logging step: it reads values on the host
    config.hf.load_path = None
    config.hf.export_at_end = False
    config.profiling.enable_profiling = False
    config.profiling.enable_memory_snapshot = False
    config.training.steps = max(config.training.steps, 1)
    return notes


class SimulatedTrainer(SwallowTrainer):
    """SwallowTrainer whose cross-rank agreement reads no value.

    ``_agree`` issues the same all-reduce, but fake tensors hold no data, so
    the simulated step is taken as finite and not stopped (the optimizer steps).
    """

    def __init__(self, job_config: Any):
        super().__init__(job_config)
        # torchtitan's device is "cpu:<local rank>"; fake tensors tell "cpu:0"
        # from "cpu" (the parameters'), real CPU tensors do not.
        self.device = torch.device(self.device.type)
        # torchtitan logs step 1 whatever log_freq says; logging reads values.
        self.metrics_processor.should_log = lambda step: False
        self.module_peaks: list[dict[str, Any]] = []

    def init_distributed(self):
        """torchtitan's, with every mesh built outside the fake mode (a mesh's rank
        coordinates are computed from real tensors)."""
        with unset_fake_temporarily():
            parallel_dims = super().init_distributed()
            parallel_dims.build_mesh()
        return parallel_dims

    def forward_backward_step(self, **kwargs: Any) -> torch.Tensor:
        """torchtitan's, with the microbatch's collectives recorded apart."""
        recorder = getattr(self, "recorder", None)
        if recorder is not None:
            recorder.start_microbatch()
        tracker = getattr(self, "tracker", None)
        if tracker is not None and (
            not isinstance(tracker, FSDPMemTracker)
            or _root_module(self) in tracker.memory_tracking
        ):
            # torch's plain MemTracker refuses a module that runs twice, and so
            # does FSDPMemTracker when the root module is an FSDP group with
            # parameters of its own (Qwen3's final norm); the module peaks seen so
            # far are kept aside (the overall peak is the tracker's).
            self.module_peaks = _largest_modules(tracker, None, self.module_peaks)
            tracker.reset_mod_stats()
        try:
            return super().forward_backward_step(**kwargs)
        finally:
            if recorder is not None:
                recorder.end_microbatch()

    def _agree(self, *flags: torch.Tensor | bool) -> list[bool]:
        self._max_over_ranks(flags)  # the collective a real step issues
        return [False] * len(flags)

    def _judge_spike(self, loss, grad_norm, microbatches) -> None:
        if self.spikes.enabled:
            self._spike_values(loss, grad_norm)  # the collectives a real step issues
        return None  # fake tensors hold no values: never a spike


# ---------------------------------------------------------------- MoE routing

ROUTING_ASSUMPTION = (
    "MoE routing: balanced (debug.moe_force_load_balance, torchtitan's round-robin: "
    "token slot i of a rank's tokens x top_k goes to expert i mod E, so every expert "
    "gets tokens x top_k / E of them and every rank sends each EP rank as many)"
)

# Where the simulation keeps a fake tensor's known value (a real CPU tensor).
_KNOWN = "_swallow_known_value"


def balanced_counts(slots: int, num_experts: int) -> torch.Tensor:
    """Tokens per expert of round-robin routing over ``slots`` token slots (int64).

    The simulation's routing assumption. How many tokens each expert gets
    decides the sizes of the experts' matmuls and of expert parallelism's
    all-to-alls, and is data, which a fake tensor cannot know. The simulation
    routes as ``debug.moe_force_load_balance`` makes torchtitan's router do
    (token slot ``i`` goes to expert ``i mod E``: the same ops as learned
    routing, with known counts); a ``--real`` run routes the same way, so its
    memory and collectives can be compared with the simulation's.
    """
    return torch.bincount(torch.arange(slots) % num_experts, minlength=num_experts)


def _known(t: Any) -> torch.Tensor | None:
    return getattr(t, _KNOWN, None) if isinstance(t, torch.Tensor) else None


def _with_values(value: Any) -> Any:
    """``value`` (an op argument) with every tensor of known value replaced by it."""
    if isinstance(value, (list, tuple)):
        return type(value)(_with_values(v) for v in value)
    known = _known(value)
    return value if known is None else known


class KnownExpertCounts(TorchDispatchMode):
    """Carries the known values of the MoE token counts through fake tensors.

    The routers' and token reorderers' counts get the value of
    :func:`balanced_counts` (forward hooks, :meth:`watch`); every op whose
    tensor inputs all have known values (or are real) is also computed on the
    values, outside every mode, so the counts reach expert parallelism's split
    sizes, its token permutation and the experts' loop with values, and
    ``.tolist()`` / ``.item()`` on them return numbers instead of unbacked
    symbols. The fake op itself still runs (the memory tracker and the
    collective recorder see it). An all-to-all of known counts assumes every rank
    routes as this one (true of balanced routing: every rank has as many tokens).
    """

    def watch(self, model: torch.nn.Module) -> int:
        """Give the counts of every MoE layer's router and reorderer known values;
        returns how many modules are watched."""
        from torchtitan.models.moe.moe import TokenChoiceTopKRouter, TokenReorderer

        watched = 0
        for module in model.modules():
            if isinstance(module, (TokenChoiceTopKRouter, TokenReorderer)):
                module.register_forward_hook(self._know_counts)
                watched += 1
        return watched

    @staticmethod
    def _know_counts(module, inputs, outputs):
        from torchtitan.models.moe.moe import TokenReorderer

        if isinstance(module, TokenReorderer):
            slots = inputs[1].numel()  # the selected experts, [tokens, top_k]
        else:
            slots = inputs[0].shape[0] * module.top_k  # the router's x, [tokens, dim]
        counts = outputs[2]
        with disable_dispatch_modes():  # neither fake nor this rank's memory
            value = balanced_counts(slots, module.num_experts).to(counts.dtype)
        setattr(counts, _KNOWN, value)
        return outputs

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = _tensors([*args, *kwargs.values()])
        known = [_known(t) for t in tensors]
        if not any(v is not None for v in known):
            return func(*args, **kwargs)
        if func is torch.ops.aten._local_scalar_dense.default:
            with disable_dispatch_modes():  # else the fake mode makes it a symbol
                return _known(args[0]).item()
        out = func(*args, **kwargs)
        if any(v is None and isinstance(t, FakeTensor) for t, v in zip(tensors, known)):
            # A value meets a fake tensor: the result has no known value (an
            # in-place op on a known tensor makes its value unknown).
            for o in _tensors(out):
                if hasattr(o, _KNOWN):
                    delattr(o, _KNOWN)
            return out
        value = self._compute(func, args, kwargs)
        for o, v in zip(_tensors(out), _tensors(value)):
            setattr(o, _KNOWN, v)
        return out

    @staticmethod
    def _compute(func, args, kwargs):
        args = _with_values(args)
        kwargs = {k: _with_values(v) for k, v in kwargs.items()}
        with disable_dispatch_modes():
            if func.namespace == "_c10d_functional":
                if func._opname == "wait_tensor":
                    return args[0]
                if func._opname == "all_to_all_single":
                    # Every rank sends its j-th split to rank j; each rank holds the
                    # same counts, so rank j receives its own j-th split from every rank.
                    inp, _, input_splits, group = args
                    ranks = _group_ranks(group)
                    mine = inp.split(list(input_splits))[ranks.index(dist.get_rank())]
                    return torch.cat([mine] * len(ranks))
                raise NotImplementedError(f"simulate: {func} on known MoE counts")
            return func(*args, **kwargs)


# ---------------------------------------------------------------- collectives


@dataclass
class Collective:
    """One kind of collective on one mesh dimension, summed over a step."""

    op: str
    dim: str
    group_size: int
    nodes: int
    count: int = 0
    bytes: int = 0
    """Full (unsharded) buffer bytes, summed."""
    largest: int = 0
    """The largest single call's buffer bytes."""


_COLLECTIVE_OPS = {
    "allgather_": "all_gather",
    "_allgather_base_": "all_gather",
    "allgather_into_tensor_coalesced_": "all_gather",
    "all_gather_into_tensor": "all_gather",
    "all_gather_into_tensor_coalesced": "all_gather",
    "reduce_scatter_": "reduce_scatter",
    "_reduce_scatter_base_": "reduce_scatter",
    "reduce_scatter_tensor_coalesced_": "reduce_scatter",
    "reduce_scatter_tensor": "reduce_scatter",
    "reduce_scatter_tensor_coalesced": "reduce_scatter",
    "allreduce_": "all_reduce",
    "allreduce_coalesced_": "all_reduce",
    "all_reduce": "all_reduce",
    "all_reduce_coalesced": "all_reduce",
    "broadcast_": "broadcast",
    "broadcast": "broadcast",
    "alltoall_base_": "all_to_all",
    "all_to_all_single": "all_to_all",
}


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


class CollectiveRecorder(TorchDispatchMode):
    """Records every collective this rank issues: kind, mesh dimension, bytes.

    Both c10d ops (FSDP2's all-gather and reduce-scatter, ``dist.all_reduce``)
    and functional collectives (DTensor redistribution, torchtitan's
    ``dist_sum``) are dispatched as torch ops, so a dispatch mode sees them.
    The bytes are the full buffer's: the all-gather's output, the
    reduce-scatter's input, the all-reduce's tensor.
    """

    def __init__(self, group_dims: dict[str, str], ngpu: int) -> None:
        super().__init__()
        self.group_dims = group_dims
        self.ngpu = ngpu
        self.records: dict[tuple[str, str], Collective] = {}
        """The step's collectives outside the microbatches (clipping, guard, ...)."""
        self.microbatch: dict[tuple[str, str], Collective] | None = None
        """While a microbatch runs (see SimulatedTrainer): that microbatch's."""
        self.last_microbatch: dict[tuple[str, str], Collective] = {}
        self.enabled = True

    def start_microbatch(self) -> None:
        self.microbatch = {}

    def end_microbatch(self) -> None:
        self.last_microbatch, self.microbatch = self.microbatch or {}, None

    def clear(self) -> None:
        self.records.clear()
        self.last_microbatch = {}

    def step_collectives(self, microbatches: int) -> list[Collective]:
        """One step's: outside the microbatches, plus ``microbatches`` times the
        last microbatch's (every microbatch after the first of a run issues the same)."""
        total: dict[tuple[str, str], Collective] = {
            k: dataclasses.replace(c) for k, c in self.records.items()
        }
        for k, c in self.last_microbatch.items():
            t = total.setdefault(k, dataclasses.replace(c, count=0, bytes=0))
            t.count += c.count * microbatches
            t.bytes += c.bytes * microbatches
            t.largest = max(t.largest, c.largest)
        return sorted(total.values(), key=lambda c: (c.dim, c.op))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.enabled and func.namespace in ("c10d", "_c10d_functional"):
            kind = _COLLECTIVE_OPS.get(func._opname)
            if kind is not None:
                self._record(kind, func, args, kwargs, out)
        return out

    def _record(self, kind: str, func, args, kwargs, out) -> None:
        group = None
        for a in list(args) + list(kwargs.values()):
            if isinstance(a, str) and func.namespace == "_c10d_functional":
                group = a
            elif isinstance(a, torch.ScriptObject) or hasattr(a, "group_name"):
                # A ReduceOp is a script object too: keep the one that is a group.
                group = _script_group_name(a) or group
        ranks = _group_ranks(group)
        size = len(ranks)
        nodes = len({r // self.ngpu for r in ranks})
        dim = self.group_dims.get(group, f"group of {size}")
        if kind == "all_to_all" and group == self.group_dims.get(EP_GROUP):
            # Only expert parallelism sends all-to-alls; its group may also be
            # another dimension's (EP over all of FSDP's ranks).
            dim = "ep"
        if kind == "reduce_scatter":
            buffer = args[1] if func.namespace == "c10d" else args[0]
        elif kind == "all_gather":
            buffer = args[0] if func.namespace == "c10d" else out
        else:
            buffer = args[0]
        nbytes = sum(t.numel() * t.element_size() for t in _tensors(buffer))
        into = self.records if self.microbatch is None else self.microbatch
        rec = into.setdefault((kind, dim), Collective(kind, dim, size, nodes))
        rec.count += 1
        rec.bytes += nbytes
        rec.largest = max(rec.largest, nbytes)


def _script_group_name(obj: Any) -> str | None:
    """The group name of a process group as c10d ops receive it."""
    if isinstance(obj, dist.ProcessGroup):
        return obj.group_name
    try:
        return dist.ProcessGroup.unbox(obj).group_name
    except (AttributeError, RuntimeError, TypeError):
        return None


def _group_ranks(group_name: str | None) -> list[int]:
    if group_name is None:
        return list(range(dist.get_world_size()))
    from torch.distributed.distributed_c10d import _resolve_process_group

    return dist.get_process_group_ranks(_resolve_process_group(group_name))


def mesh_group_names(parallel_dims) -> dict[str, str]:
    """Process-group name -> mesh dimension name(s), for every mesh the trainer uses
    (and, under :data:`EP_GROUP`, expert parallelism's group name)."""
    names: dict[str, str] = {}
    candidates = ["dp_replicate", "fsdp", "dp_shard", "tp", "cp", "pp", "batch", "loss",
                  "dp_cp", "dp", "dp_shard_cp", "ep", "efsdp", "etp"]
    for dim in candidates:
        try:
            mesh = parallel_dims.get_optional_mesh(dim)
        except (KeyError, ValueError, RuntimeError, AssertionError):
            continue
        if mesh is None:
            continue
        for d in range(mesh.ndim):
            label = mesh.mesh_dim_names[d] if mesh.mesh_dim_names else dim
            names.setdefault(mesh.get_group(d).group_name, label)
    names.setdefault(dist.group.WORLD.group_name, "world")
    ep = parallel_dims.get_optional_mesh("ep") if parallel_dims.ep_enabled else None
    if ep is not None:
        names[EP_GROUP] = ep.get_group().group_name
    return names


# mesh_group_names' key for the name of expert parallelism's group.
EP_GROUP = "<ep>"


def collective_seconds(
    c: Collective, ngpu: int, nvlink_gbps: float, internode_tbps: float
) -> float:
    """A lower bound on one kind of collective's time over a step.

    Ring/tree algorithms move, per rank, ``(n-1)/n`` of the buffer for an
    all-gather or reduce-scatter and twice that for an all-reduce. Within a node
    that crosses NVLink at the GPU's rate. A group spanning nodes must also
    bring ``(m-1)/m`` of the buffer into every node it spans (m nodes) through
    the node's network (``internode_tbps``), shared by the ``ngpu / per-node``
    groups of that dimension running at once. The bound is the slower of the two.
    """
    nvlink = nvlink_gbps * 1e9
    node_bw = internode_tbps * 1e12 / 8
    factor = 2.0 if c.op == "all_reduce" else 1.0
    if c.op == "broadcast":
        factor = 1.0
    n = c.group_size
    if n <= 1:
        return 0.0
    per_node = max(1, n // c.nodes)
    intra = factor * c.bytes * (per_node - 1) / per_node / nvlink if per_node > 1 else 0.0
    inter = 0.0
    if c.nodes > 1:
        concurrent = max(1, ngpu // per_node)
        inter = factor * c.bytes * (c.nodes - 1) / c.nodes * concurrent / node_bw
    return max(intra, inter)


# ---------------------------------------------------------------- the run


@dataclass
class SimulationResult:
    """Per-rank figures of one simulated run (bytes unless named otherwise)."""

    config_file: str
    world_size: int
    ngpu: int
    nnodes: int
    rank: int
    layout: dict[str, int]
    steps: int
    grad_accum: int
    local_batch: int
    seq_len: int
    n_params: int
    flops_per_token: float
    peak_bytes: int
    peak_parts: dict[str, int]
    modules: list[dict[str, Any]]
    collectives: list[dict[str, Any]]
    """Per (op, mesh dimension): count and full-buffer bytes of the last step."""
    gpu: str
    gpu_memory_bytes: int
    mfu: float
    bf16_tflops: float
    link_gbps: float
    internode_tbps: float
    stand_ins: list[str]
    wall_seconds: float
    state_bytes: dict[str, int] = field(default_factory=dict)
    """This rank's storages: params, grads, optimizer (FSDP padding included)."""
    simulated_layers: tuple[int, int] | None = None
    """Block counts simulated when the figures are extrapolated."""
    simulated_microbatches: int = 0
    """Microbatches per step actually run (the rest counted by arithmetic)."""
    microbatch_bytes: int = 0
    """Host storage of one microbatch's token ids and positions. The trainer
    loads a step's microbatches before the first runs; on a GPU they stay in
    host memory, on this CPU the tracker counts them (2 at most when
    microbatches are capped: a few MB at most)."""

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.gpu_memory_bytes

    def collective_seconds(self, c: dict[str, Any]) -> float:
        return collective_seconds(
            Collective(**c), self.ngpu, self.link_gbps, self.internode_tbps
        )

    @property
    def comm_seconds(self) -> float:
        """Lower bound on one step's communication time, nothing overlapped."""
        return sum(self.collective_seconds(c) for c in self.collectives)

    @property
    def compute_seconds(self) -> float:
        """One step's model FLOPs per GPU at the assumed MFU of the dense bf16 peak.

        A data-parallel rank's tokens are shared by the TP x CP x PP GPUs of its
        replica, each doing that share of the FLOPs."""
        tokens = self.grad_accum * self.local_batch * self.seq_len
        share = self.layout["tp"] * self.layout["cp"] * self.layout["pp"]
        return self.flops_per_token * tokens / share / (self.bf16_tflops * 1e12 * self.mfu)

    @property
    def bound(self) -> str:
        return "communication" if self.comm_seconds > self.compute_seconds else "compute"

    def to_json(self) -> dict[str, Any]:
        """Every field plus the derived figures."""
        out = dataclasses.asdict(self)
        out["collectives"] = [
            {**c, "seconds": self.collective_seconds(c)} for c in self.collectives
        ]
        out.update(
            fits=self.fits,
            comm_seconds=self.comm_seconds,
            compute_seconds=self.compute_seconds,
            bound=self.bound,
        )
        return out


@contextlib.contextmanager
def _rank_env(opts: SimulationOptions) -> Iterator[None]:
    """torchrun's variables for the simulated rank, restored afterwards."""
    values = {
        "RANK": str(opts.rank),
        "LOCAL_RANK": str(opts.rank % opts.ngpu),
        "WORLD_SIZE": str(opts.world_size),
        "LOCAL_WORLD_SIZE": str(opts.ngpu),
    }
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _root_module(trainer: SwallowTrainer) -> torch.nn.Module:
    if len(trainer.model_parts) != 1:
        raise ConfigError("simulate: pipeline parallelism is not simulated (one model part)")
    return trainer.model_parts[0]


def state_bytes(trainer: SwallowTrainer) -> dict[str, int]:
    """This rank's parameter, gradient and optimizer-state storage bytes.

    Storages, not tensor sizes: FSDP2 pads each shard to ``ceil(dim0 / shards)``
    rows, and a rank's padded storage is what it holds.
    """
    from torch.distributed.tensor import DTensor

    def nbytes(tensors) -> int:
        seen: dict[int, int] = {}
        for t in tensors:
            if t is None:
                continue
            local = t.to_local() if isinstance(t, DTensor) else t
            st = local.untyped_storage()
            seen[id(st)] = st.nbytes()
        return sum(seen.values())

    params = [p for m in trainer.model_parts for p in m.parameters()]
    moments = [
        v
        for opt in trainer.optimizers.optimizers
        for state in opt.state.values()
        for v in state.values()
        if isinstance(v, torch.Tensor)
    ]
    return {
        "params": nbytes(params),
        "grads": nbytes(p.grad for p in params),
        "optimizer": nbytes(moments),
    }


def _largest_modules(
    tracker: MemTracker, top: int | None, earlier: list[dict[str, Any]] = ()
) -> list[dict[str, Any]]:
    """Each module's peak while it ran, largest first (``top`` of them), also over
    ``earlier`` rows (kept from before a ``reset_mod_stats``)."""
    peaks = {row["module"]: row["peak_bytes"] for row in earlier}
    for mod_stats in tracker.memory_tracking.values():
        local = list(mod_stats.local_peak.values())
        if local:
            peaks[mod_stats.mod_fqn] = max(peaks.get(mod_stats.mod_fqn, 0), int(max(local)))
    rows = [{"module": m, "peak_bytes": p} for m, p in peaks.items()]
    rows.sort(key=lambda r: -r["peak_bytes"])
    return rows[:top]


def simulate(config, opts: SimulationOptions, source: str = "<config>") -> SimulationResult:
    """Run ``opts.steps`` training steps of ``config`` as rank ``opts.rank`` of a fake
    ``opts.world_size``-rank job and measure them.

    With ``opts.layers`` = (a, b) the model is simulated with a and with b
    transformer blocks and every figure (memory by kind, state, collectives'
    counts and bytes) is extrapolated linearly to the flavor's block count:
    each block adds the same parameters, saved activations and collectives, and
    the peak falls at the same point of the step (``tests/test_simulate.py``
    checks that a third block count lands exactly on the line).
    """
    if opts.layers is None:
        return measure(config, opts, source, None)
    a, b = opts.layers
    if not 1 <= a < b:
        raise ConfigError(f"simulate: --layers needs 1 <= a < b, got {a} {b}")
    full = _flavor_layers(config, source)
    ra = measure(config, opts, source, a)
    rb = measure(config, opts, source, b)
    return extrapolate(ra, rb, a, b, full)


def _flavor_layers(config, source: str) -> int:
    from swallow_titan.components.preflight import model_args

    return model_args(config, source).n_layers


def extrapolate(ra: SimulationResult, rb: SimulationResult, a: int, b: int, n: int) -> SimulationResult:
    """The figures at ``n`` blocks on the line through the ``a``- and ``b``-block runs."""

    def line(x: float, y: float) -> int:
        return int(round(x + (y - x) * (n - a) / (b - a)))

    def lines(da: dict, db: dict) -> dict:
        return {k: line(da.get(k, 0), db.get(k, 0)) for k in sorted(set(da) | set(db))}

    colls = []
    by_key = {(c["op"], c["dim"]): c for c in ra.collectives}
    for c in rb.collectives:
        ca = by_key.get((c["op"], c["dim"]), {**c, "count": 0, "bytes": 0})
        colls.append({**c, "count": line(ca["count"], c["count"]), "bytes": line(ca["bytes"], c["bytes"])})
    return dataclasses.replace(
        rb,
        peak_bytes=line(ra.peak_bytes, rb.peak_bytes),
        peak_parts=lines(ra.peak_parts, rb.peak_parts),
        state_bytes=lines(ra.state_bytes, rb.state_bytes),
        collectives=colls,
        n_params=line(ra.n_params, rb.n_params),
        flops_per_token=float(line(ra.flops_per_token, rb.flops_per_token)),
        modules=[],
        simulated_layers=(a, b),
        wall_seconds=ra.wall_seconds + rb.wall_seconds,
    )


@contextlib.contextmanager
def _fake_process_group(opts: SimulationOptions) -> Iterator[None]:
    if opts.real and "TORCHELASTIC_RUN_ID" in os.environ:
        # A real run under torchrun: the trainer initialises gloo as in training.
        yield
        return
    if dist.is_initialized():
        raise RuntimeError(
            "swallow_titan.simulate needs a process without a process group "
            "(it creates a fake one of the simulated size)"
        )
    with _rank_env(opts):
        dist.init_process_group(
            "fake", rank=opts.rank, world_size=opts.world_size, store=FakeStore()
        )
        try:
            yield
        finally:
            dist.destroy_process_group()


def measure(config, opts: SimulationOptions, source: str, layers: int | None) -> SimulationResult:
    """One simulation of ``config`` (with ``layers`` blocks when given); ``config``
    itself is left as it was."""
    start = time.monotonic()
    config = copy.deepcopy(config)
    if config.model.name not in SIMULATED_MODELS:
        raise ConfigError(
            f"{source}: model.name: swallow_titan.simulate covers "
            f"{sorted(SIMULATED_MODELS)}, got {config.model.name!r}"
        )
    # Stand-ins first: validation and [eval] are off, so their sizes are not checked.
    stand_ins = apply_stand_ins(config)
    moe = is_moe(model_args(config, source))
    if moe:
        # Routing decides the experts' matmul sizes and EP's all-to-all sizes, and is
        # data a fake tensor cannot know: the simulation (and a --real check of it)
        # routes by torchtitan's round-robin instead; KnownExpertCounts gives fake
        # tensors its counts.
        config.debug.moe_force_load_balance = True
        stand_ins.append(ROUTING_ASSUMPTION)
    if opts.real:
        stand_ins = [n for n in stand_ins if not n.startswith("device")]
        stand_ins.append("real tensors on CPU (a check of the simulation)")
    layout: Layout = check_structure(config, opts.world_size, source)
    real_accum = grad_accum_steps(config, layout, source)
    if opts.microbatches is not None and real_accum > opts.microbatches:
        # From the second microbatch on each one starts from the same memory and
        # issues the same collectives (tests/test_simulate.py): simulate
        # opts.microbatches of them, count the collectives of real_accum.
        config.training.global_batch_size = (
            config.training.local_batch_size * layout.dp * opts.microbatches
        )
    _register_simulated_spec(config, source, layers, opts.real)
    config.model.name = SIMULATED_MODEL_NAME
    config.comm.mode = "default"  # the fake process group is initialised here
    trainer = None
    with _fake_process_group(opts):
        try:
            if opts.real:
                tensors = contextlib.nullcontext()
            else:
                tensors = contextlib.ExitStack()
                tensors.enter_context(
                    FakeTensorMode(
                        allow_non_fake_inputs=True,
                        shape_env=ShapeEnv(allow_scalar_outputs=True),
                    )
                )
                tensors.enter_context(dtensor_propagation_in_own_fake_mode())
            with tensors:
                trainer = SimulatedTrainer(config)
                model = _root_module(trainer)
                counts = KnownExpertCounts()
                if moe and not opts.real:
                    if not counts.watch(model):
                        raise RuntimeError("simulate: an MoE model without torchtitan's router")
                else:
                    counts = contextlib.nullcontext()
                optimizer = trainer.optimizers.optimizers[0]
                if isinstance(model, FSDPModule):
                    tracker = FSDPMemTracker(mod=model, optm=optimizer)
                else:
                    tracker = MemTracker()
                    tracker.track_external(model, optimizer)
                recorder = CollectiveRecorder(mesh_group_names(trainer.parallel_dims), opts.ngpu)
                trainer.recorder = recorder
                trainer.tracker = tracker
                data = trainer.batch_generator(trainer.dataloader)
                with tracker:
                    for _ in range(opts.steps):
                        trainer.step += 1
                        # Collectives of the last step only (the first also builds
                        # the optimizer state).
                        recorder.clear()
                        with recorder, counts:
                            trainer.train_step(data)
                state = state_bytes(trainer)
                simulated_accum = trainer.gradient_accumulation_steps
                loader = trainer.dataloader
                batch_bytes = getattr(getattr(loader, "loader", loader), "microbatch_bytes", 0)
                peak_snap = tracker.get_tracker_snapshot("peak")
                parts: dict[str, int] = {}
                for dev_snap in peak_snap.values():
                    for k, v in dev_snap.items():
                        key = getattr(k, "value", str(k))
                        parts[key] = parts.get(key, 0) + int(v)
                peak = parts.pop("Total", 0)
                modules = _largest_modules(tracker, 12, trainer.module_peaks)
                n_params = sum(p.numel() for m in trainer.model_parts for p in m.parameters())
        finally:
            if trainer is not None:
                trainer.close()
    collectives = recorder.step_collectives(real_accum)
    gpu = GPUS[opts.gpu]
    return SimulationResult(
        config_file=source,
        world_size=opts.world_size,
        ngpu=opts.ngpu,
        nnodes=opts.nnodes,
        rank=opts.rank,
        layout={
            "dp_replicate": layout.dp_replicate,
            "dp_shard": layout.dp_shard,
            "tp": layout.tp,
            "cp": layout.cp,
            "pp": layout.pp,
        },
        steps=opts.steps,
        grad_accum=real_accum,
        simulated_microbatches=simulated_accum,
        microbatch_bytes=batch_bytes,
        local_batch=config.training.local_batch_size,
        seq_len=config.training.seq_len,
        n_params=n_params,
        flops_per_token=float(trainer.metrics_processor.num_flops_per_token),
        peak_bytes=int(peak),
        peak_parts=parts,
        modules=modules,
        collectives=[dataclasses.asdict(c) for c in collectives],
        gpu=gpu.name,
        gpu_memory_bytes=gpu.memory_bytes,
        mfu=opts.mfu,
        bf16_tflops=gpu.bf16_tflops,
        link_gbps=opts.nvlink_gbps or gpu.nvlink_gbps,
        internode_tbps=opts.internode_tbps,
        stand_ins=stand_ins,
        wall_seconds=time.monotonic() - start,
        state_bytes=state,
    )


# ---------------------------------------------------------------- report


def format_report(r: SimulationResult) -> str:
    """The human-readable report."""

    def g(b: float) -> str:
        return f"{b / GIB:.2f} GiB"

    lay = ", ".join(f"{k} {v}" for k, v in r.layout.items() if v != 1) or "1 rank"
    lines = [
        f"Simulated {r.config_file}: {r.nnodes} node(s) x {r.ngpu} GPUs = {r.world_size} "
        f"ranks ({lay}); rank {r.rank}; {r.steps} steps of {r.grad_accum} microbatch(es) "
        f"x {r.local_batch} x {r.seq_len} tokens; {r.n_params:,} parameters",
        "Stand-ins: " + "; ".join(r.stand_ins),
    ]
    if r.simulated_microbatches < r.grad_accum:
        lines.append(
            f"Microbatches: {r.simulated_microbatches} of {r.grad_accum} run per step; from "
            "the second on each starts from the same memory and issues the same "
            f"collectives, which are counted {r.grad_accum} times"
        )
    if r.simulated_layers:
        a, b = r.simulated_layers
        lines.append(
            f"Extrapolated: simulated with {a} and {b} transformer blocks, every figure "
            "taken on the line through them (each block adds the same)"
        )
    lines += [
        "",
        f"Peak memory (rank {r.rank}): {g(r.peak_bytes)} of {r.gpu} "
        f"({r.gpu_memory_bytes / GIB:.1f} GiB): {'fits' if r.fits else 'DOES NOT FIT'}",
    ]
    for k, v in sorted(r.peak_parts.items(), key=lambda kv: -kv[1]):
        if v:
            lines.append(f"  {k:<16} {g(v)}")
    lines.append(
        "Held by this rank after the last step: "
        + ", ".join(f"{k} {g(v)}" for k, v in r.state_bytes.items())
    )
    if r.modules:
        lines.append("Largest modules (peak while each was running):")
        for m in r.modules[:8]:
            lines.append(f"  {m['module']:<44} {g(m['peak_bytes'])}")
    lines.append("Collectives of one step (bytes of the full buffer):")
    for c in r.collectives:
        lines.append(
            f"  {c['op']:<15} {c['dim']:<13} {c['group_size']:>3} ranks on {c['nodes']} "
            f"node(s): {c['count']:>5} calls {c['bytes'] / GIB:9.2f} GiB  "
            f">= {r.collective_seconds(c) * 1e3:8.1f} ms"
        )
    lines.append(
        f"Per step: communication >= {r.comm_seconds:.2f} s (NVLink {r.link_gbps:g} GB/s "
        f"per GPU, network {r.internode_tbps:g} Tb/s per node, nothing overlapped); "
        f"compute {r.compute_seconds:.2f} s ({r.flops_per_token:.3g} FLOPs/token at "
        f"{r.mfu:.0%} MFU of {r.bf16_tflops:g} TFLOP/s) -> {r.bound}-bound"
    )
    lines.append(f"(simulated in {r.wall_seconds:.0f} s)")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m swallow_titan.simulate",
        description="Simulate a config at its real world size on one CPU (fake process "
        "group, fake tensors): peak memory per rank, collectives, communication vs compute.",
    )
    p.add_argument("config", help="training TOML")
    add_process_arguments(p)
    p.add_argument("--rank", type=int, default=0, help="simulated rank (default 0)")
    p.add_argument("--steps", type=int, default=2, help="training steps (default 2, at least 2)")
    p.add_argument("--gpu", choices=sorted(GPUS), default="h200", help="GPU to compare against")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation (default 0.4)")
    p.add_argument("--nvlink-gbps", type=float, default=None,
                   help="NVLink GB/s per GPU and direction (default: the GPU's, 450)")
    p.add_argument("--internode-tbps", type=float, default=3.2,
                   help="network Tb/s per node and direction (default 3.2)")
    p.add_argument(
        "--layers",
        type=int,
        nargs=2,
        metavar=("A", "B"),
        default=None,
        help="simulate A and B transformer blocks and extrapolate to the flavor's "
        "(faster; exact because each block adds the same)",
    )
    p.add_argument(
        "--real",
        action="store_true",
        help="run with real tensors, tracked the same way (to check the simulation; "
        "under torchrun on its gloo process group)",
    )
    p.add_argument(
        "--microbatches",
        type=int,
        default=2,
        help="microbatches run per step (default 2; 0: all); the others are counted",
    )
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.add_argument("--output", default=None, help="also write the JSON figures to this file")
    return p


def main(argv: list[str] | None = None) -> int:
    init_logger()
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, overrides = parser.parse_known_args(argv)
    opts = SimulationOptions(
        ngpu=args.ngpu, nnodes=args.nnodes, rank=args.rank, steps=args.steps, gpu=args.gpu,
        mfu=args.mfu, nvlink_gbps=args.nvlink_gbps, internode_tbps=args.internode_tbps,
        layers=tuple(args.layers) if args.layers else None,
        real=args.real,
        microbatches=args.microbatches or None,
    )
    if opts.real and "TORCHELASTIC_RUN_ID" in os.environ:
        # Under torchrun the processes are real: rank and sizes are torchrun's.
        opts = dataclasses.replace(
            opts,
            rank=int(os.environ["RANK"]),
            ngpu=int(os.environ["LOCAL_WORLD_SIZE"]),
            nnodes=int(os.environ["WORLD_SIZE"]) // int(os.environ["LOCAL_WORLD_SIZE"]),
        )
    if not 0 <= opts.rank < opts.world_size:
        parser.error(f"--rank must be in [0, {opts.world_size}), got {opts.rank}")
    if opts.steps < 2:
        parser.error("--steps must be at least 2 (the first step creates the optimizer state)")
    try:
        config = load_job_config(args.config, overrides)
        result = simulate(config, opts, args.config)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return ExitCode.BAD_INPUT
    if os.environ.get("RANK", "0") != "0" and "TORCHELASTIC_RUN_ID" in os.environ:
        return ExitCode.OK  # under torchrun rank 0 reports
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result.to_json(), f, indent=2)
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        print(format_report(result))
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
