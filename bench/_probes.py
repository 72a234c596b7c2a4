"""What the whole-tunnel benchmarks send through a tunnel besides iperf3 and wrk: a child
process serving a sink, a source and an echo target, and the two latency probes run against
the echo target (64-byte round trips on one connection; connection setup, i.e. connect + first
echoed byte). ``compare.py`` (one commit against another) and ``bench_tunnel.py`` (pytunnel
against other tunnels) share them, so both measure a round trip and a setup the same way.

The probes use blocking sockets with a timeout and ``time.perf_counter``: no event loop of
their own between the measured bytes. Every loop is bounded in count and by a deadline.

    python bench/_probes.py     # serve the targets; prints "targets SINK SOURCE ECHO"
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import socket
import statistics
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator

HOST = "127.0.0.1"
CHUNK = 256 * 1024
PING = b"p" * 64
COUNT = struct.Struct("!Q")
#: Socket timeout of every benchmark connection: a stalled tunnel fails the sample.
IO_TIMEOUT = 30.0


class ProbeError(Exception):
    """A probe's bytes did not come back as sent, or it ran out of time."""


# --------------------------------------------------------------------------- targets


def recv_exact(conn: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        data = conn.recv(n - len(buf))
        if not data:
            raise ConnectionError(f"peer closed after {len(buf)} of {n} bytes")
        buf += data
    return bytes(buf)


def _sink(conn: socket.socket) -> None:
    """Count bytes until EOF, then reply with the count."""
    buf = bytearray(CHUNK)
    total = 0
    while n := conn.recv_into(buf):
        total += n
    conn.sendall(COUNT.pack(total))


def _source(conn: socket.socket) -> None:
    """Read the requested byte count, send that many bytes, close."""
    (want,) = COUNT.unpack(recv_exact(conn, COUNT.size))
    block = memoryview(b"d" * CHUNK)
    while want > 0:
        conn.sendall(block[: min(want, CHUNK)])
        want -= min(want, CHUNK)


def _echo(conn: socket.socket) -> None:
    while data := conn.recv(65536):
        conn.sendall(data)


def serve_targets() -> int:
    """The sink, source and echo servers, a thread per connection.

    Prints ``targets SINK SOURCE ECHO`` (ports) and serves until it is ended by its pid.
    """

    def handle(conn: socket.socket, fn: Callable[[socket.socket], None]) -> None:
        with conn:
            conn.settimeout(IO_TIMEOUT)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with contextlib.suppress(OSError):
                fn(conn)

    def accept_loop(listener: socket.socket, fn: Callable[[socket.socket], None]) -> None:
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=handle, args=(conn, fn), daemon=True).start()

    ports = []
    for fn in (_sink, _source, _echo):
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((HOST, 0))
        listener.listen(1024)
        ports.append(listener.getsockname()[1])
        threading.Thread(target=accept_loop, args=(listener, fn), daemon=True).start()
    print("targets " + " ".join(map(str, ports)), flush=True)
    signal.pause()  # SIGTERM's default action ends the process
    return 0


def parse_targets(text: str) -> list[int] | None:
    """The ports of the ``targets ...`` line ``serve_targets`` printed, once it has."""
    for line in text.splitlines():
        if line.startswith("targets "):
            return [int(x) for x in line.split()[1:]]
    return None


# --------------------------------------------------------------------------- probes


def connect(port: int, host: str = HOST) -> socket.socket:
    s = socket.create_connection((host, port), timeout=IO_TIMEOUT)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


@contextlib.contextmanager
def pinned(cpu: int | None) -> Iterator[int | None]:
    """Run the calling thread on CPU ``cpu`` alone (as ``taskset -c`` would), then restore.

    A ping-pong whose client migrates between CPUs measures the migrations too. None, or a
    platform without ``sched_setaffinity``, leaves the thread where it is (and yields None).
    """
    if cpu is None or not hasattr(os, "sched_setaffinity"):
        yield None
        return
    before = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {cpu})
    except OSError:
        yield None
        return
    try:
        yield cpu
    finally:
        os.sched_setaffinity(0, before)


def round_trips(port: int, pings: int, timeout: float = 120.0) -> list[float]:
    """Seconds of each of ``pings`` 64-byte echo round trips on one connection."""
    times = []
    deadline = time.monotonic() + timeout
    with connect(port) as s:
        for _ in range(pings):
            t0 = time.perf_counter()
            s.sendall(PING)
            if recv_exact(s, len(PING)) != PING:
                raise ProbeError("round trip: the echo differs from the ping")
            times.append(time.perf_counter() - t0)
            if time.monotonic() > deadline:
                raise ProbeError(f"round trip: {len(times)} of {pings} pings in {timeout:g} s")
    return times


def setup_times(port: int, conns: int, timeout: float = 120.0) -> list[float]:
    """Seconds of connect + first echoed byte for each of ``conns`` sequential connections."""
    times = []
    deadline = time.monotonic() + timeout
    for _ in range(conns):
        t0 = time.perf_counter()
        with connect(port) as s:
            s.sendall(b"c")
            if s.recv(1) != b"c":
                raise ProbeError("connect: no echo")
            times.append(time.perf_counter() - t0)
        if time.monotonic() > deadline:
            raise ProbeError(f"connect: {len(times)} of {conns} connections in {timeout:g} s")
    return times


def percentile(xs: list[float], pct: float) -> float:
    """The ``pct`` percentile of ``xs`` (nearest rank); the median for 50."""
    if pct == 50:
        return statistics.median(xs)
    ordered = sorted(xs)
    rank = max(1, min(len(ordered), math.ceil(pct / 100 * len(ordered))))
    return ordered[rank - 1]


if __name__ == "__main__":
    sys.exit(serve_targets())
