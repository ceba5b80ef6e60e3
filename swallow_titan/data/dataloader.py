"""The training dataloader: one data-parallel rank's slots of the global stream.

The global batch has ``G`` slots (``slots.py``). With ``dp`` ranks, local batch
``B`` and ``A = G / (dp * B)`` gradient-accumulation microsteps, rank ``r``
owns the contiguous slots ``[r * A * B, (r + 1) * A * B)`` and feeds slot
``r * A * B + a * B + i`` to row ``i`` of microstep ``a``. It reads and
tokenises only those slots' parts of the sources. The global batches are the
same for any ``dp`` (the loss of a step is the mean over all ``G`` sequences,
wherever they run), and every slot's state is saved under its own key
(``dataloader.slot_<j>`` in a torchtitan checkpoint), so a run resumes exactly
with the same or another number of ranks: each rank loads the slots it owns
now, whoever wrote them.

With ``[training.dataloader] num_workers = W > 0`` the rank's slots are split
among ``W`` worker processes that each produce their slots' windows batch by
batch; the main process assembles the microbatches in a fixed order. Each
window carries its slot's state right after it, and the loader keeps the state
of the last window it handed to the trainer, so the saved state never includes
windows that workers prefetched but training did not use. Results are the same
for any number of workers.

With ``[kernels] loss = "fused_linear_ce"`` the model's output layer computes
the loss, so the labels also travel in the input dict (:func:`with_labels`,
for training by :class:`LabelsInInputs` and for validation by
``components/validation.py``).

``held_out_batches`` builds the small held-out sets of validation through the
same reader and lane, read once in file order; every rank computes all of a
set's windows and keeps its slice, so every rank sees the set end at the same
batch.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchtitan.components.dataloader import BaseDataLoader
from torchtitan.tools.logging import logger

from swallow_titan.config.sections import FUSED_LOSS, DataSource
from swallow_titan.data.lane import Lane
from swallow_titan.data.records import whole_file_unit
from swallow_titan.data.sharding import LaneSpec
from swallow_titan.data.slots import (
    SlotWindow,
    StreamSpec,
    build_stream_spec,
    check_slot_state,
    fresh_slot_state,
    iter_slot_batches,
)
from swallow_titan.data.sources import source_files
from swallow_titan.data.tokenizer import DocumentTokenizer

Batch = tuple[dict[str, torch.Tensor], torch.Tensor]

_SLOT_KEY = "slot_{}"


def slot_key(slot: int) -> str:
    """Key of a slot's state inside the checkpoint's "dataloader" entry."""
    return _SLOT_KEY.format(slot)


def rank_slots(slots: int, local_batch_size: int, dp_rank: int, dp_world_size: int) -> list[int]:
    """The slots rank ``dp_rank`` owns, in microstep-then-row order."""
    if not 0 <= dp_rank < dp_world_size:
        raise ValueError(f"dp_rank {dp_rank} outside [0, {dp_world_size})")
    per_step = local_batch_size * dp_world_size
    if slots % per_step:
        raise ValueError(
            f"global batch of {slots} sequences is not a multiple of local_batch_size "
            f"x data-parallel degree = {local_batch_size} x {dp_world_size}"
        )
    per_rank = slots // dp_world_size
    return list(range(dp_rank * per_rank, (dp_rank + 1) * per_rank))


class SlotDataLoader(BaseDataLoader):
    """Yields ``({"input", ["positions"]}, labels)`` microbatches of one rank's slots."""

    def __init__(
        self,
        spec: StreamSpec,
        local_batch_size: int,
        dp_rank: int,
        dp_world_size: int,
        emit_positions: bool,
        num_workers: int = 0,
        prefetch_factor: int | None = None,
    ):
        self.spec = spec
        self.local_batch_size = local_batch_size
        self.dp_rank = dp_rank
        self.dp_world_size = dp_world_size
        self.emit_positions = emit_positions
        self.slots = rank_slots(spec.slots, local_batch_size, dp_rank, dp_world_size)
        self.num_workers = min(max(num_workers, 0), len(self.slots))
        self.prefetch_factor = prefetch_factor
        # The state after the last window handed to training, per owned slot.
        self._consumed: dict[int, dict[str, Any]] = {
            j: fresh_slot_state(spec, j) for j in self.slots
        }
        self._epochs_logged: dict[str, int] = {}
        self._stops_logged: set[str] = set()
        self._stage_logged = -1

    @property
    def microsteps(self) -> int:
        """Gradient-accumulation microsteps per global batch."""
        return len(self.slots) // self.local_batch_size

    # -- iteration ----------------------------------------------------------

    def __iter__(self) -> Iterator[Batch]:
        for rows in self.microbatches():
            yield self._collate(rows)

    def microbatches(self) -> Iterator[list[SlotWindow]]:
        """The windows of each microbatch, in training order (row ``i`` of
        microstep ``a`` is slot ``slots[a * B + i]``); a window counts as
        consumed once its microbatch is handed out."""
        b = self.local_batch_size
        for windows in self._global_batches():
            for a in range(self.microsteps):
                rows = [windows[j] for j in self.slots[a * b : (a + 1) * b]]
                for window in rows:
                    self._consume(window)
                yield rows

    def _global_batches(self) -> Iterator[dict[int, SlotWindow]]:
        """This rank's windows of each global batch, from the consumed states."""
        states = dict(self._consumed)
        if self.num_workers == 0:
            yield from iter_slot_batches(self.spec, self.slots, states)
            return
        workers = self.num_workers
        dataset = _WorkerBatches(self.spec, self.slots, states, workers)
        loader = DataLoader(
            dataset,
            batch_size=None,
            num_workers=workers,
            prefetch_factor=self.prefetch_factor,
            collate_fn=_unchanged,
        )
        items = iter(loader)
        while True:
            merged: dict[int, SlotWindow] = {}
            for _ in range(workers):
                item = next(items, None)
                if item is None or item["end"]:
                    return
                merged.update(item["windows"])
            yield merged

    def _collate(self, windows: list[SlotWindow]) -> Batch:
        tokens = torch.from_numpy(np.stack([w.tokens for w in windows]))
        inputs = {"input": tokens[:, :-1]}
        if self.emit_positions:
            positions = torch.from_numpy(np.stack([w.positions for w in windows]))
            inputs["positions"] = positions[:, :-1]
        return inputs, tokens[:, 1:]

    def _consume(self, window: SlotWindow) -> None:
        self._consumed[window.slot] = window.state
        stage = window.state["stage"]
        if stage > self._stage_logged and len(self.spec.stages) > 1:
            self._stage_logged = stage
            weights = window.state["stage_weights"]
            logger.info(
                f"data stage {window.state['stage_name']!r} ({stage + 1} of "
                f"{len(self.spec.stages)}) begins at step {window.batch + 1}: weights {weights}"
            )
        name = self.spec.sources[window.source].name
        lane = window.state["lanes"][name]
        epoch = lane["epoch"] + 1
        if epoch > self._epochs_logged.get(name, 1):
            self._epochs_logged[name] = epoch
            logger.warning(
                f"data source '{name}' repeats: epoch {epoch} begins (first on rank "
                f"{self.dp_rank} in slot {window.slot}, global batch {window.batch}); "
                "each slot starts over its own part of the source when it has read it"
            )
        for other, state in window.state["lanes"].items():
            if state["stopped"] and other not in self._stops_logged:
                self._stops_logged.add(other)
                logger.warning(
                    f"data source '{other}' stopped in slot {window.slot} on rank "
                    f"{self.dp_rank} ({state['stopped']} after {state['epoch']} epoch(s)); "
                    "that slot fills its positions from the other sources"
                )

    # -- metrics ------------------------------------------------------------

    def consumed_states(self) -> list[dict[str, Any]]:
        """Each owned slot's state after the last window handed to training."""
        return [self._consumed[j] for j in self.slots]

    def metrics(self) -> dict[str, float]:
        """Data metrics for logging, keys ``data/<source>/<metric>``.

        ``tokens`` (input tokens, ``seq_len`` per sequence) and ``share``
        describe the global stream up to the last batch handed to training:
        they follow from the schedule, the same on every rank, exact while every
        lane has data; where this rank's slots had to stand in for a stopped
        source, the difference is extrapolated to all slots. ``epoch`` is the
        highest epoch (1-based) any of this rank's lanes of the source reached;
        ``documents``, ``skipped`` and ``skipped/<reason>`` count this rank's
        reading only. ``data/stage`` is the 1-based number of the mixture stage
        of the last batch handed to training (0 before the first).
        """
        names = self.spec.names
        states = self.consumed_states()
        scale = self.spec.slots / len(states)
        out: dict[str, float] = {}
        sequences = {}
        for name in names:
            drift = sum(s["taken"][name] - s["scheduled"][name] for s in states)
            sequences[name] = max(states[0]["counts"][name] + drift * scale, 0.0)
        total = sum(sequences.values()) or 1.0
        out["data/stage"] = states[0]["stage"] + 1
        for name in names:
            lanes = [s["lanes"][name] for s in states]
            prefix = f"data/{name}/"
            out[prefix + "tokens"] = sequences[name] * self.spec.seq_len
            out[prefix + "share"] = sequences[name] / total
            out[prefix + "epoch"] = max(lane["epoch"] + (not lane["stopped"]) for lane in lanes)
            out[prefix + "documents"] = sum(lane["documents"] for lane in lanes)
            skipped: dict[str, int] = {}
            for lane in lanes:
                for reason, n in lane["skipped"].items():
                    skipped[reason] = skipped.get(reason, 0) + n
            out[prefix + "skipped"] = sum(skipped.values())
            for reason, n in skipped.items():
                out[f"{prefix}skipped/{reason}"] = n
            stopped = sum(bool(lane["stopped"]) for lane in lanes)
            if stopped:
                out[prefix + "lanes_stopped"] = stopped
        return out

    # -- checkpointing ------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        # One key per slot: any rank can load any slot, whoever saved it.
        return {
            slot_key(j): json.dumps(self._consumed[j]).encode() for j in self.slots
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        missing = [slot_key(j) for j in self.slots if slot_key(j) not in state_dict]
        if missing:
            raise ValueError(
                f"the checkpoint's dataloader state lacks {missing[0]} (it holds "
                f"{sorted(state_dict)[:4]}...): it was saved with a smaller global "
                "batch or by another dataloader; resume with the same "
                "training.global_batch_size"
            )
        states = {}
        for j in self.slots:
            raw = state_dict[slot_key(j)]
            state = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
            check_slot_state(self.spec, j, state)
            states[j] = state
        self._consumed = states
        for state in states.values():
            for name, lane in state["lanes"].items():
                self._epochs_logged[name] = max(
                    self._epochs_logged.get(name, 1), lane["epoch"] + 1
                )
                if lane["stopped"]:
                    self._stops_logged.add(name)
            self._stage_logged = max(self._stage_logged, state.get("stage", -1))


def _unchanged(item):
    return item


class _WorkerBatches(IterableDataset):
    """In worker ``w`` of ``W``: every ``W``-th slot of the rank's, batch by batch."""

    def __init__(self, spec: StreamSpec, slots: list[int], states: dict, workers: int):
        self.spec = spec
        self.slots = slots
        self.states = states
        self.workers = workers

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        mine = self.slots[worker :: self.workers]
        batch = None
        for windows in iter_slot_batches(self.spec, mine, self.states):
            batch = next(iter(windows.values())).batch
            yield {"end": False, "batch": batch, "windows": windows}
        yield {"end": True, "batch": batch, "windows": {}}


def source_token_counts(state_dict: dict[str, Any]) -> dict[str, int]:
    """Input tokens taken from each source, read from a checkpoint's dataloader
    state (the "dataloader" entry; any one slot's key suffices).

    The counts follow the mixture schedule up to the saved batch, the same in
    every slot's state; used by reports such as the model card.
    """
    keys = sorted(k for k in state_dict if k.startswith("slot_"))
    if not keys:
        raise ValueError(
            "the dataloader state holds no slot_<j> entries; it was not written by "
            f"swallow-titan's SlotDataLoader (keys: {sorted(state_dict)[:4]})"
        )
    raw = state_dict[keys[0]]
    state = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
    return {name: n * state["seq_len"] for name, n in state["counts"].items()}


def global_batch_size(job_config, dp_world_size: int) -> int:
    """Sequences per optimizer step (torchtitan's rule for -1)."""
    configured = job_config.training.global_batch_size
    if configured < 0:
        return job_config.training.local_batch_size * dp_world_size
    return configured


def build_dataloader(
    dp_world_size: int,
    dp_rank: int,
    tokenizer: DocumentTokenizer,
    job_config,
    **kwargs,
) -> SlotDataLoader:
    """The data pipeline's loader over ``[[data.sources]]`` (the TrainSpec's is
    :func:`build_training_dataloader`)."""
    data = job_config.data
    spec = build_stream_spec(
        data.sources,
        tokenizer,
        seq_len=job_config.training.seq_len,
        global_batch=global_batch_size(job_config, dp_world_size),
        seed=data.seed,
        block_docs=data.shuffle_block_docs,
        max_chars=data.max_document_chars,
        stages=data.stages,
    )
    loader_config = job_config.training.dataloader
    return SlotDataLoader(
        spec,
        job_config.training.local_batch_size,
        dp_rank,
        dp_world_size,
        emit_positions=data.reset_position_ids,
        num_workers=loader_config.num_workers,
        prefetch_factor=loader_config.prefetch_factor,
    )


LABELS_KEY = "labels"


def with_labels(inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """A new input dict that also carries the labels, for a model that computes the loss.

    torchtitan passes every key of the input dict but "input" to the model's
    forward, so the model receives ``labels=``.
    """
    return {**inputs, LABELS_KEY: labels}


class LabelsInInputs(BaseDataLoader):
    """A dataloader whose input dicts also carry the labels (:func:`with_labels`).

    Checkpointed state is the wrapped loader's, unchanged.
    """

    def __init__(self, loader: BaseDataLoader) -> None:
        self.loader = loader

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        for inputs, labels in self.loader:
            yield with_labels(inputs, labels), labels

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.loader.load_state_dict(state_dict)

    def metrics(self) -> dict[str, float]:
        """The wrapped loader's per-source metrics."""
        return self.loader.metrics()


def build_training_dataloader(
    dp_world_size: int, dp_rank: int, tokenizer: Llama3Tokenizer, job_config, **kwargs
) -> SlotDataLoader | LabelsInInputs:
    """TrainSpec ``build_dataloader_fn``: the data pipeline's loader, plus labels in
    the inputs when the model computes the loss."""
    loader = build_dataloader(dp_world_size, dp_rank, tokenizer, job_config, **kwargs)
    if job_config.kernels.loss == FUSED_LOSS:
        return LabelsInInputs(loader)
    return loader


def held_out_batches(
    source: DataSource,
    tokenizer: DocumentTokenizer,
    *,
    seq_len: int,
    sequences: int,
    local_batch_size: int,
    dp_rank: int,
    dp_world_size: int,
    emit_positions: bool,
    max_chars: int = 1 << 62,
) -> list[Batch]:
    """This rank's batches of the first ``sequences`` windows of ``source``
    (rounded down to whole global batches of ``local_batch_size *
    dp_world_size``), read once, in file order, by the training path's reader
    and lane. Every rank computes the same windows and keeps rows
    ``[dp_rank * B, (dp_rank + 1) * B)`` of each global batch, so all ranks
    get the same number of batches."""
    if not 0 <= dp_rank < dp_world_size:
        raise ValueError(f"dp_rank {dp_rank} outside [0, {dp_world_size})")
    per_batch = local_batch_size * dp_world_size
    wanted = sequences // per_batch * per_batch
    units = tuple(whole_file_unit(f) for f in source_files(source))
    # block_docs = 0: no shuffling, the documents in file order; one epoch.
    lane = Lane(source, LaneSpec(units), 0, tokenizer, seq_len, 0, 0, max_chars)
    windows = []
    while len(windows) < wanted:
        window = lane.next_window()
        if window is None:
            break
        windows.append(window)
    usable = len(windows) // per_batch * per_batch
    first = dp_rank * local_batch_size
    batches = []
    for start in range(0, usable, per_batch):
        rows = windows[start + first : start + first + local_batch_size]
        tokens = torch.from_numpy(np.stack([t for t, _ in rows]))
        inputs = {"input": tokens[:, :-1]}
        if emit_positions:
            inputs["positions"] = torch.from_numpy(np.stack([p for _, p in rows]))[:, :-1]
        batches.append((inputs, tokens[:, 1:]))
    return batches
