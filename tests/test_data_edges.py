"""The edges of the data path the shipped samples never reach: Megatron index
versions and multimodal indexes, ids at the vocabulary's end, files that do not
cut evenly, estimates from a sample, texts longer than a tokenizer piece,
special tokens beyond the 256 slots, and units that do not divide over slots."""

from __future__ import annotations

import itertools
import json
import math
import warnings

import numpy as np
import pytest
import torch

from support import TINY_TOKENIZER, tiny_tokenizer
from support.data import numbered_docs
from support.megatron import write_megatron
from swallow_titan.data.megatron import (
    INDEX_MAGIC,
    check_vocabulary,
    document_boundaries,
    packed_tokens,
    read_index,
)
from swallow_titan.data.records import ReadUnit
from swallow_titan.data.sharding import MIN_RANGE_BYTES, assign_lanes, split_units
from swallow_titan.data.sources import DataSourceError, SourceFile
from swallow_titan.data.tokenizer import (
    NUM_SPECIAL_TOKENS,
    Llama3Tokenizer,
    byte_level_from_bytes,
    read_tiktoken_ranks,
)

# ------------------------------------------------------------------ Megatron


def test_an_index_of_another_version_is_refused_naming_file_and_version(tmp_path):
    bin_path = write_megatron(tmp_path / "v", [[1, 2, 3], [4, 5]])
    idx = tmp_path / "v.idx"
    data = bytearray(idx.read_bytes())
    data[len(INDEX_MAGIC):len(INDEX_MAGIC) + 8] = (2).to_bytes(8, "little")
    idx.write_bytes(bytes(data))
    with pytest.raises(DataSourceError, match=r"v\.bin.*index version 2, expected 1"):
        read_index(str(bin_path), "m")


def test_a_multimodal_index_with_its_sequence_modes_is_read(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    docs = [[7, 8, 9], [10], [11, 12]]
    builder = IndexedDatasetBuilder(str(tmp_path / "mm.bin"), dtype=np.int32, multimodal=True)
    for mode, doc in enumerate(docs):
        builder.add_item(torch.tensor(doc), mode=mode % 2)
        builder.end_document()
    builder.finalize(str(tmp_path / "mm.idx"))
    index = read_index(str(tmp_path / "mm.bin"), "m")  # .idx ends with one int8 per sequence
    assert [index.document(d).tolist() for d in range(index.documents)] == docs


def test_ids_up_to_the_last_of_the_vocabulary_pass_and_one_beyond_is_refused(tmp_path):
    bin_path = write_megatron(tmp_path / "ids", [[0, 5], [99, 3]])
    index = read_index(str(bin_path), "m")
    check_vocabulary(index, 100, "m")  # 99 is the last id of a 100-id vocabulary
    with pytest.raises(DataSourceError, match="token id 99"):
        check_vocabulary(index, 99, "m")


@pytest.mark.parametrize("pieces", [2, 3, 4, 5, 9])
def test_file_pieces_never_come_out_empty_when_one_document_holds_most_bytes(tmp_path, pieces):
    docs = [[1], [2], [3], [4], list(range(400))]  # byte targets all fall in the last one
    index = read_index(str(write_megatron(tmp_path / "skew", docs)), "m")
    bounds = document_boundaries(index, pieces)
    assert bounds[0] == 0 and bounds[-1] == len(docs)
    assert len(bounds) == min(pieces, len(docs)) + 1
    assert all(a < b for a, b in zip(bounds, bounds[1:]))


def test_a_sampled_packed_token_count_scales_the_stored_bos_eos_to_the_whole_file(tmp_path):
    tok = tiny_tokenizer()
    bos, eos = tok.bos_id, tok.eos_id
    # Every document stored as BOS + ids + EOS: the packer adds nothing to any of them.
    docs = [[bos, *tok.encode_ordinary(t), eos] for t in numbered_docs(40, "s")]
    index = read_index(str(write_megatron(tmp_path / "s", docs)), "m")
    exact, is_exact = packed_tokens(index, bos, eos)
    assert (exact, is_exact) == (sum(map(len, docs)), True)
    estimate, is_exact = packed_tokens(index, bos, eos, sample=4)
    assert (estimate, is_exact) == (exact, False)


# ----------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("text", [
    "word " * 30_000,  # cut at spaces
    ("line\n" * 12_000) + "x" * 150_000,  # a newline, then a run with no whitespace
], ids=["spaces", "no-whitespace-run"])
def test_text_longer_than_one_tokenizer_piece_round_trips(text):
    tok = tiny_tokenizer()
    assert len(text) > 100_000
    assert tok.decode(tok.encode_ordinary(text)) == text
    assert tok.encode_batch([text, "short"]) == [tok.encode_ordinary(text),
                                                 tok.encode_ordinary("short")]


def test_a_special_token_beyond_the_256_slots_is_left_out_of_a_tokenizer_json(tmp_path):
    ranks = read_tiktoken_ranks(TINY_TOKENIZER)
    n = len(ranks)
    spec = {
        "model": {"type": "BPE", "vocab": {byte_level_from_bytes(t): r for t, r in ranks.items()}},
        "added_tokens": [
            {"id": n, "content": "<|begin_of_text|>"},
            {"id": n + 1, "content": "<|end_of_text|>"},
            {"id": n + NUM_SPECIAL_TOKENS - 1, "content": "<|last_slot|>"},
            {"id": n + NUM_SPECIAL_TOKENS, "content": "<|image|>"},  # as Llama 3.2's
        ],
    }
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    tok = Llama3Tokenizer(tmp_path)
    assert tok.special_tokens["<|last_slot|>"] == n + NUM_SPECIAL_TOKENS - 1
    assert "<|image|>" not in tok.special_tokens
    assert tok.n_words == n + NUM_SPECIAL_TOKENS
    assert max(tok.special_tokens.values()) < tok.n_words


# ------------------------------------------------------------------ sharding


def _units(sizes: list[int]) -> list[ReadUnit]:
    return [ReadUnit(f"/data/{i}.jsonl.gz", "jsonl", "gzip", 0, -1, s) for i, s in enumerate(sizes)]


def test_units_over_slots_stay_within_the_lpt_bound_of_the_best_split():
    sizes = [5, 4, 3, 3, 3]
    slots = 2
    lanes = assign_lanes(_units(sizes), slots)
    worst = max(lane.size for lane in lanes)
    best = min(
        max(sum(s for s, side in zip(sizes, sides) if side == j) for j in range(slots))
        for sides in itertools.product(range(slots), repeat=len(sizes))
    )
    # Graham: largest-first greedy is within (4/3 - 1/(3m)) of the optimum.
    assert worst <= (4 / 3 - 1 / (3 * slots)) * best
    assert sorted(u.path for lane in lanes for u in lane.units) == sorted(u.path for u in _units(sizes))


@pytest.mark.parametrize("sizes, slots", [([700, 200, 100], 8), ([1, 1, 1], 7), ([10, 30], 5)])
def test_fewer_units_than_slots_share_every_slot_by_size(sizes, slots):
    lanes = assign_lanes(_units(sizes), slots)
    assert len(lanes) == slots
    shares = {u.path: lane.stride for lane in lanes for u in lane.units}
    for unit, size in zip(_units(sizes), sizes):
        exact = slots * size / sum(sizes)
        assert shares[unit.path] >= 1 and abs(shares[unit.path] - exact) < 1 + 1e-9
        # each sharing slot reads its own phase of the unit
        phases = sorted(lane.phase for lane in lanes if lane.units == (unit,))
        assert phases == list(range(shares[unit.path]))


def test_a_small_json_lines_file_is_not_cut_below_the_minimum_range(tmp_path):
    path = tmp_path / "small.jsonl"
    path.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(300)))
    size = path.stat().st_size
    assert MIN_RANGE_BYTES < size < 3 * MIN_RANGE_BYTES
    units = split_units([SourceFile(str(path), "jsonl", "", size)], 16, "s")
    assert len(units) == size // MIN_RANGE_BYTES
    assert all(u.size >= MIN_RANGE_BYTES for u in units)
    assert units[0].start == 0 and units[-1].end == size
    assert math.fsum(u.size for u in units) == size
