"""Where the Triton kernels run: a CUDA GPU, or Triton's CPU interpreter.

Triton chooses between compiling and interpreting when it is imported and when
``@triton.jit`` wraps a function, from ``TRITON_INTERPRET``: set
``TRITON_INTERPRET=1`` before anything imports triton (``tests/conftest.py``
does it for the test session). The interpreter runs one program after another
with NumPy, so it is for tests only; it cannot benchmark several autotune
configs (no driver), so there each kernel gets a single config.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

# What Triton was set up for when it was imported (its own tl.* helpers are
# jit functions too), not what the environment says now.
INTERPRET = isinstance(tl.standard.cdiv, InterpretedFunction)


def check_device(*tensors: torch.Tensor) -> None:
    """Raise a clear error when the kernels cannot run on these tensors."""
    for t in tensors:
        if t.is_cuda or (t.device.type == "cpu" and INTERPRET):
            continue
        if os.environ.get("TRITON_INTERPRET") == "1":
            raise RuntimeError(
                "TRITON_INTERPRET=1 was set after triton was imported, so Triton "
                "compiles for a GPU; set it in the environment before the process "
                "starts (or before any import of torch or triton)"
            )
        raise RuntimeError(
            f"swallow-titan's Triton kernels got a tensor on {t.device}: they need a "
            "CUDA GPU, or TRITON_INTERPRET=1 in the environment to run on CPU through "
            "Triton's interpreter (slow; for tests). To train without them set "
            '[kernels] rmsnorm = "torch" and loss = "torch".'
        )


def autotune_configs(
    gpu: list[triton.Config], interpreter: triton.Config
) -> list[triton.Config]:
    """The configs to autotune over: ``gpu`` on a GPU, ``[interpreter]`` otherwise."""
    return [interpreter] if INTERPRET else gpu


def num_programs(device: torch.device, per_sm: int, interpreter: int) -> int:
    """Programs for a persistent kernel: a few per SM, or a handful on CPU."""
    if device.type != "cuda":
        return interpreter
    return per_sm * torch.cuda.get_device_properties(device).multi_processor_count
