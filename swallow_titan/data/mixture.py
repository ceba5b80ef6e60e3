"""The global token stream: weighted sources, tokenised and packed.

Every data-parallel rank computes the same global stream and keeps its own
slice of each global batch (see ``dataloader.py``). The stream's state is
therefore the same on every rank and independent of the data-parallel size.

The mixture is chosen per document by token deficit: the next document comes
from the source whose token count lags its weight the most (ties go to the
earlier source). At every point of the stream each source's share of tokens is
within one document of its target.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from torchtitan.tools.logging import logger

from swallow_titan.config.sections import DataSource
from swallow_titan.data.packer import DocumentPacker, PackedWindow
from swallow_titan.data.sources import open_source
from swallow_titan.data.tokenizer import Llama3Tokenizer

OpenSource = Callable[[DataSource, int], Iterator[str]]


@dataclass
class SourceProgress:
    """How far the stream has read one source."""

    docs_in_epoch: int = 0
    epoch: int = 0
    tokens: int = 0  # tokens taken from this source, BOS/EOS included
    exhausted: bool = False


@dataclass
class _Source:
    config: DataSource
    weight: float
    progress: SourceProgress = field(default_factory=SourceProgress)
    docs: Iterator[str] | None = None


class MixtureStream:
    """Iterates ``PackedWindow``s of the weighted mixture, resumably."""

    def __init__(
        self,
        sources: list[DataSource],
        tokenizer: Llama3Tokenizer,
        seq_len: int,
        open_fn: OpenSource = open_source,
    ):
        if not sources:
            raise ValueError("[data] sources is empty: add at least one [[data.sources]]")
        total = sum(s.weight for s in sources)
        self._sources = [_Source(s, s.weight / total) for s in sources]
        self._tokenizer = tokenizer
        self._packer = DocumentPacker(seq_len, tokenizer.bos_id, tokenizer.eos_id)
        self._open = open_fn

    @property
    def total_tokens(self) -> int:
        return sum(s.progress.tokens for s in self._sources)

    def source_tokens(self) -> dict[str, int]:
        """Tokens taken so far from each source, by name."""
        return {s.config.name: s.progress.tokens for s in self._sources}

    def __iter__(self) -> Iterator[PackedWindow]:
        return self

    def __next__(self) -> PackedWindow:
        while not self._packer.has_window():
            self._packer.add(self._next_document())
        return self._packer.pop()

    def _pick(self) -> _Source:
        live = [s for s in self._sources if not s.progress.exhausted]
        if not live:
            raise StopIteration
        total = self.total_tokens
        return max(live, key=lambda s: s.weight * total - s.progress.tokens)

    def _next_document(self) -> list[int]:
        while True:
            source = self._pick()
            text = self._read(source)
            if text is None:
                continue
            tokens = self._tokenizer.encode_ordinary(text)
            source.progress.tokens += len(tokens) + 2  # BOS and EOS
            return tokens

    def _read(self, source: _Source) -> str | None:
        """Next text of ``source``, or None when it just ended an epoch."""
        progress = source.progress
        if source.docs is None:
            source.docs = self._open(source.config, progress.docs_in_epoch)
        try:
            text = next(source.docs)
        except StopIteration:
            source.docs = None
            if progress.docs_in_epoch == 0:
                raise ValueError(
                    f"[[data.sources]] '{source.config.name}' holds no documents"
                ) from None
            progress.epoch += 1
            progress.docs_in_epoch = 0
            limit = source.config.max_epochs
            if limit and progress.epoch >= limit:
                progress.exhausted = True
                logger.warning(
                    f"data source '{source.config.name}' finished its "
                    f"{progress.epoch} epoch(s) (max_epochs = {limit}); "
                    "the other sources continue"
                )
            else:
                logger.warning(
                    f"data source '{source.config.name}' ran out and repeats: "
                    f"epoch {progress.epoch + 1} starts"
                )
            return None
        progress.docs_in_epoch += 1
        return text

    def state_dict(self) -> dict[str, Any]:
        return {
            "sources": {
                s.config.name: vars(s.progress).copy() for s in self._sources
            },
            "packer": self._packer.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state["sources"]
        names = [s.config.name for s in self._sources]
        if sorted(saved) != sorted(names):
            raise ValueError(
                "the checkpoint's data state was saved with sources "
                f"{sorted(saved)}, but the config has {sorted(names)}; "
                "resume with the same [[data.sources]] names"
            )
        for source in self._sources:
            source.progress = SourceProgress(**saved[source.config.name])
            source.docs = None
        self._packer.load_state_dict(state["packer"])
