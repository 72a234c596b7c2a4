#!/usr/bin/env python3
"""What a peer can make one session buffer: N streams written to and never read.

A session over loopback TCP with both ends in this process and the default ``SessionConfig``.
The opening end writes to each of ``--streams`` streams until its windows are used up; the
accepting end never reads. Once every writer is blocked, the script prints the bytes the
accepting end holds unread (the sum of its streams' ``bytes_buffered``) and the growth of the
process's resident memory. Without a session-wide budget the figure is ``streams x window``;
with one it stops at the budget, however many streams there are.

    python bench/budget_streams.py                 # 512 streams
    python bench/budget_streams.py --streams 4000
"""

from __future__ import annotations

import argparse
import resource
import sys

import trio
from bench_session import tcp_pair

from pytunnel.session import Role, open_session

MIB = 1024 * 1024


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / MIB


async def _measure(count: int) -> None:
    a, b = await tcp_pair()
    rss_before = _rss_mib()
    async with (
        open_session(a, Role.CLIENT, name="writer") as writer,
        open_session(b, Role.SERVER, name="reader") as reader,
        trio.open_nursery() as nursery,
    ):
        accepted = []

        async def accept_all() -> None:
            for _ in range(count):
                accepted.append((await reader.accept_stream()).accept())

        async def write_forever(stream: trio.abc.SendStream) -> None:
            chunk = b"x" * (64 * 1024)
            while True:
                await stream.send_all(chunk)

        nursery.start_soon(accept_all)
        for _ in range(count):
            stream = await writer.open_stream()
            nursery.start_soon(write_forever, stream)
        with trio.fail_after(300):
            previous = -1
            while True:  # until nothing more arrives: every writer is out of window
                await trio.sleep(0.5)
                held = sum(s.bytes_buffered for s in accepted)
                if held == previous and len(accepted) == count:
                    break
                previous = held
        window = writer.config.window
        budget = getattr(reader.config, "receive_budget", None)
        print(f"{count} streams written to, never read (window {window // 1024} KiB):")
        print(f"  buffered by the reading end: {held / MIB:,.1f} MiB")
        print(f"  streams x window:            {count * window / MIB:,.1f} MiB")
        if budget is not None:
            print(f"  receive budget:              {budget / MIB:,.1f} MiB")
        print(f"  process RSS growth:          {_rss_mib() - rss_before:,.1f} MiB")
        nursery.cancel_scope.cancel()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=512, help="streams written to (512)")
    args = parser.parse_args()
    trio.run(_measure, args.streams)
    return 0


if __name__ == "__main__":
    sys.exit(main())
