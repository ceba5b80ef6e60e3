"""What a ``[[data.sources]]`` entry names: its files, found the same way for
local paths and Hugging Face hub datasets.

Local sources are a path or glob of ``.jsonl``, ``.jsonl.gz``, ``.json``,
``.parquet`` (also ``.json.gz`` and, with ``zstandard`` installed, ``.zst``).
A hub source is resolved by ``datasets``: ``load_dataset_builder(id, config,
revision=...)`` lists the data files of the split, which are exactly the shards
(``n_shards``) that ``load_dataset(..., streaming=True)`` would stream. Both
kinds then go through the same sharding (``sharding.py``) and the same record
reader (``records.py``), which opens hub files through ``fsspec``'s ``hf://``
filesystem. ``datasets``' own JSON reader is not used for the records because
it fails a whole file on one malformed line and cannot seek; ours skips and
counts bad records and resumes at a byte offset.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path

from swallow_titan.config.sections import DataSource

# File name endings -> (format, compression).
_SUFFIXES = {
    ".jsonl": ("jsonl", ""),
    ".ndjson": ("jsonl", ""),
    ".json": ("json", ""),
    ".jsonl.gz": ("jsonl", "gzip"),
    ".json.gz": ("json", "gzip"),
    ".jsonl.zst": ("jsonl", "zstd"),
    ".json.zst": ("json", "zstd"),
    ".jsonl.zstd": ("jsonl", "zstd"),
    ".parquet": ("parquet", ""),
}


class DataSourceError(ValueError):
    """A data source cannot be read; the message names the source and field."""


@dataclass(frozen=True)
class SourceFile:
    """One file of a source: where it is, its format, and its size in bytes
    (0 when unknown, e.g. a hub file whose listing failed)."""

    path: str
    format: str  # "jsonl", "json", "parquet" or "megatron"
    compression: str  # "", "gzip" or "zstd"
    size: int

    @property
    def is_remote(self) -> bool:
        return "://" in self.path


def file_kind(path: str) -> tuple[str, str] | None:
    """(format, compression) from a file name, or None if unsupported."""
    name = os.path.basename(path.split("?")[0]).lower()
    for suffix in sorted(_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return _SUFFIXES[suffix]
    return None


def _supported_endings() -> str:
    return ", ".join(sorted(_SUFFIXES))


def local_files(source: DataSource, where: str = "[[data.sources]]") -> list[str]:
    """The files a local source names, sorted; errors if none or unsupported."""
    files = sorted(glob.glob(os.path.expanduser(source.path), recursive=True))
    files = [f for f in files if os.path.isfile(f)]
    if not files:
        raise DataSourceError(
            f"{where} '{source.name}': path = {source.path!r} matches no file"
        )
    if source.format == "megatron":
        return _megatron_files(source, files, where)
    unknown = sorted({Path(f).name for f in files if file_kind(f) is None})
    if unknown:
        raise DataSourceError(
            f"{where} '{source.name}': path = {source.path!r} matches files of an "
            f"unsupported type (e.g. {unknown[0]!r}); expected {_supported_endings()}"
        )
    formats = {file_kind(f)[0] == "parquet" for f in files}
    if len(formats) > 1:
        raise DataSourceError(
            f"{where} '{source.name}': path = {source.path!r} mixes JSON and "
            "Parquet files; use one source per format"
        )
    unreadable = [f for f in files if not os.access(f, os.R_OK)]
    if unreadable:
        raise DataSourceError(
            f"{where} '{source.name}': file {unreadable[0]!r} is not readable "
            "(check its permissions)"
        )
    return files


def _megatron_files(source: DataSource, files: list[str], where: str) -> list[str]:
    """The .bin files of a Megatron source, each with its .idx beside it (a
    glob that also matches the .idx files is fine: they are the pairs' halves)."""
    bins = [f for f in files if f.endswith(".bin")]
    others = [f for f in files if not f.endswith((".bin", ".idx"))]
    if others or not bins:
        raise DataSourceError(
            f"{where} '{source.name}': format = \"megatron\" needs path to name "
            f".bin files (each with its .idx beside it), but {source.path!r} matches "
            f"{Path((others or files)[0]).name!r}"
        )
    for f in bins:
        idx = f[: -len(".bin")] + ".idx"
        if not os.path.isfile(idx):
            raise DataSourceError(
                f"{where} '{source.name}': Megatron dataset {f!r} has no .idx file "
                f"beside it (expected {idx!r})"
            )
        for path in (f, idx):
            if not os.access(path, os.R_OK):
                raise DataSourceError(
                    f"{where} '{source.name}': file {path!r} is not readable "
                    "(check its permissions)"
                )
    return bins


def hub_files(source: DataSource, where: str = "[[data.sources]]") -> list[str]:
    """The data files of a hub dataset's split, as ``datasets`` resolves them
    (``hf://`` URLs pinned to a revision, or local paths for a local folder)."""
    import datasets

    label = f"hf_dataset = {source.hf_dataset!r}" + (
        f", hf_config = {source.hf_config!r}" if source.hf_config else ""
    )
    try:
        builder = datasets.load_dataset_builder(
            source.hf_dataset,
            source.hf_config or None,
            revision=source.revision or None,
        )
    except Exception as e:  # network, missing repo, bad config name: all fatal
        raise DataSourceError(
            f"{where} '{source.name}': cannot open {label}: {e}. Check the id, "
            "the network (or HF_HUB_OFFLINE) and your Hugging Face login"
        ) from e
    data_files = builder.config.data_files or {}
    splits = {str(k): list(v) for k, v in data_files.items()}
    if source.split not in splits:
        raise DataSourceError(
            f"{where} '{source.name}': {label} has no split {source.split!r} with "
            f"data files (splits: {sorted(splits) or 'none'}); datasets built by a "
            "loading script are not supported, use their Parquet/JSON files"
        )
    files = splits[source.split]
    unknown = [f for f in files if file_kind(f) is None]
    if unknown:
        raise DataSourceError(
            f"{where} '{source.name}': {label} holds files of an unsupported type "
            f"(e.g. {unknown[0]!r}); expected {_supported_endings()}"
        )
    return files


def source_files(source: DataSource) -> list[SourceFile]:
    """Every file of ``source`` with its format and size, in a fixed order."""
    paths = local_files(source) if source.path else hub_files(source)
    sizes = _file_sizes(paths)
    if source.format == "megatron":
        return [SourceFile(p, "megatron", "", sizes[p]) for p in paths]
    out = []
    for path in paths:
        fmt, compression = file_kind(path)
        if compression == "zstd":
            _require_zstandard(source, path)
        out.append(SourceFile(path, fmt, compression, sizes.get(path, 0)))
    return out


def _require_zstandard(source: DataSource, path: str) -> None:
    try:
        import zstandard  # noqa: F401
    except ModuleNotFoundError:
        raise DataSourceError(
            f"[[data.sources]] '{source.name}': file {path!r} is zstd-compressed; "
            "install the 'zstandard' package to read it"
        ) from None


def _file_sizes(paths: list[str]) -> dict[str, int]:
    """Sizes in bytes; remote files are listed once per folder (one request
    each), and left out if the listing fails (their size is then unknown)."""
    sizes = {p: os.path.getsize(p) for p in paths if "://" not in p}
    remote = [p for p in paths if "://" in p]
    if remote:
        import fsspec

        folders: dict[str, list[str]] = {}
        for p in remote:
            folders.setdefault(p.rsplit("/", 1)[0], []).append(p)
        for folder, members in folders.items():
            try:
                fs, root = fsspec.core.url_to_fs(folder)
                listing = {e["name"].rsplit("/", 1)[-1]: e.get("size") or 0
                           for e in fs.ls(root, detail=True)}
            except Exception:
                continue
            for p in members:
                sizes[p] = int(listing.get(p.rsplit("/", 1)[-1], 0))
    return sizes


def check_source(source: DataSource, where: str = "[[data.sources]]") -> None:
    """Check a source's fields without touching the disk or the network."""
    if not source.name:
        raise DataSourceError(f"{where}: every source needs a 'name'")
    if source.format not in ("text", "megatron"):
        raise DataSourceError(
            f"{where} '{source.name}': format must be \"text\" or \"megatron\", "
            f"got {source.format!r}"
        )
    if source.format == "megatron" and not source.path:
        raise DataSourceError(
            f"{where} '{source.name}': format = \"megatron\" reads local .bin/.idx "
            "files: set path (a .bin file or a glob of them)"
        )
    if bool(source.path) == bool(source.hf_dataset):
        raise DataSourceError(
            f"{where} '{source.name}': set exactly one of 'path' (local files) "
            "or 'hf_dataset' (a hub dataset id)"
        )
    if source.weight <= 0:
        raise DataSourceError(
            f"{where} '{source.name}': weight must be positive, got {source.weight}"
        )
    if source.max_epochs < 0:
        raise DataSourceError(
            f"{where} '{source.name}': max_epochs must be >= 0 (0 = no limit), "
            f"got {source.max_epochs}"
        )
    if source.num_tokens < 0:
        raise DataSourceError(
            f"{where} '{source.name}': num_tokens must be >= 0 (0 = unknown), "
            f"got {source.num_tokens}"
        )
    if not source.text_field:
        raise DataSourceError(f"{where} '{source.name}': text_field must not be empty")


def check_data_options(data, where: str) -> None:
    """Check the ``[data]`` options that are not per source."""
    if data.shuffle_block_docs < 0:
        raise DataSourceError(
            f"{where}.shuffle_block_docs: must be >= 0 (0 = keep the files' order), "
            f"got {data.shuffle_block_docs}"
        )
    if data.max_document_chars < 1:
        raise DataSourceError(
            f"{where}.max_document_chars: must be >= 1, got {data.max_document_chars}"
        )
