"""Direct delivery: the session's reader writes a Data frame's bytes straight to the socket a
relay copies the stream into, while the relay's pump waits for data, and falls back to the
stream's buffer when the socket would block or bytes are already buffered.

Over real loopback sockets: a session over TCP, a relay from the accepting end's stream to a
real TCP connection whose far end the test reads. Each test checks that the path it is about
was really taken (``bytes_delivered_directly``), so a regression that silently turned direct
delivery off, or on where it must not be, fails here too.
"""

from __future__ import annotations

import functools
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.lowlevel
import trio.testing
from helpers import open_pair, receive_exactly, session_pair, tcp_stream_pair, wait_until

from pytunnel._relay import RelayStats, relay
from pytunnel.session import MuxStream, Session
from pytunnel.testing import Faults

pytestmark = pytest.mark.timeout(60)

SMALL_BUFFER = 16 * 1024


def _pattern(size: int, seed: int) -> bytes:
    """Position- and seed-dependent bytes: a reordered or repeated piece shows."""
    return bytes((seed * 131 + i * 7 + (i >> 8)) & 0xFF for i in range(size))


async def _read_until_eof(stream: trio.SocketStream, pause_every: int = 0) -> bytes:
    """Everything until EOF; with ``pause_every`` a slow reader (a pause after that many
    bytes, so the relay's socket fills and the fallback is used)."""
    got = bytearray()
    mark = pause_every
    while chunk := await stream.receive_some(4096):
        got += chunk
        if pause_every and len(got) >= mark:
            mark += pause_every
            await trio.sleep(0.005)
    return bytes(got)


def _buffered_is(stream: MuxStream, size: int) -> bool:
    return stream.bytes_buffered == size


async def _read_into(stream: trio.SocketStream, box: list[bytes]) -> None:
    box.append(await _read_until_eof(stream))


class _Tunnel:
    """One stream of a TCP session, relayed at the accepting end into a TCP connection."""

    def __init__(
        self,
        client: Session,
        server: Session,
        opened: MuxStream,
        accepted: MuxStream,
        target: trio.SocketStream,
        stats: RelayStats,
    ) -> None:
        self.client = client
        self.server = server
        self.opened = opened
        self.accepted = accepted
        self.target = target
        self.stats = stats


@asynccontextmanager
async def _tunnel(
    *, window: int = 1024 * 1024, small_buffers: bool = False, faults: Faults | None = None
) -> AsyncIterator[_Tunnel]:
    async with session_pair("tcp", window=window) as (client, server):
        opened, accepted = await open_pair(client, server)
        assert isinstance(opened, MuxStream)
        assert isinstance(accepted, MuxStream)
        target, relayed = await tcp_stream_pair()
        if small_buffers:
            for stream in (target, relayed):
                stream.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_BUFFER)
                stream.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUFFER)
        stats = RelayStats()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                lambda: relay(accepted, relayed, stats=stats, idle_timeout=30, faults=faults)
            )
            await trio.testing.wait_all_tasks_blocked()
            yield _Tunnel(client, server, opened, accepted, target, stats)
            nursery.cancel_scope.cancel()
        await target.aclose()


async def test_small_messages_go_straight_to_the_socket_in_order() -> None:
    """A ping-pong of small messages: each reaches the target socket written by the session's
    reader (all of them directly), in order, and the relay counts them."""
    async with _tunnel() as t:
        total = 0
        for i in range(200):
            message = _pattern(1 + i % 97, i)
            await t.opened.send_all(message)
            got = b""
            with trio.fail_after(5):
                while len(got) < len(message):
                    got += await t.target.receive_some(4096)
            assert got == message
            total += len(message)
            await t.target.send_all(b"k")  # the reply travels the other way, through the pump
            with trio.fail_after(5):
                assert await t.opened.receive_some() == b"k"
        assert t.accepted.bytes_delivered_directly == total
        assert t.stats.bytes_out == total
        assert t.accepted.bytes_buffered == 0


async def test_slow_reader_forces_the_fallback_and_order_holds() -> None:
    """Interleaved sizes into a target that reads slowly through small socket buffers: some
    bytes go directly, the rest through the buffer and the pump (the socket would block, or
    bytes are already buffered), and what arrives is exactly what was sent, then EOF."""
    sizes = [1, 7, 64, 1500, 65536, 3, 200_000, 4096, 17, 131_072, 5, 70_000, 1, 2]
    payload = b"".join(_pattern(size, seed) for seed, size in enumerate(sizes * 3))
    async with _tunnel(small_buffers=True) as t:
        got: list[bytes] = []

        async def read() -> None:
            got.append(await _read_until_eof(t.target, pause_every=32 * 1024))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            pos = 0
            for size in sizes * 3:
                await t.opened.send_all(payload[pos : pos + size])
                pos += size
                if size < 100:
                    await trio.lowlevel.checkpoint()  # small ones arrive alone, the pump waiting
            await t.opened.send_eof()
        assert got[0] == payload
        direct = t.accepted.bytes_delivered_directly
        assert 0 < direct < len(payload), direct
        assert t.stats.bytes_out == len(payload)


async def test_eof_right_after_data_comes_after_the_data() -> None:
    """Data then an immediate half-close, many times on fresh streams: the target reads every
    byte and then EOF, never EOF first, whether the data went directly or not."""
    async with session_pair("tcp") as (client, server):
        for i in range(30):
            opened, accepted = await open_pair(client, server)
            target, relayed = await tcp_stream_pair()
            message = _pattern(1 + (i * 977) % 70_000, i)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(functools.partial(relay, accepted, relayed, idle_timeout=30))
                await trio.testing.wait_all_tasks_blocked()
                await opened.send_all(message)
                await opened.send_eof()
                with trio.fail_after(5):
                    assert await _read_until_eof(target) == message
                await target.send_eof()
                with trio.fail_after(5):
                    assert await opened.receive_some() == b""
            assert isinstance(accepted, MuxStream)
            assert accepted.bytes_received == len(message)
            await target.aclose()
            await opened.aclose()


async def test_window_credit_is_returned_only_for_bytes_delivered() -> None:
    """A target that stops reading: the kernel takes what it can directly, the rest waits
    in the stream's buffer, within the window; the sender stalls on the window. After the
    target reads everything, the credit the sender got back is exactly what was consumed:
    its window plus the receiver's not yet acknowledged bytes is the window, no more."""
    window = 64 * 1024
    payload = _pattern(1024 * 1024, 3)
    async with _tunnel(window=window, small_buffers=True) as t:
        async with trio.open_nursery() as nursery:
            sent = trio.Event()

            async def send() -> None:
                # small frames and ones larger than the socket buffers, which the kernel
                # takes only in part: only the part it took may earn credit
                start, i = 0, 0
                while start < len(payload):
                    size = 1000 if i % 2 else 50_000
                    await t.opened.send_all(payload[start : start + size])
                    start += size
                    i += 1
                sent.set()

            nursery.start_soon(send)
            with trio.move_on_after(1):
                await sent.wait()
            assert not sent.is_set(), "the sender was never held back by the window"
            assert t.accepted.bytes_buffered <= window
            assert t.accepted.bytes_delivered_directly > 0
            got = bytearray()
            with trio.fail_after(20):
                while len(got) < len(payload):
                    got += await t.target.receive_some(65536)
            assert bytes(got) == payload
        state = t.server._mux._streams[t.accepted.stream_id]

        def unacked() -> int:
            """Consumed and not granted back: the window less the stream's credit."""
            return window - state.recv_window - state.held

        def balanced() -> bool:
            return t.client.send_window(t.opened.stream_id) + unacked() == window

        await wait_until(
            balanced,
            what=lambda: (
                f"window {t.client.send_window(t.opened.stream_id)}, "
                f"unacknowledged {unacked()}, initial {window}"
            ),
        )
        assert state.held == 0
        assert t.accepted.bytes_received == len(payload)


async def test_a_sink_with_a_fault_set_is_never_written_directly() -> None:
    """Fault injection wraps both streams; with a fault set towards the target, every byte
    goes through the wrapper's ``send_all``, which applies it (here: 1000-byte slices), so
    nothing goes directly, and every byte still arrives in order."""
    payload = _pattern(300_000, 9)
    faults = Faults()
    faults.set("out", slice_size=1000)
    async with _tunnel(faults=faults) as t:
        got: list[bytes] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_read_into, t.target, got)
            for start in range(0, len(payload), 3000):
                await t.opened.send_all(payload[start : start + 3000])
            await t.opened.send_eof()
        assert got[0] == payload
        assert t.accepted.bytes_delivered_directly == 0


async def test_a_fault_set_on_an_open_connection_counts_what_went_directly() -> None:
    """No fault set: a fault wrapper lets bytes go directly. A ``close_after`` set while the
    connection is open then counts those bytes too: the target gets exactly that many bytes
    in all, then EOF."""
    faults = Faults()
    async with _tunnel(faults=faults) as t:
        first = _pattern(100, 1)
        await t.opened.send_all(first)
        got = b""
        with trio.fail_after(5):
            while len(got) < len(first):
                got += await t.target.receive_some()
        assert t.accepted.bytes_delivered_directly == len(first)
        faults.set("out", close_after=150)
        await t.opened.send_all(_pattern(100, 2))
        with trio.fail_after(5):
            got += await _read_until_eof(t.target)
        assert got == first + _pattern(100, 2)[:50]


@pytest.mark.parametrize("how", ["assignment", "set"])
async def test_a_fault_assigned_on_an_open_connection_stops_direct_writes_both_ways(
    how: str,
) -> None:
    """The direct writers read a fault's ``active`` answer on every write, from a slot that
    every assignment refreshes: a ``blackhole`` switched on while the connection is open (by
    plain assignment or ``set``) drops what is sent either way, nothing slipping past it
    directly, and switched off again (by assignment, or ``clear``, which replaces the
    objects) the bytes flow again, directly."""
    faults = Faults()
    async with _tunnel(faults=faults) as t:

        async def both_ways(out: bytes, back: bytes) -> None:
            for sender, receiver, data in ((t.opened, t.target, out), (t.target, t.opened, back)):
                await sender.send_all(data)
                with trio.fail_after(5):
                    assert await receive_exactly(receiver, len(data)) == data

        await both_ways(b"before", b"BEFORE")
        direct = t.accepted.bytes_delivered_directly
        assert direct == len(b"before")
        if how == "set":
            faults.set(blackhole=True)
        else:
            faults.out.blackhole = True
            faults.in_.blackhole = True
        await t.opened.send_all(b"dropped out")
        await t.target.send_all(b"dropped in")
        await trio.testing.wait_all_tasks_blocked()
        assert t.accepted.bytes_delivered_directly == direct
        if how == "set":
            faults.clear()
        else:
            faults.out.blackhole = False
            faults.in_.blackhole = False
        # what the blackhole took never arrives: the first bytes after it are these
        await both_ways(b"after", b"AFTER")
        assert t.accepted.bytes_delivered_directly == direct + len(b"after")


async def test_a_target_that_resets_ends_the_relay_with_a_reset() -> None:
    """The target resets its connection while data keeps coming: the direct write fails,
    the data falls back to the buffer, and the pump's send raises the typed error, so the
    opener's stream breaks instead of hanging or ending cleanly."""
    async with _tunnel() as t:
        await t.opened.send_all(b"first")
        with trio.fail_after(5):
            assert await t.target.receive_some() == b"first"
        t.target.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await t.target.aclose()

        async def send_until_broken() -> None:
            while True:
                await t.opened.send_all(b"x" * 1000)
                await trio.sleep(0.001)

        with trio.fail_after(10), pytest.raises(trio.BrokenResourceError):
            await send_until_broken()


async def test_data_arriving_while_the_pump_holds_a_chunk_waits_behind_it() -> None:
    """Bytes buffered before the relay starts, then a stream of small messages while the pump
    passes the buffered ones on: a message arriving while the pump holds a chunk it has not
    written yet (the buffer is empty then, but the pump is not waiting) must not be written
    directly ahead of that chunk."""
    async with session_pair("tcp") as (client, server):
        for round_ in range(5):
            opened, accepted = await open_pair(client, server)
            assert isinstance(accepted, MuxStream)
            target, relayed = await tcp_stream_pair()
            early = [_pattern(20_000 + i, round_ * 100 + i) for i in range(8)]
            late = [_pattern(1 + i % 50, round_ * 1000 + i) for i in range(300)]
            for piece in early:
                await opened.send_all(piece)
            early_bytes = sum(map(len, early))
            await wait_until(functools.partial(_buffered_is, accepted, early_bytes))
            got: list[bytes] = []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(functools.partial(relay, accepted, relayed, idle_timeout=30))
                nursery.start_soon(_read_into, target, got)
                for i, piece in enumerate(late):
                    await opened.send_all(piece)
                    # mostly faster than the pump passes them on, now and then a pause that
                    # lets it catch up and wait, so that later ones go directly
                    await trio.sleep(0.002 if i % 25 == 24 else 0)
                await opened.send_eof()
                with trio.fail_after(10):
                    while not got:
                        await trio.sleep(0.01)
                await target.send_eof()
            assert got[0] == b"".join(early + late)
            assert accepted.bytes_delivered_directly > 0
            await target.aclose()
            await opened.aclose()


async def test_data_arriving_while_the_pump_waits_to_send_waits_behind_it() -> None:
    """The pump is blocked sending a chunk into a full socket, the stream's buffer empty; the
    target then reads a little (the socket has room again) and, at once, a small message
    arrives: whichever task runs first, the message must reach the target after the chunk,
    never ahead of it."""
    async with _tunnel(small_buffers=True) as t:
        sent = bytearray()
        got = bytearray()
        blocked_rounds = 0
        for i in range(20):
            big = _pattern(65536, i)  # one frame, more than the socket buffers take
            await t.opened.send_all(big)
            sent += big
            await trio.testing.wait_all_tasks_blocked()
            if t.accepted.bytes_buffered == 0 and len(got) + len(big) > t.stats.bytes_out:
                blocked_rounds += 1  # the pump holds the frame's tail, waiting for the socket
            got += await t.target.receive_some(SMALL_BUFFER)
            small = _pattern(10, 500 + i)
            await t.opened.send_all(small)
            sent += small
            with trio.fail_after(10):
                while len(got) < len(sent):
                    got += await t.target.receive_some(65536)
            assert bytes(got) == bytes(sent), f"out of order in round {i}"
        assert blocked_rounds > 0


async def test_chunks_into_a_stream_with_little_window_arrive_whole_and_in_order() -> None:
    """The other way: the relay copies a TCP connection into a stream whose window (16 KiB)
    is far smaller than the chunks it reads. What the window takes at once is queued without
    ``send_all``, the rest waits in ``send_all`` for window; the opener reads every byte once,
    in order, then EOF."""
    payload = _pattern(600_000, 11)
    async with _tunnel(window=16 * 1024) as t:
        got: list[bytes] = []

        async def read() -> None:
            got.append(await _read_stream_until_eof(t.opened))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            for start in range(0, len(payload), 100_000):
                await t.target.send_all(payload[start : start + 100_000])
            await t.target.send_eof()
        assert got[0] == payload
        assert t.accepted.bytes_sent == len(payload)
        assert t.stats.bytes_in == len(payload)


async def _read_stream_until_eof(stream: MuxStream) -> bytes:
    got = bytearray()
    with trio.fail_after(20):
        while chunk := await stream.receive_some(5000):
            got += chunk
            await trio.lowlevel.checkpoint()
    return bytes(got)


async def test_a_direct_writer_into_a_stream_takes_only_what_window_and_buffer_allow() -> None:
    """``MuxStream.direct_writer`` (the pump's first try for every chunk) queues at most the
    peer's window and the write buffer's mark plus one frame, in frames of at most
    ``max_data_chunk``; what it declines goes again later, and all arrives in order."""
    window, high, chunk = 100_000, 50_000, 16_384
    payload = _pattern(1_000_000, 5)
    got = bytearray()
    sizes = {"window": window, "write_buffer_high": high, "max_data_chunk": chunk}
    async with session_pair("tcp", **sizes) as (client, server):
        mine, theirs = await open_pair(client, server)
        assert isinstance(mine, MuxStream)
        write = mine.direct_writer()

        async def read() -> None:
            while len(got) < len(payload):
                got.extend(await theirs.receive_some())

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read)
                sent = 0
                while sent < len(payload):
                    before = client.send_window(mine.stream_id)
                    taken = write(memoryview(payload)[sent:])
                    assert taken <= before
                    assert client._queued() <= high + chunk
                    sent += taken
                    if not taken:
                        await mine.wait_send_all_might_not_block()
                        await trio.lowlevel.checkpoint()
    assert bytes(got) == payload
