"""Split a source's documents among the ``G`` slots of the global batch.

Each slot (see ``slots.py``) reads its own part of every source, so that a
data-parallel rank reads only the parts of the slots it owns. The split depends
only on the source's files and on ``G`` (never on the number of ranks), which is
what makes resuming on another number of GPUs exact.

1. Files become read units (``records.ReadUnit``). With at least ``G`` files a
   unit is a whole file. With fewer, uncompressed JSON Lines files are cut into
   byte ranges (a line belongs to the range it starts in) in proportion to their
   size, at least ``MIN_RANGE_BYTES`` each, and Parquet files into row groups;
   compressed files and JSON arrays stay whole because they cannot be entered
   in the middle. Megatron ``.bin`` files are cut into document ranges of about
   equal bytes (``megatron.document_boundaries``).
2. With at least ``G`` units, each unit goes to one slot, largest first to the
   slot with the fewest bytes (LPT), so every slot gets about the same amount of
   data and no unit is read twice.
3. With fewer units than slots (a few compressed files, say), each unit is
   shared by a contiguous block of slots, as many as its share of the bytes;
   slot ``p`` of a block of ``m`` takes records ``p, p + m, p + 2m, ...``. Such
   a unit is read (decompressed and split into lines, not parsed or tokenised)
   once per slot sharing it. Contiguous slots belong to the same rank (ranks own
   contiguous slot ranges), so this read amplification stays within a rank
   where the block fits in it; it is the only one, and it disappears as soon as
   a source has ``G`` files or one splittable file.
4. A slot whose part would hold no record (a source with fewer documents, or
   fewer byte ranges holding a line start, than slots) would have to fill the
   source's positions from other sources, and the mixture would drift from the
   weights. Such a *small* source is instead read whole by every slot, each in
   its own seeded order (``lane.py``), so every slot takes it at its weight's
   rate. A small source larger than ``WHOLE_SOURCE_MAX_BYTES`` (every slot
   would read all of it) is refused with what to change.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass

from swallow_titan.data.megatron import document_boundaries, open_index
from swallow_titan.data.records import ReadUnit, iter_records, open_binary, parquet_file
from swallow_titan.data.sources import DataSourceError, SourceFile

MIN_RANGE_BYTES = 4096
WHOLE_SOURCE_MAX_BYTES = 256 << 20


@dataclass(frozen=True)
class LaneSpec:
    """What one slot reads of one source: its units, and which of their records
    (``phase`` modulo ``stride``) when it shares them with other slots."""

    units: tuple[ReadUnit, ...]
    stride: int = 1
    phase: int = 0
    whole: bool = False  # a small source, read whole by every slot (step 4)

    @property
    def size(self) -> int:
        return sum(u.size for u in self.units) // max(self.stride, 1)


def plan_lanes(
    files: Sequence[SourceFile],
    slots: int,
    source_name: str,
    text_field: str = "text",
    max_epochs: float = 0.0,
) -> list[LaneSpec]:
    """One ``LaneSpec`` per slot for a source's files (steps 1-4 of the module
    docstring); raises ``DataSourceError`` for a small source too large to be
    read whole by every slot, or limited by ``max_epochs`` (every slot reading
    it whole would repeat it ``slots`` times as often as the limit says)."""
    units = split_units(files, slots, source_name)
    lanes = assign_lanes(units, slots)
    empty = _empty_lanes(lanes, source_name, text_field)
    if not empty or not units:
        return lanes
    total = sum(u.size for u in units)
    if total > WHOLE_SOURCE_MAX_BYTES:
        raise DataSourceError(
            f"[[data.sources]] '{source_name}': {len(empty)} of the {slots} slots "
            f"(e.g. slot {empty[0]}) would get no record of it, so its share could not "
            f"be kept exact, and at {total / 2**20:,.0f} MiB it is too large for every "
            f"slot to read whole (limit {WHOLE_SOURCE_MAX_BYTES >> 20} MiB). Split it "
            f"into at least {slots} files of about equal size (or into JSON Lines / "
            "Parquet files, which are split by byte range / row group)"
        )
    if max_epochs:
        raise DataSourceError(
            f"[[data.sources]] '{source_name}': {len(empty)} of the {slots} slots "
            f"(e.g. slot {empty[0]}) would get no record of it, so every slot must read "
            f"all of it to keep its share exact, and max_epochs = {max_epochs:g} cannot "
            "then limit how often its documents are seen. Remove max_epochs (the source "
            f"repeats as its weight needs) or give it at least {slots} documents"
        )
    return [LaneSpec(tuple(units), 1, 0, whole=True) for _ in range(slots)]


def _empty_lanes(lanes: Sequence[LaneSpec], source_name: str, text_field: str) -> list[int]:
    """The slots whose lane holds no record. Units are opened only as far as
    needed: up to the first record, or up to one record per sharing slot; a
    remote unit read by one slot is assumed to hold records (no request)."""
    phases: dict[tuple[ReadUnit, int], set[int]] = {}
    empty = []
    for slot, lane in enumerate(lanes):
        found = False
        for unit in lane.units:
            if unit.size == 0 and "://" not in unit.path:
                continue
            if lane.stride == 1 and "://" in unit.path:
                found = True
                break
            key = (unit, lane.stride)
            if key not in phases:
                phases[key] = _record_phases(unit, lane.stride, source_name, text_field)
            if lane.phase in phases[key]:
                found = True
                break
        if not found:
            empty.append(slot)
    return empty


def _record_phases(unit: ReadUnit, stride: int, source_name: str, text_field: str) -> set[int]:
    """Which record numbers modulo ``stride`` ``unit`` holds (reading stops
    once every phase is seen). Bad records count: they are the reader's to
    skip, and a unit of only bad records is the text-field check's to find."""
    seen: set[int] = set()
    records = iter_records(unit, text_field, source_name)
    try:
        for record in records:
            seen.add(record.index % stride)
            if len(seen) == stride:
                break
    finally:
        records.close()
    return seen


def split_units(
    files: Sequence[SourceFile], slots: int, source_name: str, join_row_groups: bool = False
) -> list[ReadUnit]:
    """The read units of ``files`` (step 1 of the module docstring).

    ``join_row_groups``: a Parquet file's row groups are joined into
    contiguous ranges, as many as its share of ``slots`` by size (as a JSON
    Lines file's byte ranges are), instead of one unit per row group. For
    ``pretokenize``, whose units are output pairs; training keeps one unit
    per row group (its slots' split must not change under a resumed run).
    """
    if len(files) >= slots:
        return [ReadUnit(f.path, f.format, f.compression, 0, -1, f.size) for f in files]
    total = sum(f.size for f in files)
    units: list[ReadUnit] = []
    for f in files:
        if f.format == "megatron":
            units.extend(_document_range_units(f, slots, total, source_name))
        elif _is_plain_json_lines(f, source_name) and f.size > 0 and total > 0:
            pieces = max(1, min(math.ceil(slots * f.size / total), f.size // MIN_RANGE_BYTES))
            bounds = [f.size * i // pieces for i in range(pieces + 1)]
            units.extend(
                ReadUnit(f.path, "jsonl", "", a, b, b - a) for a, b in zip(bounds, bounds[1:])
            )
        elif f.format == "parquet":
            groups = _row_group_units(f, source_name)
            if join_row_groups and total > 0:
                groups = _join_row_groups(groups, max(1, math.ceil(slots * f.size / total)))
            units.extend(groups)
        else:
            units.append(ReadUnit(f.path, f.format, f.compression, 0, -1, f.size))
    return units


def _is_plain_json_lines(f: SourceFile, source_name: str) -> bool:
    if f.compression or f.format == "parquet":
        return False
    if f.format == "jsonl":
        return True
    # A .json file is JSON Lines unless it starts with "[" (one JSON array).
    with open_binary(f.path, source_name) as raw:
        return raw.read(4096).lstrip()[:1] != b"["


def _document_range_units(
    f: SourceFile, slots: int, total: int, source_name: str
) -> list[ReadUnit]:
    index = open_index(f.path, source_name)
    pieces = max(1, math.ceil(slots * f.size / total)) if total else 1
    bounds = document_boundaries(index, pieces)
    return [
        ReadUnit(f.path, "megatron", "", a, b,
                 index.document_start_byte(b) - index.document_start_byte(a))
        for a, b in zip(bounds, bounds[1:])
    ]


def _row_group_units(f: SourceFile, source_name: str) -> list[ReadUnit]:
    pf, raw = parquet_file(f.path, source_name)
    try:
        groups = pf.metadata.num_row_groups
        return [
            ReadUnit(f.path, "parquet", "", g, g + 1, pf.metadata.row_group(g).total_byte_size)
            for g in range(groups)
        ] or [ReadUnit(f.path, "parquet", "", 0, -1, f.size)]
    finally:
        raw.close()


def _join_row_groups(groups: list[ReadUnit], pieces: int) -> list[ReadUnit]:
    """One file's row-group units joined into ``pieces`` contiguous ranges of
    about equal bytes (each at least one row group)."""
    if pieces >= len(groups):
        return groups
    total = sum(g.size for g in groups)
    joined: list[ReadUnit] = []
    first = size = 0
    for i, group in enumerate(groups):
        size += group.size
        pieces_left = pieces - len(joined) - 1  # after the one being filled
        if pieces_left and (
            # its share of the bytes reached, or only one group left per piece
            size * pieces >= total * (len(joined) + 1) or len(groups) - i - 1 == pieces_left
        ):
            joined.append(ReadUnit(group.path, "parquet", "", groups[first].start, group.end,
                                   sum(g.size for g in groups[first:i + 1])))
            first = i + 1
    last = groups[-1]
    joined.append(ReadUnit(last.path, "parquet", "", groups[first].start, last.end,
                           sum(g.size for g in groups[first:])))
    return joined


def assign_lanes(units: Sequence[ReadUnit], slots: int) -> list[LaneSpec]:
    """Give every slot its units (steps 2 and 3 of the module docstring)."""
    if not units:
        return [LaneSpec(()) for _ in range(slots)]
    if len(units) >= slots:
        order = sorted(range(len(units)), key=lambda u: (-units[u].size, u))
        loads = [(0, j) for j in range(slots)]
        members: list[list[int]] = [[] for _ in range(slots)]
        for u in order:
            load, j = heapq.heappop(loads)
            members[j].append(u)
            heapq.heappush(loads, (load + max(units[u].size, 1), j))
        return [LaneSpec(tuple(units[u] for u in sorted(m))) for m in members]
    shares = _shares(units, slots)
    lanes = []
    for unit, share in zip(units, shares):
        lanes.extend(LaneSpec((unit,), share, phase) for phase in range(share))
    return lanes


def _shares(units: Sequence[ReadUnit], slots: int) -> list[int]:
    """Slots per unit: at least one each, the rest by size (largest remainder)."""
    sizes = [max(u.size, 1) for u in units]
    total = sum(sizes)
    extra = slots - len(units)
    floors = [extra * s // total for s in sizes]
    remainders = [extra * s % total for s in sizes]
    left = extra - sum(floors)
    for u in sorted(range(len(units)), key=lambda u: (-remainders[u], u))[:left]:
        floors[u] += 1
    return [1 + f for f in floors]
