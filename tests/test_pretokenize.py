"""python -m swallow_titan.pretokenize: text sources become Megatron pairs that
megatron-core reads back as exactly the ids streaming tokenization gives, with
the training reader's bad-record counts, resumable and never half-published."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

from support import REPO, TINY_CONFIG, tiny_tokenizer
from support.data import make_loaders, make_spec, numbered_docs, run_global_batches
from swallow_titan.config.sections import DataSource
from swallow_titan.data.lane import Lane
from swallow_titan.data.megatron import IndexedDatasetWriter
from swallow_titan.data.records import whole_file_unit
from swallow_titan.data.sharding import LaneSpec
from swallow_titan.data.sources import source_files
from swallow_titan.pretokenize import plan_shards, pretokenize

MAX_CHARS = 300


@pytest.fixture
def corpus(tmp_path):
    """A text source with good documents and one bad record of each kind."""
    texts = numbered_docs(400, "p")
    lines = [json.dumps({"text": t}) for t in texts]
    lines[10] = '{"text": "broken'
    lines[50] = json.dumps({"text": "   "})
    lines[90] = json.dumps({"body": "no text field"})
    lines[130] = json.dumps({"text": "x" * (MAX_CHARS + 1)})
    path = tmp_path / "src" / "corpus.jsonl"
    path.parent.mkdir()
    path.write_text("\n".join(lines) + "\n")
    return DataSource(name="corpus", path=str(path))


def shards_of(source, out, shard_bytes=8 * 1024):
    tok = tiny_tokenizer()
    return plan_shards([source], str(out), str(tok.path), MAX_CHARS, shard_bytes)


def streamed(source):
    """Documents and skip counts as training's lane reads them (file order, one epoch)."""
    tok = tiny_tokenizer()
    units = tuple(whole_file_unit(f) for f in source_files(source))
    lane = Lane(DataSource(**{**source.__dict__, "max_epochs": 1}), LaneSpec(units), 0, tok,
                1 << 20, 0, block_docs=0, max_chars=MAX_CHARS)
    docs = []
    original_add = lane._packer.add
    lane._packer.add = lambda ids, skip=0: (docs.append(list(ids)), original_add(ids, skip))
    lane.next_window()
    return docs, lane.state.skipped


def megatron_core_documents(folder) -> list[list[int]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDataset
    out = []
    for bin_path in sorted(folder.glob("*.bin")):
        dataset = IndexedDataset(str(bin_path)[: -len(".bin")])
        out += [dataset[i].astype(np.int64).tolist() for i in range(len(dataset))]
    return out


def test_pairs_read_back_with_megatron_core_as_streaming_tokenization(tmp_path, corpus):
    shards = shards_of(corpus, tmp_path / "out")
    assert len(shards) > 3  # the file is split into several pairs
    report = pretokenize(shards, workers=2, log=lambda *_: None)
    eos = tiny_tokenizer().eos_id
    docs, skipped = streamed(corpus)
    assert len(docs) == 396
    got = megatron_core_documents(tmp_path / "out" / "corpus")
    assert got == [d + [eos] for d in docs]  # --append-eod layout, file order
    totals = report["sources"]["corpus"]
    assert totals["skipped"] == skipped == {
        "malformed_json": 1, "empty": 1, "missing_text": 1, "too_long": 1}
    assert totals["documents"] == 396 and totals["tokens"] == sum(len(d) + 1 for d in docs)


def test_a_megatron_source_of_the_pairs_gives_the_streamed_windows(tmp_path, corpus):
    pretokenize(shards_of(corpus, tmp_path / "out"), workers=1, log=lambda *_: None)
    mega = DataSource(name="corpus", format="megatron", path=str(tmp_path / "out/corpus/*.bin"))
    kw = dict(seq_len=32, global_batch=1, block_docs=0, max_chars=MAX_CHARS)
    a = run_global_batches(make_loaders(make_spec([corpus], **kw), 1, 1), 40)
    b = run_global_batches(make_loaders(make_spec([mega], **kw), 1, 1), 40)
    assert a == b


def test_an_interrupted_run_publishes_no_half_pair_and_resumes(tmp_path, corpus, monkeypatch):
    out = tmp_path / "out"
    shards = shards_of(corpus, out)
    calls = {"n": 0}
    original = IndexedDatasetWriter.add_document

    def failing(self, ids):
        calls["n"] += 1
        if calls["n"] == 150:  # in the middle of a later shard
            raise KeyboardInterrupt
        original(self, ids)

    monkeypatch.setattr(IndexedDatasetWriter, "add_document", failing)
    with pytest.raises(KeyboardInterrupt):
        pretokenize(shards, workers=1, log=lambda *_: None)
    monkeypatch.setattr(IndexedDatasetWriter, "add_document", original)
    folder = out / "corpus"
    done = sorted(p.name for p in folder.glob("*.idx"))
    assert 0 < len(done) < len(shards)
    assert not list(folder.glob("*.tmp"))  # nothing half-written left behind
    # A pair is published .idx last: every .idx has its whole .bin.
    assert all((folder / n.replace(".idx", ".bin")).exists() for n in done)
    kept = {n: os.path.getmtime(folder / n) for n in done}
    report = pretokenize(shards, workers=2, log=lambda *_: None)
    assert report["sources"]["corpus"]["kept"] == len(done)
    assert {n: os.path.getmtime(folder / n) for n in done} == kept  # not redone
    eos = tiny_tokenizer().eos_id
    assert megatron_core_documents(folder) == [d + [eos] for d in streamed(corpus)[0]]


def test_a_shard_from_other_input_is_redone(tmp_path, corpus):
    out = tmp_path / "out"
    pretokenize(shards_of(corpus, out), workers=1, log=lambda *_: None)
    other = plan_shards([corpus], str(out), str(tiny_tokenizer().path), MAX_CHARS + 1, 8 * 1024)
    report = pretokenize(other, workers=1, log=lambda *_: None)
    assert report["sources"]["corpus"]["kept"] == 0
    assert report["sources"]["corpus"]["skipped"].get("too_long", 0) == 0


def test_parquet_shards_follow_shard_mb_not_row_groups(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "src"
    folder.mkdir()
    texts = {"a": numbered_docs(240, "a"), "b": numbered_docs(160, "b")}
    for name, docs in texts.items():  # fewer files than shards, 10 rows per group
        pq.write_table(pa.table({"text": docs}), folder / f"{name}.parquet", row_group_size=10)
    source = DataSource(name="pq", format="parquet", path=str(folder / "*.parquet"))
    total = sum(f.size for f in source_files(source))
    pieces = 4
    shards = shards_of(source, tmp_path / "out", shard_bytes=math.ceil(total / pieces))
    # Each file gets its share of the pieces, rounded up: not one pair per row group (40).
    assert pieces <= len(shards) <= pieces + 1
    for name, groups in (("a", 24), ("b", 16)):
        ranges = [(s.unit.start, s.unit.end) for s in shards if s.unit.path.endswith(name + ".parquet")]
        assert ranges[0][0] == 0 and ranges[-1][1] == groups  # contiguous, complete
        assert all(end == start for (_, end), (start, _) in zip(ranges, ranges[1:]))
    pretokenize(shards, workers=1, log=lambda *_: None)
    assert len(list((tmp_path / "out" / "pq").glob("*.idx"))) == len(shards)
    tok = tiny_tokenizer()
    expected = [tok.encode_ordinary(t) + [tok.eos_id] for t in texts["a"] + texts["b"]]
    assert megatron_core_documents(tmp_path / "out" / "pq") == expected


def test_cli_names_an_unknown_source(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "swallow_titan.pretokenize", str(TINY_CONFIG), "--out",
         str(tmp_path), "--sources", "ja_sample,nope"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "'nope' is not a text source" in proc.stderr


def test_cli_writes_the_chosen_sources(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "swallow_titan.pretokenize", str(TINY_CONFIG), "--out",
         str(tmp_path), "--sources", "code_sample", "--workers", "2", "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert list(report["sources"]) == ["code_sample"]
    assert report["sources"]["code_sample"]["documents"] == sum(
        1 for _ in (REPO / "assets/samples/code.jsonl").open())
    assert list((tmp_path / "code_sample").glob("*.idx"))


def test_cli_refuses_an_output_folder_holding_pairs_of_another_split(tmp_path):
    def run(*extra):
        return subprocess.run(
            [sys.executable, "-m", "swallow_titan.pretokenize", str(TINY_CONFIG), "--out",
             str(tmp_path), "--sources", "math_sample", *extra],
            cwd=REPO, capture_output=True, text=True, timeout=300)

    assert run("--shard-mb", "0.05").returncode == 0
    proc = run()  # one pair now, where five were written
    assert proc.returncode == 2 and "not part of this split" in proc.stderr
    assert "math_sample_00001_text_document" in proc.stderr
