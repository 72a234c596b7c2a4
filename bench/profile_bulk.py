#!/usr/bin/env python3
"""Where a bulk transfer's CPU goes, per tunnel process: ``pytunnel serve`` + ``connect -L``
of one tree (``compare.py``'s tunnel), plain or TLS, one upload and one download of
``--mib`` MiB each, and for each process and direction its user and system CPU per GB, its
minor page faults per GB and, with ``--strace``, its system calls per MB (``strace -c -f``
attached by pid for the transfer) or, with ``--py-spy``, its hottest Python functions
(``py-spy record --format raw``, attached by pid, summarised by own samples).

    python bench/profile_bulk.py                    # this checkout, plain, 512 MiB each way
    python bench/profile_bulk.py --tls --strace     # TLS, with system call counts
    python bench/profile_bulk.py --ref main --py-spy

Upload: the client (``connect``) reads the local socket and sends Data frames, the server
decodes them and writes to the target; download the other way round. Attaching ``strace``
slows a process down several times: read its counts, not the CPU of that run.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _probes import parse_targets
from bench_tunnel import TICK, BenchError, Processes, loadavg, proc_stat, run_dir, wait_for
from compare import Targets, check_imports, checkout, download, start_tunnel, upload


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
    tool = p.add_mutually_exclusive_group()
    tool.add_argument("--strace", action="store_true")
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


def run(args: argparse.Namespace, procs: Processes, nbytes: int, gb: float, mb: float) -> int:
    tmp = procs.tmp
    version = checkout("NEW", args.ref, tmp)
    version.tls = args.tls
    check_imports(version)
    print(f"{args.ref} = {version.commit}{' over TLS' if args.tls else ''}; load {loadavg()}")
    compare = str(Path(__file__).resolve().parent / "compare.py")
    targets_child = procs.start("targets", [sys.executable, compare, "--serve-targets"])

    def ports() -> list[int] | None:
        log = targets_child.log
        return parse_targets(log.read_text() if log.exists() else "")

    targets = Targets(*wait_for("targets", ports, 20, targets_child))
    start_tunnel(version, procs, targets, "profile-" + os.urandom(8).hex(), tmp)
    server, client = version.procs
    upload(version, 8 << 20)  # warm up
    download(version, 8 << 20)
    for rep in range(args.repeat):
        for direction, fn in (("upload", upload), ("download", download)):
            tools = []
            if args.strace or args.py_spy or args.perf:
                name = "strace" if args.strace else "perf" if args.perf else "py-spy"
                for child in (server, client):
                    out = tmp / f"{name}-{child.name}-{direction}-{rep}.txt"
                    tools.append((child, out, attach(name, child.popen.pid, out)))
            before = {c.name: usage(c.popen.pid) for c in (server, client)}
            rate = fn(version, nbytes)
            after = {c.name: usage(c.popen.pid) for c in (server, client)}
            for _, _, proc in tools:
                detach(proc)
            print(f"[{rep + 1}] {direction}: {rate:.0f} MB/s (load {loadavg()})")
            for child in (server, client):
                b, a = before[child.name], after[child.name]
                role = "serve  " if child is server else "connect"
                print(
                    f"    {role} user {(a[0] - b[0]) / gb:.2f} sys {(a[1] - b[1]) / gb:.2f} s/GB, "
                    f"{(a[2] - b[2]) / gb:.0f} minor faults/GB"
                )
            for child, out, _ in tools:
                role = "serve  " if child is server else "connect"
                if out.exists():
                    if args.strace:
                        text = strace_summary(out, mb)
                    elif args.perf:
                        text = perf_summary(out)
                    else:
                        text = pyspy_summary(out)
                    print(f"    {role} {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
