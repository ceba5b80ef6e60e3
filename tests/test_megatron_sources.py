"""Megatron-LM indexed datasets (.bin + .idx) as [[data.sources]]: read token for
token in every dtype, packed without doubling BOS/EOS, mixed, sharded and resumed
like text sources, and refused at start-up when corrupt or from another tokenizer."""

from __future__ import annotations

import json

import numpy as np
import pytest

from support import SAMPLES, tiny_tokenizer
from support.data import make_loaders, make_spec, numbered_docs, run_global_batches, write_jsonl
from support.megatron import write_megatron
from swallow_titan.config.sections import DataSource
from swallow_titan.data.megatron import open_index
from swallow_titan.data.records import iter_records
from swallow_titan.data.sharding import plan_lanes
from swallow_titan.data.slots import iter_slot_batches
from swallow_titan.data.sources import DataSourceError, source_files

MEGATRON_DTYPES = [np.uint8, np.int8, np.int16, np.int32, np.int64, np.float64, np.float32,
                   np.uint16]


def token_docs(n: int, vocab: int | None = None) -> list[list[int]]:
    tok = tiny_tokenizer()
    docs = [tok.encode_ordinary(t) for t in numbered_docs(n, "m")]
    if vocab is not None:  # ids that fit a narrow dtype
        docs = [[i % vocab for i in d] for d in docs]
    return docs


def megatron_source(bin_glob, name: str = "mega", **kw) -> DataSource:
    return DataSource(name=name, format="megatron", path=str(bin_glob), **kw)


def documents_read(source: DataSource, slots: int) -> list[list[int]]:
    out = []
    for lane in plan_lanes(source_files(source), slots, source.name):
        for unit in lane.units:
            for r in iter_records(unit, "", source.name, stride=lane.stride, phase=lane.phase):
                out.append(r.ids.astype(np.int64).tolist())
    return out


@pytest.mark.parametrize("dtype", MEGATRON_DTYPES, ids=lambda d: np.dtype(d).name)
def test_every_megatron_dtype_reads_every_document_token_for_token(tmp_path, dtype):
    limit = 127 if dtype == np.int8 else 255 if dtype == np.uint8 else None
    docs = token_docs(40, vocab=limit)
    write_megatron(tmp_path / "a_text_document", docs[:25], dtype)
    write_megatron(tmp_path / "b_text_document", docs[25:], dtype, split_into=3)
    assert open_index(str(tmp_path / "a_text_document.bin"), "m").dtype == np.dtype(dtype)
    for slots in (1, 4, 16):
        got = documents_read(megatron_source(tmp_path / "*.bin"), slots)
        assert sorted(got) == sorted(docs), slots


def test_a_glob_matching_the_idx_files_too_reads_each_pair_once(tmp_path):
    write_megatron(tmp_path / "x", token_docs(5))
    files = source_files(megatron_source(tmp_path / "x.*"))
    assert [f.path for f in files] == [str(tmp_path / "x.bin")]


def packed_documents(windows: list[list[int]], bos: int, eos: int) -> list[list[int]]:
    stream = [t for w in windows for t in w]
    docs, current = [], None
    for t in stream:
        if t == bos and current is None:
            current = []
        elif t == eos and current is not None:
            docs.append(current)
            current = None
        elif current is not None:
            current.append(t)
    return docs


def test_stored_bos_and_eos_are_not_doubled(tmp_path):
    tok = tiny_tokenizer()
    docs = token_docs(30)
    stored = [[tok.bos_id, *d, tok.eos_id] if i % 3 == 0 else [*d, tok.eos_id] if i % 3 == 1
              else d for i, d in enumerate(docs)]
    write_megatron(tmp_path / "d", stored)
    spec = make_spec([megatron_source(tmp_path / "d.bin")], seq_len=16, global_batch=1,
                     block_docs=0)
    batches = iter_slot_batches(spec, [0], {})
    windows = [next(batches)[0].tokens.tolist() for _ in range(200)]
    stream = [t for w in windows for t in w]
    assert stream[:len(docs[0]) + 2] == [tok.bos_id, *docs[0], tok.eos_id]
    got = packed_documents(windows, tok.bos_id, tok.eos_id)
    assert got[:30] == docs  # every document once, BOS + doc + EOS, in file order
    assert not any(a == b == tok.bos_id for a, b in zip(stream, stream[1:]))
    assert not any(a == b == tok.eos_id for a, b in zip(stream, stream[1:]))


def test_megatron_windows_equal_those_of_the_same_text_tokenised_while_streaming(tmp_path):
    texts = numbered_docs(60, "s")
    write_jsonl(tmp_path / "t.jsonl", texts)
    tok = tiny_tokenizer()
    write_megatron(tmp_path / "t", [[*tok.encode_ordinary(t), tok.eos_id] for t in texts])
    kw = dict(seq_len=32, global_batch=1, block_docs=0)
    text = make_spec([DataSource(name="s", path=str(tmp_path / "t.jsonl"))], **kw)
    mega = make_spec([megatron_source(tmp_path / "t.bin", name="s")], **kw)
    a = run_global_batches(make_loaders(text, 1, 1), 30)
    b = run_global_batches(make_loaders(mega, 1, 1), 30)
    assert a == b


def test_a_megatron_source_mixes_exactly_and_resumes_on_another_gpu_count(tmp_path):
    write_megatron(tmp_path / "m0", token_docs(300)[:150])
    write_megatron(tmp_path / "m1", token_docs(300)[150:], np.uint16)
    sources = [megatron_source(tmp_path / "m*.bin", weight=0.3),
               DataSource(name="en", weight=0.7, path=str(SAMPLES / "en.jsonl"))]
    spec = make_spec(sources, seq_len=32, global_batch=8)
    whole = run_global_batches(make_loaders(spec, 1, 8), 12)
    first = make_loaders(spec, 2, 2)
    part = run_global_batches(first, 5)
    state = {k: v for loader in first for k, v in loader.state_dict().items()}
    rest = run_global_batches(make_loaders(spec, 1, 4, state=state), 7)
    assert part + rest == whole
    metrics = first[0].metrics()
    assert metrics["data/mega/share"] == pytest.approx(12 / 40)  # 0.3 of 5 x 8 sequences
    assert metrics["data/mega/documents"] > 0 and metrics["data/mega/skipped"] == 0


def test_max_epochs_stops_a_megatron_source(tmp_path):
    write_megatron(tmp_path / "small", token_docs(40))
    sources = [megatron_source(tmp_path / "small.bin", max_epochs=1, weight=0.5),
               DataSource(name="en", weight=0.5, path=str(SAMPLES / "en.jsonl"))]
    spec = make_spec(sources, seq_len=32, global_batch=4)
    loader = make_loaders(spec, 1, 4)[0]
    run_global_batches([loader], 60)
    lanes = [s["lanes"]["mega"] for s in loader.consumed_states()]
    assert all(lane["stopped"] == "max_epochs" and lane["epoch"] == 1 for lane in lanes)
    assert sum(lane["documents"] for lane in lanes) == 40  # each document once


def refusal(source: DataSource) -> str:
    with pytest.raises(DataSourceError) as e:
        make_spec([source], seq_len=32, global_batch=4)
    return str(e.value)


def test_ids_from_another_tokenizer_are_refused_naming_the_file(tmp_path):
    bin_path = write_megatron(tmp_path / "big_vocab", [[5, 6, 7], [9, 200_000, 3]])
    message = refusal(megatron_source(bin_path))
    assert str(bin_path) in message and "200000" in message and "another tokenizer" in message


def test_a_truncated_bin_is_refused_naming_the_file(tmp_path):
    bin_path = write_megatron(tmp_path / "cut", token_docs(20))
    data = bin_path.read_bytes()
    bin_path.write_bytes(data[: len(data) - 10])
    message = refusal(megatron_source(bin_path))
    assert str(bin_path) in message and "truncated" in message


@pytest.mark.parametrize("damage", ["magic", "short_idx", "no_idx", "pointer"])
def test_a_corrupt_or_missing_idx_is_refused_naming_the_file(tmp_path, damage):
    bin_path = write_megatron(tmp_path / "bad", token_docs(20))
    idx = tmp_path / "bad.idx"
    raw = bytearray(idx.read_bytes())
    if damage == "magic":
        raw[:4] = b"XXXX"
    elif damage == "short_idx":
        raw = raw[:-8]
    elif damage == "pointer":  # sequence 3's pointer (after 20 int32 lengths)
        at = 34 + 20 * 4 + 3 * 8
        raw[at : at + 8] = (10**6).to_bytes(8, "little")
    if damage == "no_idx":
        idx.unlink()
    else:
        idx.write_bytes(bytes(raw))
    message = refusal(megatron_source(bin_path))
    assert str(bin_path) in message or str(idx) in message


def test_plan_and_cli_know_a_megatron_sources_exact_tokens(tmp_path):
    from swallow_titan.data.source_size import source_size

    tok = tiny_tokenizer()
    docs = token_docs(30)
    write_megatron(tmp_path / "p", [[*d, tok.eos_id] for d in docs])
    size = source_size(megatron_source(tmp_path / "p.bin"), tok)
    assert size.basis == "index"
    assert size.tokens == sum(len(d) + 2 for d in docs)  # BOS + doc + EOS each


def test_a_megatron_source_without_path_is_rejected():
    from swallow_titan.data.sources import check_source

    with pytest.raises(DataSourceError, match="format = \"megatron\" reads local"):
        check_source(DataSource(name="x", format="megatron", hf_dataset="org/x"))


def test_a_megatron_glob_of_other_files_is_rejected(tmp_path):
    write_jsonl(tmp_path / "t.jsonl", ["a"])
    message = refusal(megatron_source(tmp_path / "t.jsonl"))
    assert "needs path to name .bin files" in message


def test_every_read_document_is_checked_against_the_vocabulary(tmp_path):
    # The start-up check samples the .bin; a bad id it did not sample is caught
    # when its document is read: skipped and counted, never fed to the model.
    from swallow_titan.data import megatron

    tok = tiny_tokenizer()
    docs = token_docs(20)
    docs[7] = [1, 2, tok.n_words + 5, 3]
    write_megatron(tmp_path / "v", docs)
    source = megatron_source(tmp_path / "v.bin")
    old = megatron.VOCAB_CHECK_CHUNK
    megatron.VOCAB_CHECK_CHUNK = 4
    megatron.VOCAB_CHECK_CHUNKS = 1
    try:
        spec = make_spec([source], seq_len=16, global_batch=1, block_docs=0)
    finally:
        megatron.VOCAB_CHECK_CHUNK, megatron.VOCAB_CHECK_CHUNKS = old, 64
    loader = make_loaders(spec, 1, 1)[0]
    run_global_batches([loader], 40)
    assert loader.metrics()["data/mega/skipped/token_out_of_range"] == 1


def test_the_data_cli_and_plan_read_a_config_with_a_megatron_source(tmp_path):
    import subprocess
    import sys

    from support import REPO, TINY_CONFIG

    tok = tiny_tokenizer()
    write_megatron(tmp_path / "code_text_document",
                   [[*tok.encode_ordinary(t), tok.eos_id] for t in numbered_docs(300, "c")])
    text = TINY_CONFIG.read_text()
    old = 'path = "./assets/samples/code.jsonl"'
    assert old in text
    config = tmp_path / "job.toml"
    config.write_text(text.replace(old, f'format = "megatron"\npath = "{tmp_path}/*.bin"'))
    cli = subprocess.run([sys.executable, "-m", "swallow_titan.data", str(config), "--batches",
                          "2", "--json"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr[-3000:]
    code = {s["name"]: s for s in json.loads(cli.stdout)["sources"]}["code_sample"]
    assert code["documents"] > 0
    assert abs(code["share"] - 0.2) < 1 / 32  # within one of 2 x 16 sequences
    plan = subprocess.run([sys.executable, "-m", "swallow_titan.plan", str(config), "--ngpu",
                           "1", "--json"], cwd=REPO, capture_output=True, text=True, timeout=300)
    code = {s["name"]: s for s in json.loads(plan.stdout)["sources"]}["code_sample"]
    assert code["available_from"] == "index" and code["epochs"] is not None


def test_a_validation_set_can_be_a_megatron_file(tmp_path):
    from swallow_titan.data.dataloader import held_out_batches

    tok = tiny_tokenizer()
    docs = token_docs(30)
    write_megatron(tmp_path / "val", [[*d, tok.eos_id] for d in docs])
    batches = held_out_batches(megatron_source(tmp_path / "val.bin", max_epochs=1), tok,
                               seq_len=16, sequences=8, local_batch_size=2, dp_rank=0,
                               dp_world_size=2, emit_positions=False)
    assert len(batches) == 2  # 8 windows in global batches of 2 x 2; rank 0's half
    first = batches[0][0]["input"][0].tolist()
    assert first[: len(docs[0]) + 2] == [tok.bos_id, *docs[0], tok.eos_id][:16]
