#!/usr/bin/env python3
"""Cluster registry benchmark: the engine's costs of a cluster, against a real etcd on
loopback, with many simulated nodes and clients in one process.

A "node" is an ``EtcdRegistry`` with its own lease, HTTP client and watch of ``clients/``, as a
``pytunnel serve --cluster`` node has; a "client connect" is what the server asks of the
engine when a client with an identity connects and opens one remote forward: ``replace`` of
``clients/<id>``, ``claim`` of ``tcp/<port>``; its disconnect is the two releases. Reported:

- registrations per second (client connects, all nodes together) at a given concurrency;
- engine requests per client connect and disconnect (counted, not estimated);
- watch fan-out: the time until every node's watch has seen every client key of a burst,
  and the events delivered (nodes x changes);
- failover: from a node's last lease renewal to the moment another node's watch sees its
  keys deleted, for each lease TTL asked for (what a client waits, at most, before its port
  can be taken on another node; the CLI test measures the same end to end).

etcd is started by this script in a temporary directory and stopped by its pid.

    python bench/bench_cluster.py                      # 4 nodes, 2000 clients, TTL 2 and 5
    python bench/bench_cluster.py --nodes 1 2 4 8 --clients 1000 --ttl 2
    python bench/bench_cluster.py --json out.json
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

import httpx
import trio

from pytunnel.cluster import Change, EtcdRegistry


class CountingRegistry(EtcdRegistry):
    """An EtcdRegistry that counts its requests to the engine."""

    requests = 0

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        CountingRegistry.requests += 1
        return await super()._post(path, body)


class SilentRegistry(EtcdRegistry):
    """A node that dies: it stops renewing and never revokes (a kill -9, a power cut)."""

    async def _renew(self) -> None:
        await trio.sleep_forever()

    async def _revoke(self) -> None:
        self._lease = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_etcd(data_dir: str) -> tuple[subprocess.Popen[bytes], str]:
    etcd = shutil.which("etcd")
    if etcd is None:
        sys.exit("etcd is not installed (apt-get install etcd-server)")
    client, peer = f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"
    process = subprocess.Popen(
        [
            etcd,
            "--name=bench",
            f"--data-dir={data_dir}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=bench={peer}",
            "--log-level=error",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{client}/health", timeout=1).status_code == 200:
                return process, client
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    process.kill()
    sys.exit("etcd did not start within 30 s")


async def registrations(
    endpoint: str, nodes: int, clients: int, concurrency: int
) -> dict[str, Any]:
    registries = [CountingRegistry(endpoint, f"n{i}", lease_ttl=30) for i in range(nodes)]
    seen = [0] * nodes
    last_seen = [0.0] * nodes
    all_seen = trio.Event()

    def counter(index: int, change: Change) -> None:
        if change.value is None:
            return  # a disconnect's release: not part of the burst
        seen[index] += 1
        last_seen[index] = time.perf_counter()
        if min(seen) >= clients:
            all_seen.set()

    async with trio.open_nursery() as nursery:
        for index, registry in enumerate(registries):
            await nursery.start(registry.run)
            await nursery.start(
                functools.partial(registry.watch, "clients/", functools.partial(counter, index))
            )
        limit = trio.Semaphore(concurrency)
        CountingRegistry.requests = 0

        async def connect(i: int) -> None:
            registry = registries[i % nodes]
            async with limit:
                await registry.replace(f"clients/c{i}", f"{registry.node_id}/s{i}")
                await registry.claim(f"tcp/{10000 + i}", f"{registry.node_id}/s{i}")

        started = time.perf_counter()
        async with trio.open_nursery() as burst:
            for i in range(clients):
                burst.start_soon(connect, i)
        connected = time.perf_counter()
        connect_requests = CountingRegistry.requests
        with trio.move_on_after(60):
            await all_seen.wait()
        fanout = max(last_seen) - started
        CountingRegistry.requests = 0

        async def disconnect(i: int) -> None:
            registry = registries[i % nodes]
            async with limit:
                await registry.release(f"tcp/{10000 + i}", f"{registry.node_id}/s{i}")
                await registry.release(f"clients/c{i}", f"{registry.node_id}/s{i}")

        released = time.perf_counter()
        async with trio.open_nursery() as burst:
            for i in range(clients):
                burst.start_soon(disconnect, i)
        release_time = time.perf_counter() - released
        disconnect_requests = CountingRegistry.requests
        nursery.cancel_scope.cancel()
    return {
        "nodes": nodes,
        "clients": clients,
        "concurrency": concurrency,
        "connects_per_s": clients / (connected - started),
        "disconnects_per_s": clients / release_time,
        "requests_per_connect": connect_requests / clients,
        "requests_per_disconnect": disconnect_requests / clients,
        "watch_events": sum(seen),
        "fanout_s": fanout,
        "all_seen": min(seen) >= clients,
    }


async def failover(endpoint: str, ttl: int) -> float:
    watcher = EtcdRegistry(endpoint, "watcher", lease_ttl=30)
    doomed = SilentRegistry(endpoint, f"doomed-{ttl}", lease_ttl=ttl)
    gone = trio.Event()

    def on_change(change: Change) -> None:
        if change.key == f"nodes/{doomed.node_id}" and change.value is None:
            gone.set()

    async with trio.open_nursery() as nursery:
        await nursery.start(watcher.run)
        await nursery.start(functools.partial(watcher.watch, "nodes/", on_change))
        with trio.CancelScope() as node:
            async with trio.open_nursery() as inner:
                await inner.start(doomed.run)  # the lease is granted (renewed) now
                last_renewal = time.perf_counter()
                await doomed.claim("tcp/1", f"{doomed.node_id}/s")
                node.cancel()  # silent from now on, and it never revokes
        with trio.fail_after(ttl * 3 + 10):
            await gone.wait()
        elapsed = time.perf_counter() - last_renewal
        nursery.cancel_scope.cancel()
    return elapsed


async def main(args: argparse.Namespace, endpoint: str) -> dict[str, Any]:
    rows = []
    for nodes in args.nodes:
        row = await registrations(endpoint, nodes, args.clients, args.concurrency)
        rows.append(row)
        print(
            f"nodes {nodes:>3}  clients {args.clients}  "
            f"connects/s {row['connects_per_s']:8.0f}  "
            f"disconnects/s {row['disconnects_per_s']:8.0f}  "
            f"requests/connect {row['requests_per_connect']:.2f}  "
            f"requests/disconnect {row['requests_per_disconnect']:.2f}  "
            f"watch events {row['watch_events']}  all nodes saw all after {row['fanout_s']:.2f} s",
            flush=True,
        )
    failovers = {}
    for ttl in args.ttl:
        failovers[ttl] = await failover(endpoint, ttl)
        print(f"lease TTL {ttl} s: keys gone {failovers[ttl]:.2f} s after the last renewal")
    return {"registrations": rows, "failover_s": failovers}


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--clients", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64, help="client connects in flight")
    parser.add_argument("--ttl", type=int, nargs="+", default=[2, 5])
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as data:
        process, endpoint = start_etcd(os.path.join(data, "etcd"))
        try:
            print(f"etcd at {endpoint}; load average {os.getloadavg()[0]:.2f}", flush=True)
            result = trio.run(main, args, endpoint)
        finally:
            process.kill()  # by its pid: ours
            process.wait()
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    cli()
