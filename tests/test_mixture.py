"""The replicated global stream used for held-out (validation) sets: weighted by
tokens, deterministic, resumable, DP-size independent. Training uses the slot
loader (tests/test_data_loader.py), which also owns the per-source metrics."""

from __future__ import annotations

import json

import pytest

from support import SAMPLES, tiny_tokenizer
from swallow_titan.config.sections import DataSource
from swallow_titan.data.dataloader import GlobalStreamDataLoader
from swallow_titan.data.mixture import MixtureStream

@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def sources(**weights) -> list[DataSource]:
    return [
        DataSource(name=name, domain=name, weight=w, path=str(SAMPLES / f"{name}.jsonl"))
        for name, w in weights.items()
    ]


def test_every_prefix_holds_the_weights_within_one_document(tokenizer):
    srcs = sources(ja=0.5, en=0.3, code=0.2)
    stream = MixtureStream(srcs, tokenizer, seq_len=128)
    longest = {
        s.name: max(
            len(tokenizer.encode(json.loads(line)["text"])) + 2
            for line in open(s.path)
        )
        for s in srcs
    }
    for _ in range(200):
        next(stream)
        total = stream.total_tokens
        for s in srcs:
            deficit = s.weight * total - stream.source_tokens()[s.name]
            assert abs(deficit) <= max(longest.values()), (s.name, deficit)


def test_stream_is_deterministic(tokenizer):
    a = MixtureStream(sources(ja=1, math=1), tokenizer, 64)
    b = MixtureStream(sources(ja=1, math=1), tokenizer, 64)
    for _ in range(50):
        assert next(a).tokens.tolist() == next(b).tokens.tolist()


def test_resume_from_state_continues_the_same_stream(tokenizer):
    whole = MixtureStream(sources(ja=2, code=1), tokenizer, 64)
    expected = [next(whole).tokens.tolist() for _ in range(60)]

    first = MixtureStream(sources(ja=2, code=1), tokenizer, 64)
    got = [next(first).tokens.tolist() for _ in range(25)]
    second = MixtureStream(sources(ja=2, code=1), tokenizer, 64)
    second.load_state_dict(first.state_dict())
    got += [next(second).tokens.tolist() for _ in range(35)]
    assert got == expected


def test_resume_with_other_sources_is_refused(tokenizer):
    first = MixtureStream(sources(ja=1), tokenizer, 64)
    next(first)
    other = MixtureStream(sources(en=1), tokenizer, 64)
    with pytest.raises(ValueError, match="same \\[\\[data.sources\\]\\] names"):
        other.load_state_dict(first.state_dict())


def test_a_small_source_repeats_and_max_epochs_stops_it(tokenizer, tmp_path):
    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(3)))
    srcs = [
        DataSource(name="small", weight=0.5, path=str(small), max_epochs=2),
        DataSource(name="en", weight=0.5, path=str(SAMPLES / "en.jsonl")),
    ]
    stream = MixtureStream(srcs, tokenizer, 16)
    for _ in range(100):
        next(stream)
    state = stream.state_dict()["sources"]
    assert state["small"]["epoch"] == 2 and state["small"]["exhausted"]
    assert not state["en"]["exhausted"]


def test_global_batches_are_the_same_for_any_data_parallel_size(tokenizer):
    def global_batches(world: int, local: int, n: int = 4) -> list[list[list[int]]]:
        loaders = [
            iter(GlobalStreamDataLoader(
                MixtureStream(sources(ja=1, en=1), tokenizer, 32), local, rank, world, True
            ))
            for rank in range(world)
        ]
        out = []
        for _ in range(n):
            rows = []
            for loader in loaders:
                inputs, labels = next(loader)
                assert inputs["positions"].shape == inputs["input"].shape == labels.shape
                rows += inputs["input"].tolist()
            out.append(rows)
        return out

    assert global_batches(world=2, local=2) == global_batches(world=1, local=4)
    assert global_batches(world=4, local=1) == global_batches(world=1, local=4)
