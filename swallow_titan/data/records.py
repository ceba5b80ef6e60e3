"""Read the records of one piece of a file, skipping and naming bad ones.

A ``ReadUnit`` is what one lane (or a few lanes sharing it) reads: a byte range
of an uncompressed JSON Lines file (lines that *start* inside the range), some
row groups of a Parquet file, a whole compressed/JSON-array file, or a range of
documents of a Megatron ``.bin`` (``megatron.py``), whose records carry token
ids instead of text. Records
are numbered within their unit; a lane that shares a unit with ``stride - 1``
others takes the records whose number is ``phase`` modulo ``stride`` and parses
no others.

Bad records are returned with a reason instead of text, never raised:
``malformed_json``, ``invalid_utf8``, ``missing_text``, ``not_string``,
``empty`` (nothing but whitespace), ``too_long`` (over ``max_chars``) and
``unreadable`` (a file that breaks off mid-way, e.g. a truncated gzip, which
ends its unit; or a Megatron document whose index entry points outside its
``.bin``). The lane adds ``tokenizer_panic`` / ``tokenizer_error`` (text that
tiktoken cannot encode) and ``token_out_of_range`` (a Megatron document with
an id outside the tokenizer's vocabulary). A file that cannot be opened at
all, or a Parquet file without the text column, raises ``DataSourceError`` naming the source and file.
"""

from __future__ import annotations

import gzip
import io
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from swallow_titan.data.megatron import open_index
from swallow_titan.data.sources import DataSourceError, SourceFile

SKIP_REASONS = (
    "malformed_json",
    "invalid_utf8",
    "missing_text",
    "not_string",
    "empty",
    "too_long",
    "unreadable",
    "tokenizer_panic",
    "tokenizer_error",
    "token_out_of_range",
)

_NO_LIMIT = 1 << 62


@dataclass(frozen=True)
class ReadUnit:
    """A piece of one file that lanes read (see the module docstring)."""

    path: str
    format: str  # "jsonl", "json", "parquet" or "megatron"
    compression: str  # "", "gzip" or "zstd"
    start: int = 0  # jsonl: first byte; parquet: first row group; megatron: first document
    end: int = -1  # the same, exclusive; -1: to the end
    size: int = 0  # bytes, to balance the slots

    @property
    def seekable_lines(self) -> bool:
        """Whether records are lines that can be reached by a byte offset."""
        return self.format == "jsonl" and not self.compression

    def describe(self) -> str:
        if self.format == "megatron" and (self.start or self.end >= 0):
            return f"{self.path} (documents {self.start}..{self.end})"
        if self.format == "parquet" and (self.start or self.end >= 0):
            return f"{self.path} (row groups {self.start}..{self.end})"
        if self.seekable_lines and (self.start or self.end >= 0):
            return f"{self.path} (bytes {self.start}..{self.end})"
        return self.path


def whole_file_unit(file: SourceFile) -> ReadUnit:
    return ReadUnit(file.path, file.format, file.compression, 0, -1, file.size)


@dataclass(frozen=True)
class Record:
    """One record of a unit: its number, where its line starts (seekable JSON
    Lines only, else -1), and its text (token ids for Megatron units) or the
    reason it was skipped."""

    index: int
    offset: int
    text: str | None
    reason: str | None = None
    ids: np.ndarray | None = None

    @property
    def usable(self) -> bool:
        return self.text is not None or self.ids is not None


def open_binary(path: str, source_name: str):
    """Open a local path or an ``fsspec`` URL (``hf://...``) for binary reading."""
    try:
        if "://" in path:
            import fsspec

            return fsspec.open(path, "rb").open()
        return open(path, "rb")
    except (OSError, ValueError) as e:
        raise DataSourceError(
            f"source '{source_name}': cannot open file {path!r}: {e}"
        ) from e


def _decompressed(raw, compression: str):
    if compression == "gzip":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if compression == "zstd":
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw))
    return raw


def classify_json_line(
    line: bytes, text_field: str, max_chars: int = _NO_LIMIT
) -> tuple[str | None, str | None]:
    """(text, None) for a good JSON Lines record, else (None, reason).
    A blank line gives (None, None): not a record."""
    if not line.strip():
        return None, None
    try:
        decoded = line.decode("utf-8")
    except UnicodeDecodeError:
        return None, "invalid_utf8"
    try:
        obj = json.loads(decoded)
    except ValueError:
        return None, "malformed_json"
    if not isinstance(obj, dict):
        return None, "malformed_json"
    return classify_value(obj.get(text_field), max_chars)


def classify_value(
    value: object, max_chars: int = _NO_LIMIT
) -> tuple[str | None, str | None]:
    """(text, None) if ``value`` is a usable document text, else (None, reason)."""
    if value is None:
        return None, "missing_text"
    if not isinstance(value, str):
        return None, "not_string"
    if not value.strip():
        return None, "empty"
    if len(value) > max_chars:
        return None, "too_long"
    return value, None


def iter_records(
    unit: ReadUnit,
    text_field: str,
    source_name: str,
    *,
    stride: int = 1,
    phase: int = 0,
    start_index: int = 0,
    start_offset: int = -1,
    max_chars: int = _NO_LIMIT,
) -> Iterator[Record]:
    """The records of ``unit`` numbered ``phase`` mod ``stride``, from record
    ``start_index`` on (reached directly through ``start_offset``, the byte
    offset of that record's line, when the unit is seekable)."""
    if unit.format == "megatron":
        yield from _megatron_records(unit, source_name, stride, phase, start_index)
        return
    if unit.format == "parquet":
        yield from _parquet_records(
            unit, text_field, source_name, stride, phase, start_index, max_chars
        )
        return
    raw = open_binary(unit.path, source_name)
    try:
        if unit.format == "json" and _starts_with_bracket(raw, unit, source_name):
            yield from _json_array_records(
                raw, unit, text_field, source_name, stride, phase, start_index, max_chars
            )
            return
        if unit.seekable_lines:
            lines = _ranged_lines(raw, unit, start_index, start_offset)
        else:
            lines = _all_lines(_decompressed(raw, unit.compression), start_index)
        index = start_index
        try:
            for index, offset, line in lines:
                if index % stride != phase:
                    continue
                text, reason = classify_json_line(line, text_field, max_chars)
                if text is None and reason is None:
                    continue
                yield Record(index, offset, text, reason)
        except (EOFError, OSError, zlib.error) as e:
            # A file that breaks off mid-way (truncated or corrupt compression):
            # the rest of this unit is lost, and said so.
            yield Record(index + 1, -1, None, "unreadable")
            _warn_unreadable(source_name, unit, index + 1, e)
    finally:
        raw.close()


def _megatron_records(
    unit: ReadUnit, source_name: str, stride: int, phase: int, start_index: int
) -> Iterator[Record]:
    index = open_index(unit.path, source_name)
    end = unit.end if unit.end >= 0 else index.documents
    first = start_index + (phase - start_index) % stride
    for number in range(first, end - unit.start, stride):
        ids = index.document(unit.start + number)
        if ids is None:
            yield Record(number, -1, None, "unreadable")
        else:
            yield Record(number, -1, None, None, ids)


def _warn_unreadable(source_name: str, unit: ReadUnit, index: int, error: Exception) -> None:
    from torchtitan.tools.logging import logger

    logger.warning(
        f"data source '{source_name}': {unit.describe()} cannot be read past record "
        f"{index} ({type(error).__name__}: {error}); the rest of it is skipped"
    )


def _starts_with_bracket(raw, unit: ReadUnit, source_name: str) -> bool:
    """Whether a .json file is one JSON array (else it is JSON Lines)."""
    stream = _decompressed(raw, unit.compression)
    head = stream.read(4096).lstrip()
    raw.seek(0)
    return head[:1] == b"["


def _ranged_lines(raw, unit: ReadUnit, start_index: int, start_offset: int):
    """(index, byte offset, line) of the lines that start in [unit.start, unit.end)."""
    if start_offset >= 0:
        pos, index = start_offset, start_index
        raw.seek(pos)
    else:
        pos, index = unit.start, 0
        if pos > 0:
            # The line holding byte start-1 belongs to the previous unit.
            raw.seek(pos - 1)
            pos += len(raw.readline()) - 1
    end = unit.end if unit.end >= 0 else _NO_LIMIT
    while pos < end:
        line = raw.readline()
        if not line:
            return
        if index >= start_index:
            yield index, pos, line
        pos += len(line)
        index += 1


def _all_lines(stream, start_index: int):
    for index, line in enumerate(stream):
        if index >= start_index:
            yield index, -1, line


def _json_array_records(
    raw, unit, text_field, source_name, stride, phase, start_index, max_chars
) -> Iterator[Record]:
    try:
        items = json.load(io.TextIOWrapper(_decompressed(raw, unit.compression), "utf-8"))
    except (ValueError, EOFError, OSError, zlib.error) as e:
        yield Record(0, -1, None, "unreadable")
        _warn_unreadable(source_name, unit, 0, e)
        return
    for index in range(start_index, len(items)):
        if index % stride != phase:
            continue
        item = items[index]
        if not isinstance(item, dict):
            yield Record(index, -1, None, "malformed_json")
            continue
        text, reason = classify_value(item.get(text_field), max_chars)
        yield Record(index, -1, text, reason)


def parquet_file(path: str, source_name: str):
    import pyarrow.parquet as pq

    raw = open_binary(path, source_name)
    try:
        return pq.ParquetFile(raw), raw
    except Exception as e:
        raw.close()
        raise DataSourceError(
            f"source '{source_name}': {path!r} is not a readable Parquet file: {e}"
        ) from e


def _parquet_records(
    unit, text_field, source_name, stride, phase, start_index, max_chars
) -> Iterator[Record]:
    pf, raw = parquet_file(unit.path, source_name)
    try:
        if text_field not in pf.schema_arrow.names:
            raise DataSourceError(
                f"source '{source_name}': {unit.path!r} has no column "
                f"text_field = {text_field!r} (columns: {pf.schema_arrow.names})"
            )
        end = unit.end if unit.end >= 0 else pf.num_row_groups
        first = 0  # record number of the row group's first row
        for group in range(unit.start, end):
            rows = pf.metadata.row_group(group).num_rows
            if first + rows <= start_index:
                first += rows
                continue
            index = first
            try:
                for batch in pf.iter_batches(
                    batch_size=1024, row_groups=[group], columns=[text_field]
                ):
                    for value in batch.column(0).to_pylist():
                        if index >= start_index and index % stride == phase:
                            text, reason = classify_value(value, max_chars)
                            yield Record(index, -1, text, reason)
                        index += 1
            except (OSError, ValueError) as e:  # pyarrow.ArrowInvalid is a ValueError
                yield Record(index, -1, None, "unreadable")
                _warn_unreadable(source_name, unit, index, e)
                return
            first += rows
    finally:
        raw.close()


def check_text_field(source, files: list[SourceFile], sample: int = 200) -> None:
    """Fail at start-up when the first records of a source's first file hold no
    usable text (a wrong ``text_field``, or not JSON at all), naming the source,
    the file and the fields found."""
    if not files or source.format == "megatron":
        return  # token ids: megatron.check_vocabulary checks them
    unit = whole_file_unit(files[0])
    reasons: dict[str, int] = {}
    records = iter_records(unit, source.text_field, source.name)
    try:
        for n, record in enumerate(records, start=1):
            if record.text is not None:
                return
            reasons[record.reason] = reasons.get(record.reason, 0) + 1
            if n >= sample:
                break
    finally:
        records.close()
    if not reasons:
        return  # an empty first file: nothing to judge by
    fields = _first_record_fields(unit, source.name)
    raise DataSourceError(
        f"[[data.sources]] '{source.name}': none of the first {sum(reasons.values())} "
        f"records of {files[0].path!r} has a usable text_field = {source.text_field!r} "
        f"({', '.join(f'{r}: {n}' for r, n in sorted(reasons.items()))}); "
        f"fields of the first record: {fields}. Set text_field to the field that "
        "holds the document text"
    )


def _first_record_fields(unit: ReadUnit, source_name: str) -> list[str] | str:
    if unit.format == "parquet":
        pf, raw = parquet_file(unit.path, source_name)
        with raw:
            return list(pf.schema_arrow.names)
    with open_binary(unit.path, source_name) as raw:
        stream = _decompressed(raw, unit.compression)
        for line in stream:
            if line.strip():
                try:
                    obj = json.loads(line)
                except ValueError:
                    return "not JSON"
                if isinstance(obj, list) and obj and isinstance(obj[0], dict):
                    obj = obj[0]
                return sorted(obj) if isinstance(obj, dict) else "not a JSON object"
    return "none"
