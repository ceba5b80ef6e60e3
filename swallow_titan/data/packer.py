"""Pack tokenised documents into fixed-length training windows.

Each document becomes ``BOS + tokens + EOS``; documents are concatenated and
cut into windows of ``seq_len + 1`` tokens (inputs are the first ``seq_len``,
labels the last ``seq_len``). A long document continues in the next window.

Alongside the tokens the packer keeps per-token position ids that restart at
every document start and at every window start. The window start counts as a
restart because block-causal attention (torchtitan's document mask) also treats
it as the start of a document, and because positions must stay below
``seq_len``, the length of the model's RoPE table.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class PackedWindow:
    """One window of ``seq_len + 1`` tokens and their position ids."""

    tokens: torch.Tensor  # int64 [seq_len + 1]
    positions: torch.Tensor  # int64 [seq_len + 1]


class DocumentPacker:
    """Concatenates ``BOS + doc + EOS`` token runs into ``seq_len + 1`` windows.

    The packer is a plain state machine: ``add`` appends one document, ``pop``
    takes the next full window. Tokens not yet in a window are part of
    ``state_dict``, so a restart continues mid-window exactly.
    """

    def __init__(self, seq_len: int, bos_id: int, eos_id: int):
        if seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        self.window = seq_len + 1
        self.bos_id = bos_id
        self.eos_id = eos_id
        self._tokens: list[int] = []
        self._positions: list[int] = []

    def add(self, doc_tokens: Iterable[int]) -> None:
        """Append one document (without BOS/EOS)."""
        ids = [self.bos_id, *doc_tokens, self.eos_id]
        self._tokens.extend(ids)
        # Positions restart at this document's BOS.
        self._positions.extend(range(len(ids)))

    def has_window(self) -> bool:
        """Whether a full window is ready to ``pop``."""
        return len(self._tokens) >= self.window

    def pop(self) -> PackedWindow:
        """Remove and return the next full window."""
        if not self.has_window():
            raise IndexError("no full window yet; add more documents")
        tokens = self._tokens[: self.window]
        positions = self._restart_at_window_start(self._positions[: self.window])
        del self._tokens[: self.window]
        del self._positions[: self.window]
        return PackedWindow(
            torch.tensor(tokens, dtype=torch.int64),
            torch.tensor(positions, dtype=torch.int64),
        )

    @staticmethod
    def _restart_at_window_start(positions: list[int]) -> list[int]:
        # A document cut by the previous window continues here from position 0.
        first = positions[0]
        if first == 0:
            return positions
        out = list(positions)
        for i, p in enumerate(out):
            if p < first:  # reached the next document's own restart
                break
            out[i] = p - first
        return out

    @property
    def pending_tokens(self) -> int:
        """Tokens waiting for the next window."""
        return len(self._tokens)

    def state_dict(self) -> dict[str, Any]:
        return {"tokens": list(self._tokens), "positions": list(self._positions)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["tokens"]) != len(state["positions"]):
            raise ValueError("packer state: tokens and positions differ in length")
        self._tokens = list(state["tokens"])
        self._positions = list(state["positions"])


def pack_documents(
    docs: Iterable[list[int]], seq_len: int, bos_id: int, eos_id: int
) -> Iterator[PackedWindow]:
    """Stream version of :class:`DocumentPacker` over an iterable of token lists."""
    packer = DocumentPacker(seq_len, bos_id, eos_id)
    for doc in docs:
        packer.add(doc)
        while packer.has_window():
            yield packer.pop()
