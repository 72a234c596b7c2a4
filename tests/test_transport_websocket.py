"""The WebSocket transport: the stream adapter against a raw wsproto peer, the upgrade on
both sides, and whole tunnels over ``ws://`` and ``wss://`` on real loopback sockets."""

from __future__ import annotations

import functools
import hashlib
import os
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Callable

import pytest
import trio
import trio.testing
import trustme
from click.testing import CliRunner
from helpers import (
    TOKEN,
    count_fds,
    count_tasks,
    describe_tasks,
    echo_once,
    tcp_stream_pair,
    wait_until,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    Request,
    TextMessage,
)

import pytunnel
from pytunnel.cli import main
from pytunnel.transports import websocket
from pytunnel.transports.websocket import (
    WebSocketStream,
    WebSocketURL,
    accept_websocket,
    connect_websocket,
    parse_websocket_url,
)

pytestmark = pytest.mark.timeout(60)


# --------------------------------------------------------------------------- raw peers


class RawPeer:
    """The far end of a WebSocket, driven through wsproto by hand, so a test can send what
    our stream never would (text, fragments, pings) and see exactly what it sends."""

    def __init__(self, stream: trio.abc.Stream, ws: WSConnection) -> None:
        self.stream = stream
        self.ws = ws
        self.pending: list[object] = []

    async def send(self, event: object) -> None:
        await self.stream.send_all(self.ws.send(event))  # type: ignore[arg-type]

    async def next_event(self) -> object:
        while not self.pending:
            data = await self.stream.receive_some()
            self.ws.receive_data(data or None)
            self.pending.extend(self.ws.events())
        return self.pending.pop(0)

    async def read_bytes(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            event = await self.next_event()
            if isinstance(event, BytesMessage):
                out += event.data
        return out


async def _client_with_raw_server(
    ping_interval: float | None = None,
) -> tuple[WebSocketStream, RawPeer, Request]:
    """Our client stream, upgraded by a raw wsproto server; also the request it sent."""
    ours, theirs = await tcp_stream_pair()
    ws = WSConnection(ConnectionType.SERVER)
    seen: list[Request] = []

    async def serve() -> None:
        while not seen:
            ws.receive_data(await theirs.receive_some())
            seen.extend(e for e in ws.events() if isinstance(e, Request))
        await theirs.send_all(ws.send(AcceptConnection()))

    url = WebSocketURL(secure=False, host="tunnel.example", port=8080, resource="/t?x=1")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        stream = await connect_websocket(
            ours,
            url,
            headers=[("Authorization", "Bearer abc")],
            host_header="gateway.example",
            timeout=5,
            ping_interval=ping_interval,
        )
    return stream, RawPeer(theirs, ws), seen[0]


async def _server_with_raw_client(
    ping_interval: float | None = None,
) -> tuple[WebSocketStream, RawPeer]:
    ours, theirs = await tcp_stream_pair()
    ws = WSConnection(ConnectionType.CLIENT)
    peer = RawPeer(theirs, ws)
    box: list[WebSocketStream] = []

    async def accept() -> None:
        first = await ours.receive_some()
        box.append(
            await accept_websocket(
                ours, first, path="/tunnel", timeout=5, ping_interval=ping_interval
            )
        )

    async with trio.open_nursery() as nursery:
        nursery.start_soon(accept)
        await peer.send(Request(host="x", target="/tunnel"))
        assert isinstance(await peer.next_event(), AcceptConnection)
    return box[0], peer


# --------------------------------------------------------------------------- the stream


async def test_upgrade_sends_the_host_override_the_headers_and_the_resource() -> None:
    stream, peer, request = await _client_with_raw_server()
    async with stream:
        assert request.host == "gateway.example"
        assert request.target == "/t?x=1"
        assert (b"authorization", b"Bearer abc") in [
            (bytes(k).lower(), bytes(v)) for k, v in request.extra_headers
        ]
        await stream.send_all(b"hello")
        event = await peer.next_event()
        assert isinstance(event, BytesMessage)
        assert event.data == b"hello"
        assert event.message_finished


async def test_fragments_and_message_boundaries_are_one_byte_stream() -> None:
    stream, peer = await _server_with_raw_client()

    async def send() -> None:
        await peer.send(BytesMessage(data=b"ab", message_finished=False))
        await peer.send(BytesMessage(data=b"cd", message_finished=False))
        await peer.send(BytesMessage(data=b"ef"))
        await peer.send(BytesMessage(data=b""))
        await peer.send(BytesMessage(data=b"gh" * 100_000))

    async with stream, trio.open_nursery() as nursery:
        nursery.start_soon(send)
        got = b""
        while len(got) < 6 + 200_000:
            chunk = await stream.receive_some(7)
            assert 0 < len(chunk) <= 7
            got += chunk
        assert got == b"abcdef" + b"gh" * 100_000


async def test_a_ping_is_answered_while_the_stream_is_read() -> None:
    stream, peer = await _server_with_raw_client()
    async with stream, trio.open_nursery() as nursery:
        nursery.start_soon(stream.receive_some)
        await peer.send(Ping(payload=b"are you there"))
        event = await peer.next_event()
        assert isinstance(event, Pong)
        assert event.payload == b"are you there"
        nursery.cancel_scope.cancel()


async def test_keepalive_pings_only_while_nothing_is_received() -> None:
    stream, peer, _ = await _client_with_raw_server(ping_interval=0.05)
    async with stream, trio.open_nursery() as nursery:
        nursery.start_soon(stream.receive_some)
        for _ in range(3):
            assert isinstance(await peer.next_event(), Ping)
        assert stream.pings_sent >= 3
        nursery.cancel_scope.cancel()


async def test_a_busy_writer_never_blocks_the_reader_on_a_pong() -> None:
    """The peer pings while our writer is stuck on a full socket buffer: the pong is owed,
    the reader goes on reading, and the pong goes out right after the send."""
    stream, peer = await _server_with_raw_client()
    async with stream, trio.open_nursery() as nursery:
        big = b"x" * (8 << 20)  # far beyond the socket buffers: the send parks
        nursery.start_soon(stream.send_all, big)
        await trio.sleep(0.2)
        await peer.send(Ping(payload=b"1"))
        await peer.send(BytesMessage(data=b"read me"))
        with trio.fail_after(10):
            assert await stream.receive_some() == b"read me"
        got = 0
        pong = False
        while got < len(big) or not pong:
            event = await peer.next_event()
            if isinstance(event, BytesMessage):
                got += len(event.data)
            elif isinstance(event, Pong):
                pong = True
        assert got == len(big)


async def test_pings_while_the_writer_is_stuck_owe_one_pong_not_one_each() -> None:
    """A peer pinging without reading cannot make us queue a pong per ping: only the latest
    is owed (RFC 6455 5.5.3), and it goes out once the stuck send completes."""
    stream, peer = await _server_with_raw_client()
    async with stream, trio.open_nursery() as nursery:
        big = b"x" * (8 << 20)
        nursery.start_soon(stream.send_all, big)
        await trio.sleep(0.2)
        for i in range(2000):
            await peer.send(Ping(payload=b"%d" % i))
        await peer.send(BytesMessage(data=b"marker"))
        with trio.fail_after(10):
            assert await stream.receive_some() == b"marker"
        pongs = []
        got = 0
        while got < len(big) or not pongs:
            event = await peer.next_event()
            if isinstance(event, BytesMessage):
                got += len(event.data)
            elif isinstance(event, Pong):
                pongs.append(event.payload)
        assert pongs[-1] == b"1999"
        assert len(pongs) < 2000


async def test_a_text_message_breaks_the_stream_with_a_typed_cause() -> None:
    stream, peer = await _server_with_raw_client()
    async with stream:
        await peer.send(TextMessage(data="hello"))
        with pytest.raises(trio.BrokenResourceError) as info:
            await stream.receive_some()
        assert isinstance(info.value.__cause__, pytunnel.WebSocketError)
        event = await peer.next_event()
        assert isinstance(event, CloseConnection)
        assert event.code == 1003


async def test_a_close_by_the_peer_is_eof_then_sends_are_broken() -> None:
    stream, peer = await _server_with_raw_client()
    async with stream:
        await peer.send(CloseConnection(code=1001, reason="bye"))
        assert await stream.receive_some() == b""
        assert (stream.close_code, stream.close_reason) == (1001, "bye")
        reply = await peer.next_event()
        assert isinstance(reply, CloseConnection)
        with pytest.raises(trio.BrokenResourceError):
            await stream.send_all(b"late")


async def test_the_transport_ending_without_a_close_is_eof() -> None:
    stream, peer = await _server_with_raw_client()
    async with stream:
        await peer.stream.aclose()
        assert await stream.receive_some() == b""
        assert stream.close_code == 1006


async def test_aclose_sends_a_close_frame_and_closed_streams_refuse_use() -> None:
    stream, peer = await _server_with_raw_client()
    await stream.aclose()
    event = await peer.next_event()
    assert isinstance(event, CloseConnection)
    assert event.code == 1000
    with pytest.raises(trio.ClosedResourceError):
        await stream.send_all(b"x")
    with pytest.raises(trio.ClosedResourceError):
        await stream.receive_some()
    await stream.aclose()  # idempotent


# --------------------------------------------------------------------------- upgrades


async def _listener(nursery: trio.Nursery, handler: object) -> int:
    listeners = await nursery.start(
        functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1")  # type: ignore[arg-type]
    )
    return int(listeners[0].socket.getsockname()[1])


async def test_an_upgrade_nobody_answers_is_a_typed_timeout(nursery: trio.Nursery) -> None:
    async def silent(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    port = await _listener(nursery, silent)
    with pytest.raises(pytunnel.WebSocketError, match="no answer to the WebSocket upgrade"):
        async with pytunnel.open_tunnel(
            f"ws://127.0.0.1:{port}/t", token=TOKEN, handshake_timeout=0.5
        ):
            pass  # pragma: no cover


async def test_an_answer_that_is_not_http_is_a_typed_error(nursery: trio.Nursery) -> None:
    async def garbage(stream: trio.SocketStream) -> None:
        await stream.send_all(b"\x00\x00\x00\x05hello")
        await trio.sleep_forever()

    port = await _listener(nursery, garbage)
    with pytest.raises(pytunnel.WebSocketError, match="not a WebSocket upgrade answer"):
        async with pytunnel.open_tunnel(f"ws://127.0.0.1:{port}/t", token=TOKEN):
            pass  # pragma: no cover


@pytest.mark.parametrize("status", [403, 502])
async def test_a_refused_upgrade_names_the_url_and_status(
    nursery: trio.Nursery, status: int
) -> None:
    async def refuse(stream: trio.SocketStream) -> None:
        await stream.receive_some()
        body = b"<h1>go away</h1>\r\n"
        await stream.send_all(
            f"HTTP/1.1 {status} No\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
        )
        await trio.sleep_forever()

    port = await _listener(nursery, refuse)
    url = f"ws://127.0.0.1:{port}/t"
    with pytest.raises(pytunnel.WebSocketError) as info:
        async with pytunnel.open_tunnel(url, token=TOKEN):
            pass  # pragma: no cover
    assert info.value.status == status
    assert info.value.code == pytunnel.ErrorCode.WEBSOCKET_FAILED
    assert str(info.value) == (
        f"[WEBSOCKET_FAILED] {url}: the WebSocket upgrade was refused with HTTP {status}: "
        "<h1>go away</h1>"
    )


async def test_a_server_that_closes_at_once_is_a_typed_error(nursery: trio.Nursery) -> None:
    async def hang_up(stream: trio.SocketStream) -> None:
        # the request read first: closed with it unread, the close would be a reset
        request = b""
        while b"\r\n\r\n" not in request:
            chunk = await stream.receive_some()
            if not chunk:
                break
            request += chunk
        await stream.aclose()

    port = await _listener(nursery, hang_up)
    with pytest.raises(pytunnel.WebSocketError, match="closed the connection instead"):
        async with pytunnel.open_tunnel(f"ws://127.0.0.1:{port}/t", token=TOKEN):
            pass  # pragma: no cover


def test_websocket_urls() -> None:
    url = parse_websocket_url("wss://example.com/tunnel?k=v")
    assert (url.secure, url.host, url.port) == (True, "example.com", 443)
    assert url.resource == "/tunnel?k=v"
    assert str(url) == "wss://example.com/tunnel?k=v"
    assert url.host_header == "example.com"
    url = parse_websocket_url("ws://[::1]:8080")
    assert (url.host, url.port, url.resource, url.host_header) == ("::1", 8080, "/", "[::1]:8080")
    for bad, reason in [
        ("http://x/t", "scheme"),
        ("ws:///t", "no host"),
        ("ws://u:p@x/t", "credentials"),
        ("ws://x:99999/t", "out of range"),
        ("ws://x/t#frag", "fragment"),
    ]:
        with pytest.raises(ValueError, match=reason):
            parse_websocket_url(bad)


def test_options_are_checked_when_the_config_is_made() -> None:
    with pytest.raises(ValueError, match="bad header"):
        pytunnel.ClientConfig(token="t", ws_headers=(("X-A", "1\r\nInjected: yes"),))
    with pytest.raises(ValueError, match="bad header"):
        pytunnel.ClientConfig(token="t", ws_headers=(("Bad Name", "1"),))
    with pytest.raises(ValueError, match="the WebSocket upgrade's own"):
        pytunnel.ClientConfig(token="t", ws_headers=(("Sec-WebSocket-Key", "x"),))
    with pytest.raises(ValueError, match="positive"):
        pytunnel.ServerConfig(token="t", ws_ping_interval=-1)
    with pytest.raises(ValueError, match="positive"):
        pytunnel.ClientConfig(token="t", ws_ping_interval=0)
    with pytest.raises(ValueError, match="ws_path"):
        pytunnel.ServerConfig(token="t", ws_path="tunnel")
    config = pytunnel.ClientConfig(token="t", ws_headers={"Authorization": "x"})  # type: ignore[arg-type]
    assert config.ws_headers == (("Authorization", "x"),)


def test_an_http_request_is_told_from_a_tunnel_handshake() -> None:
    from pytunnel.protocol.frames import encode_message
    from pytunnel.protocol.messages import GoAway

    assert websocket.looks_like_http(b"GET / HTTP/1.1\r\n")
    assert not websocket.looks_like_http(encode_message(GoAway(1, "x")))
    assert not websocket.looks_like_http(b"")


# --------------------------------------------------------------------------- whole tunnels


@pytest.fixture
async def ws_server() -> AsyncIterator[pytunnel.TunnelServer]:
    async with pytunnel.open_server(token=TOKEN, ws_path="/tunnel") as server:
        yield server


async def test_a_tunnel_over_websocket_and_a_raw_one_share_the_listener(
    ws_server: pytunnel.TunnelServer, echo_port: int
) -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB
    url = f"ws://127.0.0.1:{ws_server.port}/tunnel"
    async with pytunnel.open_tunnel(url, token=TOKEN) as tunnel:
        forward = await tunnel.forward_local("127.0.0.1", echo_port)
        assert await echo_once(forward.address, payload) == payload
    async with pytunnel.open_tunnel(ws_server.address, token=TOKEN) as tunnel:
        forward = await tunnel.forward_local("127.0.0.1", echo_port)
        assert await echo_once(forward.address, b"raw") == b"raw"


async def test_another_path_is_refused_404_and_a_plain_get_400(
    ws_server: pytunnel.TunnelServer,
) -> None:
    url = f"ws://127.0.0.1:{ws_server.port}/other"
    with pytest.raises(pytunnel.WebSocketError) as info:
        async with pytunnel.open_tunnel(url, token=TOKEN):
            pass  # pragma: no cover
    assert info.value.status == 404
    stream = await trio.open_tcp_stream(*ws_server.address)
    async with stream:
        await stream.send_all(b"GET /tunnel HTTP/1.1\r\nHost: x\r\n\r\n")
        with trio.fail_after(5):
            answer = await stream.receive_some()
        assert answer.startswith(b"HTTP/1.1 400 ")


async def test_a_server_without_ws_path_answers_a_websocket_client_with_a_typed_error(
    tunnel_server: pytunnel.TunnelServer,
) -> None:
    url = f"ws://127.0.0.1:{tunnel_server.port}/tunnel"
    with pytest.raises(pytunnel.WebSocketError, match="not a WebSocket upgrade answer"):
        async with pytunnel.open_tunnel(url, token=TOKEN):
            pass  # pragma: no cover


async def test_a_wrong_token_over_websocket_is_the_usual_error(
    ws_server: pytunnel.TunnelServer,
) -> None:
    url = f"ws://127.0.0.1:{ws_server.port}/tunnel"
    with pytest.raises(pytunnel.AuthenticationError):
        async with pytunnel.open_tunnel(url, token="wrong", reconnect=False):
            pass  # pragma: no cover


async def test_failed_upgrades_and_tunnels_leave_no_task_and_no_fd(
    ws_server: pytunnel.TunnelServer, echo_port: int
) -> None:
    tasks, fds = count_tasks(), count_fds()
    for _ in range(10):
        with pytest.raises(pytunnel.WebSocketError, match="HTTP 404"):
            async with pytunnel.open_tunnel(f"ws://127.0.0.1:{ws_server.port}/other", token=TOKEN):
                pass  # pragma: no cover
        async with pytunnel.open_tunnel(
            f"ws://127.0.0.1:{ws_server.port}/tunnel", token=TOKEN
        ) as tunnel:
            forward = await tunnel.forward_local("127.0.0.1", echo_port)
            assert await echo_once(forward.address, b"x") == b"x"
    await wait_until(lambda: ws_server.session_count == 0)
    await wait_until(lambda: count_tasks() == tasks, what=describe_tasks)
    await wait_until(lambda: count_fds() == fds, what=lambda: f"{count_fds()} fds, not {fds}")


class CuttableRelay:
    """A TCP relay in front of the server whose connections can all be cut at once, as a
    proxy dropping the WebSocket mid-session does."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.scopes: list[trio.CancelScope] = []

    async def handle(self, client: trio.SocketStream) -> None:
        server = await trio.open_tcp_stream(*self.target)
        with trio.CancelScope() as scope:
            self.scopes.append(scope)
            async with client, server, trio.open_nursery() as nursery:
                for a, b in ((client, server), (server, client)):
                    nursery.start_soon(self._pump, a, b)

    @staticmethod
    async def _pump(a: trio.SocketStream, b: trio.SocketStream) -> None:
        try:
            async for chunk in a:
                await b.send_all(chunk)
        except trio.BrokenResourceError:
            pass

    def cut(self) -> None:
        for scope in self.scopes:
            scope.cancel()
        self.scopes.clear()


async def test_a_websocket_cut_mid_session_reconnects_and_forwards_resume(
    nursery: trio.Nursery, ws_server: pytunnel.TunnelServer, echo_port: int
) -> None:
    relay = CuttableRelay(ws_server.address)
    port = await _listener(nursery, relay.handle)
    url = f"ws://127.0.0.1:{port}/tunnel"
    tasks, fds = count_tasks(), count_fds()
    async with pytunnel.open_tunnel(
        url, token=TOKEN, backoff_initial=0.05, backoff_max=0.2
    ) as tunnel:
        forward = await tunnel.forward_local("127.0.0.1", echo_port)
        assert await echo_once(forward.address, b"before") == b"before"
        for cut in range(1, 4):
            relay.cut()
            await wait_until(lambda: tunnel.reconnects == cut and tunnel.connected)  # noqa: B023
            assert await echo_once(forward.address, b"after") == b"after"
    await wait_until(lambda: ws_server.session_count == 0)
    await wait_until(lambda: count_tasks() == tasks, what=describe_tasks)
    await wait_until(lambda: count_fds() == fds, what=lambda: f"{count_fds()} fds, not {fds}")


# --------------------------------------------------------------------------- wss


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def _server_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost", "127.0.0.1").configure_cert(context)
    return context


async def test_wss_straight_to_a_tls_server_trusting_its_ca_or_pinning_it(
    ca: trustme.CA, echo_port: int
) -> None:
    trusted = ssl.create_default_context()
    ca.configure_trust(trusted)
    async with pytunnel.open_server(
        token=TOKEN, ws_path="/tunnel", tls=_server_context(ca)
    ) as server:
        url = f"wss://127.0.0.1:{server.port}/tunnel"
        async with pytunnel.open_tunnel(url, token=TOKEN, tls=trusted) as tunnel:
            forward = await tunnel.forward_local("127.0.0.1", echo_port)
            assert await echo_once(forward.address, b"wss") == b"wss"
            stream = tunnel.session
            assert stream is not None
        der = await _peer_certificate(server.address)
        pin = pytunnel.tls.certificate_fingerprint(der)
        async with pytunnel.open_tunnel(url, token=TOKEN, tls_fingerprint=pin) as tunnel:
            forward = await tunnel.forward_local("127.0.0.1", echo_port)
            assert await echo_once(forward.address, b"pinned") == b"pinned"
        wrong = pytunnel.tls.certificate_fingerprint(hashlib.sha256(der).digest())
        with pytest.raises(pytunnel.TLSError, match=f"{url}: server certificate fingerprint"):
            async with pytunnel.open_tunnel(url, token=TOKEN, tls_fingerprint=wrong):
                pass  # pragma: no cover
        with pytest.raises(pytunnel.TLSError, match="certificate verification failed"):
            async with pytunnel.open_tunnel(url, token=TOKEN):  # the system store
                pass  # pragma: no cover


async def _peer_certificate(address: tuple[str, int]) -> bytes:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    stream = trio.SSLStream(await trio.open_tcp_stream(*address), context)
    async with stream:
        await stream.do_handshake()
        der = stream.getpeercert(binary_form=True)
    assert der is not None
    return der


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["connect", "ftp://x/t"], "scheme must be ws:// or wss://"),
        (["connect", "ws://x/t", "--header", "no colon"], "expected 'Name: value'"),
        (["connect", "ws://x/t", "--header", "Bad Name: 1"], "bad header"),
        (["connect", "ws://x/t", "--stdio", "nohost"], "--stdio"),
        (["connect", "ws://x/t", "--stdio", "h:22", "-L", "1:h:2"], "takes no -L, -R or -D"),
        (["serve", "--ws-path", "tunnel"], "ws_path must be a path"),
    ],
)
def test_transport_options_are_usage_errors(args: list[str], message: str) -> None:
    result = CliRunner().invoke(main, [*args, "--token", "t"])
    assert result.exit_code == 2, result.output
    assert message in result.output


@pytest.mark.parametrize("first", [b"", b"GET /tunnel HTTP/1.1\r\nHost: x\r\n"])
async def test_a_silent_or_stalled_upgrade_is_dropped_at_the_first_frame_deadline(
    first: bytes, echo_port: int
) -> None:
    """Silent, or an upgrade request that never ends: the connection is closed within the
    first-frame deadline, its slot is freed, and the server goes on serving."""
    async with pytunnel.open_server(
        token=TOKEN, ws_path="/tunnel", first_frame_timeout=0.3
    ) as server:
        stream = await trio.open_tcp_stream(*server.address)
        async with stream:
            await stream.send_all(first)
            with trio.fail_after(10):
                while await stream.receive_some():
                    pass
        await wait_until(lambda: server.pending_handshakes == 0)
        url = f"ws://127.0.0.1:{server.port}/tunnel"
        async with pytunnel.open_tunnel(url, token=TOKEN) as tunnel:
            forward = await tunnel.forward_local("127.0.0.1", echo_port)
            assert await echo_once(forward.address, b"still serving") == b"still serving"


async def test_a_framing_violation_breaks_the_stream_and_is_answered_with_a_close() -> None:
    """A client frame without a mask (RFC 6455 5.1): the server closes with 1002."""
    stream, peer = await _server_with_raw_client()
    async with stream:
        await peer.stream.send_all(b"\x82\x03abc")  # binary, FIN, unmasked
        with pytest.raises(trio.BrokenResourceError) as info:
            await stream.receive_some()
        assert isinstance(info.value.__cause__, pytunnel.WebSocketError)
        event = await peer.next_event()
        assert isinstance(event, CloseConnection)
        assert event.code == 1002


async def test_a_tls_server_takes_tls_outside_or_inside_the_websocket(
    ca: trustme.CA, echo_port: int
) -> None:
    """wss:// straight to the server (TLS outside), ws:// with the tunnel's TLS inside (what
    passes a proxy that terminated its own TLS), raw TLS; a WebSocket without TLS at all is
    refused, with the usual hint."""
    trusted = ssl.create_default_context()
    ca.configure_trust(trusted)
    async with pytunnel.open_server(
        token=TOKEN, ws_path="/tunnel", tls=_server_context(ca)
    ) as server:
        for address in [
            f"wss://127.0.0.1:{server.port}/tunnel",
            f"ws://127.0.0.1:{server.port}/tunnel",
            server.address,
        ]:
            async with pytunnel.open_tunnel(address, token=TOKEN, tls=trusted) as tunnel:
                forward = await tunnel.forward_local("127.0.0.1", echo_port)
                assert await echo_once(forward.address, b"tls") == b"tls", address
        with pytest.raises(pytunnel.ConnectError, match="connect with TLS"):
            async with pytunnel.open_tunnel(
                f"ws://127.0.0.1:{server.port}/tunnel", token=TOKEN, reconnect=False
            ):
                pass  # pragma: no cover


# --------------------------------------------------------------------------- the CLI


async def test_the_cli_over_websocket_and_stdio_over_it(echo_port: int) -> None:
    """``serve --ws-path`` and ``connect ws://``: a forward, and ``--stdio`` over ws://."""
    await trio.to_thread.run_sync(_cli_over_websocket, echo_port)


def _cli_over_websocket(echo_port: int) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    cli = [sys.executable, "-m", "pytunnel"]
    server = subprocess.Popen(
        [*cli, "serve", "--listen", "127.0.0.1:0", "--token", TOKEN, "--ws-path", "/t"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    client = None
    try:
        assert server.stdout is not None
        listening = server.stdout.readline().decode()
        port = int(listening.rsplit(":", 1)[1].split()[0])
        url = f"ws://127.0.0.1:{port}/t"
        assert server.stdout.readline().decode().strip() == f"WebSocket clients: {url}"
        client = subprocess.Popen(
            [*cli, "connect", url, "--token", TOKEN, "-L", f"0:127.0.0.1:{echo_port}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        assert client.stdout is not None
        assert client.stdout.readline().decode().strip() == f"connected to {url}"
        forward = client.stdout.readline().decode().split()[2]
        host, forward_port = forward.rsplit(":", 1)
        with socket.create_connection((host, int(forward_port)), timeout=10) as s:
            s.sendall(b"cli over ws")
            s.shutdown(socket.SHUT_WR)
            assert s.makefile("rb").read() == b"cli over ws"
        result = subprocess.run(
            [*cli, "connect", url, "--token", TOKEN, "--stdio", f"127.0.0.1:{echo_port}"],
            input=b"stdio over ws",
            capture_output=True,
            env=env,
            timeout=30,
            check=False,
        )
        assert result.returncode == 0, result.stderr.decode()
        assert result.stdout == b"stdio over ws"
    finally:
        for process in [client, server]:
            if process is not None:
                process.send_signal(signal.SIGINT)
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


# --------------------------------------------------------------------------- any chunking


def _client_wire(messages: list[tuple[bytes, bool]], pings: list[int]) -> tuple[bytes, bytes]:
    """What a wsproto client sends: the upgrade request; then, once answered (RFC 6455 4.1:
    nothing before the answer), the messages (a ping before each index in ``pings``) and a
    close."""
    client = WSConnection(ConnectionType.CLIENT)
    request = client.send(Request(host="x", target="/tunnel"))
    helper = WSConnection(ConnectionType.SERVER)  # only to answer the client's upgrade
    helper.receive_data(request)
    assert any(isinstance(e, Request) for e in helper.events())
    client.receive_data(helper.send(AcceptConnection()))
    assert isinstance(next(client.events()), AcceptConnection)
    frames = b""
    for i, (data, finished) in enumerate(messages):
        if i in pings:
            frames += client.send(Ping(payload=b"p"))
        frames += client.send(BytesMessage(data=data, message_finished=finished))
    if messages and not messages[-1][1]:
        frames += client.send(BytesMessage(data=b"", message_finished=True))
    return request, frames + client.send(CloseConnection(code=1000))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    messages=st.lists(st.tuples(st.binary(max_size=3000), st.booleans()), max_size=12),
    pings=st.sets(st.integers(0, 11), max_size=4),
    cuts=st.lists(st.integers(1, 700), min_size=1, max_size=40),
    max_bytes=st.one_of(st.none(), st.integers(1, 5000)),
)
def test_any_chunking_of_any_messages_reads_back_the_same_bytes(
    messages: list[tuple[bytes, bool]], pings: set[int], cuts: list[int], max_bytes: int | None
) -> None:
    request, frames = _client_wire(messages, sorted(pings))
    expected = b"".join(data for data, _ in messages)

    async def main() -> bytes:
        theirs, ours = trio.testing.memory_stream_pair()
        answered = trio.Event()

        async def send_cut(wire: bytes) -> None:
            view, i = memoryview(wire), 0
            while view:
                cut = cuts[i % len(cuts)]
                await theirs.send_all(view[:cut])
                view, i = view[cut:], i + 1

        async def send() -> None:
            await send_cut(request)
            await answered.wait()
            await send_cut(frames)

        async def drain() -> None:  # our 101, pongs and close
            while await theirs.receive_some():
                answered.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            nursery.start_soon(drain)
            stream = await accept_websocket(
                ours, await ours.receive_some(), path="/tunnel", timeout=5, ping_interval=None
            )
            got = b""
            with trio.fail_after(5):
                while chunk := await stream.receive_some(max_bytes):
                    assert max_bytes is None or len(chunk) <= max_bytes
                    got += chunk
            assert stream.close_code == 1000
            await stream.aclose()
            nursery.cancel_scope.cancel()
        return got

    assert trio.run(main) == expected


async def test_frames_that_come_with_the_upgrade_answer_are_read() -> None:
    """A server may send right after its 101, in the same segment: nothing is lost."""
    ours, theirs = await tcp_stream_pair()
    ws = WSConnection(ConnectionType.SERVER)

    async def serve() -> None:
        while not any(isinstance(e, Request) for e in ws.events()):
            ws.receive_data(await theirs.receive_some())
        await theirs.send_all(
            ws.send(AcceptConnection()) + ws.send(BytesMessage(data=b"early bytes"))
        )

    url = WebSocketURL(secure=False, host="x", port=80, resource="/")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        stream = await connect_websocket(ours, url, timeout=5, ping_interval=None)
    async with stream, theirs:
        assert await stream.receive_some() == b"early bytes"


# --------------------------------------------------------------------------- conformance


async def _websocket_pair(
    make_pair: Callable[[], tuple[trio.abc.Stream, trio.abc.Stream]],
) -> tuple[WebSocketStream, WebSocketStream]:
    """Our client and our server stream, upgraded over ``make_pair()``'s two ends."""
    client_end, server_end = make_pair()
    url = WebSocketURL(secure=False, host="x", port=80, resource="/tunnel")
    box: list[WebSocketStream] = []

    async def accept() -> None:
        first = await server_end.receive_some()
        box.append(
            await accept_websocket(server_end, first, path="/tunnel", timeout=5, ping_interval=1)
        )

    async with trio.open_nursery() as nursery:
        nursery.start_soon(accept)
        client = await connect_websocket(client_end, url, timeout=5, ping_interval=1)
    return client, box[0]


async def test_the_websocket_stream_passes_trios_stream_conformance_checks() -> None:
    async def maker() -> tuple[WebSocketStream, WebSocketStream]:
        return await _websocket_pair(trio.testing.memory_stream_pair)

    async def clogged() -> tuple[WebSocketStream, WebSocketStream]:
        # a lockstep pair: a send waits until the other side reads
        return await _websocket_pair(trio.testing.lockstep_stream_pair)

    await trio.testing.check_two_way_stream(maker, clogged)
