"""The training dataloader: each data-parallel rank's slice of the global stream.

Global batch ``b`` is the ``local_batch_size * dp_world_size`` windows that
follow batch ``b - 1`` in the :class:`MixtureStream`; rank ``r`` takes windows
``[r * local_batch_size, (r + 1) * local_batch_size)`` of it. The same global
batches therefore reach the model whatever the data-parallel size, and the
checkpointed state (the stream's position after the last batch) is the same on
every rank, so a run can resume with a different number of GPUs.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from typing import Any

import torch
from torchtitan.components.dataloader import BaseDataLoader

from swallow_titan.data.mixture import MixtureStream
from swallow_titan.data.tokenizer import Llama3Tokenizer

Batch = tuple[dict[str, torch.Tensor], torch.Tensor]

# Key of the data state inside the "dataloader" entry of a checkpoint.
_STATE_KEY = "global_stream"


class GlobalStreamDataLoader(BaseDataLoader):
    """Yields ``({"input", ["positions"]}, labels)`` batches for one DP rank."""

    def __init__(
        self,
        stream: MixtureStream,
        local_batch_size: int,
        dp_rank: int,
        dp_world_size: int,
        emit_positions: bool,
    ):
        if not 0 <= dp_rank < dp_world_size:
            raise ValueError(f"dp_rank {dp_rank} outside [0, {dp_world_size})")
        self.stream = stream
        self.local_batch_size = local_batch_size
        self.dp_rank = dp_rank
        self.dp_world_size = dp_world_size
        self.emit_positions = emit_positions
        self.batches_yielded = 0

    def __iter__(self) -> Iterator[Batch]:
        first = self.dp_rank * self.local_batch_size
        mine = range(first, first + self.local_batch_size)
        while True:
            windows = []
            for i in range(self.local_batch_size * self.dp_world_size):
                try:
                    window = next(self.stream)
                except StopIteration:
                    return
                if i in mine:
                    windows.append(window)
            self.batches_yielded += 1
            yield self._collate(windows)

    def _collate(self, windows) -> Batch:
        tokens = torch.stack([w.tokens for w in windows])
        inputs = {"input": tokens[:, :-1]}
        if self.emit_positions:
            inputs["positions"] = torch.stack([w.positions for w in windows])[:, :-1]
        return inputs, tokens[:, 1:]

    def metrics(self) -> dict[str, float]:
        """Per-source data metrics for logging: tokens taken, share, epoch.

        Keys are ``data/<source name>/<metric>``; the values describe the global
        stream up to the last batch this loader produced.
        """
        progress = self.stream.source_progress()
        total = max(sum(p.tokens for p in progress.values()), 1)
        out: dict[str, float] = {}
        for name, p in progress.items():
            out[f"data/{name}/tokens"] = p.tokens
            out[f"data/{name}/share"] = p.tokens / total
            out[f"data/{name}/epoch"] = p.epoch + 1
        return out

    def state_dict(self) -> dict[str, Any]:
        # Identical on every rank; DCP stores it once.
        state = {"stream": self.stream.state_dict(), "batches": self.batches_yielded}
        return {_STATE_KEY: pickle.dumps(state)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if _STATE_KEY not in state_dict:
            raise ValueError(
                "the checkpoint's dataloader state was not written by swallow-titan's "
                f"dataloader (keys: {sorted(state_dict)})"
            )
        state = pickle.loads(state_dict[_STATE_KEY])
        self.stream.load_state_dict(state["stream"])
        self.batches_yielded = state["batches"]


def source_token_counts(state_dict: dict[str, Any]) -> dict[str, int]:
    """Tokens taken from each source, read from a checkpoint's dataloader state.

    ``state_dict`` is what ``GlobalStreamDataLoader.state_dict`` returned (the
    checkpoint's "dataloader" entry); used by reports such as the model card.
    """
    state = pickle.loads(state_dict[_STATE_KEY])
    return {name: p["tokens"] for name, p in state["stream"]["sources"].items()}


def build_dataloader(
    dp_world_size: int,
    dp_rank: int,
    tokenizer: Llama3Tokenizer,
    job_config,
    **kwargs,
) -> GlobalStreamDataLoader:
    """TrainSpec ``build_dataloader_fn`` over ``[[data.sources]]``."""
    stream = MixtureStream(
        job_config.data.sources, tokenizer, job_config.training.seq_len
    )
    return GlobalStreamDataLoader(
        stream,
        job_config.training.local_batch_size,
        dp_rank,
        dp_world_size,
        emit_positions=job_config.data.reset_position_ids,
    )
