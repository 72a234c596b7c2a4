"""Several streams sending bulk at once through one session over real loopback TCP: relays
that had to wait for the write buffer still send whole reads as one Data frame each."""

from __future__ import annotations

import random
import socket

import trio
import trio.testing
from helpers import count_tasks, open_pair, tcp_stream_pair

from pytunnel._relay import relay
from pytunnel.session import Role, open_session


def _small_buffers(sender: trio.SocketStream, receiver: trio.SocketStream) -> None:
    """Kernel buffers small enough that the writer soon meets a full socket."""
    sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
    receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)


async def test_relays_that_wait_for_room_still_send_whole_reads_as_one_frame() -> None:
    """Four relays copy a socket each into a stream of one session whose transport is
    congested, so most chunks they read do not fit the write buffer at once and wait for
    room. What waited still crosses as Data frames of up to a whole read (256 KiB), not cut
    into 64 KiB pieces: the far side receives its bytes in chunks of more than 64 KiB.
    (Each chunk ``receive_some()`` returns to a reader with no relay is one Data frame.)"""
    a, b = await tcp_stream_pair()
    _small_buffers(a, b)
    size = 4 * 1024 * 1024
    rng = random.Random(3)
    payloads = [rng.randbytes(size) for _ in range(4)]
    chunks: dict[int, list[int]] = {i: [] for i in range(4)}
    received: dict[int, bytes] = {}
    tasks_before = count_tasks()
    with trio.fail_after(120):
        async with (
            open_session(a, Role.CLIENT) as client,
            open_session(b, Role.SERVER) as server,
        ):
            pairs = [await open_pair(client, server, host="t", port=i + 1) for i in range(4)]
            async with trio.open_nursery() as nursery:
                for i in range(4):
                    outer, inner = await tcp_stream_pair()

                    async def feed(stream: trio.SocketStream, data: bytes) -> None:
                        await stream.send_all(data)
                        await stream.send_eof()
                        await stream.receive_some()  # until the relay closes it

                    async def receive(i: int) -> None:
                        parts = []
                        while chunk := await pairs[i][1].receive_some():
                            chunks[i].append(len(chunk))
                            parts.append(chunk)
                        received[i] = b"".join(parts)
                        await pairs[i][1].aclose()

                    nursery.start_soon(relay, inner, pairs[i][0])
                    nursery.start_soon(feed, outer, payloads[i])
                    nursery.start_soon(receive, i)
    for i, payload in enumerate(payloads):
        assert received[i] == payload, f"stream {i} arrived damaged"
    sizes = [n for i in range(4) for n in chunks[i]]
    large = sum(n for n in sizes if n > 64 * 1024)
    # cut into 64 KiB pieces, none would be larger
    assert large >= 2 * size, f"{large} of {4 * size} bytes in frames over 64 KiB: {sizes[:40]}"
    assert count_tasks() == tasks_before
