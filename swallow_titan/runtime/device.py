"""What torchtitan needs to run on a machine without a GPU, and the GPU count.

torchtitan 0.2.2 picks its device once, at import time, with
``torch._utils._get_available_device_type() or "cuda"``, and several of its
modules copy ``device_type``/``device_module`` by name. On a CPU-only machine
that yields "cuda" and the trainer fails on its first ``set_device``.
:func:`swallow_titan.runtime.seams.select_device` (run by ``import swallow_titan``,
before torchtitan loads) therefore makes it pick "cpu" and installs
:class:`CpuDeviceModule`: the memory calls torchtitan's metrics expect from a
device module (``torch.cpu`` lacks them). Peak memory on CPU is the process's
peak resident set size, so the "memory" metric stays meaningful.
"""

from __future__ import annotations

import argparse
import functools
import os
import resource
import types
from dataclasses import dataclass
from typing import Any

import torch
import torch._utils

_CPU_DEVICE_NAME = "cpu"


def gpu_available() -> bool:
    """Whether an accelerator torchtitan knows how to drive is present."""
    return torch._utils._get_available_device_type() not in (None, "cpu")


def default_ngpu() -> int:
    """Processes per node when none is asked for: the visible GPUs, else 1.

    ``run_train.sh`` (NGPU), ``python -m swallow_titan.plan`` and ``python -m
    swallow_titan.data`` (``--ngpu``) all default to this.
    """
    return torch.cuda.device_count() if torch.cuda.is_available() else 1


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_process_arguments(parser: argparse.ArgumentParser) -> None:
    """``--ngpu`` (default :func:`default_ngpu`) and ``--nnodes`` (default 1)."""
    parser.add_argument(
        "--ngpu",
        type=_at_least_one,
        default=default_ngpu(),
        help="processes per node (default: visible GPUs, else 1; like run_train.sh)",
    )
    parser.add_argument("--nnodes", type=_at_least_one, default=1, help="nodes (default 1)")


@dataclass(frozen=True)
class _CpuProperties:
    name: str
    total_memory: int


def _total_host_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _peak_rss_bytes() -> int:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _cpu_memory_stats(device: object = None) -> dict[str, int]:
    peak = _peak_rss_bytes()
    return {
        "active_bytes.all.peak": peak,
        "reserved_bytes.all.peak": peak,
        "num_alloc_retries": 0,
        "num_ooms": 0,
    }


class CpuDeviceModule(types.ModuleType):
    """``torch.cpu`` plus the ``torch.cuda`` calls torchtitan makes on its device module.

    Given to torchtitan only (as ``torchtitan.tools.utils.device_module``); torch
    itself keeps the real ``torch.cpu``.
    """

    def __init__(self) -> None:
        super().__init__("swallow_titan_cpu_device")
        for name, fn in _cpu_shims().items():
            setattr(self, name, fn)

    def __getattr__(self, name: str):
        return getattr(torch.cpu, name)


def _cpu_shims() -> dict:
    return {
        "get_device_name": lambda device=None: _CPU_DEVICE_NAME,
        "get_device_properties": lambda device=None: _CpuProperties(
            _CPU_DEVICE_NAME, _total_host_memory()
        ),
        # Peak RSS cannot be reset; report the process peak instead.
        "reset_peak_memory_stats": lambda device=None: None,
        "empty_cache": lambda: None,
        "memory_stats": _cpu_memory_stats,
        "max_memory_allocated": lambda device=None: _peak_rss_bytes(),
        # torch.cpu.current_device() returns "cpu"; torchtitan passes the result
        # to barrier(device_ids=[...]), which needs an index.
        "current_device": lambda: 0,
    }


def integer_histc_on_cpu(histc):
    """``torch.histc`` that also takes integer tensors on CPU (counted as float).

    torchtitan's MoE router and token reorderer count tokens per expert with
    ``torch.histc`` of the int64 expert indices; CUDA's histogram takes
    integers, CPU's raises NotImplementedError. Expert indices are small
    integers, exact in float32, and with ``bins = max - min`` every bin is one
    index wide, so the counts are the same; they are returned in the input's
    dtype, as CUDA does.
    """

    @functools.wraps(histc)
    def wrapper(input, *args, **kwargs):
        if input.device.type == "cpu" and not input.is_floating_point():
            return histc(input.float(), *args, **kwargs).to(input.dtype)
        return histc(input, *args, **kwargs)

    wrapper.__wrapped_histc__ = histc
    return wrapper


# torch's CPU flash-attention kernel, forward and backward, on DTensors (tensor
# parallelism on CPU). torch has DTensor rules for the CUDA attention kernels
# only; every tensor of these ops is [batch, heads, ...] (logsumexp [batch,
# heads, seq]) and each head is computed on its own, so sharding all of them on
# the heads dimension is exact, as is replicating all of them.


def _heads_or_replicated(outputs: int, inputs: int, attn_mask: Any) -> list[tuple[list, list]]:
    from torch.distributed.tensor import Replicate, Shard

    # A mask shaped [batch, heads, q, k] is sharded with the heads; a
    # broadcast one (no heads dimension, or one head) is read whole by each.
    mask_has_heads = attn_mask is not None and len(attn_mask.shape) == 4 and attn_mask.shape[1] > 1

    def every(placement) -> tuple[list, list]:
        mask = [] if attn_mask is None else [placement if mask_has_heads else Replicate()]
        # Placements for the tensor inputs only: the float / bool arguments have none.
        return [placement] * outputs, [placement] * inputs + mask

    return [every(Shard(1)), every(Replicate())]


def cpu_flash_attention_shardings(query, key, value, *scalars, attn_mask=None, **kwargs):
    """DTensor placements ``aten._scaled_dot_product_flash_attention_for_cpu`` accepts.

    For ``torch.distributed.tensor.experimental.register_sharding``: output and
    logsumexp with query, key and value (and a per-head mask) all sharded on the
    heads dimension, or all replicated.
    """
    return _heads_or_replicated(outputs=2, inputs=3, attn_mask=attn_mask)


def cpu_flash_attention_backward_shardings(
    grad_out, query, key, value, out, logsumexp, *scalars, attn_mask=None, **kwargs
):
    """As :func:`cpu_flash_attention_shardings`, for the backward op: the query, key and
    value gradients with the six tensor inputs, all on heads or all replicated."""
    return _heads_or_replicated(outputs=3, inputs=6, attn_mask=attn_mask)
