"""CLI start-up: how long ``import pytunnel`` and ``pytunnel ... --help`` take, for two source
trees side by side (a baseline checkout and this one).

Wall time is the median of ``--runs`` fresh processes per case, BASE and NEW interleaved so
both see the same load; ``--callgrind`` adds the instructions of one run of each under
valgrind, which do not depend on the load, and the number of modules imported.

    python bench/bench_startup.py --base /path/to/baseline/src --new src --runs 10 --callgrind
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time

PY = sys.executable
CASES = {
    "import pytunnel": ["-c", "import pytunnel"],
    "pytunnel --help": ["-m", "pytunnel", "--help"],
    "pytunnel connect --help": ["-m", "pytunnel", "connect", "--help"],
    "pytunnel serve --help": ["-m", "pytunnel", "serve", "--help"],
    "pytunnel status --help": ["-m", "pytunnel", "status", "--help"],
}


def _env(src: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.path.abspath(src)}


def _wall(trees: dict[str, str], runs: int) -> None:
    times: dict[tuple[str, str], list[float]] = {(c, t): [] for c in CASES for t in trees}
    bare = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([PY, "-c", "pass"], capture_output=True, check=True)
        bare.append(time.perf_counter() - start)
        for case, args in CASES.items():
            for tree, src in trees.items():
                start = time.perf_counter()
                subprocess.run([PY, *args], env=_env(src), capture_output=True, check=True)
                times[case, tree].append(time.perf_counter() - start)
    print(f"python -c pass: median {statistics.median(bare) * 1000:.0f} ms")
    print(f"| case | {' | '.join(trees)} (median, min) |")
    for case in CASES:
        cells = [
            f"{statistics.median(times[case, t]) * 1000:.0f} ms ({min(times[case, t]) * 1000:.0f})"
            for t in trees
        ]
        print(f"| `{case}` | {' | '.join(cells)} |")


def _count(trees: dict[str, str]) -> None:
    print("| case | " + " | ".join(f"{t} instructions, modules" for t in trees) + " |")
    for case, args in CASES.items():
        cells = []
        for src in trees.values():
            out = subprocess.run(
                ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", PY, *args],
                env=_env(src),
                capture_output=True,
                text=True,
                check=True,
            ).stderr
            found = re.search(r"Collected : (\d+)", out)
            assert found is not None, out
            imports = subprocess.run(
                [PY, "-X", "importtime", *args], env=_env(src), capture_output=True, text=True
            ).stderr.count("import time:")
            # the first line of -X importtime is its header
            cells.append(f"{int(found.group(1)) / 1e6:,.0f} M, {imports - 1}")
        print(f"| `{case}` | {' | '.join(cells)} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="source tree of the baseline (its src/)")
    parser.add_argument("--new", default="src", help="source tree measured against it")
    parser.add_argument("--runs", type=int, default=10, help="fresh processes per case and tree")
    parser.add_argument("--callgrind", action="store_true", help="also count instructions")
    options = parser.parse_args()
    trees = {"BASE": options.base, "NEW": options.new}
    for src in trees.values():  # compile the .pyc files before anything is timed
        for args in CASES.values():
            subprocess.run([PY, *args], env=_env(src), capture_output=True, check=True)
    _wall(trees, options.runs)
    if options.callgrind:
        _count(trees)


if __name__ == "__main__":
    main()
