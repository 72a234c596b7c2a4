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
    python bench/callgrind_tunnel.py /tmp/new --reference trio-raw-relay   # beside the floor
    python bench/callgrind_tunnel.py /tmp/new --tool cprofile --sites 25   # calls, by site

``--reference trio-raw-relay`` also counts the floor: two chained bare trio relays
(``bench_tunnel.py --trio-raw-relay``: a task per direction, ``os.read`` / ``os.write`` on the
descriptors), the same two-process shape with nothing but trio. Every line gives each
process's share (``connect`` / ``serve``; for the floor, the client-side and server-side
relay). ``--sites N`` lists, per process, the N sites that grew most per round trip: with
callgrind the C functions' own instructions (``callgrind_annotate``: the interpreter's, and a
compiled build's modules by name), with ``--tool cprofile`` the Python functions' calls
(deterministic, as docs/performance.md's tables count them). ``--keep DIR`` keeps the
profiles.

Slow (callgrind runs Python 30-60 times slower): a few minutes per tree.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_tunnel import (
    HOST,
    BenchError,
    Child,
    Processes,
    callgrind_total,
    reported_port,
    run_dir,
    wait_for,
)

PING = b"p" * 64
#: Every measured process hashes strings alike: with Python's per-process random seed, dicts
#: and sets lay out differently in each run, and their probing costs a different number of
#: instructions (a run-to-run spread of a few per cent per process, more than a small
#: change saves).
SAME_HASHES = {"PYTHONHASHSEED": "0"}
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
    if child.name.endswith("-cprofile"):
        return _cprofile_sites(Path(child.argv[child.argv.index("-o") + 1]))[""]
    return callgrind_total(child, child.name)


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


def _cprofile_sites(path: Path) -> dict[str, int]:
    """Calls per Python function of a cProfile dump (``""``: all of them)."""
    import pstats

    stats = pstats.Stats(str(path)).stats  # type: ignore[attr-defined]
    sites: dict[str, int] = {"": 0}
    for (file, line, func), (_cc, calls, *_rest) in stats.items():
        where = f"{_short(file)}:{line}({func})" if file != "~" else func
        sites[where] = sites.get(where, 0) + calls
        sites[""] += calls
    return sites


def _short(file: str) -> str:
    for marker in ("/site-packages/", "/src/", "/lib/python3"):
        if marker in file:
            return file.split(marker, 1)[1]
    return file


def _callgrind_sites(path: Path) -> dict[str, int]:
    """Own (exclusive) instructions per C function of a callgrind output."""
    out = subprocess.run(
        ["callgrind_annotate", "--inclusive=no", "--auto=no", "--threshold=100", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    sites: dict[str, int] = {}
    for line in out.splitlines():
        m = re.match(r"\s*([\d,]+) \([^)]*\)\s+(\S.*?)(?: \[[^]]*\])?$", line)
        if m and ":" in m.group(2):
            where = m.group(2).split(":", 1)[1]
            sites[where] = sites.get(where, 0) + int(m.group(1).replace(",", ""))
    return sites


class Tool:
    """How a process is run and counted: under callgrind (instructions) or cProfile (calls),
    with its profile thrown away or kept in ``keep``."""

    def __init__(self, name: str, keep: Path | None) -> None:
        self.name = name
        self.keep = keep
        self.runs = 0

    def argv(self, label: str, python_args: list[str]) -> tuple[str, list[str]]:
        """The name of the child and its command line."""
        self.runs += 1
        out = self.keep / f"{self.runs:03d}-{label}" if self.keep is not None else None
        if self.name == "cprofile":
            assert out is not None
            if python_args[0] == "-c":  # cProfile runs a module or a script, not -c
                python_args = ["-m", "pytunnel", *python_args[2:]]
            prof = [sys.executable, "-m", "cProfile", "-o", str(out)]
            return f"{label}-cprofile", [*prof, *python_args]
        target = "/dev/null" if out is None else str(out)
        grind = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={target}"]
        return label, [*grind, sys.executable, *python_args]

    def sites(self, child: Child) -> dict[str, int]:
        if self.name == "cprofile":
            return _cprofile_sites(Path(child.argv[child.argv.index("-o") + 1]))
        arg = next(a for a in child.argv if a.startswith("--callgrind-out-file="))
        return _callgrind_sites(Path(arg.split("=", 1)[1]))


#: One measurement: per process (``connect``, ``serve``), its total and, when asked for,
#: its sites.
Counts = dict[str, tuple[int, dict[str, int]]]


def _finish(procs: Processes, tool: Tool, sites: bool, **children: Child) -> Counts:
    counts: Counts = {}
    for role, child in children.items():
        total = _stopped_total(procs, child)
        counts[role] = (total, tool.sites(child) if sites else {})
    return counts


def measure_reference(
    procs: Processes, tool: Tool, echo: int, count: int, sites: bool = False
) -> Counts:
    """Both processes of the floor, two chained ``bench_tunnel.py --trio-raw-relay``
    processes, over start-up, a warm-up and ``count`` round trips."""
    script = str(Path(__file__).resolve().parent / "bench_tunnel.py")

    def relay_to(label: str, target: int) -> tuple[Child, int]:
        name, argv = tool.argv(label, [script, "--trio-raw-relay", str(target)])
        child = procs.start(name, argv, env=SAME_HASHES)
        return child, reported_port(child, rf"^relay (\d+) -> {target}$", f"{label}'s port")

    server, near = relay_to("raw-server", echo)
    client, front = relay_to("raw-client", near)

    def echoes() -> bool:
        try:
            _round_trips(front, 20)
        except OSError:
            return False
        return True

    wait_for("the relays to echo", echoes, 300, client, step=1.0)
    _round_trips(front, count)
    return _finish(procs, tool, sites, connect=client, serve=server)


def measure(
    procs: Processes,
    tree: Path,
    echo: int,
    count: int,
    workload: str = "ping",
    tool: Tool | None = None,
    sites: bool = False,
) -> Counts:
    """Both tunnel processes over start-up, a warm-up and ``count`` round trips (or
    connections): instructions, or calls with ``--tool cprofile``."""
    tool = tool or Tool("callgrind", None)
    env = {
        **SAME_HASHES,
        "PYTHONPATH": str(tree / "src"),
        "PYTUNNEL_TOKEN": "cg-" + os.urandom(8).hex(),
    }
    name, argv = tool.argv(
        "serve",
        [
            "-c",
            CLI,
            "serve",
            "--listen",
            f"{HOST}:0",
            "--log-level",
            "warning",
        ],
    )
    server = procs.start(name, argv, env=env)
    port = reported_port(
        server, r"^pytunnel server listening on \S+:(\d+)$", "the server's address"
    )
    name, argv = tool.argv(
        "connect",
        [
            "-c",
            CLI,
            "connect",
            f"{HOST}:{port}",
            "--log-level",
            "warning",
            "-L",
            f"{HOST}:0:{HOST}:{echo}",
        ],
    )
    client = procs.start(name, argv, env=env)
    front = reported_port(
        client, rf"^local forward \S+:(\d+) -> \S+:{echo}$", "the local forward's address"
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
    return _finish(procs, tool, sites, connect=client, serve=server)


def _print_sites(low: Counts, high: Counts, per: int, top: int) -> None:
    for role in ("connect", "serve"):
        a, b = low[role][1], high[role][1]
        grown = {k: (b.get(k, 0) - a.get(k, 0)) / per for k in b.keys() | a.keys() if k}
        print(f"  {role}: the {top} sites that grew most, per round trip", flush=True)
        for where, n in sorted(grown.items(), key=lambda kv: -kv[1])[:top]:
            print(f"    {n:>12,.1f}  {where}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trees", nargs="*", type=Path, help="directories holding src/pytunnel")
    parser.add_argument("--low", type=int, default=100)
    parser.add_argument("--high", type=int, default=400)
    parser.add_argument("--workload", choices=("ping", "connect", "burst"), default="ping")
    parser.add_argument(
        "--reference",
        choices=("trio-raw-relay",),
        help="also count the floor: two chained bare trio relays (ping workload only)",
    )
    parser.add_argument("--tool", choices=("callgrind", "cprofile"), default="callgrind")
    parser.add_argument(
        "--sites", type=int, default=0, metavar="N", help="list N sites per process"
    )
    parser.add_argument("--keep", type=Path, help="keep the profiles in this directory")
    args = parser.parse_args()
    if not args.trees and args.reference is None:
        parser.error("give a tree, or --reference")
    if args.reference is not None and args.workload != "ping":
        parser.error("--reference counts round trips only (the ping workload)")
    echo = _echo_server()
    if args.workload == "burst" and (args.low % BURST or args.high % BURST):
        parser.error(f"--low and --high must be multiples of {BURST} for bursts")
    what = "instr" if args.tool == "callgrind" else "calls"
    unit = f"{what}/round trip" if args.workload == "ping" else f"{what}/connection"
    print(
        f"{'tree':<30} {'I(low)':>14} {'I(high)':>14} {unit:>18} {'connect':>12} {'serve':>12}",
        flush=True,
    )
    with contextlib.ExitStack() as stack, run_dir("pytunnel-callgrind-") as procs:
        keep = args.keep
        if keep is None and (args.sites or args.tool == "cprofile"):
            keep = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cg-sites-")))
        if keep is not None:
            keep.mkdir(parents=True, exist_ok=True)
        tool = Tool(args.tool, keep)
        runs: list[tuple[str, Callable[[int], Counts]]] = []
        if args.reference is not None:
            runs.append(
                (args.reference, lambda n: measure_reference(procs, tool, echo, n, args.sites > 0))
            )
        for tree in args.trees:
            runs.append(
                (
                    str(tree),
                    lambda n, tree=tree: measure(
                        procs, tree, echo, n, args.workload, tool, args.sites > 0
                    ),
                )
            )
        n = args.high - args.low
        for label, run in runs:
            start = time.monotonic()
            low, high = run(args.low), run(args.high)
            tl, th = (sum(c[r][0] for r in c) for c in (low, high))
            each = [(high[r][0] - low[r][0]) // n for r in ("connect", "serve")]
            print(
                f"{label:<30} {tl:>14} {th:>14} {(th - tl) // n:>18} {each[0]:>12} {each[1]:>12}"
                f"   ({time.monotonic() - start:.0f} s)",
                flush=True,
            )
            if args.sites:
                _print_sites(low, high, n, args.sites)
    return 0


if __name__ == "__main__":
    sys.exit(main())
