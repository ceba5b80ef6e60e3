"""Open a ``[[data.sources]]`` entry as a stream of document texts via ``datasets``.

Local files (a path or glob of ``.jsonl``, ``.jsonl.gz``, ``.json``,
``.parquet``) and Hugging Face hub datasets are both read with
``datasets.load_dataset(..., streaming=True)``, so they behave the same.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator
from pathlib import Path

from swallow_titan.config.sections import DataSource

_BUILDERS = {
    ".jsonl": "json",
    ".json": "json",
    ".jsonl.gz": "json",
    ".json.gz": "json",
    ".parquet": "parquet",
}


class DataSourceError(ValueError):
    """A data source cannot be read; the message names the source and field."""


def _suffix(path: str) -> str:
    name = os.path.basename(path)
    for suffix in sorted(_BUILDERS, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    return Path(name).suffix


def local_files(source: DataSource, where: str = "[[data.sources]]") -> list[str]:
    """The files a local source names, sorted; errors if none or mixed formats."""
    files = sorted(glob.glob(os.path.expanduser(source.path), recursive=True))
    files = [f for f in files if os.path.isfile(f)]
    if not files:
        raise DataSourceError(
            f"{where} '{source.name}': path = {source.path!r} matches no file"
        )
    suffixes = {_suffix(f) for f in files}
    unknown = suffixes - set(_BUILDERS)
    if unknown:
        raise DataSourceError(
            f"{where} '{source.name}': path = {source.path!r} matches files of "
            f"unsupported type {sorted(unknown)}; expected "
            + ", ".join(sorted(_BUILDERS))
        )
    builders = {_BUILDERS[s] for s in suffixes}
    if len(builders) > 1:
        raise DataSourceError(
            f"{where} '{source.name}': path = {source.path!r} mixes JSON and "
            "Parquet files; use one source per format"
        )
    return files


def check_source(source: DataSource, where: str = "[[data.sources]]") -> None:
    """Check a source's fields without touching the disk or the network."""
    if not source.name:
        raise DataSourceError(f"{where}: every source needs a 'name'")
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


def open_source(source: DataSource, skip: int = 0) -> Iterator[str]:
    """Iterate the document texts of ``source``, after skipping ``skip`` records."""
    import datasets

    if source.path:
        files = local_files(source)
        dataset = datasets.load_dataset(
            _BUILDERS[_suffix(files[0])],
            data_files=files,
            split="train",
            streaming=True,
        )
    else:
        dataset = datasets.load_dataset(
            source.hf_dataset,
            source.hf_config or None,
            split=source.split,
            revision=source.revision or None,
            streaming=True,
        )
    if skip:
        dataset = dataset.skip(skip)
    for index, record in enumerate(dataset, start=skip):
        text = record.get(source.text_field)
        if not isinstance(text, str):
            raise DataSourceError(
                f"source '{source.name}': record {index} has no string field "
                f"text_field = {source.text_field!r} (fields: {sorted(record)})"
            )
        yield text
