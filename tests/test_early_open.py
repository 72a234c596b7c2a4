"""Early data end to end over real loopback sockets: a connection's first bytes go with the
stream's Open (protocol version 2), while the far side dials.

Sessions after a real handshake (both ends version 2, or one of them offering only version 1),
and the tunnel's local forward with a real target: in-order delivery, refusals and dial
timeouts with data already sent (a reset, the typed error, nothing left behind), a peer
exceeding the early window, and interop with version 1 both ways.
"""

from __future__ import annotations

import functools
import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
from helpers import (
    TOKEN,
    Blackhole,
    closed_port,
    count_fds,
    count_tasks,
    describe_tasks,
    roundtrip,
    tcp_stream_pair,
    wait_until,
)

import pytunnel
from pytunnel._handshake import client_handshake, server_handshake
from pytunnel.errors import ErrorCode, NodeTimeoutError, NodeUnstableError, UnansweredError
from pytunnel.protocol import handshake as hs
from pytunnel.protocol.frames import encode_message
from pytunnel.protocol.messages import Data, Open
from pytunnel.protocol.mux import Role
from pytunnel.session import MuxStream, Session, SessionConfig

pytestmark = pytest.mark.timeout(120)

CONFIG = SessionConfig()


@asynccontextmanager
async def handshaken_pair(
    client_versions: tuple[int, ...] = hs.SUPPORTED_VERSIONS,
    server_versions: tuple[int, ...] = hs.SUPPORTED_VERSIONS,
    config: SessionConfig = CONFIG,
) -> AsyncIterator[tuple[Session, Session]]:
    """A client and a server session over loopback TCP, after a real handshake in which each
    side offers ``*_versions`` and announces its config's early window."""
    a, b = await tcp_stream_pair()
    results: dict[str, object] = {}

    async def server() -> None:
        results["server"] = await server_handshake(
            b,
            TOKEN,
            max_frame_size=config.max_frame_size,
            versions=server_versions,
            early_window=config.early_window,
        )

    async with trio.open_nursery() as nursery:
        nursery.start_soon(server)
        client_result = await client_handshake(
            a,
            TOKEN,
            max_frame_size=config.max_frame_size,
            versions=client_versions,
            early_window=config.early_window,
        )
    server_result = results["server"]
    assert isinstance(server_result, type(client_result))
    async with (
        client_result.open_session(a, Role.CLIENT, config, name="client") as client,
        server_result.open_session(b, Role.SERVER, config, name="server") as server,
    ):
        yield client, server


async def test_a_version_2_pair_announces_its_floor_as_early_window() -> None:
    async with handshaken_pair() as (client, server):
        assert client.version == server.version == 2
        assert CONFIG.early_window == 8192  # 256 MiB budget / (2 * 16,384 streams)
        assert client.early_data
        assert server.early_data


async def test_early_data_arrives_in_order_and_complete_before_and_after_the_accept() -> None:
    """The opener writes 300 KB at once, far past the early window: what fits goes before the
    Accept, the rest after it, all in order; the opener never waited for the answer to start."""
    payload = bytes(range(256)) * 1200
    async with handshaken_pair() as (client, server):
        with trio.fail_after(30):
            stream = await client.open_stream("target", 1, early=True)
            incoming = await server.accept_stream()  # Open arrived; not answered yet
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stream.send_all, payload)
                # the early window's worth reaches the acceptor before it answers
                await wait_until(lambda: server.bytes_buffered == CONFIG.early_window)
                accepted = incoming.accept()
                received = b""
                while len(received) < len(payload):
                    received += await accepted.receive_some()
            assert received == payload
            await accepted.send_all(b"reply")
            assert await stream.receive_some() == b"reply"
            await stream.send_eof()
            assert await accepted.receive_some() == b""
            await accepted.aclose()
            assert await stream.receive_some() == b""
            await stream.aclose()
        await wait_until(lambda: client.open_streams == server.open_streams == 0)
        assert server.bytes_buffered == 0


async def test_a_fin_right_after_the_early_data_follows_the_accept() -> None:
    """Request, half-close, then the answer: the Fin waits for the Accept, never lost."""
    async with handshaken_pair() as (client, server):
        with trio.fail_after(30):
            stream = await client.open_stream(early=True)
            await stream.send_all(b"GET / HTTP/1.0\r\n\r\n")
            await stream.send_eof()
            incoming = await server.accept_stream()
            await wait_until(lambda: server.bytes_buffered == 18)
            accepted = incoming.accept()
            assert await accepted.receive_some() == b"GET / HTTP/1.0\r\n\r\n"
            assert await accepted.receive_some() == b""
            await accepted.send_all(b"ok")
            await accepted.aclose()
            assert await stream.receive_some() == b"ok"
            assert await stream.receive_some() == b""
            await stream.aclose()


@pytest.mark.parametrize("code", [ErrorCode.NODE_TIMEOUT, ErrorCode.NODE_UNSTABLE])
async def test_a_refusal_after_early_data_breaks_the_stream_with_the_typed_error(
    code: ErrorCode,
) -> None:
    async with handshaken_pair() as (client, server):
        with trio.fail_after(30):
            stream = await client.open_stream("db", 5432, early=True)
            await stream.send_all(b"x" * 5000)
            incoming = await server.accept_stream()
            await wait_until(lambda: server.bytes_buffered == 5000)
            incoming.refuse(code, "the target did not answer")
            # the acceptor dropped what it held for the stream
            assert server.bytes_buffered == 0
            assert server.receive_committed == 0
            with pytest.raises(trio.BrokenResourceError) as info:
                await stream.receive_some()
            expected = NodeTimeoutError if code == ErrorCode.NODE_TIMEOUT else NodeUnstableError
            assert isinstance(info.value.__cause__, expected)
            assert stream.refusal is info.value.__cause__
            assert info.value.__cause__.target == "db:5432"
            with pytest.raises(trio.BrokenResourceError):
                await stream.send_all(b"more")
            await stream.aclose()
        await wait_until(lambda: client.open_streams == server.open_streams == 0)


async def test_the_session_ending_before_the_answer_breaks_an_early_stream() -> None:
    """The opener learns of the end as a waiting ``open_stream`` would: a
    ``SessionClosedError``, through the refusal callback first."""
    reported: list[BaseException] = []
    async with handshaken_pair() as (client, server):
        with trio.fail_after(30):
            stream = await client.open_stream(early=True)
            stream.call_on_refusal(reported.append)
            await stream.send_all(b"hello")
            await server.accept_stream()
            await server.aclose()
            with pytest.raises(trio.BrokenResourceError) as info:
                await stream.receive_some()
    assert isinstance(info.value.__cause__, pytunnel.SessionClosedError)
    assert reported == [info.value.__cause__]


async def test_an_early_open_nobody_answers_is_reset_at_its_answer_timeout() -> None:
    """``answer_timeout``: the acceptor takes the stream but never answers; the opener's
    stream breaks with the typed timeout (refusal callback first), the acceptor's side is
    reset, and nothing stays open on either side."""
    reported: list[BaseException] = []
    async with handshaken_pair() as (client, server):
        with trio.fail_after(30):
            stream = await client.open_stream("app", 8080, early=True, answer_timeout=0.3)
            stream.call_on_refusal(reported.append)
            await stream.send_all(b"hello")
            await server.accept_stream()  # held, never accepted or refused
            await wait_until(lambda: server.bytes_buffered == 5)
            with pytest.raises(trio.BrokenResourceError) as info:
                await stream.receive_some()
            error = info.value.__cause__
            assert isinstance(error, UnansweredError)
            assert isinstance(error, NodeTimeoutError)
            assert error.target == "app:8080"
            assert reported == [error]
            await stream.aclose()
            await wait_until(lambda: client.open_streams == server.open_streams == 0)
            assert server.bytes_buffered == 0


async def test_an_early_open_answered_in_time_outlives_its_answer_timeout() -> None:
    async with handshaken_pair() as (client, server):
        with trio.fail_after(30):
            stream = await client.open_stream(early=True, answer_timeout=0.2)
            await stream.send_all(b"ping")
            accepted = (await server.accept_stream()).accept()
            assert await accepted.receive_some() == b"ping"
            await trio.sleep(0.6)  # well past the deadline and its slack
            await accepted.send_all(b"pong")
            assert await stream.receive_some() == b"pong"
            assert stream.refusal is None
            await stream.aclose()
            await accepted.aclose()


async def test_a_shorter_answer_timeout_armed_later_fires_first() -> None:
    """The timer sleeping towards a 60 s deadline is woken for a 0.3 s one opened after it."""
    async with handshaken_pair() as (client, server):
        with trio.fail_after(30):
            slow = await client.open_stream(early=True, answer_timeout=60.0)
            await server.accept_stream()
            await trio.sleep(0.05)  # the timer is asleep towards the 60 s deadline
            fast = await client.open_stream(early=True, answer_timeout=0.3)
            await server.accept_stream()
            with trio.fail_after(10), pytest.raises(trio.BrokenResourceError) as info:
                await fast.receive_some()
            assert isinstance(info.value.__cause__, UnansweredError)
            assert slow.refusal is None  # its own deadline is far off
            await slow.aclose()
            await fast.aclose()


async def test_a_peer_exceeding_the_early_window_is_a_protocol_error() -> None:
    """A raw peer, after a real version 2 handshake, sends one byte more than it may."""
    a, b = await tcp_stream_pair()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                functools.partial(client_handshake, a, TOKEN, max_frame_size=65536, early_window=0)
            )
            result = await server_handshake(
                b, TOKEN, max_frame_size=65536, early_window=CONFIG.early_window
            )
        assert result.version == 2
        async with result.open_session(b, Role.SERVER, CONFIG, name="server") as server:
            await a.send_all(
                encode_message(Open(1, 65536))
                + encode_message(Data(1, b"x" * CONFIG.early_window))
                + encode_message(Data(1, b"!"))
            )
            await server.wait_closed()
            assert isinstance(server.close_reason, pytunnel.RemoteProtocolError)
            assert server.close_reason.code == ErrorCode.FLOW_CONTROL_ERROR
            assert server.bytes_buffered == 0
    await a.aclose()


@pytest.mark.parametrize(
    "versions",
    [((1,), hs.SUPPORTED_VERSIONS), (hs.SUPPORTED_VERSIONS, (1,))],
    ids=["old client, new server", "new client, old server"],
)
async def test_with_a_version_1_peer_nothing_is_sent_before_the_accept(
    versions: tuple[tuple[int, ...], tuple[int, ...]],
) -> None:
    """Both directions of opening, each side once the opener: ``early=True`` waits for the
    answer as version 1 requires, and the data flows as before."""
    async with handshaken_pair(*versions) as (client, server):
        assert client.version == server.version == 1
        assert not client.early_data
        assert not server.early_data
        for opener, acceptor in ((client, server), (server, client)):
            with trio.fail_after(30):
                async with trio.open_nursery() as nursery:
                    box: list[MuxStream] = []

                    async def open_early(
                        opener: Session = opener, box: list[MuxStream] = box
                    ) -> None:
                        box.append(await opener.open_stream(early=True))

                    nursery.start_soon(open_early)
                    incoming = await acceptor.accept_stream()
                    await trio.sleep(0.05)
                    assert not box  # still waiting for the answer
                    accepted = incoming.accept()
                stream = box[0]
                await stream.send_all(b"ping")
                assert await accepted.receive_some() == b"ping"
                await accepted.send_all(b"pong")
                assert await stream.receive_some() == b"pong"
                await stream.aclose()
                await accepted.aclose()


async def test_a_version_1_peer_sending_data_before_the_accept_is_still_an_error() -> None:
    a, b = await tcp_stream_pair()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                functools.partial(client_handshake, a, TOKEN, max_frame_size=65536, versions=(1,))
            )
            result = await server_handshake(
                b, TOKEN, max_frame_size=65536, early_window=CONFIG.early_window
            )
        assert result.version == 1
        async with result.open_session(b, Role.SERVER, CONFIG, name="server") as server:
            await a.send_all(encode_message(Open(1, 65536)) + encode_message(Data(1, b"x")))
            await server.wait_closed()
            assert isinstance(server.close_reason, pytunnel.RemoteProtocolError)
            assert server.close_reason.code == ErrorCode.STREAM_STATE_ERROR
    await a.aclose()


# ----------------------------------------------------------------------------- the tunnel


def _server_buffered(server: pytunnel.TunnelServer) -> int:
    return sum(c.session.bytes_buffered for c in server._sessions)


def _read_to_end(sock: socket.socket) -> None:
    while sock.recv(65536):
        pass


def _send_and_read_to_end(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(payload)
    _read_to_end(sock)


def _send_then_expect_reset(address: tuple[str, int], payload: bytes) -> None:
    """Connect, send at once, then the tunnel must reset the connection (not a clean EOF):
    the bytes sent were never delivered, and the opener must not take it for a reply."""
    sock = socket.create_connection(address)
    try:
        sock.settimeout(20)
        # the reset may come while the bytes are still being sent: the send fails then
        # (ECONNRESET, or EPIPE for a send after it); a clean close would fail neither
        with pytest.raises((ConnectionResetError, BrokenPipeError)):
            _send_and_read_to_end(sock, payload)
    finally:
        sock.close()


async def test_local_forward_sends_the_first_bytes_before_the_dial_completes(
    nursery: trio.Nursery, blackhole: Blackhole, caplog: pytest.LogCaptureFixture
) -> None:
    """Through ``-L`` to a target that never answers: the client's bytes are already at the
    server while it dials; the dial times out, the connection is reset, ``[NODE_TIMEOUT]`` is
    logged and counted, and the server holds nothing afterwards."""
    caplog.set_level(logging.INFO)
    server = await nursery.start(
        functools.partial(pytunnel.serve, 0, token=TOKEN, connect_timeout=2.0)
    )
    tunnel = await pytunnel.connect_tunnel(nursery, server.address, token=TOKEN)
    assert tunnel.session is not None
    assert tunnel.session.version == 2
    forward = await tunnel.forward_local("127.0.0.1", blackhole.port)
    await trio.sleep(0.1)
    tasks, fds = count_tasks(), count_fds()

    async def client() -> None:
        await trio.to_thread.run_sync(_send_then_expect_reset, forward.address, b"hello")

    async with trio.open_nursery() as inner:
        inner.start_soon(client)
        # early data: the 5 bytes wait at the server while its dial is still pending
        await wait_until(lambda: _server_buffered(server) == 5, seconds=20)
    # reported when the refusal arrived, before the connection was reset
    assert forward.stats.errors == {"NODE_TIMEOUT": 1}
    assert any("[NODE_TIMEOUT]" in r.getMessage() for r in caplog.records)
    await wait_until(lambda: _server_buffered(server) == 0)
    await wait_until(
        lambda: count_tasks() <= tasks and count_fds() <= fds,
        what=lambda: (
            f"tasks {count_tasks()} > {tasks} or fds {count_fds()} > {fds}: " + describe_tasks()
        ),
    )


async def test_local_forward_to_a_refusing_target_resets_the_connection(
    tunnel: pytunnel.Tunnel, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    forward = await tunnel.forward_local("127.0.0.1", closed_port())
    await trio.sleep(0.1)
    tasks, fds = count_tasks(), count_fds()
    for _ in range(20):
        await trio.to_thread.run_sync(_send_then_expect_reset, forward.address, b"x" * 3000)
    assert forward.stats.errors == {"NODE_UNSTABLE": 20}
    warnings = [r.getMessage() for r in caplog.records if r.name == "pytunnel.client"]
    assert sum("[NODE_UNSTABLE] local forward" in m for m in warnings) == 20
    await wait_until(
        lambda: count_tasks() <= tasks and count_fds() <= fds,
        what=lambda: (
            f"tasks {count_tasks()} > {tasks} or fds {count_fds()} > {fds}: " + describe_tasks()
        ),
    )


async def test_local_forward_data_sent_at_once_arrives_in_order_and_complete(
    tunnel: pytunnel.Tunnel, echo_port: int
) -> None:
    """Fresh connections, each writing everything at connect time (past the early window)
    and half-closing: every echo is whole and in order."""
    forward = await tunnel.forward_local("127.0.0.1", echo_port)

    for size in (1, 100, 8192, 8193, 70000):
        payload = bytes(i % 251 for i in range(size))
        echoed = await trio.to_thread.run_sync(roundtrip, forward.address, payload, 20)
        assert echoed == payload
    await wait_until(lambda: forward.stats.active_connections == 0)
    assert forward.stats.total_connections == 5
    assert forward.stats.errors == {}
