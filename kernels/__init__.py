"""Triton kernels for swallow-titan (fused RMSNorm, fused linear + cross-entropy).

Filled by the kernel work; the foundation ships the package empty so the
layout (``kernels/`` beside ``swallow_titan/``) is stable.

Note: the PyPI project ``kernels`` (Hugging Face's kernel hub) has the same
import name. transformers probes for it; see ``tests/test_packaging.py`` for
the check that this package is not mistaken for it.
"""
