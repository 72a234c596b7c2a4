#!/usr/bin/env python3
"""Instructions per datagram through a whole UDP forward (``pytunnel serve`` plus
``pytunnel connect -L P:HOST:SINK/udp``, both under ``valgrind --tool=callgrind``), for one or
more source trees: a load-independent figure for the UDP path, where rates on a shared machine
move with whatever else runs.

Datagrams of ``--length`` bytes go in bursts of ``--burst`` (sent back to back, so they wait
on the forward's socket together, as at a high rate) to a sink thread of this script; each
burst waits until all of it arrived (or ``--timeout``; a datagram lost is reported). For each
tree a fresh tunnel runs twice, with ``--low`` and ``--high`` datagrams, and
``(I(high) - I(low)) / (high - low)`` is the cost of one datagram, both processes together:
start-up, the handshake and the warm-up cancel out.

    git archive OLD src | tar -x -C /tmp/old    # likewise NEW into /tmp/new
    python bench/bench_udp_callgrind.py /tmp/old /tmp/new                 # bursts of 32
    python bench/bench_udp_callgrind.py /tmp/old /tmp/new --burst 1 --low 100 --high 400

Slow (callgrind runs Python 30-60 times slower): a few minutes per tree.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_tunnel import HOST, BenchError, Processes, listening, run_dir, wait_for
from bench_udp import free_port_both, udp_bound
from callgrind_tunnel import CLI, _stopped_total


class Sink:
    """A UDP socket in a thread, counting what arrives."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        self.sock.bind((HOST, 0))
        self.port: int = self.sock.getsockname()[1]
        self.count = 0
        self.lock = threading.Lock()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            self.sock.recv(65536)
            with self.lock:
                self.count += 1

    def received(self) -> int:
        with self.lock:
            return self.count


def _send(sink: Sink, front: int, count: int, burst: int, length: int, timeout: float) -> int:
    """``count`` datagrams in bursts; how many never arrived."""
    payload = b"u" * length
    lost = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((HOST, 0))
        for start in range(0, count, burst):
            n = min(burst, count - start)
            target = sink.received() + n
            for _ in range(n):
                sock.sendto(payload, (HOST, front))
            deadline = time.monotonic() + timeout
            while sink.received() < target and time.monotonic() < deadline:
                time.sleep(0.002)
            lost += max(0, target - sink.received())
    return lost


def measure(procs: Processes, tree: Path, sink: Sink, count: int, args: argparse.Namespace) -> int:
    env = {"PYTHONPATH": str(tree / "src"), "PYTUNNEL_TOKEN": "cg-" + os.urandom(8).hex()}
    grind = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"]
    port, front = free_port_both(), free_port_both()
    serve = ["serve", "--listen", f"{HOST}:{port}", "--log-level", "warning"]
    server = procs.start("serve", [*grind, sys.executable, "-c", CLI, *serve], env=env)
    wait_for("the server", lambda: listening(port), 300, server, step=0.5)
    forward = f"{HOST}:{front}:{HOST}:{sink.port}/udp"
    connect = ["connect", f"{HOST}:{port}", "--log-level", "warning", "-L", forward]
    client = procs.start("connect", [*grind, sys.executable, "-c", CLI, *connect], env=env)
    wait_for("the udp forward", lambda: udp_bound(front), 300, client, step=1.0)

    def arrives() -> bool:  # the warm-up: the association opens with the first datagram
        before = sink.received()
        _send(sink, front, 1, 1, args.length, 5.0)
        return sink.received() > before

    wait_for("the forward to deliver", arrives, 300, client, step=0.5)
    _send(sink, front, args.burst * 2, args.burst, args.length, args.timeout)  # warm batches
    lost = _send(sink, front, count, args.burst, args.length, args.timeout)
    if lost:
        print(f"    ({tree}: {lost} of {count} datagrams lost)", flush=True)
    return _stopped_total(procs, client, server)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trees", nargs="+", type=Path, help="directories holding src/pytunnel")
    parser.add_argument("--low", type=int, default=320)
    parser.add_argument("--high", type=int, default=1600)
    parser.add_argument("--burst", type=int, default=32)
    parser.add_argument("--length", type=int, default=1400)
    parser.add_argument("--timeout", type=float, default=30.0, help="s to wait for one burst")
    args = parser.parse_args()
    if args.high <= args.low:
        parser.error("--high must be above --low")
    sink = Sink()
    print(
        f"bursts of {args.burst} x {args.length} B; "
        f"{'tree':<24} {'I(low)':>14} {'I(high)':>14} {'instr/datagram':>16}",
        flush=True,
    )
    try:
        with run_dir("pytunnel-callgrind-udp-") as procs:
            for tree in args.trees:
                start = time.monotonic()
                low = measure(procs, tree, sink, args.low, args)
                high = measure(procs, tree, sink, args.high, args)
                per = (high - low) // (args.high - args.low)
                print(
                    f"{tree!s:<24} {low:>14} {high:>14} {per:>16}"
                    f"   ({time.monotonic() - start:.0f} s)",
                    flush=True,
                )
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
