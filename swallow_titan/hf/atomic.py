"""Folders and files that appear complete or not at all.

A conversion or export writes into a hidden sibling folder and renames it
into place when everything is written, so a crash never leaves a
half-written folder under the final name.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


class OutputFolderError(ValueError):
    """The output folder cannot be written as asked."""


@contextmanager
def staged_folder(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that becomes ``out`` when the block succeeds.

    On an exception the temporary folder is removed and ``out`` is untouched.
    An existing non-empty ``out`` is replaced only with ``overwrite``.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputFolderError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputFolderError(
            f"{out}: exists and is not empty; choose another output folder or "
            "pass --overwrite to replace it"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out.exists():
        # Two renames: between them `out` is absent, never half-written.
        retired = out.parent / f".{out.name}.replaced-{os.getpid()}"
        os.rename(out, retired)
        os.rename(staging, out)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.rename(staging, out)


def write_json_atomically(path: str | Path, data: Any) -> None:
    """Write ``data`` as indented JSON; readers see the old or the new file."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    partial.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(partial, path)
