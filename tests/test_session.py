"""The multiplexed session over real loopback TCP and over memory streams."""

from __future__ import annotations

import functools
import hashlib
import os
import random
import socket
import struct

import pytest
import trio
import trio.lowlevel
import trio.testing
from helpers import (
    count_tasks,
    eight_streams_at_once,
    open_pair,
    read_to_eof,
    session_pair,
    tcp_stream_pair,
)

import pytunnel
from pytunnel import (
    ErrorCode,
    LocalProtocolError,
    NodeTimeoutError,
    NodeUnstableError,
    RemoteProtocolError,
    SessionClosedError,
    SessionConfig,
    StreamLimitError,
    StreamRefusedError,
    StreamResetError,
)
from pytunnel._relay import relay
from pytunnel.protocol.frames import FrameDecoder, encode_message
from pytunnel.protocol.messages import Data, Datagram, GoAway, Open, Ping, Pong, Reset
from pytunnel.session import Role, Session, open_session


async def _send_and_eof(stream: trio.abc.HalfCloseableStream, data: bytes, chunk: int) -> None:
    for i in range(0, len(data), chunk):
        await stream.send_all(data[i : i + chunk])
    await stream.send_eof()


async def test_100_concurrent_streams_sha256(transport: str) -> None:
    """Each stream carries random data both ways; the far end checks SHA-256."""
    rng = random.Random(1234)
    failures: list[str] = []
    with trio.fail_after(60):
        async with session_pair(transport) as (client, server):

            async def server_side() -> None:
                async with trio.open_nursery() as nursery:
                    for _ in range(100):
                        incoming = await server.accept_stream()
                        nursery.start_soon(echo_digest, incoming.accept())

            async def echo_digest(stream: trio.abc.HalfCloseableStream) -> None:
                # read everything, answer with its digest followed by a payload of our own
                data = await read_to_eof(stream)
                reply = os.urandom(len(data) // 3 + 1)
                await stream.send_all(hashlib.sha256(data).digest())
                await stream.send_all(hashlib.sha256(reply).digest())
                await _send_and_eof(stream, reply, 7001)
                await stream.aclose()

            async def client_side(index: int, size: int) -> None:
                data = os.urandom(size)
                stream = await client.open_stream(tag=index)
                await _send_and_eof(stream, data, rng.randint(1, 100_000))
                got = await read_to_eof(stream)
                await stream.aclose()
                digest, reply_digest, reply = got[:32], got[32:64], got[64:]
                if digest != hashlib.sha256(data).digest():
                    failures.append(f"stream {index}: server saw different bytes")
                if reply_digest != hashlib.sha256(reply).digest():
                    failures.append(f"stream {index}: client saw different bytes")

            async with trio.open_nursery() as nursery:
                nursery.start_soon(server_side)
                for i in range(100):
                    nursery.start_soon(client_side, i, rng.choice([1, 1000, 65_537, 300_000]))
    assert failures == []


async def test_slow_reader_does_not_stall_others() -> None:
    """One stream whose reader stops; another still moves 50 MiB; buffers stay bounded."""
    window = 256 * 1024
    total = 50 * 1024 * 1024
    with trio.fail_after(90):
        async with session_pair("tcp", window=window) as (client, server):
            stalled_a, stalled_b = await open_pair(client, server)
            bulk_a, bulk_b = await open_pair(client, server)
            stalled_sent = 0

            async def stalled_writer() -> None:
                nonlocal stalled_sent
                chunk = b"s" * 65536
                while True:  # ends by cancellation below; blocks once the window is full
                    await stalled_a.send_all(chunk)
                    stalled_sent += len(chunk)

            received = 0
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stalled_writer)
                nursery.start_soon(_send_and_eof, bulk_a, b"b" * (1024 * 1024) * 50, 1024 * 1024)
                while chunk := await bulk_b.receive_some():
                    received += len(chunk)
                    assert stalled_b.bytes_buffered <= window
                nursery.cancel_scope.cancel()
            assert received == total
            # the stalled stream's sender got at most one window ahead (plus the chunk in hand)
            assert stalled_b.bytes_buffered <= window
            assert stalled_sent <= window
            assert stalled_b.bytes_buffered > 0
            # and everything it buffered is still readable afterwards, in order
            assert (await stalled_b.receive_some(10)) == b"s" * 10


async def test_half_close_each_direction(transport: str) -> None:
    with trio.fail_after(10):
        async with session_pair(transport) as (client, server):
            # client finishes first, still gets the full reply (like `ssh -L` with shutdown(WR))
            a, b = await open_pair(client, server)
            await a.send_all(b"request")
            await a.send_eof()
            assert await read_to_eof(b) == b"request"
            await b.send_all(b"reply " * 1000)
            await b.send_eof()
            assert await read_to_eof(a) == b"reply " * 1000
            await a.aclose()
            await b.aclose()
            # server finishes first
            a, b = await open_pair(client, server)
            await b.send_all(b"banner")
            await b.send_eof()
            assert await read_to_eof(a) == b"banner"
            with pytest.raises(trio.ClosedResourceError):
                await b.send_all(b"more")
            await a.send_all(b"late")
            await a.send_eof()
            assert await read_to_eof(b) == b"late"
            await a.aclose()
            await b.aclose()
            assert client.open_streams == 0
            assert server.open_streams == 0
            assert client._mux.open_streams == 0
            assert server._mux.open_streams == 0


async def test_reset_mid_transfer(transport: str) -> None:
    """A receiver closing with unread data resets the stream: the writer sees it broken."""
    with trio.fail_after(10):
        async with session_pair(transport) as (client, server):
            a, b = await open_pair(client, server)
            await a.send_all(b"x" * 100_000)
            await trio.testing.wait_all_tasks_blocked()
            assert await b.receive_some(10) == b"x" * 10
            await b.aclose()  # unread data left: Reset
            with pytest.raises(trio.BrokenResourceError) as info:  # noqa: PT012
                for _ in range(1000):
                    await a.send_all(b"y" * 65536)
            assert isinstance(info.value.__cause__, StreamResetError)
            assert info.value.__cause__.code == ErrorCode.CANCELLED
            with pytest.raises(trio.BrokenResourceError):
                await a.receive_some()
            await a.aclose()
            # the session itself is unharmed
            c, d = await open_pair(client, server)
            await c.send_all(b"ok")
            assert await d.receive_some() == b"ok"


async def test_closed_peer_answers_late_data_with_reset(transport: str) -> None:
    """Clean close (nothing unread) sends Fin; data the peer sends afterwards gets Reset."""
    with trio.fail_after(10):
        async with session_pair(transport) as (client, server):
            a, b = await open_pair(client, server)
            await b.aclose()
            assert await a.receive_some() == b""  # b's Fin
            with pytest.raises(trio.BrokenResourceError):  # noqa: PT012
                for _ in range(1000):
                    await a.send_all(b"z" * 1000)
                    await trio.lowlevel.checkpoint()


async def _collect(how: str, transport: str) -> tuple[set[type[BaseException]], object]:
    async with session_pair(transport, window=1024) as (client, server):
        streams = [await open_pair(client, server) for _ in range(5)]
        outcomes: set[type[BaseException]] = set()

        async def blocked_read(s: trio.abc.ReceiveStream) -> None:
            try:
                await s.receive_some()
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                outcomes.add(type(exc))

        async def blocked_write(s: trio.abc.SendStream) -> None:
            try:
                while True:
                    await s.send_all(b"w" * 4096)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                outcomes.add(type(exc))

        async with trio.open_nursery() as nursery:
            for a, _b in streams:
                nursery.start_soon(blocked_read, a)
                nursery.start_soon(blocked_write, a)
            await trio.testing.wait_all_tasks_blocked()
            if how == "close-session":
                await client.aclose()
            elif how == "peer-closes-session":
                await server.aclose()
            else:
                await trio.aclose_forcefully(server._transport)
        with pytest.raises(SessionClosedError):
            await client.open_stream()
        with pytest.raises(SessionClosedError):
            await client.accept_stream()
        return outcomes, client.close_reason


async def test_streams_see_closed_when_we_close(transport: str) -> None:
    with trio.fail_after(10):
        outcomes, reason = await _collect("close-session", transport)
    assert outcomes == {trio.ClosedResourceError}
    assert isinstance(reason, SessionClosedError)


async def test_streams_see_broken_when_peer_closes(transport: str) -> None:
    with trio.fail_after(10):
        outcomes, reason = await _collect("peer-closes-session", transport)
    assert outcomes == {trio.BrokenResourceError}
    assert isinstance(reason, SessionClosedError)
    assert reason.code == ErrorCode.NORMAL


async def test_streams_see_broken_when_transport_lost(transport: str) -> None:
    with trio.fail_after(10):
        outcomes, reason = await _collect("transport-lost", transport)
    assert outcomes == {trio.BrokenResourceError}
    assert isinstance(reason, trio.BrokenResourceError)


async def test_no_task_outlives_the_session(transport: str) -> None:
    baseline = count_tasks()
    with trio.fail_after(10):
        async with session_pair(transport) as (client, server):
            pairs = [await open_pair(client, server) for _ in range(20)]
            for a, b in pairs:
                await a.send_all(b"data")
                assert await b.receive_some() == b"data"
            assert count_tasks() > baseline
    assert count_tasks() == baseline


async def test_cancelling_the_caller_ends_everything() -> None:
    baseline = count_tasks()
    with trio.move_on_after(0.5) as scope:
        async with session_pair("tcp") as (client, server):
            _a, b = await open_pair(client, server)
            await b.receive_some()  # blocks until cancelled
    assert scope.cancelled_caught
    assert count_tasks() == baseline


async def test_refusal_is_typed(transport: str) -> None:
    with trio.fail_after(10):
        async with session_pair(transport) as (client, server):

            async def refuse_all() -> None:
                for code in (ErrorCode.NODE_TIMEOUT, ErrorCode.NODE_UNSTABLE):
                    incoming = await server.accept_stream()
                    assert (incoming.host, incoming.port) == ("db.internal", 5432)
                    incoming.refuse(code, "dial failed")

            async with trio.open_nursery() as nursery:
                nursery.start_soon(refuse_all)
                with pytest.raises(NodeTimeoutError) as timeout_info:
                    await client.open_stream("db.internal", 5432)
                with pytest.raises(NodeUnstableError) as unstable_info:
                    await client.open_stream("db.internal", 5432)
            assert timeout_info.value.target == "db.internal:5432"
            assert timeout_info.value.code == ErrorCode.NODE_TIMEOUT
            assert unstable_info.value.category == "NODE_UNSTABLE"
            assert client.open_streams == 0
            assert server.open_streams == 0


async def test_cancelled_open_leaves_nothing(transport: str) -> None:
    with trio.fail_after(10):
        async with session_pair(transport) as (client, server):
            with trio.move_on_after(0.05):
                await client.open_stream("slow", 1)  # nobody answers
            incoming = await server.accept_stream()
            await trio.sleep(0.05)  # let the Reset arrive
            assert client.open_streams == 0
            assert client._mux.open_streams == 0
            assert server._mux.open_streams == 0
            stream = incoming.accept() if server.open_streams else None
            assert stream is None or stream._broken is not None


async def test_stream_limit(transport: str) -> None:
    with trio.fail_after(10):
        async with session_pair(transport, max_streams=2) as (client, server):
            await open_pair(client, server)
            await open_pair(client, server)
            with pytest.raises(StreamLimitError):
                await client.open_stream()


async def test_peer_stream_limit_refuses(transport: str) -> None:
    """The limit is enforced by the receiver too, whatever the opener's own setting."""
    with trio.fail_after(10):
        a, b = (
            trio.testing.memory_stream_pair() if transport == "memory" else await tcp_stream_pair()
        )
        async with (
            open_session(a, Role.CLIENT, SessionConfig(max_streams=10)) as client,
            open_session(b, Role.SERVER, SessionConfig(max_streams=1)) as server,
        ):
            await open_pair(client, server)
            with pytest.raises(StreamLimitError):
                await client.open_stream()


async def test_ping_measures_rtt(transport: str) -> None:
    with trio.fail_after(10):
        async with session_pair(transport) as (client, server):
            assert 0 <= await client.ping() < 5
            assert 0 <= await server.ping() < 5


async def test_protocol_violation_closes_session_with_goaway(transport: str) -> None:
    """A peer that sends data beyond the window gets GoAway(FLOW_CONTROL_ERROR)."""
    a, raw = trio.testing.memory_stream_pair() if transport == "memory" else await tcp_stream_pair()
    with trio.fail_after(10):
        async with open_session(a, Role.SERVER, SessionConfig(window=100)) as server:
            await raw.send_all(encode_message(Open(1, 1000)))
            incoming = await server.accept_stream()
            stream = incoming.accept()
            await raw.send_all(encode_message(Data(1, b"x" * 101)))
            with pytest.raises(trio.BrokenResourceError) as info:
                await stream.receive_some()
            await server.wait_closed()
            reason = server.close_reason
            assert isinstance(reason, RemoteProtocolError)
            assert reason.code == ErrorCode.FLOW_CONTROL_ERROR
            assert info.value.__cause__ is reason
            # the peer was told why (GoAway may overtake the queued Accept: it is a control
            # frame)
            decoder = FrameDecoder()
            seen = []
            while chunk := await raw.receive_some():
                seen.extend(decoder.feed(chunk))
            assert sorted(type(m).__name__ for m in seen) == ["Accept", "GoAway"]
            goaway = next(m for m in seen if isinstance(m, GoAway))
            assert goaway.code == ErrorCode.FLOW_CONTROL_ERROR


async def test_garbage_from_peer_is_typed_error() -> None:
    a, raw = trio.testing.memory_stream_pair()
    with trio.fail_after(10):
        async with open_session(a, Role.SERVER) as server:
            await raw.send_all(b"\x00\x00\x00\x03abc")
            await server.wait_closed()
            assert isinstance(server.close_reason, RemoteProtocolError)
            assert server.close_reason.code == ErrorCode.MALFORMED_FRAME
            # the peer is told why, then sees the connection closed (not left dangling)
            received = b""
            with trio.fail_after(5):
                while chunk := await raw.receive_some():
                    received += chunk
            (goaway,) = FrameDecoder().feed(received)
            assert isinstance(goaway, GoAway)
            assert goaway.code == ErrorCode.MALFORMED_FRAME


def test_session_config_is_validated() -> None:
    with pytest.raises(ValueError, match="max_frame_size"):
        SessionConfig(max_frame_size=100)
    with pytest.raises(ValueError, match="window"):
        SessionConfig(window=0)


async def test_oversized_frame_rejected_before_allocation() -> None:
    a, raw = trio.testing.memory_stream_pair()
    with trio.fail_after(10):
        async with open_session(a, Role.SERVER) as server:
            await raw.send_all((2**32 - 1).to_bytes(4, "big"))
            await server.wait_closed()
            assert isinstance(server.close_reason, RemoteProtocolError)
            assert server.close_reason.code == ErrorCode.FRAME_TOO_LARGE


async def test_goaway_stops_new_streams(transport: str) -> None:
    with trio.fail_after(10):
        async with session_pair(transport) as (client, server):
            await server.aclose(ErrorCode.GOING_AWAY, "maintenance")
            await client.wait_closed()
            reason = client.close_reason
            assert isinstance(reason, SessionClosedError)
            assert reason.code == ErrorCode.GOING_AWAY
            with pytest.raises(SessionClosedError) as info:
                await client.open_stream()
            assert info.value.code == ErrorCode.GOING_AWAY


async def test_body_exception_is_not_wrapped() -> None:
    a, _b = trio.testing.memory_stream_pair()
    with pytest.raises(KeyError):
        async with open_session(a, Role.CLIENT):
            raise KeyError("mine")


# ----------------------------------------------------------------------------- stream kinds


async def test_a_datagram_stream_carries_datagrams_both_ways(transport: str) -> None:
    with trio.fail_after(10):
        async with session_pair(transport) as (client, server):
            opened, accepted = await open_pair(client, server, datagrams=True)
            assert opened.datagrams
            assert accepted.datagrams
            assert opened.send_datagram(b"query")
            assert await accepted.receive_datagram() == b"query"
            assert accepted.send_datagram(b"answer")
            assert await opened.receive_datagram() == b"answer"


async def test_a_byte_stream_refuses_to_send_datagrams() -> None:
    with trio.fail_after(10):
        async with session_pair() as (client, server):
            opened, accepted = await open_pair(client, server)
            assert not opened.datagrams
            assert not accepted.datagrams
            with pytest.raises(LocalProtocolError) as info:
                opened.send_datagram(b"x")
            assert info.value.code == ErrorCode.STREAM_STATE_ERROR
            with pytest.raises(LocalProtocolError):
                await accepted.receive_datagram()


async def test_datagram_on_a_byte_stream_ends_the_session_without_queueing() -> None:
    """A peer cannot park datagrams on a TCP relay's stream: the first one is a protocol
    violation, and nothing was queued for it."""
    a, raw = await tcp_stream_pair()
    with trio.fail_after(10):
        async with open_session(a, Role.SERVER) as server:
            await raw.send_all(encode_message(Open(1, 1000)))
            stream = (await server.accept_stream()).accept()
            await raw.send_all(encode_message(Datagram(1, b"x" * 60_000)))
            await server.wait_closed()
            reason = server.close_reason
            assert isinstance(reason, RemoteProtocolError)
            assert reason.code == ErrorCode.STREAM_STATE_ERROR
            assert stream._datagrams is None
            decoder = FrameDecoder()
            seen = []
            while chunk := await raw.receive_some():
                seen.extend(decoder.feed(chunk))
            assert [m.code for m in seen if isinstance(m, GoAway)] == [ErrorCode.STREAM_STATE_ERROR]
    await raw.aclose()


# ----------------------------------------------------------------------------- floods


async def _flood(raw: trio.SocketStream, frame: bytes, session: Session, limit: int) -> int:
    """Send ``frame`` in batches, never reading, until ``session`` ends (at most ``limit``
    frames); return how many were sent."""
    batch = frame * 1000
    sent = 0
    try:
        while not session.closed and sent < limit:
            await raw.send_all(batch)
            sent += 1000
    except trio.BrokenResourceError:
        pass
    return sent


async def test_ping_flood_from_a_peer_that_does_not_read_is_cut_off() -> None:
    a, raw = await tcp_stream_pair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    with trio.fail_after(60):
        async with open_session(a, Role.SERVER, SessionConfig(max_control_queue=64 * 1024)) as s:
            await _flood(raw, encode_message(Ping(2**64 - 1)), s, limit=2_000_000)
            await s.wait_closed()
            assert isinstance(s.close_reason, RemoteProtocolError)
            assert s.close_reason.code == ErrorCode.FLOOD
            assert s._mux.bytes_to_send < 64 * 1024 + 4096  # what was queued stayed bounded
    await raw.aclose()


async def test_a_large_burst_does_not_monopolise_the_event_loop() -> None:
    """Decoding a burst of thousands of frames checkpoints between batches."""
    a, raw = trio.testing.memory_stream_pair()
    burst = b"".join(encode_message(Ping(i)) for i in range(5000))
    ticks = 0
    with trio.fail_after(10):
        async with open_session(a, Role.SERVER) as server, trio.open_nursery() as nursery:

            async def tick() -> None:
                nonlocal ticks
                while True:
                    ticks += 1
                    await trio.lowlevel.checkpoint()

            nursery.start_soon(tick)
            before = server.bytes_read
            await raw.send_all(burst)
            start = ticks
            while server.bytes_read - before < len(burst) or server._mux.frames_pending:
                await trio.lowlevel.checkpoint()
            assert ticks - start >= 5000 // 256
            nursery.cancel_scope.cancel()


async def test_frames_pipelined_with_the_handshake_are_answered_without_more_bytes() -> None:
    """Bytes a handshake read past its last frame are decoded at once, not at the next read."""
    a, raw = trio.testing.memory_stream_pair()
    decoder = FrameDecoder()
    decoder.receive_data(encode_message(Ping(5)))
    with trio.fail_after(10):
        async with open_session(a, Role.SERVER, decoder=decoder):
            reply = FrameDecoder()
            seen: list[object] = []
            while not seen:
                seen.extend(reply.feed(await raw.receive_some()))
            assert seen == [Pong(5)]


# ----------------------------------------------------------------------------- linger


async def test_a_stream_closed_on_a_silent_peer_is_reset_after_the_linger(
    autojump_clock: trio.abc.Clock,
) -> None:
    with trio.fail_after(120):
        async with session_pair(close_linger=10.0) as (client, server):
            opened, accepted = await open_pair(client, server)
            await opened.aclose()  # our Fin; the peer never answers with its own
            assert await accepted.receive_some() == b""
            start = trio.current_time()
            while server._mux.has_stream(accepted.stream_id):  # the silent peer waits
                await trio.sleep(1)
            with pytest.raises(trio.BrokenResourceError) as info:
                await accepted.send_all(b"late")
            assert isinstance(info.value.__cause__, StreamResetError)
            assert trio.current_time() - start >= 10.0
            assert client._mux.open_streams == 0
            assert server._mux.open_streams == 0


async def test_a_stream_whose_peer_finishes_in_time_is_not_reset(
    autojump_clock: trio.abc.Clock,
) -> None:
    with trio.fail_after(120):
        async with session_pair(close_linger=10.0) as (client, server):
            opened, accepted = await open_pair(client, server)
            await opened.aclose()
            assert await accepted.receive_some() == b""
            await trio.sleep(5)
            await accepted.aclose()
            while client._mux.open_streams:
                await trio.sleep(1)
            assert trio.current_time() < 10
            assert client._mux.lingering == 0


# ----------------------------------------------------------------------------- send_eof


async def test_send_eof_crosses_a_session_and_a_relay() -> None:
    """EOF from the opener reaches the TCP target through the relay, and the target's reply
    and its EOF come back: a broken half-close fails here in seconds, not as a long hang."""
    received: list[bytes] = []

    async def target(conn: trio.SocketStream) -> None:
        data = await read_to_eof(conn)  # returns only at EOF
        received.append(data)
        await conn.send_all(hashlib.sha256(data).digest())
        await conn.send_eof()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            [listener] = await nursery.start(
                functools.partial(trio.serve_tcp, target, 0, host="127.0.0.1")
            )
            port = listener.socket.getsockname()[1]
            async with session_pair("tcp") as (client, server):

                async def serve() -> None:
                    incoming = await server.accept_stream()
                    conn = await trio.open_tcp_stream("127.0.0.1", incoming.port)
                    await relay(incoming.accept(), conn, idle_timeout=30)

                nursery.start_soon(serve)
                stream = await client.open_stream("127.0.0.1", port)
                payload = os.urandom(300_000)
                await stream.send_all(payload)
                await stream.send_eof()
                assert await read_to_eof(stream) == hashlib.sha256(payload).digest()
                assert received == [payload]
            nursery.cancel_scope.cancel()


# ------------------------------------------------------------------------ stream slots


async def test_wait_stream_slot_parks_at_the_cap_until_a_stream_closes(transport: str) -> None:
    async with session_pair(transport, max_streams=2) as (client, server):
        first, first_peer = await open_pair(client, server)
        slot = await client.wait_stream_slot()  # the second slot, reserved
        assert client.free_stream_slots == 0
        got: list[object] = []

        async def waiter() -> None:
            got.append(await client.wait_stream_slot())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            assert got == []  # parked: one stream open, one slot reserved
            slot.release()  # giving a reservation back frees its slot at once
            with trio.fail_after(5):
                while not got:
                    await trio.sleep(0.01)
        second = got[0]
        assert client.free_stream_slots == 0
        got.clear()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            assert got == []
            await first.aclose()  # the close completes when the peer's Fin comes back
            await first_peer.aclose()
            with trio.fail_after(5):
                while not got:
                    await trio.sleep(0.01)
        # a reservation is used by open_stream, and the slot counts as an open stream then
        async with trio.open_nursery() as nursery:

            async def accept() -> None:
                (await server.accept_stream()).accept()

            nursery.start_soon(accept)
            stream = await client.open_stream(slot=second)  # type: ignore[arg-type]
        assert not second.held  # type: ignore[attr-defined]
        assert client.free_stream_slots == 0  # one open, one reserved
        await stream.aclose()


async def test_wait_stream_slot_raises_when_the_session_ends() -> None:
    async with session_pair(max_streams=1) as (client, server):
        await client.wait_stream_slot()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.aclose)
            with pytest.raises(SessionClosedError), trio.fail_after(5):
                await client.wait_stream_slot()


# ------------------------------------------------------------------------ small reads


async def test_small_reads_return_every_byte_in_order(transport: str) -> None:
    payload = os.urandom(300_000)
    async with session_pair(transport) as (client, server):
        a, b = await open_pair(client, server)
        for n in (1, 7, 100, 4096, 65535, 65536, 65537, 10**6):
            expected = payload[: 5_000 if n < 100 else None]
            async with trio.open_nursery() as nursery:
                nursery.start_soon(a.send_all, expected)
                got = bytearray()
                while len(got) < len(expected):
                    chunk = await b.receive_some(n)
                    assert 0 < len(chunk) <= n
                    got += chunk
                assert bytes(got) == expected, n
        await a.send_eof()
        assert await b.receive_some(3) == b""


async def test_small_reads_do_not_copy_the_rest_of_the_chunk() -> None:
    """A partial read takes its bytes from the buffered chunk in place: the chunk itself stays
    queued (read on from an offset) instead of being re-sliced, which made reading one
    64 KiB chunk in n-byte steps cost O(chunk**2 / n) bytes copied."""
    async with session_pair() as (client, server):
        a, b = await open_pair(client, server)
        data = os.urandom(64 * 1024)
        await a.send_all(data)
        with trio.fail_after(10):
            while b.bytes_buffered < len(data):
                await trio.sleep(0.01)
        head = b._buffer[0]  # type: ignore[attr-defined]
        got = bytearray()
        for _ in range(1000):
            got += await b.receive_some(16)
            assert b._buffer[0] is head  # type: ignore[attr-defined]
        while len(got) < len(data):
            got += await b.receive_some(5000)
        assert bytes(got) == data
        assert not b._buffer  # type: ignore[attr-defined]


async def test_open_stream_with_an_invalid_target_raises_a_typed_error(transport: str) -> None:
    from pytunnel import InvalidTargetError

    async with session_pair(transport) as (client, server):
        for host, port in (("a" * 256, 80), ("\udcff", 80), ("ok", 70000), ("ok", -1)):
            with pytest.raises(InvalidTargetError) as info:
                await client.open_stream(host, port)
            assert isinstance(info.value, StreamRefusedError)  # handled like a refusal
        # nothing was sent: the session and its stream ids are intact
        a, b = await open_pair(client, server, host="a" * 255, port=80)
        assert b.host == "a" * 255  # type: ignore[attr-defined]
        await a.aclose()
        assert not client.closed
        assert not server.closed


# ------------------------------------------------------------------------ peer text


def test_printable_escapes_what_could_forge_a_log_line() -> None:
    from pytunnel.errors import printable

    assert printable("db.example:5432 é") == "db.example:5432 é"
    assert printable("a\nb\r\x1b[2J\u2028\udcff") == "a\\nb\\r\\x1b[2J\\u2028\\udcff"
    assert printable("a\\nb") == "a\\\\nb"  # a literal backslash cannot pass for an escape


async def test_peer_reasons_in_refusals_resets_and_goaway_are_escaped() -> None:
    async with session_pair() as (client, server):

        async def answer() -> None:
            (await server.accept_stream()).refuse(ErrorCode.TARGET_FORBIDDEN, "no\nFORGED line")
            (await server.accept_stream()).accept().reset(ErrorCode.CANCELLED, "x\r\nFORGED")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(answer)
            with pytest.raises(StreamRefusedError) as refused:
                await client.open_stream("h", 1)
            stream = await client.open_stream("h", 2)
        assert refused.value.message == "no\\nFORGED line"
        assert "\n" not in str(refused.value)
        with pytest.raises(trio.BrokenResourceError) as broken:
            await stream.receive_some()
        cause = broken.value.__cause__
        assert isinstance(cause, StreamResetError)
        assert cause.message == "x\\r\\nFORGED"
        await server.aclose(ErrorCode.GOING_AWAY, "bye\nFORGED")
        await client.wait_closed()
        with pytest.raises(SessionClosedError) as ended:
            await client.open_stream("h", 3)
        assert "\n" not in str(ended.value)
        assert "bye\\nFORGED" in str(ended.value)


async def test_a_pong_overtakes_queued_bulk_data() -> None:
    """On a link that drains slowly, the answer to a heartbeat goes out with the next write
    instead of behind everything queued."""
    a, raw = trio.testing.lockstep_stream_pair()  # every write waits for the reader
    high, chunk = 64 * 1024, 16 * 1024
    config = SessionConfig(write_buffer_high=high, max_data_chunk=chunk)
    decoder = FrameDecoder(2**24)

    async def next_message() -> object:
        while (message := decoder.next_message()) is None:
            decoder.receive_data(await raw.receive_some(4096))
        return message

    with trio.fail_after(20):
        async with open_session(a, Role.SERVER, config) as server, trio.open_nursery() as nursery:
            await raw.send_all(encode_message(Open(1, 2**24)))
            stream = (await server.accept_stream()).accept()
            nursery.start_soon(stream.send_all, bytes(4 * 1024 * 1024))
            while not isinstance(await next_message(), Data):
                pass
            await trio.testing.wait_all_tasks_blocked()  # a write in flight, more queued
            await raw.send_all(encode_message(Ping(77)))
            await trio.testing.wait_all_tasks_blocked()
            data_before_pong = 0
            while not isinstance(message := await next_message(), Pong):
                if isinstance(message, Data):
                    data_before_pong += len(message.data)
            assert message == Pong(77)
            # at most the rest of the write in flight (at most high + chunk bytes, one chunk of
            # which was read before the Ping), not the queue behind it
            assert data_before_pong <= high
            stream.reset()
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("transport", ["memory", "tcp"])
async def test_data_and_fin_received_before_session_end_are_readable(transport: str) -> None:
    async with session_pair(transport) as (client, server):
        mine, theirs = await open_pair(client, server, host="t", port=1)
        await theirs.send_all(b"the whole response")
        await theirs.send_eof()
        await server.aclose()  # GoAway, then the transport closes
        with trio.fail_after(5):
            await client.wait_closed()
        received = b""
        while chunk := await mine.receive_some():
            received += chunk
        assert received == b"the whole response"


async def test_reset_of_an_opening_stream_wakes_the_opener() -> None:
    a, b = trio.testing.memory_stream_pair()
    async with open_session(a, Role.CLIENT) as client:
        async with trio.open_nursery() as nursery:
            result: list[BaseException] = []

            async def opener() -> None:
                try:
                    await client.open_stream("t", 1)
                except BaseException as exc:
                    result.append(exc)
                    if isinstance(exc, trio.Cancelled):
                        raise

            nursery.start_soon(opener)
            # a peer (another implementation) answers the Open with Reset, as yamux allows
            decoder = FrameDecoder(2**20)
            while True:
                decoder.receive_data(await b.receive_some())
                message = decoder.next_message()
                if message is not None:
                    break
            assert isinstance(message, Open)
            await b.send_all(encode_message(Reset(message.stream, ErrorCode.CANCELLED, "no")))
            with trio.move_on_after(2):
                while not result:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        assert result
        assert isinstance(result[0], pytunnel.TunnelError), result


async def test_sender_parked_on_write_buffer_sees_closed_when_we_close() -> None:
    a, b = await tcp_stream_pair()  # b is never read: the writer blocks, the buffer fills
    config = pytunnel.SessionConfig(write_buffer_high=0, close_timeout=0.1)
    async with (
        open_session(a, Role.CLIENT, config) as client,
        open_session(b, Role.SERVER, config) as server,
    ):
        mine, _ = await open_pair(client, server, host="t", port=1)
        # stop the server session from reading so the client's writer blocks
        server._cancel_scope.cancel()
        errors: list[BaseException] = []

        async def sender() -> None:
            try:
                while True:
                    await mine.send_all(b"x" * 65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender)
            await trio.sleep(0.5)
            await client.aclose()
        assert errors
        assert isinstance(errors[0], trio.ClosedResourceError), errors


class _InFlight(trio.abc.HalfCloseableStream):
    """Delegates to a socket stream and records how many bytes one send_all holds."""

    def __init__(self, inner: trio.SocketStream) -> None:
        self.inner = inner
        self.in_flight = 0

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.in_flight = len(data)
        try:
            await self.inner.send_all(data)
        finally:
            self.in_flight = 0

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return await self.inner.receive_some(max_bytes)

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_write_buffer_is_bounded_by_the_high_water_mark() -> None:
    raw, b = await tcp_stream_pair()
    a = _InFlight(raw)
    config = pytunnel.SessionConfig(write_buffer_high=256 * 1024)
    async with (
        open_session(a, Role.CLIENT, config) as client,
        open_session(b, Role.SERVER, config) as server,
    ):
        streams: list[trio.abc.HalfCloseableStream] = []
        for _ in range(64):
            async with trio.open_nursery() as nursery:

                async def accept() -> None:
                    (await server.accept_stream()).accept()

                nursery.start_soon(accept)
                streams.append(await client.open_stream("t", 1))
        server._cancel_scope.cancel()  # the peer stops reading: the link is congested
        async with trio.open_nursery() as nursery:
            for s in streams:
                nursery.start_soon(s.send_all, b"x" * 256 * 1024)
            await trio.sleep(0.5)
            queued = client._mux.bytes_to_send + a.in_flight
            nursery.cancel_scope.cancel()
        # allow the mark plus one frame's worth of slack (the frame the writer has in flight);
        # without the mark it is ~60 x the mark
        bound = config.write_buffer_high + config.max_data_chunk + 64
        assert queued <= bound, f"{queued / 2**20:.1f} MiB queued"


# ----------------------------------------------------------------------------- inline writes


class _WriterSpy:
    """Records what the writer task hands to a real ``SocketStream``'s ``send_all`` (the
    bytes themselves go to the real method): whatever the session wrote without it went
    inline."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.calls: list[bytes] = []
        self.in_flight = 0
        self._send_all = stream.send_all
        stream.send_all = self  # type: ignore[method-assign]

    async def __call__(self, data: bytes | bytearray | memoryview) -> None:
        self.calls.append(bytes(data))
        self.in_flight = len(data)
        try:
            await self._send_all(data)
        finally:
            self.in_flight = 0

    @property
    def bytes(self) -> int:
        return sum(map(len, self.calls))


def _small_buffers(sender: trio.SocketStream, receiver: trio.SocketStream) -> None:
    """Kernel buffers small enough that an inline write soon meets a full socket."""
    sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)


async def test_inline_and_queued_writes_interleave_without_reordering() -> None:
    """Eight streams send at once over a socket that fills up: part of what they send goes
    inline, part through the writer task, and every stream still arrives whole and in order."""
    a, b = await tcp_stream_pair()
    _small_buffers(a, b)
    spy = _WriterSpy(a)
    tasks_before = count_tasks()
    rng = random.Random(12)
    payloads = [rng.randbytes(40_000 + 7919 * i) for i in range(8)]
    with trio.fail_after(60):
        received, written = await eight_streams_at_once(a, b, payloads)
    for i, payload in enumerate(payloads):
        assert received[i] == payload, f"stream {i} arrived damaged"
    assert spy.calls, "nothing went through the writer task: the socket never filled"
    assert written > spy.bytes, "nothing was written inline"
    assert count_tasks() == tasks_before


async def test_a_write_that_would_block_mid_frame_leaves_the_rest_to_the_writer() -> None:
    """An inline write the kernel takes only part of: the rest of the frame goes out first,
    then a Pong queued meanwhile overtakes the data queued behind it, and nothing is lost."""
    a, raw = await tcp_stream_pair()
    _small_buffers(a, raw)
    spy = _WriterSpy(a)
    payload = random.Random(5).randbytes(512 * 1024)
    config = SessionConfig(write_buffer_high=128 * 1024)
    decoder = FrameDecoder(2**24)
    with trio.fail_after(60):
        async with open_session(a, Role.SERVER, config) as server, trio.open_nursery() as nursery:
            await raw.send_all(encode_message(Open(1, 2**24)))
            stream = (await server.accept_stream()).accept()
            await trio.testing.wait_all_tasks_blocked()
            decoder.receive_data(await raw.receive_some(65536))
            assert decoder.next_message() is not None  # the Accept, all there is so far
            before = server.bytes_written
            nursery.start_soon(stream.send_all, payload)
            await trio.testing.wait_all_tasks_blocked()  # the socket is full, nobody reads it
            assert spy.calls, "the first write was not cut short"
            # the kernel took part of the first Data frame: the writer holds the rest of it
            inline = server.bytes_written - before
            frame = len(encode_message(Data(1, bytes(config.max_data_chunk))))
            assert 0 < inline < frame
            assert (inline + len(spy.calls[0])) % frame == 0
            assert server._mux.bytes_to_send, "no data queued behind the cut-short write"
            await raw.send_all(encode_message(Ping(77)))
            await trio.testing.wait_all_tasks_blocked()
            data = bytearray()
            data_at_pong: int | None = None
            while len(data) < len(payload):
                decoder.receive_data(await raw.receive_some(65536))
                while (message := decoder.next_message()) is not None:
                    if isinstance(message, Data):
                        data += message.data
                    elif isinstance(message, Pong):
                        assert message == Pong(77)
                        data_at_pong = len(data)
            assert bytes(data) == payload
            assert data_at_pong is not None, "no Pong"
            # the Pong waited for the cut-short write, then overtook the queued data
            assert data_at_pong < len(payload) - config.write_buffer_high // 2
            assert len(spy.calls) > 1
            nursery.cancel_scope.cancel()
    await raw.aclose()


async def test_control_frames_overtake_data_queued_behind_an_unsent_tail() -> None:
    """While the rest of a cut-short write waits, a window update from the reading side
    and a Pong are control frames: both go out before payload queued after the tail."""
    a, raw = await tcp_stream_pair()
    _small_buffers(a, raw)
    spy = _WriterSpy(a)
    config = SessionConfig(write_buffer_high=256 * 1024, window=64 * 1024)
    decoder = FrameDecoder(2**24)
    with trio.fail_after(60):
        async with open_session(a, Role.SERVER, config) as server, trio.open_nursery() as nursery:
            await raw.send_all(encode_message(Open(1, 2**24)))
            stream = (await server.accept_stream()).accept()
            nursery.start_soon(stream.send_all, bytes(384 * 1024))
            await trio.testing.wait_all_tasks_blocked()
            assert spy.calls
            assert server._mux.bytes_to_send
            # the peer sends data it may (the window is ours), the app reads it: a window
            # update is due
            await raw.send_all(encode_message(Data(1, bytes(60 * 1024))))
            got = 0
            while got < 60 * 1024:
                got += len(await stream.receive_some())
            await raw.send_all(encode_message(Ping(9)))
            await trio.testing.wait_all_tasks_blocked()
            order: list[str] = []
            data = 0
            while data < 384 * 1024:
                decoder.receive_data(await raw.receive_some(65536))
                while (message := decoder.next_message()) is not None:
                    if isinstance(message, Data):
                        data += len(message.data)
                        if not order or order[-1] != "data":
                            order.append("data")
                    else:
                        order.append(type(message).__name__)
            assert "Pong" in order, order
            assert "WindowUpdate" in order, order
            assert order.index("Pong") < len(order) - 1, "the Pong came after all the data"
            nursery.cancel_scope.cancel()
    await raw.aclose()


async def _send_until_it_raises(stream: trio.abc.SendStream) -> None:
    while True:
        await stream.send_all(b"x" * 1000)


async def test_a_send_after_the_transport_died_raises() -> None:
    """The transport's socket closed under the session: the inline write has no socket, the
    writer task reports it, and the stream's next send raises instead of hanging."""
    a, b = await tcp_stream_pair()
    tasks_before = count_tasks()
    with trio.fail_after(20):
        async with (
            open_session(a, Role.CLIENT) as client,
            open_session(b, Role.SERVER) as server,
        ):
            mine, _ = await open_pair(client, server, host="t", port=1)
            await mine.send_all(b"before")
            a.socket.close()
            with pytest.raises(trio.BrokenResourceError):
                await _send_until_it_raises(mine)
            await client.wait_closed()
    assert count_tasks() == tasks_before


async def test_a_send_after_the_peer_vanished_raises_broken() -> None:
    a, raw = await tcp_stream_pair()
    with trio.fail_after(20):
        async with open_session(a, Role.SERVER) as server:
            await raw.send_all(encode_message(Open(1, 2**20)))
            stream = (await server.accept_stream()).accept()
            await stream.send_all(b"hello")
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            await raw.aclose()  # a reset: the next inline write fails
            with pytest.raises(trio.BrokenResourceError):
                await _send_until_it_raises(stream)
            await server.wait_closed()
        with pytest.raises(trio.BrokenResourceError):  # the peer ended it, not we
            await stream.send_all(b"after")


async def test_the_write_buffer_stays_bounded_when_inline_writes_meet_a_full_socket() -> None:
    """Over a congested plain TCP transport, what inline writes leave behind counts against
    ``write_buffer_high`` like anything queued: 64 senders do not pile up more than the mark."""
    a, b = await tcp_stream_pair()
    spy = _WriterSpy(a)
    config = SessionConfig(write_buffer_high=256 * 1024)
    with trio.fail_after(60):
        async with (
            open_session(a, Role.CLIENT, config) as client,
            open_session(b, Role.SERVER, config) as server,
        ):
            streams = [(await open_pair(client, server, host="t", port=1))[0] for _ in range(64)]
            server._cancel_scope.cancel()  # the peer stops reading: the link is congested
            inline_before = client.bytes_written - spy.bytes
            async with trio.open_nursery() as nursery:
                for s in streams:
                    nursery.start_soon(s.send_all, b"x" * 256 * 1024)
                await trio.testing.wait_all_tasks_blocked()
                queued = client._queued() + spy.in_flight
                # bytes_written counts a writer's send_all once it is done, not while in flight
                inline = client.bytes_written - (spy.bytes - spy.in_flight)
                nursery.cancel_scope.cancel()
    assert inline > inline_before, "nothing went inline"
    assert spy.calls, "the socket never filled"
    assert queued <= 2 * config.write_buffer_high, f"{queued / 2**20:.1f} MiB queued"
