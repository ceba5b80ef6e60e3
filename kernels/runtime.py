"""Where the Triton kernels run: a CUDA GPU, or Triton's CPU interpreter.

``TRITON_INTERPRET=1`` must be set before this package is imported (Triton reads
it when ``@triton.jit`` decorates a kernel). The interpreter runs one program
after another with NumPy, so it is only for tests; it cannot run several
autotune configs (no driver to benchmark with), so kernels ask
:func:`autotune_configs` for their list and get a single config there.
"""

from __future__ import annotations

import os

import torch
import triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_device(*tensors: torch.Tensor) -> None:
    """Raise a clear error when the kernels cannot run on these tensors."""
    for t in tensors:
        if t.is_cuda:
            continue
        if t.device.type == "cpu" and INTERPRET:
            continue
        raise RuntimeError(
            f"swallow-titan's Triton kernels got a tensor on {t.device}: they need a "
            "CUDA GPU, or TRITON_INTERPRET=1 set before `kernels` is imported to run "
            "on CPU through Triton's interpreter (slow; for tests). To train without "
            "them set [kernels] rmsnorm = \"torch\" and loss = \"torch\"."
        )


def autotune_configs(
    gpu: list[triton.Config], interpreter: triton.Config
) -> list[triton.Config]:
    """The configs to autotune over: ``gpu`` on a GPU, ``[interpreter]`` otherwise."""
    return [interpreter] if INTERPRET else gpu


def num_programs(device: torch.device, per_sm: int, interpreter: int) -> int:
    """Programs for a persistent kernel: a few per SM, or a handful on the interpreter."""
    if INTERPRET or device.type != "cuda":
        return interpreter
    return per_sm * torch.cuda.get_device_properties(device).multi_processor_count
