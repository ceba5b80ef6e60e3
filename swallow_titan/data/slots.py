"""Slots: the ``G`` independent streams that together make the global batches.

A global batch holds ``G = global_batch_size`` sequences, for the whole run and
whatever the number of data-parallel ranks. Slot ``j`` is a deterministic
stream of packed windows; global batch ``b`` is window ``b`` of every slot.
The mixture schedule (``schedule.py``) says from which source slot ``j`` takes
its window in batch ``b``; each (slot, source) pair is a lane (``lane.py``)
reading that slot's part of the source (``sharding.py``). A slot's state is
the batch it is at, the schedule's counts there, per source the windows it took
and was scheduled, and its lanes' states: everything needed to continue it
exactly, on any rank.

When a slot's lane of a source has stopped (``max_epochs`` reached, or its part
of the source holds no usable document), the slot fills that source's positions
from its other live sources, the one furthest behind its weight first. The
global mixture is then no longer exactly the weights, which is what stopping a
source means. A slot with no live source left ends the stream.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from torchtitan.tools.logging import logger

from swallow_titan.config.sections import DataSource, MixtureStage
from swallow_titan.data.lane import DEFAULT_BLOCK_DOCS, Lane, LaneState
from swallow_titan.data.megatron import check_vocabulary, open_index
from swallow_titan.data.records import check_text_field
from swallow_titan.data.schedule import StagedSchedule
from swallow_titan.data.sharding import LaneSpec, plan_lanes
from swallow_titan.data.sources import DataSourceError, source_files
from swallow_titan.data.stages import Stage, resolve_stages
from swallow_titan.data.tokenizer import DocumentTokenizer

STATE_FORMAT = 1


@dataclass
class StreamSpec:
    """Everything the slots share (sent to DataLoader worker processes)."""

    sources: list[DataSource]
    lanes: list[list[LaneSpec]]  # [source][slot]
    schedule: StagedSchedule
    stages: list[Stage]
    tokenizer: DocumentTokenizer
    seq_len: int
    seed: int
    block_docs: int = DEFAULT_BLOCK_DOCS
    max_chars: int = 1 << 62

    @property
    def slots(self) -> int:
        return self.schedule.slots

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sources]


def build_stream_spec(
    sources: Sequence[DataSource],
    tokenizer: DocumentTokenizer,
    *,
    seq_len: int,
    global_batch: int,
    seed: int,
    block_docs: int = DEFAULT_BLOCK_DOCS,
    max_chars: int = 1 << 62,
    stages: Sequence[MixtureStage] = (),
) -> StreamSpec:
    """Find every source's files, check they hold the text field (Megatron
    files: that they are whole and fit the tokenizer), and split them among
    the ``global_batch`` slots. Errors name the source."""
    if not sources:
        raise DataSourceError("[data] sources is empty: add at least one [[data.sources]]")
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise DataSourceError(f"[[data.sources]] names must be unique, got {names}")
    lanes = []
    for source in sources:
        files = source_files(source)
        if source.format == "megatron":
            for f in files:
                index = open_index(f.path, source.name)  # refuses a corrupt pair
                check_vocabulary(index, tokenizer.n_words, source.name, str(tokenizer.path))
        else:
            check_text_field(source, files)
        lanes.append(
            plan_lanes(files, global_batch, source.name, source.text_field, source.max_epochs)
        )
        _log_sharding(source, files, lanes[-1])
    resolved = resolve_stages(sources, stages)
    return StreamSpec(
        sources=list(sources),
        lanes=lanes,
        schedule=StagedSchedule([(s.first_batch, s.weights) for s in resolved], global_batch),
        stages=resolved,
        tokenizer=tokenizer,
        seq_len=seq_len,
        seed=seed,
        block_docs=block_docs,
        max_chars=max_chars,
    )


def _log_sharding(source: DataSource, files, lanes: list[LaneSpec]) -> None:
    units = {u for lane in lanes for u in lane.units}
    shared = max(lane.stride for lane in lanes)
    if lanes and lanes[0].whole:
        logger.info(
            f"data source '{source.name}': {len(files)} file(s) hold too few documents "
            f"for {len(lanes)} slots to get one each, so every slot reads all of it in "
            "its own seeded order (its share stays exact)"
        )
        return
    logger.info(
        f"data source '{source.name}': {len(files)} file(s) -> {len(units)} read "
        f"unit(s) for {len(lanes)} slots"
        + (
            f"; up to {shared} slots share a unit and each reads it (decompresses "
            "and splits lines) once: give the source more files to avoid that"
            if shared > 1
            else "; every unit is read by one slot only"
        )
    )


@dataclass
class SlotWindow:
    """One window of one slot, with the slot's state right after it."""

    slot: int
    batch: int
    source: int  # index into StreamSpec.sources
    tokens: np.ndarray  # int64 [seq_len + 1]
    positions: np.ndarray  # int64 [seq_len + 1]
    state: dict[str, Any]


def fresh_slot_state(spec: StreamSpec, slot: int) -> dict[str, Any]:
    zeros = {name: 0 for name in spec.names}
    return {
        "format": STATE_FORMAT,
        "slot": slot,
        "slots": spec.slots,
        "seq_len": spec.seq_len,
        "seed": spec.seed,
        "batch": 0,
        "stage": -1,
        "stage_name": "",
        "stage_weights": {},
        "base": dict(zeros),
        "counts": dict(zeros),
        "taken": dict(zeros),
        "scheduled": dict(zeros),
        "lanes": {name: LaneState().to_dict() for name in spec.names},
    }


def check_slot_state(spec: StreamSpec, slot: int, state: dict[str, Any]) -> None:
    """Refuse a saved slot state that this config cannot continue exactly."""
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError(
            f"the checkpoint's data state for slot {slot} was not written by this "
            "version of swallow-titan's dataloader"
        )
    if state["slots"] != spec.slots:
        raise ValueError(
            f"the checkpoint's data state was saved with a global batch of "
            f"{state['slots']} sequences, but training.global_batch_size is now "
            f"{spec.slots}; resume with the same global batch size (the number of "
            "GPUs may change)"
        )
    if sorted(state["lanes"]) != sorted(spec.names):
        raise ValueError(
            "the checkpoint's data state was saved with sources "
            f"{sorted(state['lanes'])}, but the config has {sorted(spec.names)}; "
            "resume with the same [[data.sources]] names"
        )
    for key, now in (("seq_len", spec.seq_len), ("seed", spec.seed)):
        if state[key] != now:
            raise ValueError(
                f"the checkpoint's data state was saved with {key} = {state[key]}, "
                f"but the config now has {now}; resume with the same value"
            )
    stage = state.get("stage", -1)
    if stage >= 0 and state["batch"] > 0:
        # The stage the last trained batch belonged to must be the same stage,
        # with the same weights, in this config: else its schedule cannot go on.
        now = spec.schedule.stage_at(state["batch"] - 1)
        name, weights = spec.stages[now].name, _stage_weights(spec, now)
        if (now, name, weights) != (stage, state["stage_name"], state["stage_weights"]):
            raise ValueError(
                f"the checkpoint's data state is in mixture stage {state['stage_name']!r} "
                f"(stage {stage + 1}, weights {state['stage_weights']}) at step "
                f"{state['batch']}, but this config puts that step in stage {name!r} "
                f"(stage {now + 1}, weights {weights}); keep [[data.stages]] up to the "
                "current stage as they were (later stages may change)"
            )


def _stage_weights(spec: StreamSpec, stage: int) -> dict[str, int]:
    weights = spec.schedule.weights_at(spec.stages[stage].first_batch)
    return {n: w for n, w in zip(spec.names, weights) if w}


class SlotStream:
    """The windows of one slot (see the module docstring)."""

    def __init__(self, spec: StreamSpec, slot: int, state: dict[str, Any] | None = None):
        state = state or fresh_slot_state(spec, slot)
        check_slot_state(spec, slot, state)
        names = spec.names
        self.spec = spec
        self.slot = slot
        self.batch: int = state["batch"]
        self.stage: int = state.get("stage", -1)
        # Checkpoints from before stages: one stage, begun at batch 0.
        if self.stage < 0 and self.batch > 0:
            self.stage = 0
        self.base = [state.get("base", {}).get(n, 0) for n in names]
        self.counts = [state["counts"][n] for n in names]
        self.taken = [state["taken"][n] for n in names]
        self.scheduled = [state["scheduled"][n] for n in names]
        self.lanes = [
            Lane(
                source,
                spec.lanes[i][slot],
                slot,
                spec.tokenizer,
                spec.seq_len,
                spec.seed,
                spec.block_docs,
                spec.max_chars,
                LaneState.from_dict(state["lanes"][source.name]),
            )
            for i, source in enumerate(spec.sources)
        ]

    def next_window(
        self, planned: int, counts_after: list[int], stage: int, base: list[int]
    ) -> SlotWindow | None:
        """The window for this batch, planned from source ``planned`` by
        ``stage``, whose counts began at ``base``."""
        source = planned
        while True:
            if self.lanes[source].stopped:
                source = self._stand_in()
                if source is None:
                    return None
            window = self.lanes[source].next_window()
            if window is not None:
                break
        tokens, positions = window
        batch = self.batch
        self.taken[source] += 1
        self.scheduled[planned] += 1
        self.batch += 1
        self.counts = list(counts_after)
        self.stage, self.base = stage, list(base)
        return SlotWindow(self.slot, batch, source, tokens, positions, self.state_dict())

    def _stand_in(self) -> int | None:
        """The live source furthest behind its weight in this slot."""
        weights = self.spec.schedule.weights_at(self.batch)
        live = [s for s, lane in enumerate(self.lanes) if not lane.stopped and weights[s]]
        if not live:
            return None
        taken = sum(self.taken[s] for s in live) + 1
        total = sum(weights[s] for s in live)
        return max(live, key=lambda s: (weights[s] * taken - self.taken[s] * total, -s))

    def state_dict(self) -> dict[str, Any]:
        names = self.spec.names
        return {
            "format": STATE_FORMAT,
            "slot": self.slot,
            "slots": self.spec.slots,
            "seq_len": self.spec.seq_len,
            "seed": self.spec.seed,
            "batch": self.batch,
            "stage": self.stage,
            "stage_name": self.spec.stages[self.stage].name if self.stage >= 0 else "",
            "stage_weights": _stage_weights(self.spec, self.stage) if self.stage >= 0 else {},
            "base": dict(zip(names, self.base)),
            "counts": dict(zip(names, self.counts)),
            "taken": dict(zip(names, self.taken)),
            "scheduled": dict(zip(names, self.scheduled)),
            "lanes": {n: lane.state.to_dict() for n, lane in zip(names, self.lanes)},
        }


def iter_slot_batches(
    spec: StreamSpec, slots: Sequence[int], states: dict[int, dict[str, Any] | None]
) -> Iterator[dict[int, SlotWindow]]:
    """Window ``b`` of each of ``slots``, batch after batch, from ``states``;
    ends at the first batch some slot cannot fill."""
    streams = [SlotStream(spec, j, states.get(j)) for j in slots]
    if len({(s.batch, tuple(s.counts), s.stage, tuple(s.base)) for s in streams}) > 1:
        raise ValueError(
            "the data state's slots are at different batches "
            f"({sorted({s.batch for s in streams})}); the checkpoint is inconsistent"
        )
    while streams:
        first = streams[0]
        stage = spec.schedule.stage_at(first.batch)
        # A new stage's schedule starts from the counts where it begins.
        base = first.base if stage == first.stage else list(first.counts)
        slot_sources, after = spec.schedule.batch(first.batch, first.counts, base)
        out = {}
        for stream in streams:
            window = stream.next_window(slot_sources[stream.slot], after, stage, base)
            if window is None:
                return
            out[stream.slot] = window
        yield out
