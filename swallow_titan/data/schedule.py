"""Which source every sequence of the global stream comes from.

The training stream is a sequence of packed windows (``seq_len + 1`` tokens,
each from one source). Global batch ``b`` is stream positions
``[b * G, (b + 1) * G)`` with ``G`` = the global batch size in sequences.

The source of every position is fixed in advance from the weights alone, with
Tijdeman's solution of the "chairman assignment problem" (1980): at position
``k`` the sources whose quota ``w_s * k - n_s`` is at least ``1 / (2S - 2)`` are
eligible, and the one whose count would fall behind first is chosen. At every
prefix of the stream each source's number of sequences ``n_s`` then stays within
``1 - 1 / (2S - 2)`` (less than one sequence) of its target ``w_s * k``, so its
token share is within one sequence (``seq_len + 1`` tokens) of its weight, at
every position and at every batch boundary. The simpler "largest deficit" rule
(Megatron-LM's blending) can drift past one sequence with many sources.

The weights are read as the exact decimals the config wrote (``1.7`` is 17/10)
and all arithmetic is on integers, so the schedule is the same on every
machine.

Inside a batch the positions are spread over the ``G`` slots (the independent
streams the data-parallel ranks read, see ``slots.py``): the batch's sequences
are laid out by source and rotated by ``b * P mod G`` with ``P`` close to
``0.618 G`` and coprime to ``G``. Over every ``G`` consecutive batches each slot
visits every rotation once, so each slot takes each source at the source's
rate and the slots' shares of a source are read at the same speed. Rows differ
from batch to batch, so that is not a proof for one slot over many cycles: at
the recipe's weights a slot stayed within 7 sequences of its rate over 320
cycles (``tests/test_schedule.py``).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from fractions import Fraction


def exact_weights(weights: Sequence[float]) -> list[int]:
    """Integer weights proportional to ``weights`` read as decimals (1.7 -> 17/10)."""
    if not weights:
        raise ValueError("a mixture needs at least one source")
    fractions = [Fraction(repr(float(w))) for w in weights]
    if any(f <= 0 for f in fractions):
        raise ValueError(f"weights must be positive, got {list(weights)}")
    denominator = math.lcm(*(f.denominator for f in fractions))
    units = [int(f * denominator) for f in fractions]
    divisor = math.gcd(*units)
    return [u // divisor for u in units]


def rotation_stride(slots: int) -> int:
    """An integer near ``0.618 * slots`` that is coprime to ``slots``."""
    if slots <= 2:
        return 1
    golden = round(slots * (math.sqrt(5) - 1) / 2)
    for distance in range(slots):
        for candidate in (golden - distance, golden + distance):
            if 0 < candidate < slots and math.gcd(candidate, slots) == 1:
                return candidate
    return 1


class MixtureSchedule:
    """The source of each stream position and of each slot in each batch."""

    def __init__(self, weights: Sequence[float], slots: int):
        if slots < 1:
            raise ValueError(f"a global batch needs at least one sequence, got {slots}")
        self.weights = exact_weights(weights)
        self.total = sum(self.weights)
        self.slots = slots
        self.stride = rotation_stride(slots)
        n = len(self.weights)
        # Tijdeman's constants, scaled by 2S - 2 to stay in integers.
        self._scale = max(2 * n - 2, 1)
        self._slack = max(2 * n - 3, 0)
        self._cache: tuple[tuple[int, ...], list[int]] | None = None

    @property
    def num_sources(self) -> int:
        return len(self.weights)

    def next_source(self, counts: Sequence[int]) -> int:
        """The source of the position after ``counts`` (sequences per source so far)."""
        n = len(self.weights)
        if n == 1:
            return 0
        k = sum(counts) + 1
        best = -1
        for s in range(n):
            quota = self.weights[s] * k - counts[s] * self.total
            if self._scale * quota < self.total:
                continue  # not eligible: less than 1/(2S-2) of a sequence owed
            if best < 0 or self._deadline_before(s, best, counts):
                best = s
        if best < 0:  # cannot happen (Tijdeman); keep the stream going anyway
            best = max(
                range(n), key=lambda s: self.weights[s] * k - counts[s] * self.total
            )
        return best

    def _deadline_before(self, s: int, r: int, counts: Sequence[int]) -> bool:
        # Source s falls a full sequence behind at k = (n_s + slack/scale) / w_s.
        ds = self._scale * counts[s] + self._slack
        dr = self._scale * counts[r] + self._slack
        return ds * self.weights[r] < dr * self.weights[s]

    def row(self, counts: Sequence[int]) -> list[int]:
        """Sources of the ``G`` positions that follow ``counts``, in stream order."""
        key = tuple(counts)
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        running = list(counts)
        sources = []
        for _ in range(self.slots):
            s = self.next_source(running)
            running[s] += 1
            sources.append(s)
        self._cache = (key, sources)
        return sources

    def batch(self, batch: int, counts: Sequence[int]) -> tuple[list[int], list[int]]:
        """For global batch ``batch`` starting after ``counts``: the source of
        each slot, and the counts after the batch."""
        row = self.row(counts)
        by_source = sorted(row)  # the batch laid out by source
        shift = (batch * self.stride) % self.slots
        slot_sources = [by_source[(j + shift) % self.slots] for j in range(self.slots)]
        after = list(counts)
        for s in row:
            after[s] += 1
        return slot_sources, after


class StagedSchedule:
    """Mixture stages: from its first batch on, each stage has its own exact
    schedule (a ``MixtureSchedule`` over the sources it weights), started from
    zero counts, so within every stage each source stays within one sequence
    of the stage's weights. Batches keep their slot rotation across stages.

    ``stages`` are ``(first_batch, weights)`` with one weight per source (0:
    not read in that stage), in order, the first starting at batch 0.
    """

    def __init__(self, stages: Sequence[tuple[int, Sequence[float]]], slots: int):
        if not stages or stages[0][0] != 0:
            raise ValueError("the first mixture stage must start at batch 0")
        firsts = [first for first, _ in stages]
        if firsts != sorted(set(firsts)):
            raise ValueError(f"mixture stages must start at increasing batches, got {firsts}")
        self.firsts = firsts
        self.num_sources = len(stages[0][1])
        self.slots = slots
        self._active: list[list[int]] = []
        self._schedules: list[MixtureSchedule] = []
        self._weights: list[list[int]] = []
        for _, weights in stages:
            active = [s for s, w in enumerate(weights) if w > 0]
            schedule = MixtureSchedule([weights[s] for s in active], slots)
            full = [0] * self.num_sources
            for s, w in zip(active, schedule.weights):
                full[s] = w
            self._active.append(active)
            self._schedules.append(schedule)
            self._weights.append(full)

    def stage_at(self, batch: int) -> int:
        """The stage (index) that global batch ``batch`` belongs to."""
        return bisect.bisect_right(self.firsts, batch) - 1

    def weights_at(self, batch: int) -> list[int]:
        """Integer weights of every source in the stage of ``batch`` (0: unused)."""
        return self._weights[self.stage_at(batch)]

    def batch(
        self, batch: int, counts: Sequence[int], base: Sequence[int]
    ) -> tuple[list[int], list[int]]:
        """For global batch ``batch``, with ``counts`` sequences per source so
        far and ``base`` the counts when its stage began: the source of each
        slot, and the counts after the batch."""
        stage = self.stage_at(batch)
        active = self._active[stage]
        local = [counts[s] - base[s] for s in active]
        slot_sources, _ = self._schedules[stage].batch(batch, local)
        slot_sources = [active[s] for s in slot_sources]
        after = list(counts)
        for s in slot_sources:
            after[s] += 1
        return slot_sources, after
