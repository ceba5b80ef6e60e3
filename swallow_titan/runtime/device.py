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
import os
import resource
import types
from dataclasses import dataclass

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
<<<<<<< HEAD


# ---------------------------------------------------------------------------
# Every place where swallow-titan's training code (swallow_titan/, kernels/)
# behaves differently on CPU and on a CUDA GPU, in one list. Benchmarks
# (benchmarks/) choose their device themselves and are not listed.
# tests/test_device_seams.py checks that every source file with such a branch
# appears here, and that a process where torch reports CUDA gets none of the
# CPU shims.


@dataclass(frozen=True)
class DeviceSeam:
    """One device-dependent behaviour: where it lives, what CPU and CUDA get."""

    where: str  # "path/to/module.py: function or class"
    cpu: str
    cuda: str
    shim: bool  # installs a CPU replacement for something torch or torchtitan provides


DEVICE_SEAMS: tuple[DeviceSeam, ...] = (
    DeviceSeam(
        "swallow_titan/runtime/seams.py: select_device",
        "replaces torch._utils._get_available_device_type (reports 'cpu') before "
        "torchtitan is imported, so torchtitan's device_type is 'cpu', and installs "
        "CpuDeviceModule",
        "nothing replaced: torchtitan's device_type is 'cuda'",
        shim=True,
    ),
    DeviceSeam(
        "swallow_titan/runtime/device.py: CpuDeviceModule",
        "torchtitan.tools.utils.device_module becomes torch.cpu plus memory and "
        "device-name calls (peak RSS as memory)",
        "torchtitan's device_module stays torch.cuda",
        shim=True,
    ),
    DeviceSeam(
        "swallow_titan/runtime/device.py: default_ngpu",
        "1 process per node",
        "one process per visible GPU",
        shim=False,
    ),
    DeviceSeam(
        "swallow_titan/components/profiling.py: profiling_context, available_activities",
        "swallow-titan's trainer profiles with this module's CPU-activities profiler",
        "torchtitan's profiler (CPU + CUDA activities)",
        shim=True,
    ),
    DeviceSeam(
        "swallow_titan/runtime/seams.py: use_cpu_profiler_in_stock_trainer",
        "stock torchtitan's Trainer (benchmarks/) gets the CPU profiler",
        "torchtitan.train.maybe_enable_profiling left as it is",
        shim=True,
    ),
    DeviceSeam(
        "swallow_titan/model/parallelize.py: parallelize_swallow",
        "on gloo (CPU) FSDP2 reduces with SUM instead of PREMUL_SUM(1.0)",
        "NCCL: torchtitan's FSDP2 reduction unchanged",
        shim=False,
    ),
    DeviceSeam(
        "swallow_titan/components/metrics.py: SwallowMetricsProcessor",
        "no MFU (no peak), memory is peak RSS",
        "MFU against the card's dense bf16 peak",
        shim=False,
    ),
    DeviceSeam(
        "swallow_titan/checkpoint/rng.py: RngState",
        "CPU generator only",
        "CPU and CUDA generators saved and restored",
        shim=False,
    ),
    DeviceSeam(
        "swallow_titan/components/preflight.py: _check_checkpoint_device, _check_float8, "
        "_check_kernels_device",
        "refuses pinned-memory async checkpoints, float8 without emulate (or emulated "
        "with a compiled model), Triton kernels without TRITON_INTERPRET=1",
        "no device restriction",
        shim=False,
    ),
    DeviceSeam(
        "swallow_titan/simulate.py: SimulatedTrainer, apply_stand_ins",
        "simulates on fake CPU tensors (torch without CUDA cannot run backward on "
        "fake CUDA tensors); SDPA on the CPU flash kernel stands in for FlexAttention, "
        "float8 is emulated; the trainer's 'cpu:<rank>' device becomes 'cpu'",
        "simulates on fake CUDA tensors (the GPU's kernels' shapes); the same "
        "attention and float8 stand-ins",
        shim=False,
    ),
    DeviceSeam(
        "swallow_titan/evaluate.py: _init_distributed, main",
        "evaluates on CPU with gloo, in float32 unless --dtype says otherwise",
        "one GPU per process (LOCAL_RANK) with NCCL, bfloat16 by default",
        shim=False,
    ),
    DeviceSeam(
        "kernels/runtime.py: check_device, autotune_configs, num_programs",
        "kernels run only under Triton's interpreter, one autotune config, 4 programs",
        "compiled Triton, the GPU autotune lists, programs per SM",
        shim=False,
    ),
    DeviceSeam(
        "kernels/cross_entropy.py: out_dtype_gemm_available, _gemm_dtype",
        "no out_dtype GEMMs: logits rounded to the GEMM dtype, weight-gradient GEMM "
        "in fp32 on upcast operands; autocast dtype read for 'cpu'",
        "bf16 GEMMs with fp32 output (probed once); autocast dtype read for 'cuda'",
        shim=False,
    ),
)
=======
>>>>>>> main
