"""Wait (bounded) until the machine's other processes leave the CPUs alone, before a sample.

The benchmark machine has 2 cores shared with other work (test suites); a sample taken while
they run measures the contention, not the code. ``/proc/stat`` tells how busy all CPUs were over
a short interval while we slept, i.e. how much the *others* use.
"""

from __future__ import annotations

import os
import time


def _cpu_times() -> tuple[int, int] | None:
    try:
        with open("/proc/stat") as fh:
            fields = fh.readline().split()
    except OSError:
        return None
    values = [int(v) for v in fields[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return sum(values), idle


def others_busy(interval: float = 0.2) -> float:
    """Fraction of total CPU capacity used by everything else during ``interval`` (0..1)."""
    a = _cpu_times()
    time.sleep(interval)
    b = _cpu_times()
    if a is None or b is None or b[0] == a[0]:
        return 0.0
    return 1.0 - (b[1] - a[1]) / (b[0] - a[0])


def wait_quiet(max_wait: float, threshold: float = 0.10) -> float:
    """Sleep until others use < ``threshold`` of the CPUs, at most ``max_wait`` s.

    Returns the last measured busy fraction (so a caller can flag a contended sample).
    """
    deadline = time.monotonic() + max_wait
    busy = others_busy()
    for _ in range(int(max_wait / 0.5) + 1):
        if busy < threshold or time.monotonic() >= deadline:
            break
        time.sleep(0.3)
        busy = others_busy()
    return busy


def ncpu() -> int:
    return os.cpu_count() or 1
