"""Run a command with a time limit that kills its whole process tree.

torchrun starts each worker in a session of its own, so killing torchrun, or
its process group, leaves the workers running and holding the GPU. Here the
tree is found by parent ids (``/proc/<pid>/stat``), which ``setsid`` does not
change, then stopped and killed.

    python3 benchmarks/proctree.py kill PID     # from a shell script
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def _children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited meanwhile
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, grandchildren, ...)."""
    children, found, todo = _children(), [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and all its descendants (stopped first, so none forks away)."""
    tree = [pid, *descendants(pid)]
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        for p in tree:
            try:
                os.kill(p, sig)
            except (ProcessLookupError, PermissionError):
                pass


def run_with_timeout(cmd: list[str], timeout: float, **popen) -> tuple[int, str]:
    """Run ``cmd`` (stdout+stderr captured as text); on timeout kill its whole tree.

    Returns ``(exit status, output)``; a timeout gives status 124 and a last line
    saying so.
    """
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
        return proc.returncode, output
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        output, _ = proc.communicate()
        return 124, (output or "") + f"\nTIMEOUT after {timeout:.0f} s: process tree killed\n"


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "kill":
        sys.exit("usage: proctree.py kill PID")
    kill_tree(int(sys.argv[2]))
    time.sleep(0.1)
