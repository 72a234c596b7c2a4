"""``bench/callgrind_tunnel.py`` against the real processes it measures: the floor (two bare
trio relays) and a tunnel, counted by cProfile (fast and deterministic; callgrind itself takes
minutes, which CI does not spend), with each process's share and the sites that grew."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

from pytunnel._build import compiled_modules

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.timeout(420)  # four measurements, each starting two profiled processes
def test_the_floor_and_a_tree_are_counted_per_process_and_by_site(
    tmp_path: pathlib.Path,
) -> None:
    keep = tmp_path / "profiles"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "callgrind_tunnel.py"),
            str(ROOT),
            "--reference",
            "trio-raw-relay",
            "--tool",
            "cprofile",
            "--low",
            "20",
            "--high",
            "60",
            "--sites",
            "3",
            "--keep",
            str(keep),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {}
    for line in result.stdout.splitlines():
        m = re.match(r"(\S+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+\(", line)
        if m:
            rows[m.group(1)] = [int(x) for x in m.groups()[1:]]
    assert set(rows) == {"trio-raw-relay", str(ROOT)}, result.stdout
    for low, high, per, connect, serve in rows.values():
        assert 0 < low < high
        assert connect > 0
        assert serve > 0
        assert abs(per - (connect + serve)) <= 2  # the shares add up (each rounded down)
    tunnel, floor = rows[str(ROOT)][2], rows["trio-raw-relay"][2]
    if not compiled_modules():
        # cProfile sees pytunnel's own calls too: more per round trip than the bare relays
        assert tunnel > floor
    else:
        # compiled, pytunnel's calls are C calls that cProfile does not see: what it counts
        # is mostly trio's, of the same order as the bare relays'
        assert floor / 2 < tunnel < floor * 2
    assert result.stdout.count("sites that grew most") == 4
    # both runs of both processes of both measurements kept: 8 profiles
    assert len(list(keep.iterdir())) == 8


def test_the_reference_needs_the_round_trip_workload() -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "callgrind_tunnel.py"),
            "--reference",
            "trio-raw-relay",
            "--workload",
            "connect",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "round trips only" in result.stderr
