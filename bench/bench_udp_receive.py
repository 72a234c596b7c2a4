#!/usr/bin/env python3
"""CPU cost of reading datagrams off a UDP socket: trio's ``recvfrom`` one at a time against
``_listen.receive_batch`` (every waiting datagram per pass through the scheduler).

In process, on loopback: each round queues ``--queue`` datagrams of ``--length`` bytes on a
socket, then reads them back; only the reading is timed, as process CPU time, so the figure
holds on a busy machine better than a rate would. Rounds alternate between the two ways.

    python bench/bench_udp_receive.py            # 20,000 datagrams, 6 repeats each way
"""

from __future__ import annotations

import argparse
import statistics
import time

import trio

from pytunnel._listen import bind_udp, receive_batch


async def _sample(batched: bool, count: int, queue: int, length: int) -> float:
    receiver = await bind_udp("127.0.0.1", 0)
    sender = await bind_udp("127.0.0.1", 0)
    with receiver, sender:
        target = receiver.getsockname()
        payload = b"x" * length
        cpu = 0.0
        done = 0
        while done < count:
            for _ in range(queue):
                await sender.sendto(payload, target)
            start = time.process_time()
            read = 0
            with trio.fail_after(30):
                while read < queue:
                    if batched:
                        read += len(await receive_batch(receiver, 65536))
                    else:
                        await receiver.recvfrom(65536)
                        read += 1
            cpu += time.process_time() - start
            done += read
    return cpu / count * 1e6


async def _main(args: argparse.Namespace) -> None:
    results: dict[bool, list[float]] = {True: [], False: []}
    for i in range(args.repeat):
        for batched in (False, True) if i % 2 == 0 else (True, False):
            results[batched].append(await _sample(batched, args.count, args.queue, args.length))
    one, batch = statistics.median(results[False]), statistics.median(results[True])
    print("| read | CPU us per datagram (median) | min..max |")
    print("|---|---:|---|")
    for name, values in (
        ("recvfrom, one per pass", results[False]),
        ("receive_batch", results[True]),
    ):
        print(
            f"| {name} | {statistics.median(values):.2f} | {min(values):.2f}..{max(values):.2f} |"
        )
    print(f"receive_batch / recvfrom: {batch / one:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=20_000, help="datagrams per sample")
    parser.add_argument("--queue", type=int, default=200, help="datagrams queued per round")
    parser.add_argument("--length", type=int, default=1400, help="datagram size in bytes")
    parser.add_argument("--repeat", type=int, default=6, help="samples each way")
    trio.run(_main, parser.parse_args())


if __name__ == "__main__":
    main()
