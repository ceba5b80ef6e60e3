"""Small corpora and loader runs shared by the data-pipeline tests."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from support import SAMPLES, tiny_tokenizer
from swallow_titan.config.sections import DataSource
from swallow_titan.data.dataloader import SlotDataLoader
from swallow_titan.data.slots import StreamSpec, build_stream_spec
from swallow_titan.data.tokenizer import Llama3Tokenizer

WORDS = "alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega".split()


def numbered_docs(n: int, prefix: str = "doc", seed: int = 0) -> list[str]:
    """``n`` distinct documents of varied length, each starting with its id."""
    rng = random.Random(seed)
    return [
        f"{prefix}{i:05d} " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 30)))
        for i in range(n)
    ]


def write_jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({field: t}, ensure_ascii=False) + "\n" for t in texts))
    return path


def sample_sources(**weights: float) -> list[DataSource]:
    """Sources over the shipped samples, e.g. ``sample_sources(ja=0.5, en=0.5)``."""
    return [
        DataSource(name=name, domain=name, weight=w, path=str(SAMPLES / f"{name}.jsonl"))
        for name, w in weights.items()
    ]


def make_spec(sources: list[DataSource], *, seq_len: int = 32, global_batch: int = 8,
              seed: int = 0, **kwargs) -> StreamSpec:
    return build_stream_spec(
        sources, tiny_tokenizer(), seq_len=seq_len, global_batch=global_batch, seed=seed, **kwargs
    )


def make_loaders(spec: StreamSpec, dp: int, local: int, workers: int = 0,
                 state: dict | None = None) -> list[SlotDataLoader]:
    loaders = [
        SlotDataLoader(spec, local, rank, dp, emit_positions=True, num_workers=workers)
        for rank in range(dp)
    ]
    if state is not None:
        for loader in loaders:
            loader.load_state_dict(state)
    return loaders


def run_global_batches(
    loaders: list[SlotDataLoader], n: int, iterators: list | None = None
) -> list[list[list[int]]]:
    """``n`` global batches as lists of windows (token lists) in slot order:
    rank 0's microbatches, then rank 1's, ... (rank r owns a contiguous slot range).

    ``iterators``: the loaders' live iterators to continue (default: new ones).
    """
    if iterators is None:
        iterators = [iter(loader) for loader in loaders]
    out = []
    for _ in range(n):
        rows: list[list[int]] = []
        for loader, it in zip(loaders, iterators):
            for _ in range(loader.microsteps):
                inputs, labels = next(it)
                assert torch.equal(inputs["input"][:, 1:], labels[:, :-1])
                window = torch.cat([inputs["input"], labels[:, -1:]], dim=1)
                rows += window.tolist()
        out.append(rows)
    return out


def merged_state(loaders: list[SlotDataLoader]) -> dict:
    """The checkpoint's "dataloader" entry as DCP would hold it: every rank's keys."""
    state: dict = {}
    for loader in loaders:
        state.update(loader.state_dict())
    return state


def document_texts(windows: list[list[int]], tokenizer: Llama3Tokenizer) -> list[str]:
    """Texts of the documents that start (with BOS) in ``windows``, each window
    continued by the following ones of the same list until its EOS."""
    stream = [t for w in windows for t in w]
    texts, current = [], None
    for t in stream:
        if t == tokenizer.bos_id:
            current = []
        elif t == tokenizer.eos_id:
            if current is not None:
                texts.append(tokenizer.decode(current))
            current = None
        elif current is not None:
            current.append(t)
    return texts
