#!/usr/bin/env python3
"""Where a bulk transfer's CPU goes, per tunnel process: ``pytunnel serve`` + ``connect -L``
of one tree (``compare.py``'s tunnel), plain or TLS, one upload and one download of
``--mib`` MiB each, and for each process and direction its user and system CPU per GB, its
minor page faults per GB and, with ``--strace``, its system calls per MB (``strace -c -f``
attached by pid for the transfer) or, with ``--py-spy``, its hottest Python functions
(``py-spy record --format raw``, attached by pid, summarised by own samples).

``--streams N`` moves the same bytes over N connections at once (each its own stream of the
one session); ``--iperf S`` has iperf3 do the moving instead (``-t S``, ``-P N``, ``-R`` for
the download), as ``bench_tunnel.py`` measures bulk, and prints iperf3's own CPU per GB
beside the tunnel's (on 2 cores they share the CPUs). ``--perf-stat`` counts system calls
and context switches per MB with ``perf stat`` tracepoints (a far smaller slow-down than
``strace``'s); ``--counters`` (a pure-Python tree only) counts inside each process what a
system call count cannot tell (``bench/_counters.py``): Data frame sizes, window updates,
which path queued each frame, waits for room or window, bytes per read and write on the
session socket and on the target sockets, trio task steps.

    python bench/profile_bulk.py                    # this checkout, plain, 512 MiB each way
    python bench/profile_bulk.py --tls --strace     # TLS, with system call counts
    python bench/profile_bulk.py --ref main --py-spy
    python bench/profile_bulk.py --iperf 5 --streams 4 --perf-stat

Upload: the client (``connect``) reads the local socket and sends Data frames, the server
decodes them and writes to the target; download the other way round. Attaching ``strace``
slows a process down several times: read its counts, not the CPU of that run.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _probes import parse_targets
from bench_tunnel import (
    HOST,
    TICK,
    BenchError,
    Processes,
    free_port,
    listening,
    loadavg,
    proc_stat,
    run_dir,
    wait_for,
)
from compare import Targets, Version, check_imports, checkout, download, start_tunnel, upload

BENCH = Path(__file__).resolve().parent

#: ``perf stat`` tracepoints: every system call, the few that matter one by one, and the
#: scheduler's view (a context switch is a sleep or a preemption).
PERF_EVENTS = [
    "raw_syscalls:sys_enter",
    "syscalls:sys_enter_read",
    "syscalls:sys_enter_write",
    "syscalls:sys_enter_epoll_wait",
    "syscalls:sys_enter_sendto",
    "syscalls:sys_enter_recvfrom",
    "context-switches",
]


def usage(pid: int) -> tuple[float, float, int]:
    """(user s, system s, minor faults) of ``pid`` so far."""
    st = proc_stat(pid)
    if st is None:
        return 0.0, 0.0, 0
    f = st[2]
    return int(f[11]) / TICK, int(f[12]) / TICK, int(f[7])


def attach(tool: str, pid: int, out: Path) -> subprocess.Popen[bytes]:
    if tool == "strace":
        argv = ["strace", "-c", "-f", "-o", str(out), "-p", str(pid)]
    elif tool == "perf-stat":
        events = ",".join(PERF_EVENTS)
        argv = ["perf", "stat", "-x", ",", "-e", events, "-o", str(out), "-p", str(pid)]
    elif tool == "perf":
        argv = ["perf", "record", "-e", "cpu-clock", "-q", "-o", str(out), "-p", str(pid)]
    else:
        argv = ["py-spy", "record", "--format", "raw", "-r", "250", "-o", str(out), "-p", str(pid)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # let it attach
    return proc


def detach(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(2)  # SIGINT: both tools write their summary and exit
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def strace_summary(path: Path, mb: float, top: int = 6) -> str:
    calls: dict[str, tuple[int, int]] = {}
    for line in path.read_text().splitlines():
        m = re.match(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(\d+)?\s*(\w+)$", line)
        if m and m.group(3) != "total":
            calls[m.group(3)] = (int(m.group(1)), int(m.group(2) or 0))
    total = sum(c for c, _ in calls.values())
    best = sorted(calls.items(), key=lambda kv: -kv[1][0])[:top]
    parts = [
        f"{name} {c / mb:.1f}" + (f" ({e / mb:.1f} failed)" if e else "") for name, (c, e) in best
    ]
    return f"{total / mb:.1f} calls/MB: " + ", ".join(parts)


def perf_stat_summary(path: Path, mb: float) -> str:
    counts: dict[str, float] = {}
    for line in path.read_text().splitlines():
        parts = line.split(",")
        if len(parts) > 2 and parts[0].replace(".", "").isdigit():
            counts[parts[2].split(":")[-1]] = float(parts[0])
    names = {
        "sys_enter": "syscalls",
        "sys_enter_read": "read",
        "sys_enter_write": "write",
        "sys_enter_epoll_wait": "epoll_wait",
        "sys_enter_sendto": "sendto",
        "sys_enter_recvfrom": "recvfrom",
        "context-switches": "ctx switches",
    }
    return "per MB: " + ", ".join(
        f"{label} {counts[key] / mb:.1f}" for key, label in names.items() if key in counts
    )


def counters_summary(before: dict[str, int], after: dict[str, int], mb: float) -> str:
    """The counts of ``bench/_counters.py`` over one transfer: per MB, and the averages."""
    d = {k: after.get(k, 0) - before.get(k, 0) for k in after}

    def avg(name: str) -> str:
        n = d.get(name, 0)
        return f"{d.get(name + '.bytes', 0) / n / 1024:.0f} KiB x {n / mb:.2f}/MB" if n else "-"

    frames = {k.rsplit(".", 1)[-1]: v for k, v in d.items() if k.startswith("data_frames.sent.")}
    sizes = " ".join(f"{k}:{v}" for k, v in sorted(frames.items()) if k != "bytes" and v)
    steps = sorted(
        ((k[len("trio.steps.") :], v) for k, v in d.items() if k.startswith("trio.steps.") and v),
        key=lambda kv: -kv[1],
    )[:5]
    lines = [
        f"Data frames sent {avg('data_frames.sent')} [{sizes}]; received "
        f"{d.get('data_frames.received', 0) / mb:.2f}/MB; WindowUpdate sent "
        f"{d.get('control.WindowUpdate', 0) / mb:.2f}/MB",
        f"queued by direct writer {avg('queued_by.direct')} (took none "
        f"{d.get('queued_by.direct.none', 0) / mb:.2f}/MB, part "
        f"{d.get('queued_by.direct.partial', 0) / mb:.2f}/MB), by send_all "
        f"{avg('queued_by.send_all')}; relay send_rest {avg('relay.send_rest')}; "
        f"no room {d.get('sender.no_room', 0) / mb:.2f}/MB, window waits "
        f"{d.get('sender.window_wait', 0) / mb:.2f}/MB",
        f"session socket: write {avg('session.write')} (partial "
        f"{d.get('session.write.partial', 0) / mb:.2f}, EAGAIN "
        f"{d.get('session.write.eagain', 0) / mb:.2f}/MB), writer send_all "
        f"{avg('session.send_all')}, read {avg('session.read')} (EAGAIN "
        f"{d.get('session.read.eagain', 0) / mb:.2f}/MB); queue taken {avg('queue.taken')}",
        f"target sockets: write {avg('target.write')} (partial "
        f"{d.get('target.write.partial', 0) / mb:.2f}, EAGAIN "
        f"{d.get('target.write.eagain', 0) / mb:.2f}/MB), send_all {avg('target.send_all')}, "
        f"read {avg('target.read')} (EAGAIN {d.get('target.read.eagain', 0) / mb:.2f}/MB)",
        f"deliver {d.get('deliver', 0) / mb:.2f}/MB, buffered {avg('deliver.buffered')}; "
        f"stream receive_some {avg('stream.receive_some')}",
        f"trio task steps {d.get('trio.task_steps', 0) / mb:.2f}/MB, io waits "
        f"{d.get('trio.io_waits', 0) / mb:.2f}/MB: "
        + ", ".join(f"{k} {v / mb:.2f}" for k, v in steps),
    ]
    return "counters:\n" + "\n".join("        " + line for line in lines)


def read_counters(pids: list[int], out: Path) -> dict[int, dict[str, int]]:
    """Ask each counted process for its counts (``SIGUSR1``) and read them."""
    for pid in pids:
        (out / f"{pid}.json").unlink(missing_ok=True)
        os.kill(pid, signal.SIGUSR1)
    found: dict[int, dict[str, int]] = {}
    deadline = time.monotonic() + 10
    while len(found) < len(pids) and time.monotonic() < deadline:
        for pid in pids:
            path = out / f"{pid}.json"
            if pid not in found and path.exists():
                try:
                    found[pid] = json.loads(path.read_text())
                except json.JSONDecodeError:
                    continue  # being written
        time.sleep(0.05)
    if len(found) < len(pids):
        raise BenchError("a tunnel process wrote no counters (a compiled tree?)")
    return found


def perf_summary(path: Path, top: int = 14) -> str:
    report = subprocess.run(
        ["perf", "report", "-i", str(path), "--stdio", "--sort", "dso,sym", "-q"],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    rows = [line.rstrip() for line in report.splitlines() if line.strip()][:top]
    return "perf, by DSO and symbol:\n" + "\n".join("    " + r.strip() for r in rows)


def pyspy_summary(path: Path, top: int = 12) -> str:
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        own[stack.split(";")[-1]] += n
    rows = [f"    {n / total * 100:5.1f}%  {frame}" for frame, n in own.most_common(top)]
    return f"{total} samples, own time:\n" + "\n".join(rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ref", default="WORKTREE", help="the tree to run (a commit, or WORKTREE)")
    p.add_argument("--tls", action="store_true", help="TLS on the tunnel")
    p.add_argument("--mib", type=float, default=512.0)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--streams", type=int, default=1, help="connections at once (1)")
    p.add_argument(
        "--iperf", type=float, default=0.0, metavar="S", help="iperf3 -t S moves the bytes"
    )
    p.add_argument(
        "--counters", action="store_true", help="counts inside each process (a pure tree)"
    )
    tool = p.add_mutually_exclusive_group()
    tool.add_argument("--strace", action="store_true")
    tool.add_argument("--perf-stat", action="store_true", help="perf stat: syscalls per MB")
    tool.add_argument("--py-spy", action="store_true")
    tool.add_argument("--perf", action="store_true", help="perf record -e cpu-clock, by DSO")
    args = p.parse_args()
    nbytes = int(args.mib * 1024 * 1024)
    gb, mb = nbytes / 1e9, nbytes / 1e6
    with run_dir("pytunnel-profile-") as procs:
        try:
            return run(args, procs, nbytes, gb, mb)
        except BenchError as exc:
            print(f"profile failed: {exc}", flush=True)
            return 1


def parallel(fn: Callable[[Version, int], float], version: Version, nbytes: int, n: int) -> int:
    """``fn`` (``upload`` / ``download``) on ``n`` connections at once, ``nbytes`` in all;
    the bytes moved."""
    if n == 1:
        fn(version, nbytes)
        return nbytes
    errors: list[BaseException] = []

    def one() -> None:
        try:
            fn(version, nbytes // n)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    if errors:
        raise BenchError(f"a transfer failed: {errors[0]!r}")
    return nbytes // n * n


def run_iperf3(port: int, seconds: float, streams: int, reverse: bool) -> tuple[int, float]:
    """iperf3 through the tunnel's forward on ``port``: (bytes received, client CPU s)."""
    argv = ["iperf3", "-c", HOST, "-p", str(port), "-t", f"{seconds:g}", "-J", "-P", str(streams)]
    if reverse:
        argv.append("-R")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    r = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        data = json.loads(r.stdout)
        received = int(data["end"]["sum_received"]["bytes"])
    except (json.JSONDecodeError, KeyError) as exc:
        raise BenchError(f"iperf3 failed (rc {r.returncode}): {r.stderr[-300:]}") from exc
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return received, cpu


def run(args: argparse.Namespace, procs: Processes, nbytes: int, gb: float, mb: float) -> int:
    tmp = procs.tmp
    version = checkout("NEW", args.ref, tmp)
    version.tls = args.tls
    check_imports(version)
    counted = tmp / "counters"
    if args.counters:
        counted.mkdir()
        module, func = version.entry.split(":")
        code = (
            f"import sys; sys.argv[0] = 'pytunnel'; sys.path.insert(0, {str(BENCH)!r}); "
            f"import _counters; _counters.install(); "
            f"from {module} import {func}; sys.exit({func}())"
        )
        version.cli = lambda: [sys.executable, "-c", code]  # type: ignore[method-assign]
        os.environ["PYTUNNEL_COUNTERS"] = str(counted)
    print(
        f"{args.ref} = {version.commit}{' over TLS' if args.tls else ''}; "
        f"{args.streams} stream(s){f', iperf3 -t {args.iperf:g}' if args.iperf else ''}; "
        f"load {loadavg()}"
    )
    compare = str(Path(__file__).resolve().parent / "compare.py")
    targets_child = procs.start("targets", [sys.executable, compare, "--serve-targets"])

    def ports() -> list[int] | None:
        log = targets_child.log
        return parse_targets(log.read_text() if log.exists() else "")

    targets = Targets(*wait_for("targets", ports, 20, targets_child))
    iperf_pid = 0
    if args.iperf:
        iperf_port = free_port()
        iperf = procs.start("iperf3-server", ["iperf3", "-s", "-B", HOST, "-p", str(iperf_port)])
        wait_for(f"iperf3 server on {iperf_port}", lambda: listening(iperf_port), 10, iperf)
        iperf_pid = iperf.popen.pid
        targets.sink = iperf_port  # the sink's forward leads to iperf3
    start_tunnel(version, procs, targets, "profile-" + os.urandom(8).hex(), tmp)
    server, client = version.procs
    if args.iperf:
        run_iperf3(version.front["sink"], 1, args.streams, False)  # warm up
        run_iperf3(version.front["sink"], 1, args.streams, True)
    else:
        upload(version, 8 << 20)  # warm up
        download(version, 8 << 20)
    pids = [server.popen.pid, client.popen.pid]
    for rep in range(args.repeat):
        for direction, fn in (("upload", upload), ("download", download)):
            tools = []
            if args.strace or args.py_spy or args.perf or args.perf_stat:
                name = (
                    "strace"
                    if args.strace
                    else "perf"
                    if args.perf
                    else "perf-stat"
                    if args.perf_stat
                    else "py-spy"
                )
                for child in (server, client):
                    out = tmp / f"{name}-{child.name}-{direction}-{rep}.txt"
                    tools.append((child, out, attach(name, child.popen.pid, out)))
            counts = read_counters(pids, counted) if args.counters else {}
            before = {c.name: usage(c.popen.pid) for c in (server, client)}
            iperf_before = usage(iperf_pid)[:2] if iperf_pid else (0.0, 0.0)
            t0 = time.perf_counter()
            if args.iperf:
                moved, client_cpu = run_iperf3(
                    version.front["sink"], args.iperf, args.streams, direction == "download"
                )
            else:
                moved, client_cpu = parallel(fn, version, nbytes, args.streams), 0.0
            elapsed = time.perf_counter() - t0
            after = {c.name: usage(c.popen.pid) for c in (server, client)}
            iperf_after = usage(iperf_pid)[:2] if iperf_pid else (0.0, 0.0)
            counts_after = read_counters(pids, counted) if args.counters else {}
            for _, _, proc in tools:
                detach(proc)
            gb, mb = moved / 1e9, moved / 1e6
            print(
                f"[{rep + 1}] {direction}: {mb / elapsed:.0f} MB/s, {mb / 1e3:.2f} GB "
                f"(load {loadavg()})"
            )
            for child in (server, client):
                b, a = before[child.name], after[child.name]
                role = "serve  " if child is server else "connect"
                print(
                    f"    {role} user {(a[0] - b[0]) / gb:.2f} sys {(a[1] - b[1]) / gb:.2f} s/GB, "
                    f"{(a[2] - b[2]) / gb:.0f} minor faults/GB"
                )
            if args.iperf:
                server_cpu = sum(iperf_after) - sum(iperf_before)
                tunnel_cpu = sum(
                    sum(after[c.name][:2]) - sum(before[c.name][:2]) for c in (server, client)
                )
                print(
                    f"    iperf3 client {client_cpu / gb:.2f} s/GB, server {server_cpu / gb:.2f} "
                    f"s/GB; tunnel {tunnel_cpu / elapsed * 100:.0f} % CPU, "
                    f"{tunnel_cpu / gb:.2f} s/GB"
                )
            for child, out, _ in tools:
                role = "serve  " if child is server else "connect"
                if out.exists():
                    if args.strace:
                        text = strace_summary(out, mb)
                    elif args.perf_stat:
                        text = perf_stat_summary(out, mb)
                    elif args.perf:
                        text = perf_summary(out)
                    else:
                        text = pyspy_summary(out)
                    print(f"    {role} {text}")
            for child in (server, client) if args.counters else ():
                role = "serve  " if child is server else "connect"
                pid = child.popen.pid
                print(f"    {role} {counters_summary(counts[pid], counts_after[pid], mb)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
