"""A W&B offline run's history, read from its ``.wandb`` files.

wandb 0.31 has no Python reader for its transaction log (its datastore moved
into the Go ``wandb-core``), so the documented LevelDB log framing is read
here and each record is decoded with wandb's own protobuf message
(``wandb.proto.wandb_internal_pb2.Record``).

Framing: a 7-byte file header (``:W&B``, magic 0xBEE1, version 0); then
32 KiB blocks of chunks, each ``crc32c (4) | length (2, LE) | type (1) | data``
(type 1 full, 2 first, 3 middle, 4 last); a block tail shorter than a chunk
header is zero padding.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

_HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
_BLOCK = 32 * 1024
_CHUNK_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def records(path: Path) -> list[wandb_internal_pb2.Record]:
    """Every record of one ``run-<id>.wandb`` file, in order."""
    data = Path(path).read_bytes()
    assert data[: len(_HEADER)] == _HEADER, f"{path}: not a W&B transaction log"
    out: list[wandb_internal_pb2.Record] = []
    offset = len(_HEADER)
    pending = b""
    while offset + _CHUNK_HEADER <= len(data):
        left_in_block = _BLOCK - offset % _BLOCK
        if left_in_block < _CHUNK_HEADER:
            offset += left_in_block  # zero padding
            continue
        _crc, length, kind = struct.unpack_from("<IHB", data, offset)
        if kind == 0 and length == 0:
            break
        chunk = data[offset + _CHUNK_HEADER : offset + _CHUNK_HEADER + length]
        offset += _CHUNK_HEADER + length
        if kind in (_FULL, _FIRST):
            pending = chunk
        else:
            pending += chunk
        if kind in (_FULL, _LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def offline_runs(wandb_dir: Path) -> list[Path]:
    """The offline run folders under ``wandb_dir`` (its ``wandb/`` subfolder), oldest first."""
    return sorted((Path(wandb_dir) / "wandb").glob("offline-run-*"))


def history(run_folder: Path) -> list[dict]:
    """The ``log()`` calls of one offline run folder: ``{"_step": N, key: value, ...}``."""
    (log,) = Path(run_folder).glob("run-*.wandb")
    rows = []
    for record in records(log):
        if record.WhichOneof("record_type") != "history":
            continue
        row = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
               for item in record.history.item}
        rows.append(row)
    return rows


def run_id(run_folder: Path) -> str:
    """The run id of an offline run folder (its ``run-<id>.wandb`` file name)."""
    (log,) = Path(run_folder).glob("run-*.wandb")
    return log.stem.removeprefix("run-")
