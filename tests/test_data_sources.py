"""Sources: every format reads the same documents, bad records are skipped and
counted, unusable sources fail at start-up naming the source, and each slot
reads only its own part."""

from __future__ import annotations

import gzip
import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from support.data import make_spec, numbered_docs, write_jsonl
from swallow_titan.config.sections import DataSource
from swallow_titan.data.records import iter_records
from swallow_titan.data.sharding import plan_lanes, split_units
from swallow_titan.data.sources import DataSourceError, source_files


def lane_texts(source: DataSource, slots: int) -> list[str]:
    """Every text the slots' lanes read in one epoch, in lane order."""
    texts = []
    for lane in plan_lanes(source_files(source), slots, source.name):
        for unit in lane.units:
            for record in iter_records(unit, source.text_field, source.name,
                                       stride=lane.stride, phase=lane.phase):
                assert record.reason is None
                texts.append(record.text)
    return texts


@pytest.fixture(scope="module")
def docs():
    return numbered_docs(300, prefix="ドキュメント")


def write_formats(folder, docs):
    """The same documents as JSONL, JSONL.GZ, JSONL.ZST, JSON lines, JSON array, Parquet."""
    import zstandard

    write_jsonl(folder / "jsonl" / "part.jsonl", docs)
    (folder / "gz").mkdir()
    with gzip.open(folder / "gz" / "part.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs)
    (folder / "zst").mkdir()
    lines = "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs)
    (folder / "zst" / "part.jsonl.zst").write_bytes(
        zstandard.ZstdCompressor().compress(lines.encode())
    )
    write_jsonl(folder / "json_lines" / "part.json", docs)
    (folder / "json_array").mkdir()
    (folder / "json_array" / "part.json").write_text(json.dumps([{"text": d} for d in docs]))
    (folder / "parquet").mkdir()
    pq.write_table(pa.table({"text": docs, "id": list(range(len(docs)))}),
                   folder / "parquet" / "part.parquet", row_group_size=40)
    return ["jsonl", "gz", "zst", "json_lines", "json_array", "parquet"]


@pytest.mark.parametrize("slots", [1, 8])
def test_every_local_format_loads_the_same_documents(tmp_path, docs, slots):
    for kind in write_formats(tmp_path, docs):
        source = DataSource(name=kind, path=str(tmp_path / kind / "*"))
        assert sorted(lane_texts(source, slots)) == sorted(docs), kind


def test_byte_ranges_and_row_groups_split_a_single_file_among_slots(tmp_path, docs):
    write_formats(tmp_path, docs)
    jsonl = DataSource(name="j", path=str(tmp_path / "jsonl" / "part.jsonl"))
    parquet = DataSource(name="p", path=str(tmp_path / "parquet" / "part.parquet"))
    ranges = split_units(source_files(jsonl), 4, "j")
    assert len(ranges) == 4 and ranges[0].start == 0
    assert [u.end for u in ranges[:-1]] == [u.start for u in ranges[1:]]
    assert len(split_units(source_files(parquet), 4, "p")) == 300 // 40 + 1
    # No slot shares a unit: nothing is read twice.
    for source in (jsonl, parquet):
        lanes = plan_lanes(source_files(source), 4, source.name)
        assert all(lane.stride == 1 for lane in lanes)


def test_a_compressed_file_is_shared_by_stride_without_overlap(tmp_path, docs):
    write_formats(tmp_path, docs)
    source = DataSource(name="gz", path=str(tmp_path / "gz" / "*"))
    lanes = plan_lanes(source_files(source), 4, "gz")
    assert [(lane.stride, lane.phase) for lane in lanes] == [(4, 0), (4, 1), (4, 2), (4, 3)]
    per_lane = [lane_texts_of(source, lane) for lane in lanes]
    assert sorted(t for texts in per_lane for t in texts) == sorted(docs)


def lane_texts_of(source, lane):
    return [r.text for u in lane.units
            for r in iter_records(u, "text", source.name, stride=lane.stride, phase=lane.phase)]


def test_many_files_go_whole_to_slots_balanced_by_size(tmp_path):
    for i in range(12):
        write_jsonl(tmp_path / f"f{i:02d}.jsonl", numbered_docs(10 + 10 * (i % 3), f"f{i}-"))
    lanes = plan_lanes(source_files(DataSource(name="m", path=str(tmp_path / "*.jsonl"))), 4, "m")
    files = [u.path for lane in lanes for u in lane.units]
    assert sorted(files) == sorted(str(p) for p in tmp_path.glob("*.jsonl"))
    sizes = [lane.size for lane in lanes]
    assert max(sizes) - min(sizes) <= max(u.size for lane in lanes for u in lane.units)


def test_bad_records_are_skipped_and_named_by_reason(tmp_path):
    path = tmp_path / "bad.jsonl"
    lines = [
        json.dumps({"text": "good one"}).encode(),
        b'{"text": "unterminated',
        b'\xff\xfe{"text": "x"}',
        json.dumps({"body": "no text field"}).encode(),
        json.dumps({"text": 42}).encode(),
        json.dumps({"text": "   "}).encode(),
        json.dumps({"text": "x" * 200}).encode(),
        json.dumps([1, 2]).encode(),
        b"",
        json.dumps({"text": "good two"}).encode(),
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    source = DataSource(name="bad", path=str(path))
    (file,) = source_files(source)
    records = list(iter_records(split_units([file], 1, "bad")[0], "text", "bad", max_chars=100))
    assert [r.text for r in records if r.text] == ["good one", "good two"]
    assert Counter(r.reason for r in records if r.reason) == {
        "malformed_json": 2, "invalid_utf8": 1, "missing_text": 1, "not_string": 1,
        "empty": 1, "too_long": 1,
    }


def test_a_truncated_gzip_file_counts_as_unreadable_instead_of_stopping(tmp_path, docs):
    data = gzip.compress("".join(json.dumps({"text": d}) + "\n" for d in docs).encode())
    (tmp_path / "cut.jsonl.gz").write_bytes(data[: len(data) // 2])
    source = DataSource(name="cut", path=str(tmp_path / "cut.jsonl.gz"))
    records = list(iter_records(split_units(source_files(source), 1, "cut")[0], "text", "cut"))
    assert records[-1].reason == "unreadable"
    assert 0 < sum(r.text is not None for r in records) < len(docs)


def test_a_wrong_text_field_fails_at_start_up_naming_source_file_and_fields(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", ["a", "b"], field="content")
    with pytest.raises(DataSourceError) as e:
        make_spec([DataSource(name="code", path=str(path))])
    message = str(e.value)
    assert "'code'" in message and str(path) in message
    assert "text_field = 'text'" in message and "['content']" in message


def test_a_missing_file_fails_naming_the_source(tmp_path):
    with pytest.raises(DataSourceError, match="'ja'.*matches no file"):
        make_spec([DataSource(name="ja", path=str(tmp_path / "none-*.jsonl"))])


def test_a_hub_dataset_is_sharded_like_local_files(tmp_path, docs):
    # A folder laid out like a hub dataset repo goes through the hub code path
    # (datasets.load_dataset_builder -> the split's data files).
    for i in range(3):
        write_jsonl(tmp_path / "repo" / "data" / f"train-{i:05d}-of-00003.jsonl", docs[i::3])
    hub = DataSource(name="hub", hf_dataset=str(tmp_path / "repo"))
    local = DataSource(name="local", path=str(tmp_path / "repo" / "data" / "*.jsonl"))
    assert [f.path for f in source_files(hub)] == [f.path for f in source_files(local)]
    assert sorted(lane_texts(hub, 8)) == sorted(lane_texts(local, 8)) == sorted(docs)


def test_an_unreachable_hub_dataset_fails_naming_the_source(monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataSourceError, match="'math_remote': cannot open hf_dataset"):
        source_files(DataSource(name="math_remote", hf_dataset="no-such-org/no-such-data"))
