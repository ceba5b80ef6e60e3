"""Progress of the long offline jobs (``convert``, ``export``): units, bytes, rate, ETA.

On a terminal it is a ``tqdm`` bar over the bytes, with the units (tensors or
shards) beside it. When the output is not a terminal (a log file, a batch
job) a bar would write control characters into it, so plain lines are
written instead: one at the start, then at most one every ``interval_s``
seconds, and one at the end.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

from tqdm import tqdm

PLAIN_INTERVAL_S = 10.0


def format_bytes(n: float) -> str:
    """``1.23 GB``: decimal units, as the Hub and safetensors report sizes."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def format_seconds(seconds: float) -> str:
    """``1h02m``, ``3m05s`` or ``42s``."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


class Progress:
    """Reports ``done/total`` units and bytes of one job while it runs."""

    def __init__(
        self,
        what: str,
        total_units: int,
        total_bytes: int,
        unit: str,
        *,
        stream: TextIO | None = None,
        interval_s: float = PLAIN_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ):
        """``what`` names the job in each line (``export``); ``unit`` is plural (``shards``)."""
        self.what = what
        self.unit = unit
        self.total_units = total_units
        self.total_bytes = total_bytes
        self.units = 0
        self.bytes = 0
        self.stream = stream if stream is not None else sys.stderr
        self.interval_s = interval_s
        self.clock = clock
        self.started = clock()
        self.last_line = self.started
        is_tty = getattr(self.stream, "isatty", lambda: False)()
        self.bar: tqdm | None = None
        if is_tty:
            self.bar = tqdm(
                total=total_bytes,
                desc=what,
                unit="B",
                unit_scale=True,
                file=self.stream,
                dynamic_ncols=True,
            )
            self.bar.set_postfix_str(self._units())
        else:
            self._write_line()

    def _units(self) -> str:
        return f"{self.units}/{self.total_units} {self.unit}"

    def line(self) -> str:
        """The plain progress line for the state now."""
        elapsed = self.clock() - self.started
        parts = [
            f"{self.what}: {self._units()}",
            f"{format_bytes(self.bytes)} of {format_bytes(self.total_bytes)}"
            + (f" ({100 * self.bytes / self.total_bytes:.0f}%)" if self.total_bytes else ""),
        ]
        if elapsed > 0 and self.bytes:
            rate = self.bytes / elapsed
            parts.append(f"{format_bytes(rate)}/s")
            if self.bytes < self.total_bytes:
                parts.append(f"ETA {format_seconds((self.total_bytes - self.bytes) / rate)}")
            else:
                parts.append(f"done in {format_seconds(elapsed)}")
        return ", ".join(parts)

    def _write_line(self) -> None:
        self.stream.write(self.line() + "\n")
        self.stream.flush()
        self.last_line = self.clock()

    def advance(self, units: int = 1, nbytes: int = 0) -> None:
        """``units`` more done, holding ``nbytes`` bytes."""
        self.units += units
        self.bytes += nbytes
        if self.bar is not None:
            self.bar.update(nbytes)
            self.bar.set_postfix_str(self._units())
        elif self.units >= self.total_units or self.clock() - self.last_line >= self.interval_s:
            self._write_line()

    def close(self) -> None:
        """End the bar (a terminal); the last plain line was written by ``advance``."""
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
