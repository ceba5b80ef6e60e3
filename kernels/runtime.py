"""Where the Triton kernels run: a CUDA GPU, or Triton's CPU interpreter.

Triton decides between compiling and interpreting when ``@triton.jit`` wraps a
function, from ``TRITON_INTERPRET``. The kernels here are wrapped by
:func:`triton_kernel` instead, which applies ``triton.autotune(triton.jit(fn))``
at the first launch: importing ``kernels`` early (any module importing the model
does) then cannot freeze the choice, and a test only has to set
``TRITON_INTERPRET=1`` before it launches a kernel.

The interpreter runs one program after another with NumPy, so it is for tests
only; it cannot benchmark several autotune configs (no driver), so there each
kernel gets a single config.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch
import triton


def interpreting() -> bool:
    """Whether Triton kernels launched now run in the CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_device(*tensors: torch.Tensor) -> None:
    """Raise a clear error when the kernels cannot run on these tensors."""
    for t in tensors:
        if t.is_cuda or (t.device.type == "cpu" and interpreting()):
            continue
        raise RuntimeError(
            f"swallow-titan's Triton kernels got a tensor on {t.device}: they need a "
            "CUDA GPU, or TRITON_INTERPRET=1 in the environment to run on CPU through "
            "Triton's interpreter (slow; for tests). To train without them set "
            '[kernels] rmsnorm = "torch" and loss = "torch".'
        )


def num_programs(device: torch.device, per_sm: int, interpreter: int) -> int:
    """Programs for a persistent kernel: a few per SM, or a handful on CPU."""
    if device.type != "cuda":
        return interpreter
    return per_sm * torch.cuda.get_device_properties(device).multi_processor_count


class LazyKernel:
    """A Triton kernel that is jit-wrapped and autotuned on its first launch."""

    def __init__(
        self,
        fn: Callable,
        key: Sequence[str],
        gpu_configs: Sequence[triton.Config],
        interpreter_config: triton.Config,
    ):
        self.fn = fn
        self.key = list(key)
        self.gpu_configs = list(gpu_configs)
        self.interpreter_config = interpreter_config
        self._built: dict[bool, Callable] = {}

    def _kernel(self) -> Callable:
        interpret = interpreting()
        if interpret not in self._built:
            configs = [self.interpreter_config] if interpret else self.gpu_configs
            self._built[interpret] = triton.autotune(configs=configs, key=self.key)(
                triton.jit(self.fn)
            )
        return self._built[interpret]

    def __getitem__(self, grid) -> Callable:
        return self._kernel()[grid]


def triton_kernel(
    *,
    key: Sequence[str],
    gpu_configs: Sequence[triton.Config],
    interpreter_config: triton.Config,
) -> Callable[[Callable], LazyKernel]:
    """Decorator: a :class:`LazyKernel` autotuned over ``gpu_configs`` on a GPU and
    run with ``interpreter_config`` alone in the interpreter."""

    def wrap(fn: Callable) -> LazyKernel:
        return LazyKernel(fn, key, gpu_configs, interpreter_config)

    return wrap
