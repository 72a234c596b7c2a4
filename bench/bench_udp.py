#!/usr/bin/env python3
"""UDP forwarding benchmark over loopback: ``iperf3 -u`` at fixed offered rates, direct to the
iperf3 server and through ``pytunnel connect -L P:HOST:IPERF/udp``, side by side in one run.

iperf3 -u also needs its TCP control connection, on the same port number as the UDP data, so
the tunnel carries two forwards on one local port P: ``-L P:127.0.0.1:IPERF`` (TCP) and
``-L P:127.0.0.1:IPERF/udp``.

Figures per offered rate and path, each the median of ``--repeat`` samples (3): the rate the
client sent, the rate the server received (``end.sum_received``), loss % and jitter (the
server's, as the client reports them in ``end.sum``), the received rate as a ratio to direct,
the CPU time of the two pytunnel processes over the sample, and that CPU time per datagram
delivered (µs): a figure that depends much less on how busy the machine is than the rates.

Where the datagrams were lost, per sample (medians in the table): the kernel's drops on the
tunnel's UDP listener, on the server's socket to the target and on the iperf3 server's
socket (the "drops" column of /proc/net/udp, polled during the sample), pytunnel's own
counts (the client's ``--status-interval`` ``dropped=``, which includes the kernel's drops
on its sockets, and the server's ``pytunnel_server_udp_dropped`` from ``--metrics``), and
the machine's ``Udp`` RcvbufErrors / SndbufErrors (every process's). ``--window`` passes
``iperf3 -w`` to both iperf3 ends, so the receiving iperf3 reads with that receive buffer.

``--baseline REV`` also runs the code of git revision REV (``git archive`` of its ``src`` into
the run's folder, put first on ``PYTHONPATH`` of a second tunnel's two processes), so OLD and
NEW are measured side by side in one run, samples interleaved.

Every process (iperf3 server, ``pytunnel serve``, ``pytunnel connect``) is a child started and
ended by its pid through ``bench_tunnel.Processes``; every loop is bounded.

    python bench/bench_udp.py            # 10M 50M 100M 200M, 3 x 5 s, ~3 min
    python bench/bench_udp.py --quick    # 1 x 2 s, 3 rates, ~30 s
    python bench/bench_udp.py --reverse  # also -R (server -> client)
    python bench/bench_udp.py --json out.json
    python bench/bench_udp.py --quick --baseline main --rates 100M,200M,400M
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _quiet import wait_quiet
from bench_tunnel import (
    HOST,
    QUIET_THRESHOLD,
    BenchError,
    Child,
    Processes,
    _read,
    cpu_ticks,
    default_pytunnel,
    fmt,
    listening,
    loadavg,
    median,
    run,
    run_dir,
    wait_for,
    which,
)

CLK_TCK = os.sysconf("SC_CLK_TCK")


def udp_bound(port: int) -> bool:
    """Whether a UDP socket is bound to ``port``, from /proc/net/udp*."""
    suffix = f":{port:04X}"
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        for line in (_read(table) or "").splitlines()[1:]:
            parts = line.split()
            if len(parts) > 1 and parts[1].endswith(suffix):
                return True
    return False


def udp_sockets() -> dict[int, tuple[int, int, int]]:
    """Every UDP socket on the machine: inode -> (local port, remote port, drops), the
    kernel's per-socket count of datagrams it dropped for want of receive buffer (the
    last column of /proc/net/udp*)."""
    found: dict[int, tuple[int, int, int]] = {}
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        for line in (_read(table) or "").splitlines()[1:]:
            parts = line.split()
            if len(parts) < 13:
                continue
            try:
                local = int(parts[1].rsplit(":", 1)[1], 16)
                remote = int(parts[2].rsplit(":", 1)[1], 16)
                found[int(parts[9])] = (local, remote, int(parts[12]))
            except ValueError:
                continue
    return found


def udp_snmp() -> dict[str, int]:
    """The machine's ``Udp:`` counters from /proc/net/snmp (RcvbufErrors, SndbufErrors, ...):
    every process's, so other work on the machine shows in them too."""
    text = _read("/proc/net/snmp") or ""
    lines = [x.split() for x in text.splitlines() if x.startswith("Udp:")]
    if len(lines) < 2:
        return {}
    return {k: int(v) for k, v in zip(lines[0][1:], lines[1][1:], strict=False)}


class DropWatch:
    """Kernel drop counts per hop over one sample, by polling /proc/net/udp from a thread
    (the iperf3 server's data socket lives only as long as its test): for each socket the
    drops it gained between the first and the last time it was seen, summed per hop, the
    hop told by its ports (``front``: the tunnel's UDP listener; ``target``: the iperf3
    server's port)."""

    def __init__(self, front: int | None, target: int) -> None:
        self.front, self.target = front, target
        self.first: dict[int, int] = {}
        self.last: dict[int, tuple[int, int, int]] = {}
        self.snmp0: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _poll(self) -> None:
        for inode, (local, remote, drops) in udp_sockets().items():
            self.first.setdefault(inode, drops)
            self.last[inode] = (local, remote, drops)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self._poll()

    def __enter__(self) -> DropWatch:
        self.snmp0 = udp_snmp()
        self._poll()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self._poll()

    def result(self) -> dict[str, int]:
        hops = {"drops_listener": 0, "drops_target": 0, "drops_tunnel_target_socket": 0}
        for inode, (local, remote, drops) in self.last.items():
            gained = drops - self.first.get(inode, drops)
            if self.front is not None and local == self.front:
                hops["drops_listener"] += gained
            elif local == self.target:
                hops["drops_target"] += gained
            elif remote == self.target:
                hops["drops_tunnel_target_socket"] += gained
        snmp = udp_snmp()
        for key in ("RcvbufErrors", "SndbufErrors", "InErrors"):
            if key in snmp and key in self.snmp0:
                hops[f"snmp_{key}"] = snmp[key] - self.snmp0[key]
        return hops


def free_port_both() -> int:
    """A port free for both TCP and UDP on HOST (bounded tries)."""
    for _ in range(200):
        with socket.socket() as t:
            t.bind((HOST, 0))
            port = int(t.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                try:
                    u.bind((HOST, port))
                except OSError:
                    continue
                return port
    raise BenchError("no port free for both TCP and UDP")


def parse_rate(text: str) -> float:
    mult = {"K": 1e3, "M": 1e6, "G": 1e9}
    t = text.strip().upper()
    return float(t[:-1]) * mult[t[-1]] if t[-1] in mult else float(t)


@dataclass
class Tunnel:
    """One ``pytunnel serve`` + ``pytunnel connect`` pair and the local port P it forwards."""

    server: Child
    client: Child
    front: int
    #: The server's ``--metrics`` port.
    metrics: int

    def cpu(self) -> int:
        return sum(cpu_ticks(c.pid) for c in (self.client, self.server))

    def server_dropped(self) -> int | None:
        """The server's ``pytunnel_server_udp_dropped`` (datagrams its associations dropped:
        stream queue full, sendto failed or its buffer full too long), ``None`` if it has no
        such metric (older code)."""
        try:
            with urllib.request.urlopen(f"http://{HOST}:{self.metrics}/metrics", timeout=5) as r:
                text = r.read().decode()
        except OSError:
            return None
        found = re.search(r"^pytunnel_server_udp_dropped(?:_total)? (\S+)$", text, re.M)
        return int(float(found.group(1))) if found else None

    def status(self) -> tuple[int, int | None]:
        """How many status reports ``connect --status-interval`` printed so far, and the UDP
        forward's ``dropped=`` in the last one: datagrams pytunnel itself dropped on the
        listening side (session write buffer full, association refused, ...)."""
        reports = [
            line for line in (_read(str(self.client.log)) or "").splitlines()
            if line.startswith("status ") and " udp " in line
        ]  # fmt: skip
        found = re.findall(r"dropped=(\d+)", reports[-1]) if reports else []
        return len(reports), (int(found[0]) if found else None)

    def dropped_after(self, before: tuple[int, int | None]) -> int | None:
        """The UDP forward's drops since ``before`` (a :meth:`status`), from the first
        report printed after it (waited for, at most 3 s)."""
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            now = self.status()
            if now[0] > before[0] and now[1] is not None and before[1] is not None:
                return now[1] - before[1]
            time.sleep(0.1)
        return None


def export_source(rev: str, dest: Path) -> Path:
    """``src`` of git revision ``rev`` of this repository, unpacked under ``dest``."""
    repo = Path(__file__).resolve().parent.parent
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", "-C", str(repo), "archive", rev, "src"], capture_output=True, check=False
    )
    if archive.returncode != 0:
        raise BenchError(f"git archive {rev}: {archive.stderr.decode(errors='replace')}")
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest / "src"


class Bench:
    def __init__(self, args: argparse.Namespace, procs: Processes, tmp: Path) -> None:
        self.args = args
        self.procs = procs
        self.tmp = tmp
        self.iperf3 = which("iperf3")
        if not self.iperf3:
            raise BenchError("iperf3 not found (bench/setup_tools.sh)")
        self.token = "bench-" + os.urandom(12).hex()
        self.iperf_port = 0
        self.iperf_child: Child | None = None
        #: "pytunnel" (the code this runs with) and, with --baseline, "baseline".
        self.tunnels: dict[str, Tunnel] = {}
        self.commands: list[str] = []

    def start_iperf(self) -> None:
        if self.iperf_child is not None:
            self.procs.stop(self.iperf_child)
        port = self.iperf_port or free_port_both()
        argv = [self.iperf3, "-s", "-B", HOST, "-p", str(port)]
        child = self.procs.start("iperf3-server", argv)
        wait_for(f"iperf3 server on {port}", lambda: listening(port), 10, child)
        self.iperf_port, self.iperf_child = port, child
        if len(self.commands) == 0:
            self.commands.append(shlex.join(argv))

    def start_tunnel(self, key: str, pythonpath: str | None = None) -> Tunnel:
        pt = self.args.pytunnel
        metrics = free_port_both()
        argv_s = [pt, "serve", "--listen", f"{HOST}:0", "--log-level", "warning"]
        argv_s += ["--metrics", f"{HOST}:{metrics}"]
        env = {"PYTUNNEL_TOKEN": self.token}
        if pythonpath is not None:
            env["PYTHONPATH"] = pythonpath
        server = self.procs.start(f"{key}-serve", argv_s, env=env)

        def address() -> int | None:
            m = _read(str(server.log)) or ""
            import re

            found = re.search(r"pytunnel server listening on \S+:(\d+)", m)
            return int(found.group(1)) if found else None

        sport = wait_for("pytunnel server address", address, 20, server)
        front = free_port_both()
        t = f"{HOST}:{self.iperf_port}"
        argv_c = [
            pt, "connect", f"{HOST}:{sport}", "--log-level", "warning", "--status-interval", "0.5",
            "-L", f"{front}:{t}", "-L", f"{front}:{t}/udp",
        ]  # fmt: skip
        client = self.procs.start(f"{key}-connect", argv_c, env=env)
        wait_for(
            "pytunnel -L forwards",
            lambda: (
                "local udp forward" in (_read(str(client.log)) or "")
                and listening(front)
                and udp_bound(front)
            ),
            20,
            client,
        )
        prefix = "PYTUNNEL_TOKEN=... " + (f"PYTHONPATH={pythonpath} " if pythonpath else "")
        self.commands += [prefix + shlex.join(argv_s), prefix + shlex.join(argv_c)]
        tunnel = self.tunnels[key] = Tunnel(server, client, front, metrics)
        return tunnel

    def iperf_argv(self, port: int, rate: str, reverse: bool) -> list[str]:
        a = self.args
        argv = [
            self.iperf3, "-c", HOST, "-p", str(port), "-u", "-b", rate,
            "-l", str(a.length), "-t", f"{a.seconds:g}", "-J", "--connect-timeout", "5000",
        ]  # fmt: skip
        if a.window:
            argv += ["-w", a.window]
        return argv + (["-R"] if reverse else [])

    def sample(self, path: str, rate: str, reverse: bool) -> dict:
        tunnel = self.tunnels.get(path)
        port = self.iperf_port if tunnel is None else tunnel.front
        argv = self.iperf_argv(port, rate, reverse)
        busy = wait_quiet(self.args.quiet_wait, QUIET_THRESHOLD)
        cpu0, t0 = (tunnel.cpu() if tunnel else 0), time.monotonic()
        status0 = tunnel.status() if tunnel else None
        server0 = tunnel.server_dropped() if tunnel else None
        out: dict = {"path": path, "rate": rate, "reverse": reverse, "cmd": shlex.join(argv)}
        out["busy_before"] = round(busy, 3)
        watch = DropWatch(tunnel.front if tunnel else None, self.iperf_port)
        try:
            with watch:
                r = run(argv, self.args.seconds + 30)
            data = json.loads(r.stdout)
        except (json.JSONDecodeError, OSError) as exc:
            out["error"] = f"no JSON: {exc}"
            return out
        except Exception as exc:  # subprocess.TimeoutExpired
            out["error"] = repr(exc)
            return out
        wall = time.monotonic() - t0
        cpu_s = ((tunnel.cpu() if tunnel else 0) - cpu0) / CLK_TCK
        out["tunnel_cpu_pct"] = 100.0 * cpu_s / wall
        out.update(watch.result())
        if tunnel is not None and status0 is not None:
            dropped = tunnel.dropped_after(status0)
            if dropped is not None:
                out["pytunnel_dropped"] = dropped
        if tunnel is not None and server0 is not None:
            server1 = tunnel.server_dropped()
            if server1 is not None:
                out["pytunnel_server_dropped"] = server1 - server0
        if "error" in data:
            out["error"] = data["error"]
            return out
        end = data.get("end", {})
        s = end.get("sum", {})
        sent = end.get("sum_sent", s).get("bits_per_second")
        recv = end.get("sum_received", {}).get("bits_per_second")
        lost = s.get("lost_percent")
        if recv is None and sent is not None and lost is not None:
            recv = sent * (1 - lost / 100)
        out.update(
            sum_bps=s.get("bits_per_second"),
            sent_bps=sent,
            recv_bps=recv,
            lost_percent=lost,
            lost_packets=s.get("lost_packets"),
            packets=s.get("packets"),
            jitter_ms=s.get("jitter_ms"),
        )
        packets, lost_packets = s.get("packets"), s.get("lost_packets")
        if tunnel is not None and packets and lost_packets is not None and packets > lost_packets:
            out["cpu_us_per_datagram"] = cpu_s * 1e6 / (packets - lost_packets)
        return out


#: Drop counters of a sample, in the order of the hops, and their short names.
DROP_KEYS = (
    ("drops_listener", "listener"),
    ("pytunnel_dropped", "pytunnel-client"),
    ("pytunnel_server_dropped", "pytunnel-server"),
    ("drops_tunnel_target_socket", "tunnel-target-sock"),
    ("drops_target", "iperf3-server"),
    ("snmp_RcvbufErrors", "Rcvbuf"),
    ("snmp_SndbufErrors", "Sndbuf"),
)


def drop_summary(s: dict) -> str:
    """The sample's drop counters, one ``name=count`` per hop it has."""
    return " ".join(f"{name}={s[key]}" for key, name in DROP_KEYS if key in s)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 repeat, 2 s samples, 10M/100M/200M")
    p.add_argument("--rates", default=None, help="offered rates, comma separated (10M,50M,...)")
    p.add_argument("--repeat", type=int, default=None)
    p.add_argument("--seconds", type=float, default=None)
    p.add_argument("--length", type=int, default=1400, help="datagram payload (iperf3 -l)")
    p.add_argument("--reverse", action="store_true", help="also run -R (server sends)")
    p.add_argument(
        "--window",
        default=None,
        help="iperf3 -w: socket buffer of both iperf3 ends (the receiving iperf3's receive "
        "buffer; default: the kernel's, net.core.rmem_default)",
    )
    p.add_argument("--quiet-wait", type=float, default=3.0, help="max s to wait for idle CPU")
    p.add_argument("--pytunnel", default=default_pytunnel())
    p.add_argument("--json", type=Path, default=None, help="write every sample here")
    p.add_argument(
        "--baseline", default=None, metavar="REV", help="also run git revision REV (OLD vs NEW)"
    )
    a = p.parse_args(argv)
    if a.rates is None:
        a.rates = "10M,100M,200M" if a.quick else "10M,50M,100M,200M"
    a.rates = [r.strip() for r in a.rates.split(",") if r.strip()]
    a.repeat = a.repeat or (1 if a.quick else 3)
    a.seconds = a.seconds or (2.0 if a.quick else 5.0)
    a.repeat = max(1, min(a.repeat, 20))
    return a


def report(samples: list[dict], args, log) -> None:
    paths = [("direct", "direct")]
    if args.baseline:
        paths.append(("baseline", f"pytunnel {args.baseline} (OLD)"))
    paths.append(("pytunnel", "pytunnel -L …/udp" + (" (NEW)" if args.baseline else "")))
    dirs = [False, True] if args.reverse else [False]
    log("")
    log(
        "| offered | dir | path | sent Mbit/s | received Mbit/s | loss % | jitter ms "
        "| recv vs direct | pytunnel CPU % | CPU µs/datagram | drops: listener / pytunnel client "
        "/ pytunnel server / iperf3 server | n |"
    )
    log("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for reverse in dirs:
        for rate in args.rates:
            ref = None
            for key, label in paths:
                ok = [
                    s for s in samples
                    if s["path"] == key and s["rate"] == rate and s["reverse"] == reverse
                    and "error" not in s
                ]  # fmt: skip
                errs = sum(
                    1 for s in samples
                    if s["path"] == key and s["rate"] == rate and s["reverse"] == reverse
                    and "error" in s
                )  # fmt: skip

                def med(k: str, ok=ok) -> float | None:
                    return median([s[k] for s in ok if s.get(k) is not None])

                sent, recv = med("sent_bps"), med("recv_bps")
                if key == "direct":
                    ref = recv
                rel = "-" if recv is None or not ref else f"{recv / ref:.2f}x"
                cpu = med("tunnel_cpu_pct") if key != "direct" else None
                per = med("cpu_us_per_datagram") if key != "direct" else None
                n = f"{len(ok)}" + (f" ({errs} failed)" if errs else "")
                drops = " / ".join(
                    fmt(med(k), 0) if key != "direct" or k == "drops_target" else "-"
                    for k in (
                        "drops_listener",
                        "pytunnel_dropped",
                        "pytunnel_server_dropped",
                        "drops_target",
                    )
                )
                log(
                    f"| {rate} | {'-R' if reverse else 'c→s'} | {label} "
                    f"| {fmt(sent and sent / 1e6, 1)} | {fmt(recv and recv / 1e6, 1)} "
                    f"| {fmt(med('lost_percent'), 2)} | {fmt(med('jitter_ms'), 3)} | {rel} "
                    f"| {fmt(cpu, 0)} | {fmt(per, 1)} | {drops} | {n} |"
                )
    failed = [s for s in samples if "error" in s]
    for s in failed[:10]:
        log(f"failed: {s['path']} {s['rate']}{' -R' if s['reverse'] else ''}: {s['error']}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    print("command:", shlex.join([sys.executable, *sys.argv]), flush=True)

    def log(line: str = "") -> None:
        print(line, flush=True)

    with run_dir("pytunnel-bench-udp-") as procs:
        return _main(args, procs, log)


def _main(args: argparse.Namespace, procs: Processes, log: Callable[[str], None]) -> int:
    try:
        b = Bench(args, procs, procs.tmp)
        b.start_iperf()
        if args.baseline:
            b.start_tunnel("baseline", str(export_source(args.baseline, procs.tmp / "baseline")))
        b.start_tunnel("pytunnel")
        log(f"nproc {os.cpu_count()}, loadavg {loadavg()}, {args.repeat} x {args.seconds:g} s, "
            f"-l {args.length}, rates {','.join(args.rates)}")  # fmt: skip
        log("processes:")
        for c in b.commands:
            log(f"    {c}")
        log("clients (per sample):")
        for rate in args.rates[:1]:
            log(f"    direct:   {shlex.join(b.iperf_argv(b.iperf_port, rate, False))}")
            for key, tunnel in b.tunnels.items():
                log(f"    {key}: {shlex.join(b.iperf_argv(tunnel.front, rate, False))}")
        log("    (-b varies per row; --reverse adds -R)")
        samples: list[dict] = []
        order = ["direct", *b.tunnels]
        dirs = [False, True] if args.reverse else [False]
        for reverse in dirs:
            for rate in args.rates:
                for rep in range(args.repeat):
                    k = rep % len(order)
                    rot = order[k:] + order[:k]
                    for path in rot:
                        s = b.sample(path, rate, reverse)
                        samples.append(s)
                        tag = f"{rate}{' -R' if reverse else ''} {path} #{rep + 1}"
                        if "error" in s:
                            log(f"  {tag}: ERROR {s['error']}")
                            # an aborted test can leave iperf3 -s wedged: restart it
                            b.start_iperf()
                        else:
                            log(
                                f"  {tag}: sent {s['sent_bps'] / 1e6:.1f} recv "
                                f"{(s['recv_bps'] or 0) / 1e6:.1f} Mbit/s, loss "
                                f"{s['lost_percent']:.2f}%, jitter {s['jitter_ms']:.3f} ms"
                                + (f", tunnel CPU {s['tunnel_cpu_pct']:.0f}%"
                                   if path != "direct" else "")
                                + (f", {s['cpu_us_per_datagram']:.1f} µs/datagram"
                                   if "cpu_us_per_datagram" in s else "")
                                + f"; drops {drop_summary(s)}"
                            )  # fmt: skip
                        for c in [x for t in b.tunnels.values() for x in (t.client, t.server)]:
                            if not c.alive():
                                raise BenchError(f"{c.name} died:\n{c.log_tail()}")
        report(samples, args, log)
        warn = [
            x for x in (_read(str(b.tunnels["pytunnel"].client.log)) or "").splitlines()
            if not x.startswith(("connected to", "local forward", "local udp forward"))
        ]  # fmt: skip
        if warn:
            log("\npytunnel connect log (after the forward lines):")
            for line in warn[-10:]:
                log(f"    {line}")
        served = [
            x for x in (_read(str(b.tunnels["pytunnel"].server.log)) or "").splitlines()
            if not x.startswith("pytunnel server listening")
        ]  # fmt: skip
        if served:
            log("\npytunnel serve log:")
            for line in served[-20:]:
                log(f"    {line}")
        if args.json:
            meta = vars(args) | {"json": str(args.json)}
            args.json.write_text(json.dumps({"args": meta, "samples": samples}, indent=1))
        return 0
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
