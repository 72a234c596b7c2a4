#!/usr/bin/env python3
"""Node link benchmark: what the extra hop costs a public connection that lands on a node
whose client is on another node, against the same connection to the client's own node.

Two nodes (``serve(cluster=..., cluster_secret=...)``) in this process on a real etcd (started
by this script in a temporary directory, stopped by its pid), one client holding one port
whose target is an echo service. For the port at node A (the client's node, direct) and at
node B (relayed over the node link to A) it reports:

- connections per second: open, one 64-byte echo, close, ``--concurrency`` at a time;
- round trips: the median and 99th percentile of a 64-byte echo on a held connection;
- throughput: ``--megabytes`` through one connection, echoed back.

Everything (nodes, client, echo, load) shares this process's one core, so the figures are
relative: the ratio relayed / direct is the point, not the absolute rates.

    python bench/bench_node_link.py
    python bench/bench_node_link.py --connections 2000 --concurrency 20 --megabytes 128
    python bench/bench_node_link.py --json out.json
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

import pytunnel
from pytunnel.cluster import EtcdRegistry

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_cluster import free_port, start_etcd

TOKEN = "bench-token"
SECRET = "bench-cluster-secret"


async def echo(stream: trio.SocketStream) -> None:
    try:
        async for chunk in stream:
            await stream.send_all(chunk)
    except trio.BrokenResourceError:
        pass


async def connection_rate(address: tuple[str, int], count: int, concurrency: int) -> float:
    payload = b"x" * 64
    limiter = trio.CapacityLimiter(concurrency)

    async def one() -> None:
        async with limiter:
            stream = await trio.open_tcp_stream(*address)
            async with stream:
                await stream.send_all(payload)
                got = 0
                while got < len(payload):
                    got += len(await stream.receive_some())

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(one)
    return count / (time.perf_counter() - start)


async def round_trips(address: tuple[str, int], count: int) -> tuple[float, float]:
    payload = b"y" * 64
    times = []
    stream = await trio.open_tcp_stream(*address)
    async with stream:
        for _ in range(count):
            start = time.perf_counter()
            await stream.send_all(payload)
            got = 0
            while got < len(payload):
                got += len(await stream.receive_some())
            times.append(time.perf_counter() - start)
    times.sort()
    return statistics.median(times) * 1e6, times[int(len(times) * 0.99) - 1] * 1e6


async def throughput(address: tuple[str, int], megabytes: int) -> float:
    block = b"z" * 65536
    total = megabytes * 1024 * 1024
    stream = await trio.open_tcp_stream(*address)
    start = time.perf_counter()
    async with stream, trio.open_nursery() as nursery:

        async def send() -> None:
            for _ in range(total // len(block)):
                await stream.send_all(block)

        nursery.start_soon(send)
        got = 0
        while got < total:
            got += len(await stream.receive_some(1 << 20))
    return megabytes / (time.perf_counter() - start)


async def run(args: argparse.Namespace, endpoint: str) -> dict[str, Any]:
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, echo, 0, host="127.0.0.1")
        )
        echo_port = listeners[0].socket.getsockname()[1]
        nodes = []
        for name, host in (("a", "127.0.0.1"), ("b", "127.0.0.2")):
            registry = EtcdRegistry(endpoint, name, lease_ttl=10)
            nodes.append(
                await nursery.start(
                    functools.partial(
                        pytunnel.serve,
                        0,
                        host=host,
                        token=TOKEN,
                        public_host=host,
                        cluster=registry,
                        cluster_secret=SECRET,
                        max_streams=4096,
                    )
                )
            )
        a, b = nodes
        tunnel = await pytunnel.connect_tunnel(nursery, a.address, token=TOKEN)
        port = free_port()
        await tunnel.forward_remote("127.0.0.1", echo_port, remote_port=port)
        links = b.node_links
        assert links is not None
        with trio.fail_after(20):
            while port not in links.mirrored_ports:  # noqa: ASYNC110 - a watch fills it
                await trio.sleep(0.05)
        results: dict[str, Any] = {}
        for label, host in (("direct (node A)", "127.0.0.1"), ("relayed (node B)", "127.0.0.2")):
            address = (host, port)
            await connection_rate(address, 20, 5)  # warm up (and open the link)
            rate = await connection_rate(address, args.connections, args.concurrency)
            p50, p99 = await round_trips(address, args.round_trips)
            mbps = await throughput(address, args.megabytes)
            results[label] = {
                "connections_per_s": round(rate, 1),
                "round_trip_p50_us": round(p50, 1),
                "round_trip_p99_us": round(p99, 1),
                "throughput_mb_per_s": round(mbps, 1),
            }
            print(
                f"{label:18} {rate:8.1f} conn/s   rtt p50 {p50:7.1f} us  p99 {p99:8.1f} us"
                f"   {mbps:7.1f} MB/s"
            )
        nursery.cancel_scope.cancel()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--round-trips", type=int, default=2000)
    parser.add_argument("--megabytes", type=int, default=64)
    parser.add_argument("--json", metavar="FILE", help="also write the results here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as data_dir:
        process, endpoint = start_etcd(os.path.join(data_dir, "etcd"))
        try:
            print(f"etcd at {endpoint}; load average {os.getloadavg()[0]:.2f}", flush=True)
            results = trio.run(run, args, endpoint)
        finally:
            process.kill()  # by its pid: ours
            process.wait()
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(results, out, indent=2)


if __name__ == "__main__":
    main()
