"""Datagram batches (protocol version 2): the datagrams one socket read found travel in one
``Datagrams`` frame, boundaries and order kept; a version 1 peer gets one frame each."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import msgpack
import pytest
import trio
from helpers import TOKEN, tcp_stream_pair, wait_until

import pytunnel
from pytunnel._handshake import client_handshake, server_handshake
from pytunnel._listen import bind_udp, send_batch
from pytunnel._relay import RelayStats
from pytunnel._udp import relay_association, udp_connect
from pytunnel.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from pytunnel.protocol import messages as m
from pytunnel.protocol.frames import (
    DATAGRAMS_ENVELOPE,
    HEADER_SIZE,
    FrameDecoder,
    append_datagrams_frame,
    encode_message,
)
from pytunnel.protocol.mux import (
    DatagramReceived,
    DatagramsReceived,
    Event,
    Multiplexer,
    Role,
    StreamAccepted,
)
from pytunnel.session import MuxStream, Session, SessionConfig, open_session

pytestmark = pytest.mark.timeout(120)


# ----------------------------------------------------------------------------- frames


def test_the_batch_frame_is_the_generic_encoding() -> None:
    """The fast encoder and the fast decoder agree byte for byte with msgpack + cattrs."""
    for payloads in ([b"a", b""], [bytes(300), b"x" * 35_000, b"\x00"], [b"q"] * 256):
        message = m.Datagrams(7, tuple(payloads))
        out = bytearray()
        append_datagrams_frame(out, 7, list(payloads))
        assert bytes(out) == encode_message(message)
        assert FrameDecoder(2**32 - 1).feed(bytes(out)) == [message]


def test_a_batch_frame_over_the_limit_is_refused_locally() -> None:
    out = bytearray()
    with pytest.raises(LocalProtocolError) as info:
        append_datagrams_frame(out, 1, [bytes(3000), bytes(3000)], 4096)
    assert info.value.code == ErrorCode.FRAME_TOO_LARGE
    assert not out


@pytest.mark.parametrize(
    ("label", "data"),
    [
        ("empty list", []),
        ("one entry (a Datagram's job)", [b"x"]),
        ("oversized entry", [b"x", bytes(m.MAX_DATAGRAM + 1)]),
        ("too many", [b"x"] * (m.MAX_DATAGRAM_BATCH + 1)),
        ("text entry", [b"x", "y"]),
        ("not a list", b"xy"),
    ],
)
def test_a_malformed_batch_is_one_invalid_field_error(label: str, data: Any) -> None:
    body = msgpack.packb({"stream": 1, "data": data, "t": "dgrams"})
    decoder = FrameDecoder(2**32 - 1)
    with pytest.raises(RemoteProtocolError) as info:
        decoder.feed(len(body).to_bytes(HEADER_SIZE, "big") + body)
    assert info.value.code == ErrorCode.INVALID_FIELD, label
    with pytest.raises(RemoteProtocolError):  # sticky: the stream cannot resynchronise
        decoder.next_message()


def test_a_non_canonical_batch_is_still_decoded() -> None:
    """Key order is not part of the protocol: a peer may send ``t`` first."""
    body = msgpack.packb({"t": "dgrams", "data": [b"a", b"b"], "stream": 3})
    frame = len(body).to_bytes(HEADER_SIZE, "big") + body
    assert FrameDecoder().feed(frame) == [m.Datagrams(3, (b"a", b"b"))]


# ----------------------------------------------------------------------------- multiplexer


def _pair(batches: bool = True, limit: int = 1024 * 1024) -> tuple[Multiplexer, Multiplexer, int]:
    """Two multiplexers with one open datagram stream (the client opened it)."""
    kw: dict[str, Any] = {
        "datagram_batches": batches,
        "max_frame_size": limit,
        "peer_max_frame_size": limit,
    }
    client, server = Multiplexer(Role.CLIENT, **kw), Multiplexer(Role.SERVER, **kw)
    sid = client.open_stream(datagrams=True)
    server.receive_data(client.data_to_send())
    server.accept_stream(sid)
    assert client.receive_data(server.data_to_send()) == [StreamAccepted(sid)]
    return client, server, sid


def _datagrams(events: list[Event]) -> list[bytes]:
    out: list[bytes] = []
    for event in events:
        if isinstance(event, DatagramsReceived):
            out += event.data
        else:
            assert isinstance(event, DatagramReceived)
            out.append(event.data)
    return out


def _frames(data: bytes | bytearray) -> list[Any]:
    return FrameDecoder(2**32 - 1).feed(bytes(data))


def test_a_batch_is_one_frame_with_a_version_2_peer() -> None:
    client, server, sid = _pair()
    payloads = [b"", b"one", bytes(1400), b"three"]
    client.send_datagrams(sid, payloads)
    wire = client.data_to_send()
    assert _frames(wire) == [m.Datagrams(sid, tuple(payloads))]
    assert server.receive_data(wire) == [DatagramsReceived(sid, tuple(payloads))]


def test_a_batch_is_one_frame_per_datagram_with_a_version_1_peer() -> None:
    client, server, sid = _pair(batches=False)
    payloads = [b"one", b"two", b"three"]
    client.send_datagrams(sid, payloads)
    wire = client.data_to_send()
    assert _frames(wire) == [m.Datagram(sid, p) for p in payloads]
    assert _datagrams(server.receive_data(wire)) == payloads


def test_a_batch_counts_once_per_datagram_against_a_decoding_pass() -> None:
    """A reader that decodes in bounded passes hands over about as many datagrams per pass
    as when each datagram had its own frame, so the bounded queues behind it are emptied
    between passes as before."""
    client, server, sid = _pair()
    batches = [[bytes([b, i]) for i in range(8)] for b in range(3)]
    for batch in batches:
        client.send_datagrams(sid, batch)
    server.feed(client.data_to_send())
    first = server.next_events(10)  # 8 datagrams, then 8 more reach the limit
    assert first == [DatagramsReceived(sid, tuple(b)) for b in batches[:2]]
    assert server.frames_pending
    assert server.next_events(10) == [DatagramsReceived(sid, tuple(batches[2]))]
    assert not server.frames_pending


def test_a_single_datagram_travels_as_a_datagram() -> None:
    client, _, sid = _pair()
    client.send_datagrams(sid, [b"alone"])
    assert _frames(client.data_to_send()) == [m.Datagram(sid, b"alone")]


def test_a_batch_near_the_frame_limit_is_split_into_frames_that_fit() -> None:
    """With the smallest frame limit a peer may announce, datagrams that together need
    several frames are split between frames (never inside a datagram), each frame within
    the limit and well filled, boundaries and order intact."""
    limit = m.MIN_MAX_FRAME_SIZE
    client, server, sid = _pair(limit=limit)
    # sizes around the point where one more entry no longer fits, and one alone at its limit
    payloads = [bytes([i]) * (1000 + i) for i in range(12)] + [b"z" * (limit - 64)]
    client.send_datagrams(sid, payloads)
    wire = bytes(client.data_to_send())
    frames, pos = [], 0
    while pos < len(wire):
        size = int.from_bytes(wire[pos : pos + HEADER_SIZE], "big")
        assert size <= limit
        frames.append(size)
        pos += HEADER_SIZE + size
    assert len(frames) >= 4
    assert all(size > limit - 1100 - DATAGRAMS_ENVELOPE for size in frames[:-2])
    assert _datagrams(server.receive_data(wire)) == payloads


def test_at_most_max_batch_datagrams_share_a_frame() -> None:
    client, server, sid = _pair()
    payloads = [i.to_bytes(2, "big") for i in range(m.MAX_DATAGRAM_BATCH * 2 + 1)]
    client.send_datagrams(sid, payloads)
    wire = client.data_to_send()
    frames = _frames(wire)
    assert [type(f) for f in frames] == [m.Datagrams, m.Datagrams, m.Datagram]
    assert _datagrams(server.receive_data(wire)) == payloads


def test_a_batch_with_a_datagram_too_large_queues_nothing() -> None:
    client, _, sid = _pair()
    with pytest.raises(LocalProtocolError):
        client.send_datagrams(sid, [b"ok", bytes(m.MAX_DATAGRAM + 1)])
    assert client.bytes_to_send == 0


def test_a_batch_on_a_byte_stream_is_refused_locally() -> None:
    client, server, _ = _pair()
    sid = client.open_stream()
    server.receive_data(client.data_to_send())
    server.accept_stream(sid)
    client.receive_data(server.data_to_send())
    with pytest.raises(LocalProtocolError) as info:
        client.send_datagrams(sid, [b"a", b"b"])
    assert info.value.code == ErrorCode.STREAM_STATE_ERROR


def _go_away_on_error(mux: Multiplexer, frame: bytes) -> RemoteProtocolError:
    with pytest.raises(RemoteProtocolError) as info:
        mux.receive_data(frame)
    assert mux.error is info.value
    return info.value


def test_a_batch_in_a_version_1_session_is_unexpected() -> None:
    _, server, sid = _pair(batches=False)
    error = _go_away_on_error(server, encode_message(m.Datagrams(sid, (b"a", b"b"))))
    assert error.code == ErrorCode.UNEXPECTED_MESSAGE


def test_a_batch_on_a_byte_stream_is_a_stream_state_error() -> None:
    client, server, _ = _pair()
    sid = client.open_stream()
    server.receive_data(client.data_to_send())
    server.accept_stream(sid)
    error = _go_away_on_error(server, encode_message(m.Datagrams(sid, (b"a", b"b"))))
    assert error.code == ErrorCode.STREAM_STATE_ERROR


def test_a_batch_for_a_stream_that_ended_is_dropped_silently() -> None:
    _, server, sid = _pair()
    server.reset_stream(sid)
    assert server.receive_data(encode_message(m.Datagrams(sid, (b"a", b"b")))) == []
    assert server.error is None


# ----------------------------------------------------------------------------- sessions


@asynccontextmanager
async def _sessions(version: int, **config: Any) -> AsyncIterator[tuple[Session, Session]]:
    """Two sessions over a real loopback TCP connection, as a handshake at ``version``
    would leave them."""
    a, b = await tcp_stream_pair()
    cfg = SessionConfig(**config)
    async with (
        open_session(a, Role.CLIENT, cfg, name="client", version=version) as client,
        open_session(b, Role.SERVER, cfg, name="server", version=version) as server,
    ):
        yield client, server


async def _datagram_streams(client: Session, server: Session) -> tuple[MuxStream, MuxStream]:
    async with trio.open_nursery() as nursery:
        box: list[MuxStream] = []

        async def accept() -> None:
            incoming = await server.accept_stream()
            box.append(incoming.accept())

        nursery.start_soon(accept)
        opened = await client.open_stream(datagrams=True)
    return opened, box[0]


async def _receive(stream: MuxStream, count: int) -> list[bytes]:
    got: list[bytes] = []
    with trio.fail_after(30):
        while len(got) < count:
            got += await stream.receive_datagrams()
    return got


@pytest.mark.parametrize("version", [1, 2])
async def test_a_burst_arrives_whole_and_in_order_over_a_session(version: int) -> None:
    payloads = [i.to_bytes(4, "big") * (i % 300) for i in range(200)]
    async with _sessions(version) as (client, server):
        opened, accepted = await _datagram_streams(client, server)
        before = client.bytes_written
        assert opened.send_datagrams(payloads) == (200, sum(map(len, payloads)))
        assert await _receive(accepted, 200) == payloads
        written = client.bytes_written - before
        envelope = written - sum(map(len, payloads))
        # a Datagram frame costs ~20 bytes around its payload, a batch entry 2 or 3
        assert envelope < 4 * 200 if version == 2 else envelope > 15 * 200
        assert opened.datagrams_sent == 200
        assert accepted.datagrams_received == 200


async def test_a_batch_beyond_the_receivers_queue_is_dropped_and_counted() -> None:
    async with _sessions(2) as (client, server):
        opened, accepted = await _datagram_streams(client, server)
        accepted.datagram_queue = 10
        opened.send_datagrams([bytes([i]) for i in range(25)])
        await wait_until(lambda: accepted.datagrams_dropped == 15)
        assert await accepted.receive_datagrams() == [bytes([i]) for i in range(10)]
        assert accepted.datagrams_received == 10


@pytest.mark.parametrize("version", [1, 2])
async def test_a_queue_takes_datagrams_up_to_its_bytes_and_drops_the_rest_counted(
    version: int,
) -> None:
    """Past the byte bound a datagram is dropped and counted as at the count bound (one
    ``Datagrams`` frame with version 2, one frame each with version 1); a smaller one after
    it still fits, and the queue's bytes never went past the bound."""
    async with _sessions(version) as (client, server):
        opened, accepted = await _datagram_streams(client, server)
        accepted.datagram_queue_bytes = 10_000
        payloads = [bytes([i]) * 3000 for i in range(5)] + [b"small" * 100]
        assert opened.send_datagrams(payloads)[0] == 6
        await wait_until(lambda: accepted.datagrams_received + accepted.datagrams_dropped == 6)
        assert accepted.datagrams_dropped == 2
        assert accepted.datagram_bytes_queued == accepted.datagram_bytes_peak == 9500
        assert await accepted.receive_datagrams() == [*payloads[:3], payloads[5]]
        assert accepted.datagram_bytes_queued == 0
        # taken one at a time, the bytes go down with each
        assert opened.send_datagrams([bytes(4000), bytes(2000)])[0] == 2
        await wait_until(lambda: accepted.datagrams_received == 6)
        assert accepted.datagram_bytes_queued == 6000
        assert await accepted.receive_datagram() == bytes(4000)
        assert accepted.datagram_bytes_queued == 2000
        assert accepted.datagram_bytes_peak == 9500


@pytest.mark.parametrize("version", [1, 2])
async def test_a_datagram_larger_than_the_byte_bound_fits_an_empty_queue(version: int) -> None:
    async with _sessions(version) as (client, server):
        opened, accepted = await _datagram_streams(client, server)
        accepted.datagram_queue_bytes = 1000
        big = [bytes([i]) * 5000 for i in range(3)]
        assert opened.send_datagrams(big)[0] == 3
        await wait_until(lambda: accepted.datagrams_received + accepted.datagrams_dropped == 3)
        assert (accepted.datagrams_received, accepted.datagrams_dropped) == (1, 2)
        assert accepted.datagram_bytes_peak == 5000
        assert await accepted.receive_datagrams() == big[:1]
        # empty again: the next one fits too
        assert opened.send_datagrams(big[1:2])[0] == 1
        assert await _receive(accepted, 1) == big[1:2]
        assert accepted.datagrams_dropped == 2


async def test_a_batch_beyond_the_write_buffer_is_dropped_and_counted() -> None:
    """Not flow-controlled: what the write buffer has no room for is dropped at once (the
    tail of the batch), never queued beyond the mark or waited for."""
    async with _sessions(2, write_buffer_high=10_000) as (client, server):
        opened, accepted = await _datagram_streams(client, server)
        payloads = [bytes(1000)] * 30
        sent, size = opened.send_datagrams(payloads)
        assert 10 <= sent < 30
        assert size == 1000 * sent
        assert opened.datagrams_dropped == 30 - sent
        assert await _receive(accepted, sent) == payloads[:sent]


async def test_a_datagram_too_large_for_the_peer_is_dropped_alone() -> None:
    async with _sessions(2, max_frame_size=m.MIN_MAX_FRAME_SIZE) as (client, server):
        opened, accepted = await _datagram_streams(client, server)
        assert opened.send_datagrams([b"a", bytes(5000), b"b"]) == (2, 2)
        assert opened.datagrams_dropped == 1
        assert await _receive(accepted, 2) == [b"a", b"b"]


async def test_a_malformed_batch_from_the_peer_ends_the_session_with_its_code() -> None:
    """A raw peer over real TCP: it opens a datagram stream, then sends an empty batch; the
    session answers GoAway(INVALID_FIELD) and ends."""
    a, b = await tcp_stream_pair()
    async with open_session(b, Role.SERVER, SessionConfig(), version=2) as server:
        await a.send_all(encode_message(m.Open(1, 65536, datagrams=True)))
        incoming = await server.accept_stream()
        incoming.accept()
        body = msgpack.packb({"stream": 1, "data": [], "t": "dgrams"})
        await a.send_all(len(body).to_bytes(HEADER_SIZE, "big") + body)
        decoder = FrameDecoder()
        frames: list[Any] = []
        with trio.fail_after(30):
            while not any(isinstance(f, m.GoAway) for f in frames):
                data = await a.receive_some()
                assert data, "the session closed without saying why"
                frames += decoder.feed(data)
            await server.wait_closed()
        [goaway] = [f for f in frames if isinstance(f, m.GoAway)]
        assert goaway.code == ErrorCode.INVALID_FIELD
        assert isinstance(server.close_reason, RemoteProtocolError)
    await a.aclose()


# ----------------------------------------------------------------------------- UDP, end to end


async def _udp_sink(
    got: list[bytes], *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
) -> None:
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    with sock:
        await sock.bind(("127.0.0.1", 0))
        task_status.started(sock.getsockname()[1])
        while True:
            data, _ = await sock.recvfrom(65536)
            got.append(data)


def _burst(sock: socket.socket, address: tuple[str, int], payloads: list[bytes]) -> None:
    """Send without a checkpoint in between, so the datagrams wait on the forward's socket
    together and one read takes them all."""
    for payload in payloads:
        sock.sendto(payload, address)


async def test_bursts_cross_the_tunnel_whole_and_in_order(
    tunnel: pytunnel.Tunnel, nursery: trio.Nursery
) -> None:
    got: list[bytes] = []
    port = await nursery.start(_udp_sink, got)
    udp = await tunnel.forward_local("127.0.0.1", port, protocol="udp")
    sent: list[bytes] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        with trio.fail_after(30):  # the association opens with the first datagram
            while not got:
                _burst(sock, udp.address, [b"hello"])
                await trio.sleep(0.05)
        got.clear()
        for burst in range(10):
            # an empty datagram, small ones and full-size ones: each stays one datagram
            payloads = [b""] + [f"{burst}:{i}:".encode() * (i * 10 % 140) for i in range(31)]
            sent += payloads
            _burst(sock, udp.address, payloads)
            expected = len(sent)
            await wait_until(
                lambda: len(got) == expected,  # noqa: B023 - used before the loop goes on
                30,
                lambda: f"{len(got)} of {expected} arrived",  # noqa: B023
            )
    assert got == sent
    assert udp.stats.datagrams_dropped == 0


async def test_version_1_interop_one_frame_per_datagram() -> None:
    """A client that offers only version 1 gets a version 1 session from a server that
    speaks 2, and bursts still cross, through the real dialing side (a UDP socket to a real
    echo service), one Datagram frame each: a batch frame would be a violation there."""
    a, b = await tcp_stream_pair()
    async with trio.open_nursery() as handshakes:
        box: dict[str, Any] = {}

        async def serve() -> None:
            box["server"] = await server_handshake(b, TOKEN, max_frame_size=1 << 20)

        handshakes.start_soon(serve)
        box["client"] = await client_handshake(a, TOKEN, max_frame_size=1 << 20, versions=(1,))
    assert box["client"].version == box["server"].version == 1
    echo = await bind_udp("127.0.0.1", 0)
    echo_port = echo.getsockname()[1]

    async def echo_service() -> None:
        while True:
            data, address = await echo.recvfrom(65536)
            await send_batch(echo, [data], address)

    config = SessionConfig()
    async with (
        trio.open_nursery() as nursery,
        box["client"].open_session(a, Role.CLIENT, config, name="client") as client,
        box["server"].open_session(b, Role.SERVER, config, name="server") as server,
    ):
        assert client.version == server.version == 1
        stats = RelayStats()

        async def dial_side() -> None:
            incoming = await server.accept_stream()
            sock = await udp_connect("127.0.0.1", echo_port)
            await relay_association(incoming.accept(), sock, stats=stats)

        nursery.start_soon(echo_service)
        nursery.start_soon(dial_side)
        stream = await client.open_stream("127.0.0.1", echo_port, datagrams=True)
        payloads = [f"v1 datagram {i}".encode() for i in range(50)]
        assert stream.send_datagrams(payloads) == (50, sum(map(len, payloads)))
        assert await _receive(stream, 50) == payloads
        assert server.close_reason is None
        assert client.close_reason is None
        assert stats.datagrams_dropped == 0
        await stream.aclose()
        nursery.cancel_scope.cancel()
    echo.close()


async def test_send_batch_skips_a_datagram_the_kernel_refuses() -> None:
    """One failing send (here: too large for UDP) drops that datagram only."""
    receiver = await bind_udp("127.0.0.1", 0)
    sender = await bind_udp("127.0.0.1", 0)
    with receiver, sender:
        address = receiver.getsockname()
        sent = await send_batch(sender, [b"a", bytes(70_000), b"b"], address)
        assert sent == (2, 2)
        with trio.fail_after(30):
            assert (await receiver.recvfrom(100))[0] == b"a"
            assert (await receiver.recvfrom(100))[0] == b"b"
