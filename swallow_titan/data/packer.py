"""Pack tokenised documents into fixed-length training windows.

Each document is framed the way its tokenizer family frames documents: Llama 3
writes ``BOS + tokens + EOS``, Qwen (no BOS) ``tokens + <|endoftext|>``; the
packer is told by a ``bos_id`` of None. Documents are concatenated and cut into
windows of ``seq_len + 1`` tokens (inputs are the first ``seq_len``, labels the
last ``seq_len``). A long document continues in the next window.

Alongside the tokens the packer keeps per-token position ids that restart at
every document start and at every window start. The window start counts as a
restart because block-causal attention (torchtitan's document mask, built from
the EOS tokens) also treats it as the start of a document, and because positions
must stay below ``seq_len``, the length of the model's RoPE table.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class PackedWindow:
    """One window of ``seq_len + 1`` tokens and their position ids."""

    tokens: torch.Tensor  # int64 [seq_len + 1]
    positions: torch.Tensor  # int64 [seq_len + 1]


def positions_from_starts(length: int, starts: Sequence[int]) -> np.ndarray:
    """Position ids of a window whose documents start at ``starts``: they count
    from 0 at the window start and at every document start."""
    bounds = [0, *(s for s in starts if 0 < s < length)]
    lengths = np.diff([*bounds, length])
    return np.arange(length, dtype=np.int64) - np.repeat(
        np.asarray(bounds, dtype=np.int64), lengths
    )


def frame_tokens(bos_id: int | None) -> int:
    """Tokens the packer adds to every document: BOS (if the family has one) and EOS."""
    return 2 if bos_id is not None else 1


class DocumentPacker:
    """Concatenates ``[BOS +] doc + EOS`` token runs into ``seq_len + 1`` windows.

    The packer is a plain state machine: ``add`` appends one document, ``pop``
    takes the next full window. Tokens not yet in a window are part of
    ``state_dict``, so a restart continues mid-window exactly.
    """

    def __init__(self, seq_len: int, bos_id: int | None, eos_id: int):
        if seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        self.window = seq_len + 1
        self.bos_id = bos_id
        self.eos_id = eos_id
        self._head = [] if bos_id is None else [bos_id]
        self._tokens: list[int] = []
        self._starts: list[int] = []  # indices in _tokens where a document starts

    @property
    def frame_tokens(self) -> int:
        """Tokens added to every document (the module's ``frame_tokens``)."""
        return frame_tokens(self.bos_id)

    def add(self, doc_tokens: Iterable[int], skip: int = 0) -> None:
        """Append one document (without BOS/EOS). ``skip`` leaves out its first
        tokens (BOS counted), which an earlier window already holds."""
        tokens = self._tokens
        if skip == 0:
            self._starts.append(len(tokens))
            tokens.extend(self._head)
            tokens.extend(doc_tokens)
            tokens.append(self.eos_id)
        else:
            tokens.extend([*self._head, *doc_tokens, self.eos_id][skip:])

    def has_window(self) -> bool:
        """Whether a full window is ready to ``pop``."""
        return len(self._tokens) >= self.window

    def pop(self) -> PackedWindow:
        """Remove and return the next full window."""
        tokens, positions = self.pop_arrays()
        return PackedWindow(torch.from_numpy(tokens), torch.from_numpy(positions))

    def pop_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """``pop`` as int64 numpy arrays (tokens, positions)."""
        if not self.has_window():
            raise IndexError("no full window yet; add more documents")
        w = self.window
        tokens = np.array(self._tokens[:w], dtype=np.int64)
        positions = positions_from_starts(w, self._starts)
        del self._tokens[:w]
        self._starts = [s - w for s in self._starts if s >= w]
        return tokens, positions

    @property
    def pending_tokens(self) -> int:
        """Tokens waiting for the next window."""
        return len(self._tokens)

    def clear(self) -> None:
        self._tokens = []
        self._starts = []

    def state_dict(self) -> dict[str, Any]:
        return {"tokens": list(self._tokens), "starts": list(self._starts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        tokens, starts = list(state["tokens"]), list(state["starts"])
        if any(not 0 <= s < len(tokens) for s in starts):
            raise ValueError("packer state: document starts lie outside its tokens")
        self._tokens, self._starts = tokens, starts


def pack_documents(
    docs: Iterable[list[int]], seq_len: int, bos_id: int | None, eos_id: int
) -> Iterator[PackedWindow]:
    """Stream version of :class:`DocumentPacker` over an iterable of token lists."""
    packer = DocumentPacker(seq_len, bos_id, eos_id)
    for doc in docs:
        packer.add(doc)
        while packer.has_window():
            yield packer.pop()
