"""The benchmark scripts still import and parse their options against today's API.

They are not run in CI (they take minutes and want a quiet machine), so without this an API
rename leaves them broken until the next person who measures something finds out.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

BENCH = pathlib.Path(__file__).resolve().parent.parent / "bench"
SCRIPTS = sorted(path.name for path in BENCH.glob("*.py") if not path.name.startswith("_"))


def test_every_benchmark_script_is_checked() -> None:
    assert {"bench_frames.py", "bench_session.py", "bench_tunnel.py", "compare.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_script_starts(script: str) -> None:
    result = subprocess.run(
        [sys.executable, str(BENCH / script), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout
