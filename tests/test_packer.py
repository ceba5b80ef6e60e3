"""DocumentPacker: BOS/EOS per document, seq_len+1 windows, restarting positions."""

from __future__ import annotations

import pytest

from swallow_titan.data.packer import DocumentPacker, pack_documents

BOS, EOS = 100, 101


def test_windows_have_seq_len_plus_one_tokens_and_lose_nothing():
    docs = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10, 11, 12], [13]]
    windows = list(pack_documents(docs, seq_len=4, bos_id=BOS, eos_id=EOS))
    stream = [t for d in docs for t in (BOS, *d, EOS)]
    assert all(len(w.tokens) == 5 for w in windows)
    flat = [int(t) for w in windows for t in w.tokens]
    assert flat == stream[: len(flat)]
    assert len(stream) - len(flat) < 5


def test_positions_restart_at_each_document_and_each_window():
    packer = DocumentPacker(seq_len=7, bos_id=BOS, eos_id=EOS)
    packer.add([1, 2, 3, 4, 5, 6])  # 8 tokens with BOS/EOS
    packer.add([7, 8])  # 4 tokens
    first = packer.pop()
    assert first.tokens.tolist() == [BOS, 1, 2, 3, 4, 5, 6, EOS]
    assert first.positions.tolist() == list(range(8))
    packer.add([9, 10, 11])
    second = packer.pop()
    assert second.tokens.tolist() == [BOS, 7, 8, EOS, BOS, 9, 10, 11]
    assert second.positions.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]


def test_a_document_cut_by_a_window_restarts_its_positions():
    packer = DocumentPacker(seq_len=3, bos_id=BOS, eos_id=EOS)
    packer.add(list(range(1, 10)))  # 11 tokens: two full windows
    assert packer.pop().positions.tolist() == [0, 1, 2, 3]
    second = packer.pop()
    assert second.tokens.tolist() == [4, 5, 6, 7]
    assert second.positions.tolist() == [0, 1, 2, 3]
    packer.add([20])
    third = packer.pop()
    assert third.tokens.tolist() == [8, 9, EOS, BOS]
    assert third.positions.tolist() == [0, 1, 2, 0]


def test_state_round_trip_continues_mid_window():
    docs = [[i] * (i % 7 + 1) for i in range(1, 40)]
    whole = [w.tokens.tolist() for w in pack_documents(docs, 6, BOS, EOS)]

    first = DocumentPacker(6, BOS, EOS)
    out = []
    for doc in docs[:20]:
        first.add(doc)
        while first.has_window():
            out.append(first.pop().tokens.tolist())
    second = DocumentPacker(6, BOS, EOS)
    second.load_state_dict(first.state_dict())
    for doc in docs[20:]:
        second.add(doc)
        while second.has_window():
            out.append(second.pop().tokens.tolist())
    assert out == whole


def test_pop_without_a_full_window_raises():
    packer = DocumentPacker(seq_len=8, bos_id=BOS, eos_id=EOS)
    packer.add([1])
    with pytest.raises(IndexError):
        packer.pop()


def test_a_document_added_again_with_skip_continues_where_windows_left_it():
    docs = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16]]
    whole = [w.tokens.tolist() for w in pack_documents(docs, 4, BOS, EOS)]
    first = DocumentPacker(4, BOS, EOS)
    first.add(docs[0])  # 11 tokens: two windows, 1 token of the document left over
    out = [first.pop().tokens.tolist(), first.pop().tokens.tolist()]
    resumed = DocumentPacker(4, BOS, EOS)
    resumed.add(docs[0], skip=10)  # what a restart does: re-add, drop what was used
    for doc in docs[1:]:
        resumed.add(doc)
        while resumed.has_window():
            out.append(resumed.pop().tokens.tolist())
    assert out == whole
