"""The pump reads a plain socket directly (``pytunnel._direct.SocketReader``), not through
``trio.SocketStream.receive_some``: every byte still arrives in order, EOF after the data, the
errors are ``receive_some``'s, and a source that is always readable neither starves the other
tasks nor delays its cancellation by more than ``MAX_STREAK`` chunks.

Over real loopback sockets where a socket can show it; an always-readable source cannot be
made of a real socket deterministically, so that one is a stream that implements the relay's
``direct_reader`` capability itself."""

from __future__ import annotations

import functools
import itertools
import socket
import struct

import pytest
import trio
import trio.testing
from helpers import receive_exactly, tcp_stream_pair

from pytunnel._direct import MAX_STREAK, SocketReader
from pytunnel._relay import _CHUNK, relay
from pytunnel.testing import Faults

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("wrapped", [False, True], ids=["plain", "fault-wrapper"])
async def test_a_relay_between_sockets_reads_them_directly(
    receive_calls: list[trio.SocketStream], wrapped: bool
) -> None:
    """Ping-pong of messages of growing size, then a half-close each way: all arrive in
    order, EOF last, and the relay never called ``receive_some`` on its sockets."""
    left, relay_a = await tcp_stream_pair()
    right, relay_b = await tcp_stream_pair()
    a: trio.abc.HalfCloseableStream = relay_a
    b: trio.abc.HalfCloseableStream = relay_b
    if wrapped:  # as a local forward wraps its relays, with no fault set
        a, b = Faults().wrap(relay_a, relay_b)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(functools.partial(relay, a, b, idle_timeout=30))
            for i in range(40):
                message = bytes([i]) * (1 + i * 997)
                await left.send_all(message)
                assert await receive_exactly(right, len(message)) == message
                await right.send_all(message[::-1])
                assert await receive_exactly(left, len(message)) == message[::-1]
            await left.send_all(b"last")
            await left.send_eof()
            assert await receive_exactly(right, 4) == b"last"
            assert await right.receive_some() == b""
            await right.send_eof()
            assert await left.receive_some() == b""
    assert not [s for s in receive_calls if s in (relay_a, relay_b)]
    await left.aclose()
    await right.aclose()


async def test_socket_reader_reads_data_then_eof_and_waits_in_between() -> None:
    ours, theirs = await tcp_stream_pair()
    reader = SocketReader(ours.socket)
    assert reader.receive_nowait(100) is None  # nothing yet: no exception, no wait
    await theirs.send_all(b"hello")
    with trio.fail_after(10):
        await reader.wait()
    assert reader.receive_nowait(100) == b"hello"
    await theirs.send_eof()
    with trio.fail_after(10):
        await reader.wait()
    assert reader.receive_nowait(100) == b""
    await ours.aclose()
    await theirs.aclose()


async def test_socket_reader_reports_a_reset_as_broken_and_its_own_close_as_closed() -> None:
    ours, theirs = await tcp_stream_pair()
    reader = SocketReader(ours.socket)
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await theirs.aclose()  # RST
    with trio.fail_after(10):
        await reader.wait()
    with pytest.raises(trio.BrokenResourceError) as info:
        reader.receive_nowait(100)
    assert isinstance(info.value.__cause__, ConnectionResetError)
    await ours.aclose()
    with pytest.raises(trio.ClosedResourceError):
        reader.receive_nowait(100)
    with pytest.raises(trio.ClosedResourceError):
        await reader.wait()


async def test_socket_reader_wait_ends_when_the_socket_is_closed_under_it() -> None:
    ours, theirs = await tcp_stream_pair()
    reader = SocketReader(ours.socket)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:

            async def close_soon() -> None:
                await trio.testing.wait_all_tasks_blocked()
                await ours.aclose()

            nursery.start_soon(close_soon)
            with pytest.raises(trio.ClosedResourceError):
                await reader.wait()
    await theirs.aclose()


class _AlwaysReadable(trio.abc.HalfCloseableStream):
    """A source with a full chunk ready at every read, ``chunks`` times, then EOF."""

    def __init__(self, chunks: int, ticks: list[int]) -> None:
        self.left = chunks
        self.reads = 0
        #: the ticker's count at each read
        self.seen: list[int] = []
        self._ticks = ticks

    def direct_reader(self) -> _AlwaysReadable:
        return self

    def receive_nowait(self, max_bytes: int) -> bytes:
        self.reads += 1
        self.seen.append(self._ticks[0])
        if self.left == 0:
            return b""
        self.left -= 1
        return bytes(max_bytes)

    async def wait(self) -> None:
        raise AssertionError("an always-readable source is never waited for")

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        raise AssertionError("read directly")

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def send_eof(self) -> None:
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


class _TakesEverything(_AlwaysReadable):
    """A sink whose direct writer takes every chunk at once; never readable."""

    def __init__(self) -> None:
        super().__init__(0, [0])
        self.taken = 0

    def direct_reader(self) -> None:  # type: ignore[override]
        return None

    def direct_writer(self) -> object:
        def write(data: bytes | bytearray | memoryview) -> int:
            self.taken += len(data)
            return len(data)

        return write

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.sleep_forever()
        raise AssertionError


async def _tick(ticks: list[int]) -> None:
    while True:
        ticks[0] += 1
        await trio.lowlevel.checkpoint()


async def test_an_always_readable_source_lets_other_tasks_run() -> None:
    """The pump yields after ``MAX_STREAK`` reads: another runnable task runs once per
    scheduler batch, in any order, so between two of its runs the pump reads at most two
    streaks (one ending its batch, one starting the next)."""
    ticks = [0]
    source = _AlwaysReadable(20 * MAX_STREAK, ticks)
    sink = _TakesEverything()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_tick, ticks)
            # the way back never ends (the sink is never readable): cancelled once all is read
            nursery.start_soon(functools.partial(relay, source, sink))
            while source.left:
                await trio.lowlevel.checkpoint()
            nursery.cancel_scope.cancel()
    assert sink.taken == 20 * MAX_STREAK * _CHUNK
    longest = run = 1
    for before, after in itertools.pairwise(source.seen):
        run = run + 1 if before == after else 1
        longest = max(longest, run)
    assert longest <= 2 * MAX_STREAK


async def test_a_relay_on_an_always_readable_source_is_cancelled_within_a_streak() -> None:
    source = _AlwaysReadable(10**9, [0])
    sink = _TakesEverything()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(functools.partial(relay, source, sink))
            while source.reads < 3 * MAX_STREAK:
                await trio.lowlevel.checkpoint()
            reads = source.reads
            nursery.cancel_scope.cancel()
    assert source.reads - reads <= MAX_STREAK + 1
