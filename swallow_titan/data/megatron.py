"""Megatron-LM indexed datasets (``.bin`` + ``.idx``) as a source of token ids.

A ``[[data.sources]]`` entry with ``format = "megatron"`` names ``.bin`` files;
the ``.idx`` beside each describes it. The ``.idx`` layout, as Megatron-Core's
``IndexedDatasetBuilder`` writes it (little-endian):

==========  =============================================================
9 bytes     ``MMIDIDX\\x00\\x00``
uint64      version, 1
uint8       dtype code (see ``DTYPES``)
uint64      ``S``: number of sequences
uint64      ``D``: number of document indices (documents + 1)
int32[S]    sequence lengths, in tokens
int64[S]    sequence pointers: byte offset of each sequence in the ``.bin``
int64[D]    document indices: first sequence of each document; the last is ``S``
int8[S]     sequence modes (multimodal datasets only)
==========  =============================================================

The ``.bin`` holds the sequences back to back in that dtype. A document is its
sequences concatenated (one sequence per document unless the corpus was
written with sentence splitting). Both files are read through ``numpy.memmap``:
opening a pair reads its header only, and a document read touches only its
own pages.

A pair is checked when a run (or the plan) starts: header, version, dtype,
the ``.idx`` size against its counts, the document indices' first and last
entries, and the ``.bin`` size against the last sequence's end (a truncated
``.bin``); small indexes are checked entry by entry. Token ids are checked
against the tokenizer's vocabulary on a spread sample of the ``.bin`` at
start-up, and every document is checked again when read (one with an id
outside the vocabulary is skipped and counted as ``token_out_of_range``).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from swallow_titan.data.packer import frame_tokens
from swallow_titan.data.sources import DataSourceError

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
_HEADER_BYTES = len(INDEX_MAGIC) + 8 + 1 + 8 + 8

DTYPES: dict[int, type[np.number]] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}

# Indexes with at most this many sequences are checked entry by entry at
# start-up (a vectorised pass over 2 x 8 bytes per sequence); larger ones by
# their end points, and each document again when it is read.
FULL_CHECK_SEQUENCES = 1 << 24
# Tokens sampled for the vocabulary check: this many chunks of CHUNK tokens,
# spread evenly over the .bin (first and last included).
VOCAB_CHECK_CHUNKS = 64
VOCAB_CHECK_CHUNK = 1 << 14


def idx_path_for(bin_path: str) -> str:
    """The ``.idx`` that describes ``bin_path`` (same prefix)."""
    return bin_path[: -len(".bin")] + ".idx"


@dataclass(frozen=True)
class MegatronIndex:
    """One validated ``.bin``/``.idx`` pair, its arrays memory-mapped."""

    bin_path: str
    dtype: np.dtype
    sequence_lengths: np.ndarray  # int32 [S]
    sequence_pointers: np.ndarray  # int64 [S]
    document_indices: np.ndarray  # int64 [D]
    bin_bytes: int

    @property
    def documents(self) -> int:
        return len(self.document_indices) - 1

    @property
    def tokens(self) -> int:
        """Tokens stored in the ``.bin`` (exact: sequences are contiguous)."""
        return self.bin_bytes // self.dtype.itemsize

    def document_start_byte(self, doc: int) -> int:
        """Byte offset in the ``.bin`` where document ``doc`` starts (``doc ==
        documents`` gives the file's end)."""
        seq = int(self.document_indices[doc])
        if seq >= len(self.sequence_pointers):
            return self.bin_bytes
        return int(self.sequence_pointers[seq])

    def document(self, doc: int) -> np.ndarray | None:
        """The token ids of document ``doc`` (its sequences concatenated), or
        None when the index points outside the ``.bin`` (a corrupt entry)."""
        first, last = int(self.document_indices[doc]), int(self.document_indices[doc + 1])
        if first == last:
            return np.zeros(0, dtype=self.dtype)
        start = int(self.sequence_pointers[first])
        end = int(self.sequence_pointers[last - 1]) + int(
            self.sequence_lengths[last - 1]
        ) * self.dtype.itemsize
        if not 0 <= start <= end <= self.bin_bytes:
            return None
        # Sequences of a document are contiguous (the builder writes them so).
        data = _bin_memmap(self.bin_path)
        return np.frombuffer(data, dtype=self.dtype, count=(end - start) // self.dtype.itemsize,
                             offset=start)


def _refuse(bin_path: str, source_name: str, problem: str) -> DataSourceError:
    return DataSourceError(
        f"[[data.sources]] '{source_name}': Megatron dataset {bin_path!r} (with its "
        f"{os.path.basename(idx_path_for(bin_path))!r}) {problem}; rewrite the pair "
        "(e.g. with python -m swallow_titan.pretokenize or Megatron's preprocess_data.py)"
    )


@lru_cache(maxsize=4096)
def _bin_memmap(bin_path: str) -> np.memmap:
    return np.memmap(bin_path, dtype=np.uint8, mode="r")


def read_index(bin_path: str, source_name: str) -> MegatronIndex:
    """The validated index of ``bin_path``, read now (``open_index`` caches);
    raises ``DataSourceError`` naming the file when the pair is missing,
    truncated or corrupt."""
    idx_path = idx_path_for(bin_path)
    if not os.path.isfile(idx_path):
        raise _refuse(bin_path, source_name, "has no .idx file beside it")
    idx_bytes = os.path.getsize(idx_path)
    with open(idx_path, "rb") as f:
        header = f.read(_HEADER_BYTES)
    if len(header) < _HEADER_BYTES or header[: len(INDEX_MAGIC)] != INDEX_MAGIC:
        raise _refuse(bin_path, source_name, "has an .idx that is not a Megatron index "
                      "(wrong magic bytes or shorter than its header)")
    version, code, sequences, doc_indices = struct.unpack_from("<QBQQ", header, len(INDEX_MAGIC))
    if version != INDEX_VERSION:
        raise _refuse(bin_path, source_name, f"has index version {version}, expected "
                      f"{INDEX_VERSION}")
    if code not in DTYPES:
        raise _refuse(bin_path, source_name, f"has unknown dtype code {code} (known: "
                      f"{sorted(DTYPES)})")
    arrays = _HEADER_BYTES + sequences * (4 + 8) + doc_indices * 8
    if idx_bytes not in (arrays, arrays + sequences):  # + int8 modes if multimodal
        raise _refuse(bin_path, source_name, f"has an .idx of {idx_bytes} bytes, but its "
                      f"header ({sequences} sequences, {doc_indices} document indices) "
                      f"needs {arrays}: the .idx is truncated or corrupt")
    if doc_indices < 1:
        raise _refuse(bin_path, source_name, "has no document indices")
    raw = np.memmap(idx_path, dtype=np.uint8, mode="r")
    lengths = np.frombuffer(raw, np.int32, sequences, _HEADER_BYTES)
    pointers = np.frombuffer(raw, np.int64, sequences, _HEADER_BYTES + 4 * sequences)
    documents = np.frombuffer(raw, np.int64, doc_indices, _HEADER_BYTES + 12 * sequences)
    dtype = np.dtype(DTYPES[code])
    bin_bytes = os.path.getsize(bin_path)
    if documents[0] != 0 or documents[-1] != sequences:
        raise _refuse(bin_path, source_name, f"has document indices from {documents[0]} "
                      f"to {documents[-1]}, expected 0 to {sequences}: the .idx is corrupt")
    end = int(pointers[-1]) + int(lengths[-1]) * dtype.itemsize if sequences else 0
    if sequences and pointers[0] != 0:
        raise _refuse(bin_path, source_name, "has a first sequence that does not start "
                      "at byte 0: the .idx is corrupt")
    if end != bin_bytes:
        raise _refuse(bin_path, source_name, f"has a .bin of {bin_bytes} bytes, but its "
                      f".idx says the sequences end at byte {end}: the .bin is "
                      + ("truncated" if end > bin_bytes else "longer than its index (or "
                         "the .idx is stale)"))
    if sequences <= FULL_CHECK_SEQUENCES:
        _check_entries(bin_path, source_name, lengths, pointers, documents, dtype)
    return MegatronIndex(bin_path, dtype, lengths, pointers, documents, bin_bytes)


def sequence_pointers(lengths: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Byte offsets of sequences of ``lengths`` tokens stored back to back."""
    pointers = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1].astype(np.int64) * np.dtype(dtype).itemsize, out=pointers[1:])
    return pointers


def _check_entries(bin_path, source_name, lengths, pointers, documents, dtype) -> None:
    if len(lengths) and int(lengths.min()) < 0:
        raise _refuse(bin_path, source_name, "has a negative sequence length")
    expected = sequence_pointers(lengths, dtype)
    if not np.array_equal(expected, pointers):
        bad = int(np.argmax(expected != pointers))
        raise _refuse(bin_path, source_name, f"has sequence {bad} at byte "
                      f"{int(pointers[bad])}, where the lengths before it put it at "
                      f"{int(expected[bad])}: the .idx is corrupt")
    if len(documents) > 1 and bool((np.diff(documents) < 0).any()):
        raise _refuse(bin_path, source_name, "has document indices that go backwards: "
                      "the .idx is corrupt")


_open_index = lru_cache(maxsize=4096)(read_index)


def open_index(bin_path: str, source_name: str) -> MegatronIndex:
    """``read_index``, cached per process (a lane opens its files often)."""
    return _open_index(bin_path, source_name)


def check_vocabulary(index: MegatronIndex, vocab_size: int, source_name: str,
                     tokenizer_path: str = "") -> None:
    """Refuse a ``.bin`` whose token ids (sampled across the file) cannot belong
    to a tokenizer of ``vocab_size`` ids, naming the file and the first bad id."""
    total = index.tokens
    if total == 0:
        return
    data = np.frombuffer(_bin_memmap(index.bin_path), dtype=index.dtype, count=total)
    chunks = min(VOCAB_CHECK_CHUNKS, max(1, total // VOCAB_CHECK_CHUNK))
    starts = np.linspace(0, max(total - VOCAB_CHECK_CHUNK, 0), chunks).astype(np.int64)
    for start in starts:
        chunk = data[start : start + VOCAB_CHECK_CHUNK]
        whole = chunk.astype(np.int64)
        # Float dtypes must hold whole numbers; every dtype, ids inside the vocabulary.
        bad = np.flatnonzero((whole != chunk) | (whole < 0) | (whole >= vocab_size))
        if len(bad):
            at = int(start + bad[0])
            raise DataSourceError(
                f"[[data.sources]] '{source_name}': Megatron dataset {index.bin_path!r} "
                f"holds token id {data[at].item()!r} (token {at:,}), which cannot belong to the "
                f"tokenizer{f' {tokenizer_path!r}' if tokenizer_path else ''} with "
                f"{vocab_size:,} ids: the file was tokenized with another tokenizer. Use "
                "the tokenizer it was written with ([model] hf_assets_path) or re-tokenize"
            )


def document_boundaries(index: MegatronIndex, pieces: int) -> list[int]:
    """``pieces + 1`` document numbers that cut the file into ranges of about
    equal bytes, each holding at least one document (fewer pieces if the file
    has fewer documents). Binary search: O(pieces log D) index reads."""
    docs = index.documents
    pieces = max(1, min(pieces, docs))
    bounds = [0]
    for i in range(1, pieces):
        target = index.bin_bytes * i // pieces
        lo, hi = bounds[-1] + 1, docs - (pieces - i)
        while lo < hi:  # first document starting at or after target
            mid = (lo + hi) // 2
            if index.document_start_byte(mid) < target:
                lo = mid + 1
            else:
                hi = mid
        bounds.append(lo)
    bounds.append(docs)
    return bounds


def packed_tokens(index: MegatronIndex, bos_id: int | None, eos_id: int,
                  sample: int = 1 << 16) -> tuple[int, bool]:
    """Tokens the packer makes of the file (``[BOS +] doc + EOS`` per document,
    no BOS when ``bos_id`` is None, the stored BOS/EOS not doubled) and whether
    that is exact (documents up to ``sample`` are all looked at; beyond, the
    BOS/EOS rate of an even sample of ``sample`` documents is scaled)."""
    docs = index.documents
    if docs == 0:
        return 0, True
    if docs <= sample:
        picked = np.arange(docs)
    else:
        picked = np.linspace(0, docs - 1, sample).astype(np.int64)
    firsts = index.document_indices[picked]
    lasts = index.document_indices[picked + 1]
    nonempty = lasts > firsts
    firsts, lasts = firsts[nonempty], lasts[nonempty]
    item = index.dtype.itemsize
    data = np.frombuffer(_bin_memmap(index.bin_path), dtype=index.dtype, count=index.tokens)
    head = data[index.sequence_pointers[firsts] // item]
    tail_pos = (index.sequence_pointers[lasts - 1] // item
                + index.sequence_lengths[lasts - 1].astype(np.int64) - 1)
    tail = data[tail_pos]
    stored = int((tail == eos_id).sum())
    if bos_id is not None:
        stored += int((head == bos_id).sum())
    if docs > sample:
        stored = round(stored * docs / len(picked))
    return index.tokens + frame_tokens(bos_id) * docs - stored, docs <= sample


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """The dtype Megatron's preprocessing picks: uint16 below 65,500 ids, else int32."""
    return np.dtype(np.uint16 if vocab_size < 65500 else np.int32)


class IndexedDatasetWriter:
    """Writes one ``.bin``/``.idx`` pair (one sequence per document) so that it
    never looks complete before it is: both are written as ``*.tmp``, flushed
    to disk, and renamed, the ``.idx`` last. A pair whose ``.idx`` exists is
    whole; a ``.bin`` without its ``.idx`` is an interrupted write."""

    def __init__(self, bin_path: str, dtype: np.dtype):
        if not bin_path.endswith(".bin"):
            raise ValueError(f"a Megatron data file ends with .bin, got {bin_path!r}")
        self.bin_path = bin_path
        self.dtype = np.dtype(dtype)
        self._code = {np.dtype(v): k for k, v in DTYPES.items()}[self.dtype]
        self._bin = open(bin_path + ".tmp", "wb")
        self._lengths: list[int] = []

    def add_document(self, ids) -> None:
        array = np.asarray(ids, dtype=self.dtype)
        self._bin.write(array.tobytes(order="C"))
        self._lengths.append(len(array))

    def finish(self) -> None:
        """Write the index and publish the pair (``.bin`` first, ``.idx`` last)."""
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        lengths = np.asarray(self._lengths, dtype=np.int32)
        pointers = sequence_pointers(lengths, self.dtype)
        documents = np.arange(len(lengths) + 1, dtype=np.int64)
        idx_path = idx_path_for(self.bin_path)
        with open(idx_path + ".tmp", "wb") as f:
            f.write(INDEX_MAGIC)
            f.write(struct.pack("<QBQQ", INDEX_VERSION, self._code, len(lengths), len(documents)))
            f.write(lengths.tobytes(order="C"))
            f.write(pointers.tobytes(order="C"))
            f.write(documents.tobytes(order="C"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(self.bin_path + ".tmp", self.bin_path)
        os.replace(idx_path + ".tmp", idx_path)

    def abandon(self) -> None:
        self._bin.close()
        for path in (self.bin_path + ".tmp", idx_path_for(self.bin_path) + ".tmp"):
            if os.path.exists(path):
                os.remove(path)
