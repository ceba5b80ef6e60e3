"""Makes ``python3 benchmarks/<name>.py`` import like ``python3 -m benchmarks.<name>``.

Run as a script, a benchmark's own folder leads ``sys.path``, so
``benchmarks/kernels.py`` would shadow the ``kernels`` package that the
benchmarks (and swallow_titan) import, and ``benchmarks.*`` would not be
importable. Importing this module puts the repository root first and drops
``benchmarks/``. A benchmark imports it only when run as a script::

    if not __package__:  # python3 benchmarks/<name>.py
        import _bootstrap  # noqa: F401
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:] = [str(REPO)] + [
    p for p in sys.path if Path(p or ".").resolve() != REPO / "benchmarks"
]
