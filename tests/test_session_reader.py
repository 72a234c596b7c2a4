"""A session over plain TCP reads its transport directly (``pytunnel._direct.SocketReader``),
not through ``trio.SocketStream.receive_some``: frames cut anywhere by the reads still arrive
whole and in order, and a transport that always has data lets the other tasks run."""

from __future__ import annotations

import itertools

import pytest
import trio
from helpers import open_pair, receive_exactly, session_pair

from pytunnel._direct import MAX_STREAK, SocketReader

pytestmark = pytest.mark.timeout(60)


async def test_a_tcp_session_reads_its_transport_directly(
    receive_calls: list[trio.SocketStream],
) -> None:
    """Messages from 1 byte to 300 KB each way, reads of 1,000 bytes (so frames straddle
    reads), then EOF: everything arrives in order and no ``receive_some`` ran on a socket."""
    with trio.fail_after(30):
        async with session_pair("tcp", receive_size=1000) as (client, server):
            mine, theirs = await open_pair(client, server)
            for i, size in enumerate((1, 64, 999, 1000, 1001, 65_536, 300_000)):
                message = bytes((i * 31 + n) & 0xFF for n in range(size))
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(mine.send_all, message)
                    assert await receive_exactly(theirs, size) == message
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(theirs.send_all, message[::-1])
                    assert await receive_exactly(mine, size) == message[::-1]
            await mine.send_eof()
            assert await theirs.receive_some() == b""
    assert receive_calls == []


async def test_a_transport_that_always_has_data_lets_other_tasks_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """2 MiB on one stream read 1,000 bytes at a time: the socket has data at almost every
    read, which never yields by itself. Another runnable task runs once per scheduler batch,
    in any order, so between two of its runs the reader makes at most two streaks of reads
    (one ending a batch, one starting the next)."""
    ticks = [0]
    seen: list[int] = []
    real = SocketReader.receive_nowait

    def spy(self: SocketReader, max_bytes: int) -> bytes | None:
        got = real(self, max_bytes)
        if got and max_bytes == 1000:  # the receiving session's reads that found data
            seen.append(ticks[0])
        return got

    monkeypatch.setattr(SocketReader, "receive_nowait", spy)

    async def tick() -> None:
        while True:
            ticks[0] += 1
            await trio.lowlevel.checkpoint()

    payload = bytes(range(256)) * (2 * 1024 * 1024 // 256)
    with trio.fail_after(30):
        async with session_pair(
            "tcp", receive_size=1000, window=4 * 1024 * 1024, receive_budget=64 * 1024 * 1024
        ) as (client, server):
            mine, theirs = await open_pair(client, server)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(tick)
                nursery.start_soon(mine.send_all, payload)
                assert await receive_exactly(theirs, len(payload)) == payload
                nursery.cancel_scope.cancel()
    longest = run = 1
    for before, after in itertools.pairwise(seen):
        run = run + 1 if before == after else 1
        longest = max(longest, run)
    assert len(seen) > 4 * MAX_STREAK
    assert longest <= 2 * MAX_STREAK


async def test_with_the_defaults_a_relay_read_crosses_a_tcp_session_as_one_frame() -> None:
    """A relay reads its socket 256 KiB at a time; with the default ``max_data_chunk`` each
    such write is one Data frame, delivered whole to the far stream (one write into the far
    socket), and a ``receive_size`` of twice that lets reads hold whole frames. 4 MiB in
    256 KiB writes: every byte in order, no frame larger than a write, the first whole."""
    from pytunnel import SessionConfig

    config = SessionConfig()
    assert config.max_data_chunk == 256 * 1024
    assert config.receive_size == 2 * config.max_data_chunk
    sizes: list[int] = []
    piece = 256 * 1024
    message = bytes(n * 7 & 0xFF for n in range(16 * piece))
    with trio.fail_after(30):
        async with session_pair("tcp", config) as (client, server):
            mine, theirs = await open_pair(client, server)
            # the multiplexer hands each Data frame to the session's sink as it decodes it: a
            # seam of both builds (the compiled session calls the stream's deliver_data natively)
            sink = server._mux.data_sink
            assert sink is not None

            def spy(stream_id: int, data: bytes) -> None:
                sizes.append(len(data))
                sink(stream_id, data)

            server._mux.data_sink = spy

            async def send() -> None:
                for start in range(0, len(message), piece):
                    await mine.send_all(message[start : start + piece])

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send)
                assert await receive_exactly(theirs, len(message)) == message
    assert sum(sizes) == len(message)
    assert sizes[0] == piece
    assert max(sizes) == piece
