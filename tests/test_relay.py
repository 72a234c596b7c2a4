"""The relay's promises over real loopback sockets: a slow reader is not idle, and a relay that
ends before both directions reached EOF resets both sides instead of closing them cleanly."""

from __future__ import annotations

import functools
import socket

import pytest
import trio
import trio.testing
from helpers import TOKEN, open_pair, session_pair, tcp_stream_pair

import pytunnel
from pytunnel import ErrorCode, StreamResetError
from pytunnel._relay import relay
from pytunnel._stream import MuxStream

pytestmark = pytest.mark.timeout(60)

PAYLOAD = bytes(range(256)) * (8 * 1024 * 1024 // 256)  # 8 MiB, position-dependent content
SMALL_BUFFER = 64 * 1024


def _small_buffers(stream: trio.SocketStream) -> None:
    """Keep the kernel from absorbing the transfer, so the relay really waits on its reader."""
    stream.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_BUFFER)
    stream.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUFFER)


async def _write_all_then_eof(stream: trio.SocketStream) -> None:
    """A sender that writes the payload, half-closes, then waits for the other side's end."""
    try:
        await stream.send_all(PAYLOAD)
        await stream.send_eof()
        while await stream.receive_some():
            pass
    except trio.BrokenResourceError:
        pass  # a reset is one of the allowed outcomes; the reader side decides the verdict
    finally:
        await stream.aclose()


async def _read_with_a_pause(stream: trio.SocketStream, pause: float) -> tuple[bytes, bool]:
    """Read a little, stop reading for ``pause`` s (a paused consumer), then read to the end.

    Returns what arrived and whether the end was a reset (``True``) or a clean EOF.
    """
    got = bytearray()
    reset = False
    try:
        got += await stream.receive_some(SMALL_BUFFER)
        await trio.sleep(pause)  # the behaviour under test: a reader that stops reading
        while chunk := await stream.receive_some(256 * 1024):
            got += chunk
    except trio.BrokenResourceError:
        reset = True
    finally:
        await stream.aclose()
    return bytes(got), reset


def _complete_or_reset(got: bytes, reset: bool) -> None:
    """A transfer either arrives whole or ends in a reset; a partial one never ends cleanly."""
    if not reset:
        assert len(got) == len(PAYLOAD), f"clean EOF after {len(got)} of {len(PAYLOAD)} bytes"
        assert got == PAYLOAD
    else:
        assert PAYLOAD.startswith(got)


async def test_paused_reader_gets_every_byte_or_a_reset() -> None:
    """8 MiB through a relay with a 0.5 s idle timeout to a reader that pauses for 1.5 s."""
    reader, relay_a = await tcp_stream_pair()
    writer, relay_b = await tcp_stream_pair()
    for stream in (reader, relay_a, writer, relay_b):
        _small_buffers(stream)
    result: list[tuple[bytes, bool]] = []

    async def read() -> None:
        result.append(await _read_with_a_pause(reader, 1.5))

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(functools.partial(relay, relay_a, relay_b, idle_timeout=0.5))
            nursery.start_soon(_write_all_then_eof, writer)
            nursery.start_soon(read)
    _complete_or_reset(*result[0])


async def _read_slowly(stream: trio.SocketStream) -> tuple[bytes, bool]:
    """A slow consumer: 16 KiB every 20 ms, steadily (far slower than the writer)."""
    got = bytearray()
    reset = False
    try:
        while chunk := await stream.receive_some(16 * 1024):
            got += chunk
            await trio.sleep(0.02)
    except trio.BrokenResourceError:
        reset = True
    finally:
        await stream.aclose()
    return bytes(got), reset


async def test_send_blocked_on_a_slow_reader_is_not_idle() -> None:
    """While the relay waits on a reader that takes its bytes slowly, the transfer is alive:
    all of it arrives, although it lasts many idle timeouts."""
    reader, relay_a = await tcp_stream_pair()
    writer, relay_b = await tcp_stream_pair()
    for stream in (reader, relay_a, writer, relay_b):
        _small_buffers(stream)
    result: list[tuple[bytes, bool]] = []

    async def read() -> None:
        result.append(await _read_slowly(reader))

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(functools.partial(relay, relay_a, relay_b, idle_timeout=0.5))
            nursery.start_soon(_write_all_then_eof, writer)
            nursery.start_soon(read)
    got, reset = result[0]
    assert not reset
    assert got == PAYLOAD


async def test_a_reader_that_never_reads_loses_the_relay_with_a_reset() -> None:
    """A peer that stops taking bytes cannot hold a relay (its sockets, a server slot) for
    ever: after ``idle_timeout`` without progress both sides are reset."""
    reader, relay_a = await tcp_stream_pair()
    writer, relay_b = await tcp_stream_pair()
    for stream in (reader, relay_a, writer, relay_b):
        _small_buffers(stream)

    async def write_for_ever() -> None:
        try:
            while True:
                await writer.send_all(bytes(64 * 1024))
        except trio.BrokenResourceError:
            pass

    with trio.fail_after(20):  # hang detector: the relay ends after 0.5 s without progress
        async with trio.open_nursery() as nursery:
            nursery.start_soon(write_for_ever)
            await relay(relay_a, relay_b, idle_timeout=0.5)
    with pytest.raises(trio.BrokenResourceError):
        await _read_to_the_end(reader)
    await reader.aclose()
    await writer.aclose()


async def test_paused_reader_through_a_tunnel_gets_every_byte_or_a_reset(
    nursery: trio.Nursery,
) -> None:
    """The same through ``forward_local``: the relays on both ends of the tunnel (TCP -> mux
    stream on the server, mux stream -> TCP on the client) wait on a paused reader."""

    async def serve_payload(stream: trio.SocketStream) -> None:
        _small_buffers(stream)
        await _write_all_then_eof(stream)

    listeners = await nursery.start(
        functools.partial(trio.serve_tcp, serve_payload, 0, host="127.0.0.1")
    )
    target_port = listeners[0].socket.getsockname()[1]
    server = await nursery.start(
        functools.partial(pytunnel.serve, 0, token=TOKEN, idle_timeout=0.5)
    )
    tunnel = await pytunnel.connect_tunnel(nursery, server.address, token=TOKEN, idle_timeout=0.5)
    forward = await tunnel.forward_local("127.0.0.1", target_port)
    reader = await trio.open_tcp_stream(*forward.address)
    _small_buffers(reader)
    with trio.fail_after(30):
        got, reset = await _read_with_a_pause(reader, 1.5)
    _complete_or_reset(got, reset)


async def test_idle_relay_is_reset_on_both_sides() -> None:
    """Nothing moving for the idle timeout cuts a connection whose directions had not ended:
    both ends see a reset, not an EOF they could take for the end of the transfer."""
    left, relay_a = await tcp_stream_pair()
    right, relay_b = await tcp_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(functools.partial(relay, relay_a, relay_b, idle_timeout=0.2))
        await left.send_all(b"hello")
        assert await right.receive_some() == b"hello"
        for end in (left, right):
            with trio.fail_after(10), pytest.raises(trio.BrokenResourceError):
                await end.receive_some()
    await left.aclose()
    await right.aclose()


async def test_idle_relay_resets_its_mux_stream_with_idle_timeout_code() -> None:
    """A relay between TCP and a mux stream tells the peer why: ``IDLE_TIMEOUT``."""
    async with session_pair("tcp") as (client, server):
        mine, theirs = await open_pair(client, server)
        outside, relay_side = await tcp_stream_pair()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(functools.partial(relay, relay_side, mine, idle_timeout=0.2))
            with trio.fail_after(10), pytest.raises(trio.BrokenResourceError) as info:
                await theirs.receive_some()
            with trio.fail_after(10), pytest.raises(trio.BrokenResourceError):
                await outside.receive_some()
        assert isinstance(info.value.__cause__, StreamResetError)
        assert info.value.__cause__.code == ErrorCode.IDLE_TIMEOUT
        await outside.aclose()
        await theirs.aclose()


async def test_half_closed_relay_still_ends_cleanly() -> None:
    """Both directions reaching EOF is the one clean ending: each side reads everything, then
    EOF, even with an idle timeout shorter than the time the relay lives."""
    left, relay_a = await tcp_stream_pair()
    right, relay_b = await tcp_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(functools.partial(relay, relay_a, relay_b, idle_timeout=5))
        await left.send_all(b"request")
        await left.send_eof()
        got = b""
        with trio.fail_after(10):
            while chunk := await right.receive_some():
                got += chunk
        assert got == b"request"
        await right.send_all(b"reply")
        await right.send_eof()
        got = b""
        with trio.fail_after(10):
            while chunk := await left.receive_some():
                got += chunk
        assert got == b"reply"
    await left.aclose()
    await right.aclose()


class _BreaksUnderBothPumps(trio.abc.HalfCloseableStream):
    """A side that breaks while both pumps use it: the send fails at once and wakes the
    parked receive, which fails too, so neither pump ever meets a ``Cancelled``."""

    def __init__(self) -> None:
        self._broke = trio.Event()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await self._broke.wait()
        raise trio.BrokenResourceError("broken")

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self._broke.set()
        raise trio.BrokenResourceError("broken")

    async def wait_send_all_might_not_block(self) -> None:
        raise trio.BrokenResourceError("broken")

    async def send_eof(self) -> None:
        raise trio.BrokenResourceError("broken")

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


async def test_both_directions_meeting_a_break_reset_the_other_side() -> None:
    """Both pumps can meet the break without a ``Cancelled`` ever being raised: the relay was
    still cut, so the healthy side must see a reset, never the clean EOF of a finished
    transfer (seen as a few clean EOFs among hundreds of connections torn down at once)."""
    ours, theirs = await tcp_stream_pair()
    with trio.fail_after(10):  # hang detector
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                functools.partial(relay, ours, _BreaksUnderBothPumps(), idle_timeout=30)
            )
            await trio.testing.wait_all_tasks_blocked()  # both pumps parked on their reads
            await theirs.send_all(b"data that meets the broken side")
        with pytest.raises(trio.BrokenResourceError):
            await _read_to_the_end(theirs)
    await theirs.aclose()


async def _read_to_the_end(stream: trio.SocketStream) -> None:
    while await stream.receive_some():
        pass


async def _partial_then_rst(stream: trio.SocketStream) -> None:
    import socket
    import struct

    await stream.send_all(b"partial")
    await trio.sleep(0.1)
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await stream.aclose()


async def test_target_reset_is_not_reported_as_clean_eof(
    nursery: trio.Nursery, tunnel: pytunnel.Tunnel
) -> None:
    listeners = await nursery.start(
        functools.partial(trio.serve_tcp, _partial_then_rst, 0, host="127.0.0.1")
    )
    port = listeners[0].socket.getsockname()[1]
    forward = await tunnel.forward_local("127.0.0.1", port)
    conn = await trio.open_tcp_stream(*forward.address)
    received = b""
    error: BaseException | None = None
    with trio.fail_after(5):
        try:
            while chunk := await conn.receive_some():
                received += chunk
        except trio.BrokenResourceError as exc:
            error = exc
    assert received == b"partial"
    assert isinstance(error, trio.BrokenResourceError), "the far end saw a clean EOF"


@pytest.mark.parametrize("wrapped", [False, True], ids=["bare", "through-faults"])
async def test_a_broken_mux_stream_resets_its_tcp_side_at_once(wrapped: bool) -> None:
    """When the mux stream breaks (its session died, its peer reset it), the relay's TCP
    connection is reset in that same synchronous step, before any relay task runs again: a
    session carrying thousands of relays resets all their peers in one pass, not after each
    relay has unwound in turn."""
    from pytunnel.errors import SessionClosedError
    from pytunnel.testing import Faults

    async with session_pair("tcp") as (client, server):
        mine, theirs = await open_pair(client, server)
        outside, relay_side = await tcp_stream_pair()
        a: trio.abc.HalfCloseableStream = relay_side
        b: trio.abc.HalfCloseableStream = mine
        if wrapped:
            a, b = Faults().wrap(relay_side, mine)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(functools.partial(relay, a, b, idle_timeout=30))
            await trio.testing.wait_all_tasks_blocked()
            assert isinstance(mine, MuxStream)
            mine.break_with(SessionClosedError("the session died"))
            # no checkpoint since: the relay's tasks have not run, the socket is closed
            assert relay_side.socket.fileno() == -1
            with trio.fail_after(10), pytest.raises(trio.BrokenResourceError):
                await _read_to_the_end(outside)  # a reset, never a clean EOF
        await outside.aclose()
        await theirs.aclose()


async def test_what_a_finished_peer_sent_still_arrives_when_its_session_dies() -> None:
    """A peer that had sent everything and its EOF before the session died: the relay still
    delivers the bytes, then the EOF (the immediate reset is only for a stream that broke
    with data possibly missing)."""
    async with session_pair("tcp") as (client, server):
        mine, theirs = await open_pair(client, server)
        outside, relay_side = await tcp_stream_pair()
        outside.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_BUFFER)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(functools.partial(relay, relay_side, mine, idle_timeout=30))
            await theirs.send_all(b"the whole answer")
            await theirs.send_eof()
            await trio.testing.wait_all_tasks_blocked()
            assert isinstance(mine, MuxStream)
            mine.session_ended(trio.BrokenResourceError("session died"), locally=False)
            assert relay_side.socket.fileno() != -1
            got = b""
            with trio.fail_after(10):
                while chunk := await outside.receive_some():
                    got += chunk
            assert got == b"the whole answer"
            await outside.send_eof()
        await outside.aclose()
        await theirs.aclose()


@pytest.mark.parametrize("timeout", [10.0, 0.5])
async def test_idle_reset_comes_within_the_slack_after_the_last_byte(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture, timeout: float
) -> None:
    """The idle deadline moves only once activity pushed it more than the slack
    (``min(1 s, timeout / 10)``): the reset never comes before ``timeout`` after the last
    byte, and at most the slack later. Bytes closer together than the slack, which do not
    move the deadline, still keep the relay for ``timeout`` after the last of them."""
    caplog.set_level("INFO", "pytunnel.relay")
    slack = min(1.0, timeout / 10)
    left, relay_a = trio.testing.memory_stream_pair()
    relay_b, right = trio.testing.memory_stream_pair()
    last = 0.0
    ended = 0.0

    async def run_relay() -> None:
        nonlocal ended
        await relay(relay_a, relay_b, idle_timeout=timeout)
        ended = trio.current_time()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_relay)
        # three bytes, each well inside the timeout of the one before, the last two closer
        # together than the slack
        for pause in (timeout * 0.8, timeout * 0.8, slack * 0.5):
            await trio.sleep(pause)
            await left.send_all(b"x")
            assert await right.receive_some() == b"x"
            last = trio.current_time()
    assert last + timeout <= ended <= last + timeout + slack
    assert [r.getMessage() for r in caplog.records] == [f"relay reset after {timeout:g} s idle"]


def test_the_idle_clock_reads_trios_own_clock_without_its_method() -> None:
    """With trio's own clock the relay reads the time as ``offset + perf_counter()``: the
    same clock as ``trio.current_time()`` (each read falls between two of trio's), and with
    any other clock (a test's) through the clock's method, as the idle tests rely on."""
    import time

    from pytunnel._relay import _clock_reader

    async def system() -> None:
        now, offset = _clock_reader()
        assert offset is not None
        for _ in range(100):
            before = trio.current_time()
            mine = offset + time.perf_counter()
            after = trio.current_time()
            assert before <= mine <= after
            assert before <= now() <= trio.current_time()

    trio.run(system)

    clock = trio.testing.MockClock(autojump_threshold=0)

    async def mock() -> None:
        now, offset = _clock_reader()
        assert offset is None
        await trio.sleep(1000)
        assert now() == trio.current_time() >= 1000

    trio.run(mock, clock=clock)


async def test_the_relay_asks_the_standard_socket_for_its_descriptor() -> None:
    """The per-chunk descriptor read goes to the standard socket under trio's (one Python
    call fewer), which answers as trio's does, -1 once trio's socket is closed."""
    from pytunnel._direct import raw_socket as _raw

    a, b = await tcp_stream_pair()
    raw = _raw(a.socket)
    assert type(raw) is socket.socket
    assert raw.fileno() == a.socket.fileno() >= 0
    a.socket.close()
    assert raw.fileno() == a.socket.fileno() == -1
    await b.aclose()

    class Bare:
        def fileno(self) -> int:
            return 7

    bare = Bare()
    assert _raw(bare) is bare  # type: ignore[arg-type]
