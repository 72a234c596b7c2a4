#!/usr/bin/env python3
"""Cluster scale benchmark with real node processes: N ``pytunnel serve --cluster`` processes
on one real etcd on loopback, thousands of real client sessions from this process.

For each N (the node count) a fresh etcd and N nodes are started (each with a cluster secret,
so every node mirrors every other node's ports, as behind a balancer; node ``i`` publishes on
127.0.0.(11+i)); then:

- **registrations**: ``--clients`` tunnels, each with a client id and one remote forward
  (port 0), connect to the nodes round robin, ``--concurrency`` at a time: client connects
  (handshake, identity, claim, bind) per second, all nodes together;
- **engine operations per client connect**: etcd's own counters (``/metrics``:
  ``grpc_server_handled_total`` per method) before and after the burst, divided by the
  clients, so the figure is what the nodes really asked, keepalives shown apart;
- **watch fan-out**: events etcd sent to watchers per write (``etcd_debugging_mvcc_*``), and
  the time from the burst's start until every node mirrors every port held on the others
  (read from each node's admin API, polled only once the burst is over, so those reads are
  not counted above);
- **failover**: node 0 is killed (SIGKILL); the time until every port its clients held is
  served again (an echo through node 1's public address), its clients having reconnected
  to the next node in their list once the dead node's lease expired.

Every process is started by this script and stopped by its pid; every wait is bounded.

    python bench/bench_cluster_nodes.py                        # N = 2 4 8, 2000 clients, TTL 10
    python bench/bench_cluster_nodes.py --nodes 2 --clients 500
    python bench/bench_cluster_nodes.py --json out.json
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

import httpx
import trio
from bench_cluster import start_etcd

import pytunnel

TOKEN = "bench-cluster-token"
SECRET = "bench-cluster-secret, not the token"


def public_host(index: int) -> str:
    return f"127.0.0.{11 + index}"


class Node:
    """One ``pytunnel serve --cluster`` process, its control address and admin socket."""

    def __init__(self, process: trio.Process, index: int, admin: str) -> None:
        self.process = process
        self.index = index
        self.admin = admin
        self.address: tuple[str, int] = ("", 0)
        self._pending = b""

    @classmethod
    async def start(cls, index: int, etcd: str, work: str, ttl: int) -> Node:
        secret = os.path.join(work, "secret")
        await trio.Path(secret).write_text(SECRET + "\n")
        admin = os.path.join(work, f"n{index}.sock")
        process = await trio.lowlevel.open_process(
            [
                *(sys.executable, "-m", "pytunnel", "serve", "--listen", "127.0.0.1:0"),
                *("--public-host", public_host(index), "--cluster", etcd.replace("http", "etcd")),
                *("--node-id", f"n{index}", "--cluster-secret-file", secret),
                *("--cluster-lease-ttl", str(ttl), "--admin", f"unix:{admin}"),
                *("--max-pending-handshakes", "4096", "--max-handshakes-per-address", "4096"),
                *("--log-level", "error"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "PYTUNNEL_TOKEN": TOKEN},
        )
        node = cls(process, index, admin)
        listening = await node.line_with("listening on")
        host, port = listening.rsplit(" ", 1)[1].rsplit(":", 1)
        node.address = (host, int(port))
        await node.line_with("of the cluster at")
        return node

    async def line_with(self, text: str) -> str:
        assert self.process.stdout is not None
        with trio.fail_after(60):
            while True:
                while b"\n" in self._pending:
                    line, _, self._pending = self._pending.partition(b"\n")
                    if text in line.decode():
                        return line.decode()
                chunk = await self.process.stdout.receive_some()
                if not chunk:
                    raise RuntimeError(f"node {self.index} exited before saying {text!r}")
                self._pending += chunk

    async def cluster(self) -> dict[str, Any]:
        """The registry and links as this node sees them (its admin API)."""
        transport = httpx.AsyncHTTPTransport(uds=self.admin)
        async with httpx.AsyncClient(transport=transport, timeout=30.0) as http:
            reply = await http.get("http://localhost/api/cluster")
        view: dict[str, Any] = reply.json()
        return view

    async def mirrored(self) -> int:
        """How many ports this node mirrors now."""
        return len((await self.cluster())["links"]["mirrored_ports"])

    async def entries(self) -> dict[str, str]:
        entries: dict[str, str] = (await self.cluster())["entries"]
        return entries

    async def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, sig)  # by pid: ours
        with trio.move_on_after(10):
            await self.process.wait()
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            await self.process.wait()


_SAMPLE = re.compile(r"^(\w+)(?:\{(.*)\})? ([0-9.e+-]+)$")


async def etcd_counters(endpoint: str) -> dict[str, float]:
    """etcd's counters that say what it was asked: gRPC calls by method, writes, events."""
    async with httpx.AsyncClient(timeout=10.0) as http:
        text = (await http.get(f"{endpoint}/metrics")).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None:
            continue
        name, labels, value = match.groups()
        if name == "grpc_server_handled_total":
            method = re.search(r'grpc_method="(\w+)"', labels or "")
            if method:
                out[method.group(1)] = out.get(method.group(1), 0) + float(value)
        elif name in (
            "etcd_debugging_mvcc_put_total",
            "etcd_debugging_mvcc_delete_total",
            "etcd_debugging_mvcc_events_total",
            "etcd_debugging_mvcc_txn_total",
        ):
            out[name.replace("etcd_debugging_mvcc_", "")] = float(value)
    return out


async def echo(stream: trio.SocketStream) -> None:
    try:
        async for chunk in stream:
            await stream.send_all(chunk)
        await stream.send_eof()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def served(host: str, port: int) -> bool:
    try:
        with trio.fail_after(5):
            stream = await trio.open_tcp_stream(host, port)
            async with stream:
                await stream.send_all(b"ping")
                await stream.send_eof()
                got = b""
                while chunk := await stream.receive_some():
                    got += chunk
                return got == b"ping"
    except (OSError, trio.BrokenResourceError, trio.TooSlowError):
        return False


async def run_one(args: argparse.Namespace, count: int, work: str) -> dict[str, Any]:
    # its health wait in a thread: the loop is already running
    etcd, endpoint = await trio.to_thread.run_sync(start_etcd, os.path.join(work, "etcd"))
    nodes: list[Node] = []
    try:
        for index in range(count):
            nodes.append(await Node.start(index, endpoint, work, args.ttl))
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(
                functools.partial(trio.serve_tcp, echo, 0, host="127.0.0.1")
            )
            echo_port = int(listeners[0].socket.getsockname()[1])
            ports: dict[int, int] = {}  # client -> its public port
            refused = [0, 0]  # claims refused with CLUSTER_UNAVAILABLE; connects failed
            limit = trio.Semaphore(args.concurrency)
            addresses = [n.address for n in nodes]
            before = await etcd_counters(endpoint)

            async def connect(i: int) -> None:
                first = i % count
                order = addresses[first:] + addresses[:first]  # its node, then the next ones
                async with limit:
                    for _ in range(20):
                        try:
                            tunnel = await pytunnel.connect_tunnel(
                                nursery,
                                order,
                                token=TOKEN,
                                client_id=f"c{i}",
                                backoff_initial=0.2,
                                backoff_max=args.backoff_max,
                                backoff_jitter=0.0,
                            )
                        except pytunnel.ConnectError:  # a node too busy: its backlog, a reset
                            refused[1] += 1
                            await trio.sleep(0.5)
                            continue
                        try:
                            forward = await tunnel.forward_remote("127.0.0.1", echo_port)
                            break
                        except pytunnel.ClusterUnavailableError:
                            # a node too busy to renew its lease in time refuses claims
                            refused[0] += 1
                            await tunnel.aclose()
                            await trio.sleep(0.5)
                    else:
                        raise RuntimeError(f"client {i}: refused 20 times")
                    ports[i] = forward.address[1]

            started = time.perf_counter()
            with trio.fail_after(args.timeout):
                async with trio.open_nursery() as burst:
                    for i in range(args.clients):
                        burst.start_soon(connect, i)
            connected = time.perf_counter()
            after = await etcd_counters(endpoint)
            # each port is mirrored by every node but its owner's (a client whose first
            # connect failed may be on another node than the one it was sent to)
            # (a mirror whose bind keeps failing is logged by its node and given up: the
            # wait ends when every port is mirrored or nothing changed for 10 s)
            expected = (count - 1) * len(ports)
            mirrored, last_change = -1, time.perf_counter()
            with trio.fail_after(args.timeout):
                while True:
                    now = sum([await n.mirrored() for n in nodes])
                    if now != mirrored:
                        mirrored, last_change = now, time.perf_counter()
                    if mirrored >= expected or time.perf_counter() - last_change > 10:
                        break
                    await trio.sleep(0.2)
            fanout = last_change - started

            # failover: node 0 dies; its clients go to the next node once its lease expires
            held = await nodes[1].entries()
            victims = sorted(
                int(key[4:])
                for key, owner in held.items()
                if key.startswith("tcp/") and owner.startswith("n0/")
            )
            profiler = None
            if args.profile_failover:  # the survivor, from the kill to the last restore
                profiler = await trio.lowlevel.open_process(
                    [
                        *("py-spy", "record", "--nonblocking", "--format", "raw"),
                        *("-o", args.profile_failover, "--pid", str(nodes[1].process.pid)),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                await trio.sleep(1.0)
            before_failover = await etcd_counters(endpoint)
            killed = time.perf_counter()
            await nodes[0].stop(signal.SIGKILL)
            probe = public_host(1)
            pending = set(victims)
            first_served: dict[int, float] = {}  # port -> when a probe first got its echo
            with trio.fail_after(args.timeout):
                while pending:
                    done: set[int] = set()

                    async def check(port: int, done: set[int] = done) -> None:
                        async with limit:
                            if await served(probe, port):
                                done.add(port)
                                first_served[port] = time.perf_counter()

                    async with trio.open_nursery() as probes:
                        for port in pending:
                            probes.start_soon(check, port)
                    pending -= done
                    if pending:
                        await trio.sleep(0.2)
            failover = time.perf_counter() - killed
            after_failover = await etcd_counters(endpoint)
            # the restores themselves: from the first port served again to the last (the
            # lease's remainder before the first is the engine's, not the survivor's)
            served_at = sorted(first_served.values())
            restore_window = served_at[-1] - served_at[0] if served_at else 0.0
            if args.profile_failover and profiler is not None:
                profiler.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
            if profiler is not None:
                with trio.move_on_after(30):
                    await profiler.wait()
                if profiler.poll() is None:
                    profiler.kill()  # by its handle: ours
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            for node in nodes:
                await node.stop()
            if etcd.poll() is None:
                os.kill(etcd.pid, signal.SIGKILL)  # by pid: ours
            await trio.to_thread.run_sync(etcd.wait)
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    moved = {k: after_failover.get(k, 0) - before_failover.get(k, 0) for k in after_failover}
    clients = args.clients
    unary = ("Txn", "Put", "Range", "DeleteRange", "LeaseGrant", "LeaseRevoke")
    writes = delta.get("put_total", 0) + delta.get("delete_total", 0)
    return {
        "nodes": count,
        "clients": clients,
        "concurrency": args.concurrency,
        "ttl": args.ttl,
        "connects_per_s": clients / (connected - started),
        "burst_s": connected - started,
        "engine_ops_per_connect": {m: delta.get(m, 0) / clients for m in unary if delta.get(m)},
        "keepalive_streams": delta.get("LeaseKeepAlive", 0),
        "writes": writes,
        "watch_events": delta.get("events_total", 0),
        "events_per_write": delta.get("events_total", 0) / writes if writes else 0.0,
        "all_nodes_mirror_all_s": fanout,
        "mirrors": mirrored,
        "mirrors_expected": expected,
        "claims_refused_retried": refused[0],
        "connects_failed_retried": refused[1],
        "failover_clients": len(victims),
        "failover_s": failover,
        "engine_ops_per_restore": {
            m: moved.get(m, 0) / len(victims)
            for m in ("Txn", "Put", "Range", "DeleteRange")
            if victims and moved.get(m)
        },
        "restore_window_s": restore_window,
        "restores_per_s": len(victims) / restore_window if restore_window else 0.0,
    }


async def main(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for count in args.nodes:
        with tempfile.TemporaryDirectory() as work:
            row = await run_one(args, count, work)
        rows.append(row)
        ops = " ".join(f"{m} {v:.2f}" for m, v in row["engine_ops_per_connect"].items())
        print(
            f"nodes {count:>2}  clients {row['clients']}  connects/s {row['connects_per_s']:6.0f}  "
            f"engine ops/connect: {ops}  keepalives {row['keepalive_streams']:.0f}  "
            f"events/write {row['events_per_write']:.2f}  "
            f"mirrors {row['mirrors']}/{row['mirrors_expected']} after "
            f"{row['all_nodes_mirror_all_s']:.1f} s  "
            f"failover of {row['failover_clients']} clients {row['failover_s']:.1f} s "
            f"(restores over {row['restore_window_s']:.1f} s: {row['restores_per_s']:.0f}/s; "
            f"engine ops/restore: "
            + " ".join(f"{m} {v:.2f}" for m, v in row["engine_ops_per_restore"].items())
            + ")  "
            f"retried: claims {row['claims_refused_retried']} "
            f"connects {row['connects_failed_retried']}  "
            f"(load {os.getloadavg()[0]:.1f})",
            flush=True,
        )
    return rows


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--clients", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64, help="client connects in flight")
    parser.add_argument("--ttl", type=int, default=10, help="the nodes' lease TTL, seconds")
    parser.add_argument("--timeout", type=float, default=300, help="bound of each phase, s")
    parser.add_argument(
        "--backoff-max", type=float, default=1.0, help="the clients' reconnect backoff cap, s"
    )
    parser.add_argument("--json", metavar="FILE")
    parser.add_argument(
        "--profile-failover",
        metavar="FILE",
        help="py-spy record (raw format) of the surviving node 1 during the failover",
    )
    args = parser.parse_args()
    print(
        f"{' '.join(sys.argv)}; load average {os.getloadavg()[0]:.2f}; {os.cpu_count()} cores",
        flush=True,
    )
    rows = trio.run(main, args)
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    cli()
