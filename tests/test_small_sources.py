"""A source with fewer documents than slots keeps its weight's share exactly:
every slot reads all of it in its own seeded order."""

from __future__ import annotations

from fractions import Fraction

import pytest

from support import SAMPLES
from support.data import make_spec, numbered_docs, write_jsonl
from swallow_titan.config.sections import DataSource
from swallow_titan.data import sharding
from swallow_titan.data.slots import iter_slot_batches
from swallow_titan.data.sources import DataSourceError


def held_out_and_code(tmp_path, docs: int = 7) -> list[DataSource]:
    path = write_jsonl(tmp_path / "held_out.jsonl", numbered_docs(docs, "held"))
    return [
        DataSource(name="held_out", weight=0.5, path=str(path)),
        DataSource(name="code", weight=0.3, path=str(SAMPLES / "code.jsonl")),
    ]


def test_seven_documents_among_sixteen_slots_keep_the_ratio_within_one_sequence(tmp_path):
    sources = held_out_and_code(tmp_path)
    spec = make_spec(sources, seq_len=32, global_batch=16)
    taken = [0, 0]
    share = [Fraction(5, 8), Fraction(3, 8)]  # 0.5 : 0.3 between the two
    for k, batch in enumerate(iter_slot_batches(spec, range(16), {}), start=1):
        for window in batch.values():
            taken[window.source] += 1
        sequences = 16 * k
        for s in range(2):
            # Tijdeman's bound: every prefix within one sequence of the target.
            assert abs(taken[s] - share[s] * sequences) < 1, (k, taken)
        if k == 40:
            break
    assert k == 40  # no slot ran dry


def test_every_slot_reads_every_document_of_a_small_source_in_its_own_order(tmp_path):
    sources = held_out_and_code(tmp_path)
    spec = make_spec(sources, seq_len=32, global_batch=16)
    lanes = spec.lanes[0]
    assert all(lane.whole and lane.stride == 1 for lane in lanes)
    assert not any(lane.whole for lane in spec.lanes[1])  # code is large enough
    from swallow_titan.data.lane import Lane

    tok = spec.tokenizer
    firsts = set()
    for slot in range(16):
        lane = Lane(sources[0], lanes[slot], slot, tok, 32, 0, block_docs=8)
        lane.next_window()
        firsts.add(tuple(lane._block[i][1].index for i in range(7)))
        assert sorted(r.index for _, r in lane._block) == list(range(7))
    assert len(firsts) > 1  # seeded per slot, not one order for all


def test_a_source_with_a_document_per_slot_is_split_not_copied(tmp_path):
    sources = held_out_and_code(tmp_path, docs=16)
    lanes = make_spec(sources, seq_len=32, global_batch=16).lanes[0]
    assert not any(lane.whole for lane in lanes) and {lane.stride for lane in lanes} == {16}


def test_a_small_source_too_large_to_copy_is_refused_by_name(tmp_path, monkeypatch):
    monkeypatch.setattr(sharding, "WHOLE_SOURCE_MAX_BYTES", 100)
    with pytest.raises(DataSourceError) as e:
        make_spec(held_out_and_code(tmp_path), seq_len=32, global_batch=16)
    message = str(e.value)
    assert "'held_out'" in message and "9 of the 16 slots" in message
    assert "at least 16 files" in message


def test_the_plan_shows_a_small_source_and_refuses_one_too_large(tmp_path, monkeypatch):
    from support import TINY_CONFIG
    from swallow_titan.config.manager import load_job_config
    from swallow_titan.data.source_size import format_source_line, plan_sources

    config = load_job_config(TINY_CONFIG, [])
    config.data.sources = held_out_and_code(tmp_path)
    held_out, code = plan_sources(config, total_tokens=100_000, slots=16)
    assert held_out["read_whole_by_every_slot"] and not code["read_whole_by_every_slot"]
    assert "every slot reads all of it" in format_source_line(held_out, str)
    assert held_out["problem"] is None
    monkeypatch.setattr(sharding, "WHOLE_SOURCE_MAX_BYTES", 100)
    held_out, _ = plan_sources(config, total_tokens=100_000, slots=16)
    assert "'held_out'" in held_out["problem"] and "at least 16 files" in held_out["problem"]


def test_a_small_source_with_max_epochs_is_refused_by_name(tmp_path):
    sources = held_out_and_code(tmp_path)
    sources[0].max_epochs = 2
    with pytest.raises(DataSourceError) as e:
        make_spec(sources, seq_len=32, global_batch=16)
    assert "'held_out'" in str(e.value) and "Remove max_epochs" in str(e.value)
