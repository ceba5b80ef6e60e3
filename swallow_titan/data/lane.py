"""A lane: one slot's part of one source, shuffled, tokenised and packed.

A lane reads the records of its ``LaneSpec`` (``sharding.py``) epoch after
epoch. In every epoch its units are read in a seeded order (seed, source,
slot, epoch), and its records are taken in blocks of ``block_docs``, each
permuted by a seeded shuffle (seed, source, slot, epoch, block). Good
documents become ``BOS + tokens + EOS`` and are packed into ``seq_len + 1``
windows (``packer.py``); bad records are counted per reason and skipped.

The state is small and exact: where the current block starts (epoch, block
number, unit, record, byte offset), which item of the permuted block is being
packed, and how many of that document's tokens earlier windows already hold. A
restart re-reads that one block, permutes it the same way, re-tokenises the
document and drops the tokens already used, so no document is repeated or
skipped.

An epoch that ends is followed by the next, reshuffled, unless the source's
``max_epochs`` is reached (a fractional limit stops part-way through the last
epoch, at a block boundary); the lane then stops and the slot fills the
source's positions from its other sources (``slots.py``). A lane whose part of
the source holds no usable document stops the same way. A stopped lane drops
its last, incomplete window.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from torchtitan.tools.logging import logger

from swallow_titan.config.sections import DataSource
from swallow_titan.data.packer import DocumentPacker
from swallow_titan.data.records import Record, iter_records
from swallow_titan.data.sharding import LaneSpec
from swallow_titan.data.tokenizer import DocumentTokenizer

DEFAULT_BLOCK_DOCS = 1024
_WARNINGS_PER_REASON = 3
_warned: dict[tuple[str, str], int] = {}


def seeded_permutation(n: int, *key: object) -> list[int]:
    """A permutation of ``range(n)`` fixed by ``key`` on every machine and
    Python version (Fisher-Yates driven by ``random.Random.random``, whose
    sequence Python keeps stable for an integer seed)."""
    digest = hashlib.sha256(repr(key).encode()).digest()
    rng = random.Random(int.from_bytes(digest[:8], "little"))
    order = list(range(n))
    for i in range(n - 1, 0, -1):
        j = int(rng.random() * (i + 1))
        order[i], order[j] = order[j], order[i]
    return order


def tokenize_text(tokenizer: DocumentTokenizer, text: str) -> tuple[list[int] | None, str | None]:
    """(ids, None), or (None, reason) for text the tokenizer cannot encode."""
    try:
        return tokenizer.encode_ordinary(text), None
    except Exception:
        return None, "tokenizer_error"
    except BaseException as e:
        # tiktoken's Rust panics surface as pyo3's PanicException, which is
        # a BaseException; anything else (KeyboardInterrupt, ...) goes on.
        if type(e).__name__ != "PanicException":
            raise
        return None, "tokenizer_panic"


@dataclass
class LaneState:
    """Where a lane is; JSON-able, saved in checkpoints."""

    epoch: int = 0
    block: int = 0  # number of the current block within the epoch
    unit: int = 0  # position, in this epoch's unit order, of the block's first record
    record: int = 0  # that record's number within its unit
    offset: int = -1  # byte offset of its line (seekable units), else -1
    item: int = 0  # item of the permuted block being packed (or next)
    emitted: int = 0  # tokens of that item's document (BOS counted) already in windows
    records_before_block: int = 0  # records of this epoch before the block
    epoch_records: int = 0  # records in one full epoch, known after the first
    epoch_documents: int = 0  # documents packed in this epoch
    documents: int = 0  # documents packed in all epochs
    windows: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    stopped: str = ""  # "", "max_epochs", "empty" or "no_documents"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LaneState:
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["skipped"] = dict(self.skipped)
        return out


class Lane:
    """Packed windows of one slot's part of one source (see the module docstring)."""

    def __init__(
        self,
        source: DataSource,
        spec: LaneSpec,
        slot: int,
        tokenizer: DocumentTokenizer,
        seq_len: int,
        seed: int,
        block_docs: int = DEFAULT_BLOCK_DOCS,
        max_chars: int = 1 << 62,
        state: LaneState | None = None,
    ):
        self.source = source
        self.spec = spec
        self.slot = slot
        self._tokenizer = tokenizer
        self._seed = seed
        self._shuffle = block_docs > 0
        self._block_size = block_docs if block_docs > 0 else DEFAULT_BLOCK_DOCS
        self._max_chars = max_chars
        self._packer = DocumentPacker(seq_len, tokenizer.bos_id, tokenizer.eos_id)
        self.state = state or LaneState()
        self._block: list[tuple[int, Record]] | None = None
        self._records: Iterator[tuple[int, Record]] | None = None
        self._pos = 0
        self._current_len = 0

    @property
    def stopped(self) -> bool:
        return bool(self.state.stopped)

    # -- windows ------------------------------------------------------------

    def next_window(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The next (tokens, positions) window, or None once the lane stopped."""
        if self._block is None and not self.stopped:
            self._resume()
        while not self._packer.has_window():
            if not self._feed():
                self._packer.clear()
                return None
        tokens, positions = self._packer.pop_arrays()
        state = self.state
        state.windows += 1
        pending = self._packer.pending_tokens
        if pending:
            state.item, state.emitted = self._pos - 1, self._current_len - pending
        else:
            state.item, state.emitted = self._pos, 0
        return tokens, positions

    def _feed(self) -> bool:
        """Add the next good document to the packer; False once stopped."""
        state = self.state
        while not self.stopped:
            if self._pos >= len(self._block):
                self._next_block()
                continue
            u_pos, record = self._block[self._pos]
            self._pos += 1
            if not record.usable:
                self._skip(record.reason, u_pos, record)
                continue
            ids = self._document_ids(u_pos, record)
            if ids is None:
                continue
            state.documents += 1
            state.epoch_documents += 1
            self._packer.add(ids)
            self._current_len = len(ids) + self._packer.frame_tokens
            return True
        return False

    def _document_ids(self, u_pos: int, record: Record) -> list[int] | None:
        """The document's token ids without BOS/EOS (the packer adds them), or
        None when it is skipped (and counted)."""
        if record.ids is None:
            return self._tokenize(u_pos, record)
        ids = record.ids.astype(np.int64)
        # Megatron corpora may store BOS (the tokenizer adds it) and EOS
        # (--append-eod): drop them so the packer's are not doubled.
        bos = self._tokenizer.bos_id
        start = 1 if bos is not None and len(ids) and ids[0] == bos else 0
        stop = len(ids) - 1 if len(ids) > start and ids[-1] == self._tokenizer.eos_id else len(ids)
        ids = ids[start:stop]
        if len(ids) == 0:
            self._skip("empty", u_pos, record)
            return None
        if (
            (ids < 0).any()
            or (ids >= self._tokenizer.n_words).any()
            or (record.ids.dtype.kind == "f" and not np.array_equal(ids, record.ids[start:stop]))
        ):
            self._skip("token_out_of_range", u_pos, record)
            return None
        return ids.tolist()

    def _tokenize(self, u_pos: int, record: Record) -> list[int] | None:
        ids, reason = tokenize_text(self._tokenizer, record.text)
        if ids is None:
            self._skip(reason, u_pos, record)
        return ids

    def _skip(self, reason: str, u_pos: int, record: Record) -> None:
        skipped = self.state.skipped
        skipped[reason] = skipped.get(reason, 0) + 1
        key = (self.source.name, reason)
        shown = _warned.get(key, 0)
        if shown < _WARNINGS_PER_REASON:
            _warned[key] = shown + 1
            unit = self._unit_at(u_pos)
            logger.warning(
                f"data source '{self.source.name}': skipped record {record.index} of "
                f"{unit.describe()} ({reason})"
                + ("; further ones are only counted" if shown + 1 == _WARNINGS_PER_REASON else "")
            )

    # -- blocks and epochs --------------------------------------------------

    def _unit_order(self, epoch: int) -> list[int]:
        n = len(self.spec.units)
        if not self._shuffle:
            return list(range(n))
        return seeded_permutation(n, "units", self._seed, self.source.name, self.slot, epoch)

    def _unit_at(self, u_pos: int):
        return self.spec.units[self._unit_order(self.state.epoch)[u_pos]]

    def _open_records(self) -> Iterator[tuple[int, Record]]:
        """This epoch's records from the current block's first one on."""
        state = self.state
        order = self._unit_order(state.epoch)
        for u_pos in range(state.unit, len(order)):
            first = u_pos == state.unit
            unit = self.spec.units[order[u_pos]]
            for record in iter_records(
                unit,
                self.source.text_field,
                self.source.name,
                stride=self.spec.stride,
                phase=self.spec.phase,
                start_index=state.record if first else 0,
                start_offset=state.offset if first else -1,
                max_chars=self._max_chars,
            ):
                yield u_pos, record

    def _read_block(self, first: tuple[int, Record] | None = None) -> list[tuple[int, Record]]:
        block = [first] if first is not None else []
        while len(block) < self._block_size:
            item = next(self._records, None)
            if item is None:
                break
            block.append(item)
        if self._shuffle and len(block) > 1:
            order = seeded_permutation(
                len(block), "docs", self._seed, self.source.name, self.slot,
                self.state.epoch, self.state.block,
            )
            block = [block[i] for i in order]
        return block

    def _resume(self) -> None:
        """Re-read the current block and put back the partly packed document."""
        state = self.state
        self._records = self._open_records()
        if self._check_epoch_limit():
            return
        self._block = self._read_block()
        if not self._block:
            self._end_epoch()
            return
        self._pos = state.item
        if state.emitted and state.item < len(self._block):
            u_pos, record = self._block[state.item]
            ids = self._document_ids(u_pos, record)
            self._packer.add(ids, skip=state.emitted)
            self._current_len = len(ids) + self._packer.frame_tokens
            self._pos = state.item + 1

    def _next_block(self) -> None:
        state = self.state
        state.records_before_block += len(self._block)
        state.block += 1
        state.item = state.emitted = 0
        if self._check_epoch_limit():
            return
        first = next(self._records, None)
        if first is None:
            self._block = []
            self._end_epoch()
            return
        u_pos, record = first
        # The block's cursor: where a restart re-opens the records.
        state.unit, state.record, state.offset = u_pos, record.index, record.offset
        self._block = self._read_block(first)
        self._pos = 0

    def _end_epoch(self) -> None:
        state = self.state
        records = state.records_before_block + len(self._block or [])
        if state.epoch == 0:
            state.epoch_records = records
        if state.epoch_documents == 0:
            state.stopped = "empty" if records == 0 else "no_documents"
            self._block = []
            return
        state.epoch += 1
        state.block = state.unit = state.record = state.item = state.emitted = 0
        state.offset = -1
        state.records_before_block = state.epoch_documents = 0
        limit = self.source.max_epochs
        if limit and state.epoch >= limit:
            state.stopped = "max_epochs"
            self._block = []
            return
        self._resume()

    def _check_epoch_limit(self) -> bool:
        """Stop part-way through the last epoch of a fractional max_epochs."""
        state, limit = self.state, self.source.max_epochs
        if not limit or state.epoch != math.floor(limit) or not state.epoch_records:
            return False
        if state.records_before_block >= (limit - state.epoch) * state.epoch_records:
            state.stopped = "max_epochs"
            self._block = []
            return True
        return False
