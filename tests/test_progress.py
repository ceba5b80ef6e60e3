"""Progress of convert / export: plain periodic lines when the output is not a terminal."""

from __future__ import annotations

import io

from swallow_titan.hf.progress import Progress, format_bytes, format_seconds


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_plain_lines_give_units_bytes_rate_and_eta_at_most_once_per_interval():
    stream, clock = io.StringIO(), Clock()
    progress = Progress("export", 4, 4_000_000, "shards", stream=stream, interval_s=10, clock=clock)
    clock.now += 5
    progress.advance(1, 1_000_000)  # 5 s after the start line: within the interval
    clock.now += 5
    progress.advance(1, 1_000_000)  # 10 s: a line
    clock.now += 10
    progress.advance(1, 1_000_000)  # 20 s: a line
    clock.now += 1
    progress.advance(1, 1_000_000)  # the last unit: always a line
    progress.close()
    assert stream.getvalue().splitlines() == [
        "export: 0/4 shards, 0 B of 4.00 MB (0%)",
        # 2 MB in 10 s = 200 kB/s; 2 MB left = 10 s.
        "export: 2/4 shards, 2.00 MB of 4.00 MB (50%), 200.00 kB/s, ETA 10s",
        # 3 MB in 20 s = 150 kB/s; 1 MB left = 6.67 s, shown rounded.
        "export: 3/4 shards, 3.00 MB of 4.00 MB (75%), 150.00 kB/s, ETA 7s",
        "export: 4/4 shards, 4.00 MB of 4.00 MB (100%), 190.48 kB/s, done in 21s",
    ]


def test_a_terminal_gets_a_bar_and_no_plain_lines():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Terminal()
    with Progress("convert: read", 2, 2048, "tensors", stream=stream, interval_s=0) as progress:
        progress.advance(1, 1024)
        progress.advance(1, 1024)
    shown = stream.getvalue()
    assert "convert: read" in shown and "2/2 tensors" in shown and "\r" in shown
    assert "2/2 tensors, " not in shown  # not the plain line


def test_sizes_and_durations_read_as_people_write_them():
    assert [format_bytes(n) for n in (512, 1_500, 2_340_000, 16_060_000_000)] == [
        "512 B", "1.50 kB", "2.34 MB", "16.06 GB",
    ]
    assert [format_seconds(s) for s in (42, 185, 3720)] == ["42s", "3m05s", "1h02m"]
