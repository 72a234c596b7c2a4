#!/usr/bin/env python3
"""Python heap per idle relayed connection, both ends of one session in this process.

A session over loopback TCP (no handshake, default ``SessionConfig``); each connection is a
stream opened by the client end and accepted by the server end, each end relayed
(``pytunnel._relay.relay``, as ``-L`` does on both sides) to a TCP connection whose far socket
this script holds. ``tracemalloc`` compares the heap before and after ``--streams`` more
connections, once every task is blocked: what one idle relayed connection costs in Python
objects (streams, relay tasks and their frames, trio sockets), both sides together, with the
largest allocation sites. Kernel socket buffers and the interpreter's own overhead are not
counted, so the figure is below the RSS growth ``bench_tunnel.py`` measures across processes,
but it is exact and repeatable on a loaded machine.

    python bench/memory_streams.py                # 300 connections
    python bench/memory_streams.py --streams 1000 --top 30
"""

from __future__ import annotations

import argparse
import functools
import gc
import sys
import tracemalloc

import trio
import trio.testing
from bench_session import tcp_pair

from pytunnel._relay import relay
from pytunnel.session import Role, open_session


async def _measure(count: int, top: int) -> None:
    a, b = await tcp_pair()
    held: list[trio.SocketStream] = []
    async with (
        open_session(a, Role.CLIENT, name="client") as client,
        open_session(b, Role.SERVER, name="server") as server,
        trio.open_nursery() as nursery,
    ):

        async def accept_loop() -> None:
            while True:
                stream = (await server.accept_stream()).accept()
                far, near = await tcp_pair()
                held.append(far)
                nursery.start_soon(functools.partial(relay, stream, near))

        async def connection() -> None:
            stream = await client.open_stream("127.0.0.1", 1)
            far, near = await tcp_pair()
            held.append(far)
            nursery.start_soon(functools.partial(relay, stream, near))

        nursery.start_soon(accept_loop)
        for _ in range(20):  # warm-up: first-use allocations are not per connection
            await connection()
        await trio.testing.wait_all_tasks_blocked()
        gc.collect()
        tracemalloc.start(1)
        before = tracemalloc.take_snapshot()
        for _ in range(count):
            await connection()
        await trio.testing.wait_all_tasks_blocked()
        gc.collect()
        after = tracemalloc.take_snapshot()
        tracemalloc.stop()
        diff = after.compare_to(before, "lineno")
        total = sum(stat.size_diff for stat in diff)
        print(f"{count} idle relayed connections: {total / count:,.0f} bytes of Python heap each")
        print("(both ends of the session; the far sockets this script holds are included)")
        print(f"{'bytes':>8} {'blocks':>7}  where")
        for stat in diff[:top]:
            where = stat.traceback[0]
            print(f"{stat.size_diff / count:8.0f} {stat.count_diff / count:7.1f}  {where}")
        nursery.cancel_scope.cancel()
    for stream in held:
        await stream.aclose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=300, help="connections measured (300)")
    parser.add_argument("--top", type=int, default=15, help="allocation sites shown (15)")
    args = parser.parse_args()
    trio.run(_measure, args.streams, args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
