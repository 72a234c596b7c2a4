"""The session-wide receive budget over real loopback TCP: a peer with many streams that are
never read cannot make a session buffer more than ``receive_budget``; readers that stopped
cannot starve the other streams; and the default stream cap holds that many streams at once."""

from __future__ import annotations

import pytest
import trio
from helpers import open_pair, session_pair, wait_until

from pytunnel import SessionConfig, StreamLimitError
from pytunnel.session import MuxStream, Session

KIB = 1024
MIB = 1024 * KIB


async def _write_forever(stream: trio.abc.SendStream, byte: bytes) -> None:
    """Write until cancelled: blocks for good once the stream's window is used up."""
    chunk = byte * (64 * KIB)
    while True:
        await stream.send_all(chunk)


def _stuck(client: Session, writers: list[MuxStream], server: Session, read: int = 0) -> bool:
    """Every writer has used all the credit it was given and the receiver holds all of it
    but the ``read`` bytes its application took."""
    return all(client.send_window(s.stream_id) == 0 for s in writers) and (
        server.bytes_buffered == sum(s.bytes_sent for s in writers) - read
    )


async def test_streams_that_never_read_cannot_exceed_the_budget() -> None:
    """64 streams with 1 MiB windows, each written to and never read, could make the receiver
    hold 64 MiB; with a 4 MiB budget it holds at most 4 MiB, counted in its own buffers."""
    budget, streams = 4 * MIB, 64
    with trio.fail_after(60):
        async with session_pair("tcp", receive_budget=budget, max_streams=streams) as (
            client,
            server,
        ):
            pairs = [await open_pair(client, server) for _ in range(streams)]
            writers = [a for a, _ in pairs]
            readers = [b for _, b in pairs]
            assert all(isinstance(s, MuxStream) for s in writers + readers)
            async with trio.open_nursery() as nursery:
                for i, stream in enumerate(writers):
                    nursery.start_soon(_write_forever, stream, bytes([i]))
                await wait_until(
                    lambda: _stuck(client, writers, server),  # type: ignore[arg-type]
                    30,
                    lambda: (
                        f"buffered {server.bytes_buffered}, committed {server.receive_committed}"
                    ),
                )
                held = sum(s.bytes_buffered for s in readers)  # type: ignore[attr-defined]
                assert held == server.bytes_buffered == server.receive_committed
                assert held <= budget
                # every stream got at least its floor in: none was shut out
                assert all(s.bytes_buffered >= 32 * KIB for s in readers)  # type: ignore[attr-defined]
                nursery.cancel_scope.cancel()
            # what was buffered is intact and in order
            for i, stream in enumerate(readers):
                chunk = await stream.receive_some(100)
                assert chunk == bytes([i]) * 100


async def test_stalled_readers_holding_the_budget_do_not_starve_a_new_stream() -> None:
    """Fifteen readers read for a while, then stop, and their writers fill every byte of
    credit they can get; a new stream still carries 4 MiB, the session never holds more than
    its budget, and once the stalled readers read again their credit goes back and new
    streams start with the window a stream gets in a quiet session."""
    budget, window = 2 * MIB, MIB
    payload = bytes(range(256)) * (16 * KIB)  # 4 MiB
    with trio.fail_after(90):
        async with session_pair("tcp", receive_budget=budget, max_streams=16) as (
            client,
            server,
        ):
            stalled = [await open_pair(client, server) for _ in range(15)]
            writers = [a for a, _ in stalled]
            # what a stream gets in a quiet session (here the half of the pool that streams
            # not read yet may hold, plus the floor: less than a window with this budget)
            fresh_window = client.send_window(writers[0].stream_id)  # type: ignore[attr-defined]
            assert 64 * KIB < fresh_window <= window
            read = 0

            async def read_then_stop(stream: trio.abc.ReceiveStream) -> None:
                nonlocal read
                mine = 0
                while mine < 2 * MIB:
                    chunk = await stream.receive_some(2 * MIB - mine)
                    mine += len(chunk)
                read += mine

            async with trio.open_nursery() as nursery:
                async with trio.open_nursery() as readers:
                    for stream, reader in stalled:
                        nursery.start_soon(_write_forever, stream, b"s")
                        readers.start_soon(read_then_stop, reader)
                await wait_until(
                    lambda: _stuck(client, writers, server, read),  # type: ignore[arg-type]
                    30,
                )
                held = server.bytes_buffered
                assert held <= budget
                a, b = await open_pair(client, server)

                async def send() -> None:
                    await a.send_all(payload)
                    await a.send_eof()

                nursery.start_soon(send)
                got = bytearray()
                while chunk := await b.receive_some():
                    got += chunk
                    assert server.receive_committed <= budget
                assert got == payload
                assert server.bytes_buffered == held  # the stalled bytes stayed, unread
                nursery.cancel_scope.cancel()
            await a.aclose()
            await b.aclose()
            # the stalled readers read everything; their credit returns to the pool
            for writer, reader in stalled:
                await writer.aclose()
                while chunk := await reader.receive_some():
                    assert chunk == b"s" * len(chunk)
                await reader.aclose()
            await wait_until(lambda: server.bytes_buffered == 0 and server.open_streams == 0)
            a, _ = await open_pair(client, server)
            assert client.send_window(a.stream_id) == fresh_window  # type: ignore[attr-defined]


def test_session_config_takes_a_budget() -> None:
    assert SessionConfig().receive_budget == 256 * MIB
    assert SessionConfig(receive_budget=1).receive_budget == 1
    with pytest.raises(ValueError, match="receive_budget"):
        SessionConfig(receive_budget=0)


@pytest.mark.slow
async def test_the_default_stream_cap_holds_that_many_streams_at_once() -> None:
    """16,384 streams (the default cap) open at once through one session, each carrying a
    byte each way; the next open is refused; all close cleanly."""
    limit = SessionConfig().max_streams
    assert limit == 16384
    opened = trio.Event()
    count = 0
    with trio.fail_after(300):
        async with session_pair("tcp") as (client, server):

            async def echo_all(nursery: trio.Nursery) -> None:
                while True:
                    incoming = await server.accept_stream()
                    nursery.start_soon(echo, incoming.accept())

            async def echo(stream: trio.abc.HalfCloseableStream) -> None:
                async with stream:
                    data = await stream.receive_some()
                    await stream.send_all(data)
                    assert await stream.receive_some() == b""

            async def one(done: trio.Event) -> None:
                nonlocal count
                stream = await client.open_stream()
                async with stream:
                    await stream.send_all(b"!")
                    assert await stream.receive_some() == b"!"
                    count += 1
                    if count == limit:
                        opened.set()
                    await done.wait()
                    await stream.send_eof()
                    assert await stream.receive_some() == b""

            async with trio.open_nursery() as servers:
                servers.start_soon(echo_all, servers)
                done = trio.Event()
                async with trio.open_nursery() as clients:
                    for _ in range(limit):
                        clients.start_soon(one, done)
                    await opened.wait()
                    assert client.open_streams == server.open_streams == limit
                    with pytest.raises(StreamLimitError):
                        await client.open_stream()
                    assert server.receive_committed <= server.config.receive_budget
                    done.set()
                await wait_until(lambda: server.open_streams == 0, 60)
                servers.cancel_scope.cancel()
