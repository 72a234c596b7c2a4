#!/usr/bin/env python3
"""Instructions per 64-byte round trip through a whole tunnel (``pytunnel serve`` plus
``pytunnel connect -L``, both under ``valgrind --tool=callgrind``), for one or more source trees;
with ``--workload connect``, per new connection instead (connect, one byte echoed, close), and
with ``--workload burst`` the same for connections opened 50 at once.

On a shared machine the wall clock of a round trip moves with the load; the instructions the
two processes execute for it do not. For each tree, a fresh tunnel runs twice, once with
``--low`` and once with ``--high`` round trips through an echo target (a thread of this
script), and ``(I(high) - I(low)) / (high - low)`` is what one round trip costs, both processes
together: start-up, the handshake and the warm-up cancel out. The processes are ended with
SIGINT (a clean exit, so callgrind writes its totals) and, failing that, by their pid.

    git archive OLD src | tar -x -C /tmp/old    # likewise NEW into /tmp/new
    python bench/callgrind_tunnel.py /tmp/old /tmp/new --low 100 --high 400
    python bench/callgrind_tunnel.py /tmp/old /tmp/new --workload connect --low 30 --high 130
    python bench/callgrind_tunnel.py /tmp/old /tmp/new --workload burst --low 50 --high 250

Slow (callgrind runs Python 30-60 times slower): a few minutes per tree.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import socket
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_tunnel import HOST, BenchError, Child, Processes, free_port, listening, run_dir, wait_for

PING = b"p" * 64
CLI = "import sys; sys.argv[0] = 'pytunnel'; from pytunnel.cli import main; sys.exit(main())"


def _echo_server() -> int:
    listener = socket.socket()
    listener.bind((HOST, 0))
    listener.listen(64)

    def serve(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while data := conn.recv(65536):
                conn.sendall(data)

    def accept_loop() -> None:
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept_loop, daemon=True).start()
    port: int = listener.getsockname()[1]
    return port


def _round_trips(port: int, count: int) -> None:
    with socket.create_connection((HOST, port), timeout=120) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(count):
            s.sendall(PING)
            got = 0
            while got < len(PING):
                data = s.recv(len(PING) - got)
                if not data:
                    raise BenchError("the tunnel closed the connection")
                got += len(data)


def _connections(port: int, count: int) -> None:
    """``count`` connections one after the other, each echoing one byte before it closes."""
    for _ in range(count):
        with socket.create_connection((HOST, port), timeout=120) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.sendall(b"c")
            if s.recv(1) != b"c":
                raise BenchError("the tunnel closed the connection")
            s.shutdown(socket.SHUT_WR)
            while s.recv(4096):
                pass


#: Connections opened at once by the ``burst`` workload.
BURST = 50


def _bursts(port: int, count: int) -> None:
    """``count`` connections in bursts of :data:`BURST`: all of a burst connected before any
    is used (they wait in the listener's backlog together), then one byte echoed on each,
    then each closed."""
    for _ in range(0, count, BURST):
        socks = [socket.create_connection((HOST, port), timeout=120) for _ in range(BURST)]
        try:
            for s in socks:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                s.sendall(b"c")
            for s in socks:
                if s.recv(1) != b"c":
                    raise BenchError("the tunnel closed the connection")
                s.shutdown(socket.SHUT_WR)
            for s in socks:
                while s.recv(4096):
                    pass
        finally:
            for s in socks:
                s.close()


def _collected(child: Child) -> int:
    found = re.findall(r"Collected : (\d+)", child.log.read_text(errors="replace"))
    if not found:
        raise BenchError(f"{child.name}: no callgrind totals:\n{child.log_tail()}")
    return int(found[-1])


def _stopped_total(procs: Processes, *children: Child) -> int:
    """The instructions of ``children``, stopped by SIGINT so that callgrind writes its
    totals (a child that does not exit in time is killed, and the error raised)."""
    total = 0
    for child in children:
        child.popen.send_signal(signal.SIGINT)
        try:
            child.popen.wait(timeout=120)
        except Exception:
            procs.stop(child)
            raise
        total += _collected(child)
        procs.stop(child)
    return total


def measure(procs: Processes, tree: Path, echo: int, count: int, workload: str = "ping") -> int:
    """Instructions of both tunnel processes over start-up, a warm-up and ``count`` round
    trips (or connections)."""
    env = {"PYTHONPATH": str(tree / "src"), "PYTUNNEL_TOKEN": "cg-" + os.urandom(8).hex()}
    grind = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"]
    port, front = free_port(), free_port()
    server = procs.start(
        "serve",
        [
            *grind,
            sys.executable,
            "-c",
            CLI,
            "serve",
            "--listen",
            f"{HOST}:{port}",
            "--log-level",
            "warning",
        ],
        env=env,
    )
    wait_for("the server", lambda: listening(port), 300, server, step=0.5)
    client = procs.start(
        "connect",
        [
            *grind,
            sys.executable,
            "-c",
            CLI,
            "connect",
            f"{HOST}:{port}",
            "--log-level",
            "warning",
            "-L",
            f"{HOST}:{front}:{HOST}:{echo}",
        ],
        env=env,
    )

    def echoes() -> bool:
        try:
            _round_trips(front, 20)  # the warm-up: first connection, first frames
        except OSError:
            return False
        return True

    wait_for("the tunnel to echo", echoes, 300, client, step=1.0)
    if workload in ("connect", "burst"):
        _connections(front, 5)  # the warm-up of the connection path
        (_connections if workload == "connect" else _bursts)(front, count)
        time.sleep(2)  # both sides finish closing the last ones before the totals
    else:
        _round_trips(front, count)
    return _stopped_total(procs, client, server)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trees", nargs="+", type=Path, help="directories holding src/pytunnel")
    parser.add_argument("--low", type=int, default=100)
    parser.add_argument("--high", type=int, default=400)
    parser.add_argument("--workload", choices=("ping", "connect", "burst"), default="ping")
    args = parser.parse_args()
    echo = _echo_server()
    if args.workload == "burst" and (args.low % BURST or args.high % BURST):
        parser.error(f"--low and --high must be multiples of {BURST} for bursts")
    unit = "instr/round trip" if args.workload == "ping" else "instr/connection"
    print(f"{'tree':<30} {'I(low)':>14} {'I(high)':>14} {unit:>18}", flush=True)
    with run_dir("pytunnel-callgrind-") as procs:
        for tree in args.trees:
            start = time.monotonic()
            low = measure(procs, tree, echo, args.low, args.workload)
            high = measure(procs, tree, echo, args.high, args.workload)
            per = (high - low) // (args.high - args.low)
            print(
                f"{tree!s:<30} {low:>14} {high:>14} {per:>18}   ({time.monotonic() - start:.0f} s)",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
