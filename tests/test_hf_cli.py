"""The command lines: convert hf-to-dcp / dcp-to-hf, export, and a Hub push without network."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from support import REPO
from support.hf import ODD_CONFIG, save_random_llama
from support.runs import free_port
from swallow_titan import convert, export
from swallow_titan.checkpoint.dcp_reader import DCPCheckpoint

pytest.importorskip("transformers")

EXPORT_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors.index.json",
    "README.md",
    "tokenizer.model",
}


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cli")
    hf = save_random_llama(folder / "hf", ODD_CONFIG)
    assert convert.main(["hf-to-dcp", str(hf), str(folder / "dcp")]) == 0
    return folder / "dcp"


def exported_files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def test_hf_to_dcp_writes_a_dcp_checkpoint_with_its_run_record(converted):
    assert (converted / ".metadata").is_file()
    record = json.loads((converted / "swallow_run.json").read_text())
    assert record["hf_config"]["hidden_size"] == ODD_CONFIG["hidden_size"]


def test_dcp_to_hf_is_the_export(converted, tmp_path):
    assert convert.main(["dcp-to-hf", str(converted), str(tmp_path / "a"), "--dtype", "float32"]) == 0
    assert export.main([str(converted), str(tmp_path / "b"), "--dtype", "float32"]) == 0
    for name in exported_files(tmp_path / "a"):
        if name != "README.md":  # the card names its own folder
            assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert EXPORT_FILES <= exported_files(tmp_path / "a")


def test_convert_and_export_report_progress_in_plain_lines_when_not_a_terminal(
    converted, tmp_path, capsys
):
    # capsys's stderr is not a terminal: no bar, plain lines.
    hf = converted.parent / "hf"
    assert convert.main(["hf-to-dcp", str(hf), str(tmp_path / "dcp")]) == 0
    lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith("convert: read: ")]
    count = len(list(DCPCheckpoint(tmp_path / "dcp").tensors()))
    assert lines[0].startswith(f"convert: read: 0/{count} tensors, 0 B of ")
    assert lines[-1].startswith(f"convert: read: {count}/{count} tensors, ")
    assert "(100%)" in lines[-1] and "done in" in lines[-1]

    assert export.main([str(converted), str(tmp_path / "out"), "--max-shard-size", "20kB"]) == 0
    lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith("export: ")]
    shards = len(list((tmp_path / "out").glob("*.safetensors")))
    assert shards > 1
    assert lines[0].startswith(f"export: 0/{shards} shards, 0 B of ")
    assert lines[-1].startswith(f"export: {shards}/{shards} shards, ")
    assert "(100%)" in lines[-1] and "done in" in lines[-1]


def test_bad_input_exits_2_and_writes_nothing(converted, tmp_path, capsys):
    assert export.main([str(converted), str(tmp_path / "out"), "--step", "7"]) == 2
    assert "--step 7 was asked for" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert convert.main(["hf-to-dcp", str(tmp_path / "nowhere"), str(tmp_path / "dcp")]) == 2
    assert "config.json: not found" in capsys.readouterr().err


def test_push_without_network_fails_clearly_and_leaves_the_export_complete(converted, tmp_path):
    out = tmp_path / "export"
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        # Nothing listens there: the Hub is unreachable on any machine.
        "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}",
        "HF_TOKEN": "hf_not_a_real_token",
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "swallow_titan.export", str(converted), str(out),
         "--push-to-hub", "someone/swallow-test", "--private"],
        env=env, capture_output=True, text=True, timeout=300, cwd=REPO,
    )
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "could not upload" in proc.stderr and "someone/swallow-test" in proc.stderr
    assert "The local export is complete" in proc.stderr
    assert EXPORT_FILES <= exported_files(out)
    assert not list(tmp_path.glob(".export.partial-*"))
