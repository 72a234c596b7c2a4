#!/usr/bin/env python3
"""``pytunnel`` with every pass of the cyclic garbage collector logged: a bench-only wrapper.

Run it where the ``pytunnel`` command would run (``bench_scale.py --pytunnel`` takes a script
such as ``PYTHONPATH=TREE/src exec python bench/gc_trace.py "$@"``). With
``PYTUNNEL_GC_TRACE=FILE`` in the environment, each collection appends one line to ``FILE``::

    <end, CLOCK_MONOTONIC s> <generation> <wall ms> <CPU ms> <collected> <uncollectable>

``time.monotonic()`` is the system-wide monotonic clock, so a benchmark can lay the passes
over its own timeline (``bench_scale.py`` records the kill on it). Without the variable it is
plain ``pytunnel``. The library itself has no such hook: the collector's cost is a property
of the whole process, which is what this measures.
"""

from __future__ import annotations

import gc
import os
import sys
import time
from collections import Counter
from pathlib import Path

#: The line format's fields, in order (``read_trace`` returns them as dicts).
FIELDS = ("end", "generation", "wall_ms", "cpu_ms", "collected", "uncollectable")


def install(path: str, types: bool = False) -> None:
    """Append one line per collection to ``path`` (written at once: the process may be
    killed at any moment). With ``types``, also one line per young collection to
    ``path + ".types"``: what the youngest generation holds as the pass starts, by type (the
    objects allocated since the last pass and still alive, i.e. what made it run)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    types_fd = (
        os.open(path + ".types", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644) if types else -1
    )
    started = [0.0, 0.0]

    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            if types_fd >= 0 and info["generation"] == 0:
                young = Counter(type(o).__qualname__ for o in gc.get_objects(generation=0))
                top = " ".join(f"{n}={c}" for n, c in young.most_common(12))
                os.write(types_fd, f"{time.monotonic():.6f} {top}\n".encode())
            started[0] = time.perf_counter()
            started[1] = time.process_time()
            return
        wall = (time.perf_counter() - started[0]) * 1000
        cpu = (time.process_time() - started[1]) * 1000
        os.write(
            fd,
            f"{time.monotonic():.6f} {info['generation']} {wall:.3f} {cpu:.3f} "
            f"{info['collected']} {info['uncollectable']}\n".encode(),
        )

    gc.callbacks.append(callback)


def read_trace(path: Path) -> list[dict[str, float]]:
    """The collections logged in ``path`` (none if it does not exist)."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == len(FIELDS):
            rows.append({k: float(v) for k, v in zip(FIELDS, parts, strict=True)})
    return rows


def summarize(rows: list[dict[str, float]], start: float, end: float) -> dict[str, object]:
    """Collections that ended in ``[start, end]`` (monotonic seconds): count, wall and CPU
    milliseconds per generation, and each full (generation 2) pass's offset from ``start``."""
    inside = [r for r in rows if start <= r["end"] <= end]
    out: dict[str, object] = {}
    for gen in (0, 1, 2):
        these = [r for r in inside if r["generation"] == gen]
        out[f"gen{gen}"] = {
            "count": len(these),
            "wall_ms": round(sum(r["wall_ms"] for r in these), 3),
            "cpu_ms": round(sum(r["cpu_ms"] for r in these), 3),
            "collected": int(sum(r["collected"] for r in these)),
        }
    out["full_at"] = [
        (round(r["end"] - start, 3), round(r["wall_ms"], 1)) for r in inside if r["generation"] == 2
    ]
    return out


def main() -> None:
    if sys.argv[1:] in (["--help"], ["-h"]):
        # the wrapper's own help (a command's, such as ``serve --help``, is pytunnel's)
        print(f"usage: {Path(sys.argv[0]).name} PYTUNNEL_ARGUMENTS...\n\n{__doc__}")
        return
    trace = os.environ.get("PYTUNNEL_GC_TRACE")
    if trace:
        install(trace, types=bool(os.environ.get("PYTUNNEL_GC_TRACE_TYPES")))
    from pytunnel.cli import main as cli_main

    sys.argv[0] = "pytunnel"
    sys.exit(cli_main())


if __name__ == "__main__":
    main()
