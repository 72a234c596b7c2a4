#!/usr/bin/env python3
"""Many concurrent relayed connections through one ``pytunnel connect``, then a kill.

What issue-level scale figures need and no other benchmark shows: how fast N connections
(10,000 by default) open through one ``-L`` forward and what each costs the two processes, and
how fast everything is torn down on *both* sides when one process dies.

Processes (each a child ended by its pid, as in ``bench_tunnel.py``): an echo target that
records when each of its connections closes, ``pytunnel serve``, ``pytunnel connect -L``. The
driver (this process) opens the connections with ``--parallel`` in flight, each proven end to
end by one echoed byte, and holds them open. Then it kills one process with SIGKILL
(``--kill client`` or ``server``; ``both`` runs the whole thing twice) and measures, from the
kill, when the connections on the far side of the surviving process close:

* client killed: the server must close its connections to the target (the target sees EOF);
* server killed: the client must close the connections it accepted (the driver sees EOF).

With ``--forward R`` the connections go through a remote forward instead (the server accepts
them on its public port, the client dials the target), and the two cases swap: a dead client
shows at the driver, a dead server at the target.

Reported: opening rate (connections/s), CPU milliseconds per connection of each pytunnel
process while opening, resident memory per connection of each, and the teardown times (first,
median, 99th percentile, last close after the kill; how many closed within 1 s).

    python bench/bench_scale.py                    # 10,000 connections, kill client then server
    python bench/bench_scale.py --quick            # 1,000 connections
    python bench/bench_scale.py --conns 10000 --kill server --json out.json
    python bench/bench_scale.py --forward R --conns 3000 --kill client

Every wait is bounded (``--timeout``); at the bound the figures say how many never closed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import selectors
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_tunnel import (
    HOST,
    BenchError,
    Child,
    cpu_ticks,
    default_pytunnel,
    loadavg,
    raise_nofile,
    run_dir,
    wait_for,
)
from gc_trace import read_trace
from gc_trace import summarize as summarize_gc

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
TOKEN = "bench-scale"
#: Streams per session and per server that both commands allow by default.
DEFAULT_STREAMS = 16384


# --------------------------------------------------------------------------- the target


def target_main(port_file: str) -> None:
    """The echo target (run as a child): one line ``closed <monotonic>`` per connection that
    ends, written at once, so the driver can time the teardown from outside.

    A plain ``selectors`` loop, not Trio: it does a few microseconds of work per event, so
    the time it records is when the close arrived, not when a busy event loop got to it.
    """
    listener = socket.create_server((HOST, 0), backlog=4096)
    listener.setblocking(False)
    Path(port_file).write_text(str(listener.getsockname()[1]))
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    while True:
        for key, _ in selector.select():
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            if sock is listener:
                with contextlib.suppress(BlockingIOError):
                    conn, _ = listener.accept()
                    conn.setblocking(False)
                    selector.register(conn, selectors.EVENT_READ)
                continue
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if data:
                with contextlib.suppress(OSError):
                    sock.send(data)
                continue
            os.write(1, f"closed {time.monotonic():.6f}\n".encode())
            selector.unregister(sock)
            sock.close()


def watch_closes(socks: list[socket.socket], timeout: float) -> list[float]:
    """When each of ``socks`` sees its peer close (EOF or reset), with the same cheap loop
    as the target; bounded by ``timeout``."""
    selector = selectors.DefaultSelector()
    for sock in socks:
        selector.register(sock, selectors.EVENT_READ)
    closed: list[float] = []
    deadline = time.monotonic() + timeout
    while len(closed) < len(socks) and time.monotonic() < deadline:
        for key, _ in selector.select(max(0.0, deadline - time.monotonic())):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            try:
                if sock.recv(1):
                    continue
            except BlockingIOError:
                continue
            except OSError:
                pass
            closed.append(time.monotonic())
            selector.unregister(sock)
    return closed


# --------------------------------------------------------------------------- the driver


def rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as fh:
            return int(fh.read().split()[1]) * PAGE // 1024
    except OSError:
        return 0


def closes(log: Path) -> list[float]:
    text = log.read_text(errors="replace") if log.exists() else ""
    return [float(m) for m in re.findall(r"^closed (\d+\.\d+)$", text, re.M)]


def summarize(times: list[float], t0: float, total: int) -> dict[str, float | int | None]:
    after = sorted(t - t0 for t in times)
    if not after:
        return {"closed": 0, "of": total, "first": None, "p50": None, "p99": None, "last": None}
    return {
        "closed": len(after),
        "of": total,
        "within_1s": sum(1 for t in after if t <= 1.0),
        "first": after[0],
        "p50": statistics.median(after),
        "p99": after[min(len(after) - 1, int(len(after) * 0.99))],
        "last": after[-1],
    }


def one_run(args: argparse.Namespace, kill: str) -> dict[str, object]:
    import trio

    with run_dir("bench-scale-") as procs:
        tmp = procs.tmp
        port_file = tmp / "target.port"
        target = procs.start(
            "target", [sys.executable, __file__, "--target", str(port_file)], cwd=tmp
        )
        target_port = int(
            wait_for("the target", lambda: port_file.exists() and port_file.read_text(), 20, target)
        )
        # the defaults carry DEFAULT_STREAMS connections; the flags only for more, or for a
        # build from before the defaults were raised (--stream-limits)
        flags = args.stream_limits or args.conns + 100 > DEFAULT_STREAMS
        cap = str(max(args.conns + 100, DEFAULT_STREAMS))
        limits = ["--max-streams", cap, "--max-session-streams", cap] if flags else []
        client_limit = ["--max-streams", cap] if flags else []
        exe = args.pytunnel
        traces = {name: tmp / f"gc-{name}.log" for name in ("serve", "connect")}

        def gc_env(name: str) -> dict[str, str] | None:
            return {"PYTUNNEL_GC_TRACE": str(traces[name])} if args.gc_trace else None

        server = procs.start(
            "serve",
            [exe, "serve", "--listen", f"{HOST}:0", "--token", TOKEN, "--log-level", "warning",
             *limits],
            env=gc_env("serve"),
        )  # fmt: skip
        line = wait_for("serve", lambda: _match(server, r"listening on [\d.]+:(\d+)"), 30, server)
        flag, kind = ("-L", "local") if args.forward == "L" else ("-R", "remote")
        client = procs.start(
            "connect",
            [exe, "connect", f"{HOST}:{line}", "--token", TOKEN, "--quiet", *client_limit,
             flag, f"{HOST}:0:{HOST}:{target_port}"],
            env=gc_env("connect"),
        )  # fmt: skip
        local = int(
            wait_for("connect", lambda: _match(client, kind + r" forward [\d.]+:(\d+)"), 30, client)
        )
        base = {"serve": rss_kib(server.pid), "connect": rss_kib(client.pid)}
        ticks = {"serve": cpu_ticks(server.pid), "connect": cpu_ticks(client.pid)}
        result: dict[str, object] = {
            "conns": args.conns,
            "forward": args.forward,
            "kill": kill,
            "load_start": loadavg(),
        }

        async def drive() -> None:
            streams: list[trio.SocketStream] = []
            limiter = trio.CapacityLimiter(args.parallel)
            failures = 0

            async def open_one() -> None:
                nonlocal failures
                async with limiter:
                    try:
                        stream = await trio.open_tcp_stream(HOST, local)
                        await stream.send_all(b"x")
                        if await stream.receive_some(1) != b"x":
                            raise OSError("no echo")
                    except OSError:
                        failures += 1
                        return
                    streams.append(stream)

            started = time.monotonic()
            with trio.move_on_after(args.timeout):
                async with trio.open_nursery() as nursery:
                    for _ in range(args.conns):
                        nursery.start_soon(open_one)
            elapsed = time.monotonic() - started
            result["opened"] = len(streams)
            result["open_failures"] = failures
            result["open_seconds"] = elapsed
            result["open_rate"] = len(streams) / elapsed if elapsed else 0.0
            for name, child in (("serve", server), ("connect", client)):
                cpu_ms = (cpu_ticks(child.pid) - ticks[name]) * 1000 / CLK_TCK
                result[f"{name}_cpu_ms_per_conn"] = cpu_ms / max(1, len(streams))
                rss = rss_kib(child.pid) - base[name]
                result[f"{name}_kib_per_conn"] = rss / max(1, len(streams))

            result["streams"] = streams

        trio.run(drive)
        streams = result.pop("streams")
        assert isinstance(streams, list)
        # out of Trio: plain sockets watched by a cheap loop (see watch_closes)
        socks = [socket.socket(fileno=stream.socket.detach()) for stream in streams]
        victim, survivor = (client, server) if kill == "client" else (server, client)
        spy = None
        # connections the target saw end while opening (given up at the bound) are not ours
        closed_before = len(closes(target.log))
        survivor_ticks = cpu_ticks(survivor.pid)
        t0 = time.monotonic()
        os.kill(victim.pid, 9)
        if args.py_spy:
            # the survivor's teardown, sampled for 10 s from the kill (collapsed stacks)
            out = args.py_spy / f"teardown-{kill}-killed.txt"
            spy = procs.start(
                "py-spy",
                ["py-spy", "record", "--nonblocking", "-p", str(survivor.pid), "-d", "10",
                 "-r", str(args.py_spy_rate), "-f", "raw", "-o", str(out)],
            )  # fmt: skip
        # the survivor must close its far side: the driver's connections if it is the one
        # that accepted them (the client of -L, the server of -R), else the target's
        if (survivor is client) == (args.forward == "L"):
            closed = watch_closes(socks, args.timeout)
        else:
            # the driver's own sockets die with the victim; the figure is the target's,
            # read from its log until every connection closed
            deadline = time.monotonic() + args.timeout
            while (
                len(closes(target.log)) < closed_before + len(socks) and time.monotonic() < deadline
            ):
                time.sleep(0.05)
            closed = closes(target.log)[closed_before:]
        result["survivor_cpu_s"] = (cpu_ticks(survivor.pid) - survivor_ticks) / CLK_TCK
        watched = time.monotonic()
        if args.settle:
            # the survivor's tasks unwind after the resets went out: their cost too
            time.sleep(args.settle)
            settled = (cpu_ticks(survivor.pid) - survivor_ticks) / CLK_TCK
            result["survivor_cpu_settled_s"] = settled
            watched = time.monotonic()
        if spy is not None:
            spy.popen.wait(timeout=30)
        for sock in socks:
            sock.close()
        result["teardown"] = summarize(closed, t0, len(socks))
        result["kill_monotonic"] = t0
        if args.gc_trace:
            # the survivor's collections from the kill to its last close (the teardown), and
            # to the end of the watch
            name = "serve" if survivor is server else "connect"
            rows = read_trace(traces[name])
            last = max(closed) if closed else t0 + args.timeout
            result["gc_teardown"] = summarize_gc(rows, t0, last)
            result["gc_watch"] = summarize_gc(rows, t0, watched)
            args.gc_trace.mkdir(parents=True, exist_ok=True)
            for path in traces.values():
                for src in (path, path.with_name(path.name + ".types")):
                    if src.exists():
                        dst = src.name.replace("gc-", f"gc-{kill}-killed-", 1)
                        (args.gc_trace / dst).write_text(src.read_text())
        result["load_end"] = loadavg()
        return result


def _match(child: Child, pattern: str) -> str | None:
    text = child.log.read_text(errors="replace") if child.log.exists() else ""
    found = re.search(pattern, text)
    return found.group(1) if found else None


def fmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if value < 10 else f"{value:,.0f}"
    return str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", metavar="PORT_FILE", help=argparse.SUPPRESS)
    parser.add_argument("--conns", type=int, default=10_000)
    parser.add_argument("--parallel", type=int, default=100, help="connections in flight")
    parser.add_argument("--kill", choices=["client", "server", "both"], default="both")
    parser.add_argument(
        "--forward",
        choices=["L", "R"],
        default="L",
        help="through a local forward (the client accepts) or a remote one (the server does)",
    )
    parser.add_argument("--timeout", type=float, default=60, help="bound of each phase, s")
    parser.add_argument("--quick", action="store_true", help="1,000 connections")
    parser.add_argument("--pytunnel", default=default_pytunnel())
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--stream-limits",
        action="store_true",
        help="pass --max-streams / --max-session-streams for --conns (builds whose defaults "
        "are below 10,000; automatic above the defaults)",
    )
    parser.add_argument(
        "--py-spy", type=Path, metavar="DIR", help="profile the survivor's teardown into DIR"
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=0.0,
        metavar="S",
        help="after the last close, wait S seconds and report the survivor's CPU since the "
        "kill again (its tasks unwinding; the collections to then with --gc-trace)",
    )
    parser.add_argument("--py-spy-rate", type=int, default=250, help="py-spy samples per s")
    parser.add_argument(
        "--gc-trace",
        type=Path,
        metavar="DIR",
        help="log the garbage collector's passes of both processes (--pytunnel must run "
        "bench/gc_trace.py) and summarize the survivor's during the teardown; logs kept in DIR",
    )
    args = parser.parse_args()
    if args.target:
        target_main(args.target)
        return
    if args.quick:
        args.conns = 1_000
    raise_nofile(args.conns * 2 + 1000)
    print(f"# {' '.join(sys.argv)}\n# load average at start: {loadavg()}")
    results = []
    for kill in ["client", "server"] if args.kill == "both" else [args.kill]:
        try:
            results.append(one_run(args, kill))
        except BenchError as exc:
            print(f"kill {kill}: {exc}")
    print()
    print("| killed | opened | failed | open/s | serve ms/conn | connect ms/conn "
          "| serve KiB/conn | connect KiB/conn | closed | within 1 s | first s | p50 s "
          "| p99 s | last s | survivor CPU s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        t = r["teardown"]
        assert isinstance(t, dict)
        print(
            f"| {r['kill']} | {r['opened']} | {r['open_failures']} | {fmt(r['open_rate'])} "
            f"| {fmt(r['serve_cpu_ms_per_conn'])} | {fmt(r['connect_cpu_ms_per_conn'])} "
            f"| {fmt(r['serve_kib_per_conn'])} | {fmt(r['connect_kib_per_conn'])} "
            f"| {t['closed']}/{t['of']} | {t.get('within_1s', 0)} | {fmt(t['first'])} "
            f"| {fmt(t['p50'])} | {fmt(t['p99'])} | {fmt(t['last'])} "
            f"| {fmt(r['survivor_cpu_s'])} |"
        )
    for r in results:
        if "gc_teardown" in r:
            gct = r["gc_teardown"]
            print(f"# kill {r['kill']}: survivor's collections to its last close: {gct}")
            print(f"# kill {r['kill']}: and to the end of the watch: {r['gc_watch']}")
        if "survivor_cpu_settled_s" in r:
            cpu = r["survivor_cpu_settled_s"]
            print(f"# kill {r['kill']}: survivor CPU s, kill to last close + settle: {cpu}")
    print(f"\n# load average at end: {loadavg()}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
