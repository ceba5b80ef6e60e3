"""Triton kernels for swallow-titan: fused RMSNorm and fused linear + cross-entropy.

- :func:`rms_norm` (``kernels/rmsnorm.py``): RMSNorm, optionally fused with the
  residual add before it; :func:`rms_norm_heads` applies it per attention head
  (Qwen3's q/k norms).
- :func:`fused_linear_cross_entropy` (``kernels/cross_entropy.py``): output
  projection + cross-entropy (+ z-loss) without the [tokens, vocab] logits.

Each is a PyTorch custom op (``torch.ops.swallow.*``) usable under
``torch.compile(fullgraph=True)``, accepts DTensors, and has a plain-PyTorch
``*_reference`` beside it. They run on a CUDA GPU, or on CPU under Triton's
interpreter (``TRITON_INTERPRET=1``; see ``kernels/runtime.py``).
``kernels/aot.py`` compiles every kernel and GPU autotune config for sm_90
without a GPU (``benchmarks/kernels_aot.py``).

Note: the PyPI project ``kernels`` (Hugging Face's kernel hub) has the same
import name. transformers probes for it; this package must not be mistaken for
it (see pyproject.toml).
"""

from kernels.cross_entropy import (
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_reference,
)
from kernels.rmsnorm import rms_norm, rms_norm_heads, rms_norm_reference

__all__ = [
    "fused_linear_cross_entropy",
    "fused_linear_cross_entropy_reference",
    "rms_norm",
    "rms_norm_heads",
    "rms_norm_reference",
]
