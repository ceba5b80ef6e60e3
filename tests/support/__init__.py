"""What the tests share: paths, the tiny tokenizer, and (in submodules) their set-ups.

- ``support.runs``: real training jobs (torchrun in a subprocess, in the
  foreground or in the background to signal and kill) and their run logs.
- ``support.data``: small corpora, stream specs and slot-loader runs.
- ``support.eval``: the shipped lm-eval task files and HF tokenizer files for them.
- ``support.hf``: small random Hugging Face Llama folders saved by transformers.
- ``support.megatron``: Megatron indexed datasets written by megatron-core.
- ``support.model``: the model as a run builds it from a config, in-process.
- ``support.overrides``: override sets the tests share (kernels on, FSDP2, TP2).
- ``support.tensorboard``: a run's TensorBoard events read as TensorBoard does.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from swallow_titan.data.tokenizer import Llama3Tokenizer

REPO = Path(__file__).resolve().parents[2]
TINY_CONFIG = REPO / "train_configs" / "tiny_cpu.toml"
SAMPLES = REPO / "assets" / "samples"
# The tiny flavor's tokenizer (scripts/build_tiny_tokenizer.py made it).
TINY_TOKENIZER_DIR = REPO / "assets" / "tokenizer"
TINY_TOKENIZER = TINY_TOKENIZER_DIR / "tokenizer.model"


@lru_cache(maxsize=1)
def tiny_tokenizer() -> Llama3Tokenizer:
    """The shipped tiny tokenizer, loaded once per test session."""
    return Llama3Tokenizer(TINY_TOKENIZER_DIR)
