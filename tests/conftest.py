"""Test set-up: swallow_titan must be imported before torchtitan (device selection)."""

import os

# Triton's CPU interpreter for the kernel tests (kernels/). Triton reads this when
# it is first imported, so it is set before anything imports torch or triton;
# nothing else in the tests uses Triton.
os.environ.setdefault("TRITON_INTERPRET", "1")

import swallow_titan  # noqa: E402, F401
