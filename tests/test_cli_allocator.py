"""The CLI's allocator tuning (``cli._run.tune_allocator``), observed as the kernel sees it:
minor page faults of a fresh process that reuses 256 KiB buffers, as the session's reads do."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

_PROBE = """
import resource, sys
from pytunnel.cli._run import tune_allocator
tuned = tune_allocator() if sys.argv[1] == "tune" else False
def cycle():
    # a few 256 KiB buffers alive at once, then freed: reads in flight and their copies
    bufs = [bytearray(256 * 1024) for _ in range(4)]  # zero-filled: every page touched
    del bufs
for _ in range(20):  # warm up (glibc adapts its thresholds to what it sees freed)
    cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(200):
    cycle()
print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")


def _faults(mode: str, **env: str) -> tuple[bool, int]:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.split()
    return out[0] == "True", int(out[1])


def test_tuned_allocator_reuses_large_buffers() -> None:
    tuned, faults = _faults("tune")
    untuned, before = _faults("plain")
    assert tuned
    assert not untuned
    # untuned, the heap's top is given back after each cycle and faulted in again (64
    # pages per buffer above glibc's adapted trim threshold)
    assert before >= 200 * 64, before
    assert faults * 10 < before, (faults, before)


def test_thresholds_from_the_environment_are_left_alone() -> None:
    tuned, faults = _faults(
        "tune", MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072"
    )
    assert not tuned
    assert faults >= 200 * 64, faults


def test_thresholds_from_glibc_tunables_are_left_alone() -> None:
    # GLIBC_TUNABLES is glibc's current way to set them; MALLOC_*_ are its older aliases
    tuned, faults = _faults(
        "tune",
        GLIBC_TUNABLES="glibc.malloc.mmap_threshold=131072:glibc.malloc.trim_threshold=131072",
    )
    assert not tuned
    assert faults >= 200 * 64, faults


def test_one_threshold_from_glibc_tunables_leaves_the_other_to_the_cli() -> None:
    tuned, _ = _faults("tune", GLIBC_TUNABLES="glibc.malloc.mmap_threshold=131072")
    assert tuned  # the trim threshold is still raised
