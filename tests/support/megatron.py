"""Megatron indexed datasets written by megatron-core's own IndexedDatasetBuilder."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch


def write_megatron(prefix: Path, documents: list[list[int]], dtype=np.int32,
                   split_into: int = 1) -> Path:
    """``prefix.bin`` / ``prefix.idx`` holding ``documents``; each document is
    stored as ``split_into`` sequences when it is long enough (as sentence
    splitting does). Returns the .bin path."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix.parent.mkdir(parents=True, exist_ok=True)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for doc in documents:
        if split_into > 1 and len(doc) >= split_into:
            cut = np.array_split(np.arange(len(doc)), split_into)
            builder.add_document(torch.tensor(doc), [len(c) for c in cut])
        else:
            builder.add_item(torch.tensor(doc, dtype=torch.int64))
            builder.end_document()
    builder.finalize(f"{prefix}.idx")
    return Path(f"{prefix}.bin")
