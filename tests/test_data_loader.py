"""The slot dataloader: exact mixture, deterministic shuffling, repeats, block-causal
positions, reading only its own part, workers, exact and elastic resumption."""

from __future__ import annotations

import json
import logging
import re

import pytest
import torch

from support import tiny_tokenizer
from support.data import (
    document_texts,
    make_loaders,
    make_spec,
    merged_state,
    numbered_docs,
    run_global_batches,
    sample_sources,
    write_jsonl,
)
from swallow_titan.config.sections import DataSource
from swallow_titan.data import records
from swallow_titan.data.dataloader import source_token_counts


def one_epoch_source(tmp_path, n=400, name="docs", files=1, **kwargs) -> DataSource:
    docs = numbered_docs(n, prefix=f"{name}-")
    for i in range(files):
        write_jsonl(tmp_path / name / f"part{i}.jsonl", docs[i::files])
    return DataSource(name=name, path=str(tmp_path / name / "*.jsonl"), max_epochs=1, **kwargs)


def all_windows(loaders) -> dict[int, list[list[int]]]:
    """Every window of a finite stream, per slot, in order."""
    per_slot: dict[int, list[list[int]]] = {}
    for loader in loaders:
        for rows in loader.microbatches():
            for w in rows:
                per_slot.setdefault(w.slot, []).append(w.tokens.tolist())
    return per_slot


def test_realised_mixture_is_within_one_sequence_at_every_global_batch():
    spec = make_spec(sample_sources(ja=0.4, en=0.3, code=0.2, math=0.1), global_batch=16)
    loaders = make_loaders(spec, dp=2, local=4)
    iterators = [loader.microbatches() for loader in loaders]
    counts = {name: 0 for name in spec.names}
    weights = {s.name: s.weight for s in spec.sources}
    for _ in range(40):
        for loader, it in zip(loaders, iterators):
            for _ in range(loader.microsteps):
                for w in next(it):
                    counts[spec.names[w.source]] += 1
        k = sum(counts.values())
        for name, n in counts.items():
            assert abs(n - weights[name] * k) < 1, (name, n, k)


def test_the_same_seed_gives_the_same_batches_and_another_seed_others():
    def batches(seed):
        spec = make_spec(sample_sources(ja=1, en=1), seed=seed)
        return run_global_batches(make_loaders(spec, dp=1, local=4), 12)

    assert batches(1) == batches(1)
    assert batches(1) != batches(2)


def test_shuffling_changes_the_order_but_not_the_documents(tmp_path):
    source = one_epoch_source(tmp_path, n=300)
    tok = tiny_tokenizer()

    def documents(seed, block_docs):
        spec = make_spec([source], seed=seed, global_batch=2, block_docs=block_docs)
        per_slot = all_windows(make_loaders(spec, dp=1, local=2))
        return [document_texts(ws, tok) for _, ws in sorted(per_slot.items())]

    in_file_order, seed1, seed2 = documents(0, 0), documents(1, 64), documents(2, 64)
    assert seed1 != in_file_order and seed1 != seed2
    for a, b, c in zip(in_file_order, seed1, seed2):
        # The same documents per slot (the last partial window is dropped at the
        # end of the single epoch, so compare what all three contain).
        common = set(a) & set(b) & set(c)
        assert len(common) >= len(a) - 8
        assert sorted(d for d in b if d in common) == sorted(d for d in a if d in common)


def test_a_source_that_runs_out_repeats_reshuffled_and_says_so(tmp_path, caplog):
    small = DataSource(name="small", path=str(write_jsonl(tmp_path / "s.jsonl", numbered_docs(12))))
    spec = make_spec([small, *sample_sources(en=1)], global_batch=2, seed=3, block_docs=8)
    loader = make_loaders(spec, dp=1, local=2)[0]
    tok = tiny_tokenizer()
    slot0 = []
    with caplog.at_level(logging.WARNING):
        for rows in loader.microbatches():
            w = rows[0]
            if w.source == 0:
                slot0.append(w.tokens.tolist())
            if w.state["lanes"]["small"]["epoch"] == 2:
                break
    assert "data source 'small' repeats: epoch 2 begins" in caplog.text
    ids = [d.split()[0] for d in document_texts(slot0, tok)]
    # Slot 0's part of the source, read twice: same documents, another order.
    n = len(set(ids))
    assert sorted(ids[:n]) == sorted(ids[n : 2 * n])
    assert ids[:n] != ids[n : 2 * n]


def test_max_epochs_stops_a_source_and_the_others_fill_its_positions(tmp_path, caplog):
    small = one_epoch_source(tmp_path, n=12, name="small")
    spec = make_spec([small, *sample_sources(en=1)], global_batch=4)
    loader = make_loaders(spec, dp=1, local=4)[0]
    batches = iter(loader)
    with caplog.at_level(logging.WARNING):
        for _ in range(60):
            next(batches)
    metrics = loader.metrics()
    assert "data source 'small' stopped" in caplog.text and "max_epochs" in caplog.text
    assert metrics["data/small/lanes_stopped"] == 4
    assert metrics["data/small/epoch"] == 1
    assert metrics["data/en/share"] > 0.75


def test_a_stopped_sources_positions_keep_the_others_at_their_weights(tmp_path):
    small = DataSource(
        name="small", path=str(write_jsonl(tmp_path / "small.jsonl", numbered_docs(12))),
        weight=2, max_epochs=1,
    )
    spec = make_spec([small, *sample_sources(en=3, code=1)], global_batch=4)
    loader = make_loaders(spec, dp=1, local=4)[0]
    batches = iter(loader)
    for _ in range(100):
        next(batches)
    for state in loader.consumed_states():
        taken = state["taken"]
        assert taken["small"] <= 12  # it stopped early: most positions were stood in for
        # The stand-in is the live source furthest behind its weight, so en and
        # code stay 3:1 in each slot: each within about two sequences of its
        # share (one from the stand-in rule, one from the schedule's rounding),
        # i.e. |en - 3 code| <= 4 x 2. Handing the positions to the source
        # furthest ahead instead puts it off by 30 or more.
        assert abs(taken["en"] - 3 * taken["code"]) <= 8, taken


def test_max_epochs_1_reads_each_document_once(tmp_path):
    spec = make_spec([one_epoch_source(tmp_path, n=50)], global_batch=2)
    per_slot = all_windows(make_loaders(spec, dp=1, local=2))
    ids = [t.split()[0] for ws in per_slot.values() for t in document_texts(ws, tiny_tokenizer())]
    assert len(ids) == len(set(ids))  # nothing read a second time
    # The stream ends at the first batch a slot cannot fill, so the tail of the
    # epoch is lost (6 documents here); the rest was read.
    assert len(ids) > 40


def test_fractional_max_epochs_stops_at_the_block_boundary_past_the_fraction(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", numbered_docs(40))
    source = DataSource(name="d", path=str(path), max_epochs=1.5)
    spec = make_spec([source], global_batch=1, block_docs=4)
    loader = make_loaders(spec, dp=1, local=1)[0]
    all_windows([loader])
    # One whole epoch (40), then blocks of 4 until 0.5 x 40 records are behind.
    assert loader.metrics()["data/d/documents"] == 60


def test_resume_across_shuffle_blocks_continues_exactly():
    # Blocks of 4 documents: the resume point lies many blocks into the epoch,
    # so the saved block cursor (unit, record, offset) is what a restart reads from.
    spec = make_spec(sample_sources(ja=1, en=1), global_batch=4, seq_len=16, block_docs=4)
    expected = run_global_batches(make_loaders(spec, dp=2, local=2), 30)
    first = make_loaders(spec, dp=2, local=2)
    got = run_global_batches(first, 13)
    got += run_global_batches(make_loaders(spec, dp=2, local=2, state=merged_state(first)), 17)
    assert got == expected


def test_the_stream_ends_when_every_source_of_a_slot_stopped(tmp_path):
    spec = make_spec([one_epoch_source(tmp_path, n=50)], global_batch=2)
    windows = all_windows(make_loaders(spec, dp=1, local=2))
    assert 0 < len(windows[0]) < 100


def test_positions_agree_with_torchtitans_document_mask():
    from torchtitan.models.attention import get_document_mask_mod

    tok = tiny_tokenizer()
    spec = make_spec(sample_sources(code=1, math=1), seq_len=64)
    inputs, _ = next(iter(make_loaders(spec, dp=1, local=8)[0]))
    tokens, positions = inputs["input"], inputs["positions"]
    mask_mod = get_document_mask_mod(tokens.clone(), tok.eos_id)
    q = torch.arange(64).view(-1, 1).expand(64, 64)
    kv = torch.arange(64).view(1, -1).expand(64, 64)
    for b in range(tokens.shape[0]):
        # Our documents: a new one wherever the position restarts at 0.
        doc = torch.cumsum((positions[b] == 0).long(), 0)
        ours = doc[q] == doc[kv]
        theirs = mask_mod(torch.tensor(b), torch.tensor(0), q, kv)
        assert torch.equal(ours, theirs)
        # Positions count from each document start (or the window start).
        starts = torch.nonzero(positions[b] == 0).flatten().tolist()
        for a, e in zip(starts, [*starts[1:], 64]):
            assert positions[b, a:e].tolist() == list(range(e - a))
        assert tokens[b][positions[b] == 0][1:].eq(tok.bos_id).all()


def test_each_rank_opens_only_its_own_files_and_reads_its_own_documents(tmp_path, monkeypatch):
    source = one_epoch_source(tmp_path, n=400, files=8)
    source.max_epochs = 0
    opened: list[str] = []
    real_open = records.open_binary
    monkeypatch.setattr(records, "open_binary",
                        lambda path, name: opened.append(path) or real_open(path, name))
    spec = make_spec([source], global_batch=8, seq_len=16)
    tok = tiny_tokenizer()
    seen = []
    for rank in range(2):
        opened.clear()
        loader = make_loaders(spec, dp=2, local=4)[0 if rank == 0 else 1]
        per_slot = {}
        for _, rows in zip(range(30), loader.microbatches()):
            for w in rows:
                per_slot.setdefault(w.slot, []).append(w.tokens.tolist())
        files = {path for path in opened}
        mine = {u.path for j in loader.slots for u in spec.lanes[0][j].units}
        assert files == mine and len(files) == 4
        seen.append({d for ws in per_slot.values() for d in document_texts(ws, tok)})
        documents_read = sum(s["lanes"]["docs"]["documents"] for s in loader.consumed_states())
        assert documents_read <= 400 // 2 + 8
    assert not seen[0] & seen[1]


@pytest.mark.parametrize("workers", [1, 2])
def test_worker_processes_give_the_same_batches(workers):
    spec = make_spec(sample_sources(ja=0.4, en=0.2, code=0.2, math=0.2), global_batch=8)
    expected = run_global_batches(make_loaders(spec, dp=2, local=2), 10)
    assert run_global_batches(make_loaders(spec, dp=2, local=2, workers=workers), 10) == expected


def test_resume_mid_run_continues_exactly_with_the_same_ranks():
    spec = make_spec(sample_sources(ja=2, code=1), global_batch=4, seq_len=16)
    expected = run_global_batches(make_loaders(spec, dp=2, local=2), 30)
    first = make_loaders(spec, dp=2, local=2)
    got = run_global_batches(first, 13)
    got += run_global_batches(make_loaders(spec, dp=2, local=2, state=merged_state(first)), 17)
    assert got == expected


@pytest.mark.parametrize("workers_after", [2, 0])
def test_resume_from_a_loader_with_two_workers_continues_exactly(workers_after):
    """Workers prefetch ahead of training: what they read but training did not
    take must not leak into the state a checkpoint stores."""
    spec = make_spec(sample_sources(ja=0.4, en=0.2, code=0.2, math=0.2), global_batch=8)
    expected = run_global_batches(make_loaders(spec, dp=2, local=2), 16)
    first = make_loaders(spec, dp=2, local=2, workers=2)
    iterators = [iter(loader) for loader in first]
    got = run_global_batches(first, 7, iterators)
    # Taken while the workers are alive and have read ahead, as a checkpoint is.
    state = merged_state(first)
    assert run_global_batches(first, 1, iterators) == expected[7:8]
    resumed = make_loaders(spec, dp=2, local=2, workers=workers_after, state=state)
    got += run_global_batches(resumed, 9)
    assert got == expected


@pytest.mark.parametrize(
    "before,after",
    [((2, 4, 0), (1, 4, 2)), ((1, 2, 0), (2, 4, 0)), ((1, 8, 0), (4, 1, 1))],
    ids=["2->1", "1->2", "1->4"],
)
def test_resume_with_another_number_of_ranks_continues_the_same_global_stream(before, after):
    spec = make_spec(sample_sources(ja=0.4, en=0.2, code=0.2, math=0.2), global_batch=8)
    expected = run_global_batches(make_loaders(spec, dp=1, local=8), 24)
    dp, local, workers = before
    first = make_loaders(spec, dp=dp, local=local, workers=workers)
    got = run_global_batches(first, 10)
    dp, local, workers = after
    got += run_global_batches(
        make_loaders(spec, dp=dp, local=local, workers=workers, state=merged_state(first)), 14
    )
    assert got == expected


def test_no_document_is_repeated_or_skipped_across_an_elastic_resume(tmp_path):
    # Unshuffled, so that each slot must read its part of the file in order.
    docs = numbered_docs(240)
    write_jsonl(tmp_path / "d.jsonl", docs)
    source = DataSource(name="d", path=str(tmp_path / "d.jsonl"))
    spec = make_spec([source], global_batch=4, seq_len=24, block_docs=0)
    tok = tiny_tokenizer()

    first = make_loaders(spec, dp=2, local=2)
    per_slot: dict[int, list] = {}
    for loader in first:
        for _, rows in zip(range(9), loader.microbatches()):
            for w in rows:
                per_slot.setdefault(w.slot, []).append(w.tokens.tolist())
    second = make_loaders(spec, dp=1, local=4, state=merged_state(first))[0]
    for _, rows in zip(range(4 * 12), second.microbatches()):
        for w in rows:
            per_slot[w.slot].append(w.tokens.tolist())
    seen = []
    for slot, windows in sorted(per_slot.items()):
        ids = [int(d.split()[0][3:]) for d in document_texts(windows, tok)]
        # Consecutive documents of the slot's byte range: none twice, none left out.
        assert ids == list(range(ids[0], ids[0] + len(ids))), slot
        seen += ids
    assert len(seen) == len(set(seen)) and len(seen) > 60


def test_metrics_describe_the_global_stream_and_checkpoint_counts_agree():
    spec = make_spec(sample_sources(ja=3, math=1), global_batch=8, seq_len=32)
    loaders = make_loaders(spec, dp=2, local=4)
    run_global_batches(loaders, 20)
    metrics = [loader.metrics() for loader in loaders]
    for m in metrics:
        assert m["data/ja/tokens"] == 20 * 8 * 0.75 * 32
        assert m["data/ja/share"] == pytest.approx(0.75)
        assert m["data/math/epoch"] >= 1 and m["data/ja/skipped"] == 0
    assert metrics[0]["data/ja/tokens"] == metrics[1]["data/ja/tokens"]
    counts = source_token_counts(merged_state(loaders))
    assert counts == {"ja": metrics[0]["data/ja/tokens"], "math": metrics[0]["data/math/tokens"]}
    # Documents are counted per rank: each read its own.
    assert metrics[0]["data/ja/documents"] > 0 and metrics[1]["data/ja/documents"] > 0


def test_bad_records_are_counted_per_reason_and_training_goes_on(tmp_path):
    good = numbered_docs(50)
    lines = [json.dumps({"text": t}) for t in good]
    lines[5] = '{"text": broken'
    lines[9] = json.dumps({"text": None})
    lines[12] = json.dumps({"text": ""})
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    spec = make_spec([DataSource(name="bad", path=str(tmp_path / "bad.jsonl"))], global_batch=1)
    loader = make_loaders(spec, dp=1, local=1)[0]
    batches = iter(loader)
    for _ in range(40):
        next(batches)
    m = loader.metrics()
    # 40 windows read the whole first epoch (it ends at window 103): each bad
    # record was met exactly once.
    assert m["data/bad/epoch"] == 1
    assert m["data/bad/skipped/malformed_json"] == 1
    assert m["data/bad/skipped/missing_text"] == 1 and m["data/bad/skipped/empty"] == 1
    assert m["data/bad/skipped"] == 3


def test_a_document_that_makes_tiktoken_panic_is_skipped_and_counted(tmp_path, monkeypatch):
    from swallow_titan.data import tokenizer as tokenizer_module

    # Let the 1M-space document reach tiktoken whole, which then panics.
    monkeypatch.setattr(tokenizer_module, "_MAX_CHARS_PER_PIECE", 10_000_000)
    texts = numbered_docs(30)
    texts.insert(3, "a" + " " * 1_000_000 + "b")
    spec = make_spec([DataSource(name="p", path=str(write_jsonl(tmp_path / "p.jsonl", texts)))],
                     global_batch=1, block_docs=0)
    loader = make_loaders(spec, dp=1, local=1)[0]
    batches = iter(loader)
    for _ in range(20):
        next(batches)
    assert loader.metrics()["data/p/skipped/tokenizer_panic"] >= 1


def test_resume_refuses_another_global_batch_or_other_sources():
    spec = make_spec(sample_sources(ja=1, en=1), global_batch=8)
    loaders = make_loaders(spec, dp=1, local=4)
    run_global_batches(loaders, 2)
    state = merged_state(loaders)
    bigger = make_spec(sample_sources(ja=1, en=1), global_batch=16)
    with pytest.raises(ValueError, match="lacks slot_8"):
        make_loaders(bigger, dp=1, local=4, state=state)
    smaller = make_spec(sample_sources(ja=1, en=1), global_batch=4)  # every key present
    with pytest.raises(ValueError, match="global batch of 8 sequences"):
        make_loaders(smaller, dp=1, local=4, state=state)
    other = make_spec(sample_sources(ja=1, math=1), global_batch=8)
    with pytest.raises(ValueError, match=re.escape("same [[data.sources]] names")):
        make_loaders(other, dp=1, local=4, state=state)
