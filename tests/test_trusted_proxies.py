"""``trusted_proxies``: the real client address behind a proxy that sends PROXY protocol
headers, on the control listener; a real HAProxy (``send-proxy`` / ``send-proxy-v2``) in front
of a real server and client, and hand-made headers for every failure path.

The proxy's side of each connection comes from 127.0.0.3 (HAProxy's ``source``, or a local
bind), so the server can tell the proxy (trusted) from everyone else.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import logging
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from click.testing import CliRunner
from helpers import TOKEN, closed_port, echo_once, until_listening, wait_until
from test_remote_proxy_protocol import HeaderTarget

import pytunnel
from pytunnel._handshake import client_handshake
from pytunnel._proxied import is_trusted, read_proxy_header, trusted_networks
from pytunnel.cli import main
from pytunnel.protocol.proxy import ProxyHeaderError, encode_header

pytestmark = pytest.mark.timeout(60)

PROXY_SOURCE = "127.0.0.3"
HAPROXY = shutil.which("haproxy") or (
    "/usr/sbin/haproxy" if os.path.exists("/usr/sbin/haproxy") else None
)
needs_haproxy = pytest.mark.skipif(
    HAPROXY is None, reason="haproxy is not installed (.ci/run installs it)"
)


class _HeaderFirst(trio.abc.Stream):
    """A connection from the proxy's address whose first write carries ``header`` and the
    client's first bytes in one segment, as a proxy writes them."""

    def __init__(self, stream: trio.SocketStream, header: bytes) -> None:
        self.stream = stream
        self._header = header

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        header, self._header = self._header, b""
        await self.stream.send_all(header + bytes(data))

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.stream.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.stream.aclose()


async def _via_proxy(server: pytunnel.TunnelServer, header: bytes) -> _HeaderFirst:
    stream = await trio.open_tcp_stream(*server.address, local_address=PROXY_SOURCE)
    return _HeaderFirst(stream, header)


def _v1(source: str, port: int = 40000) -> bytes:
    return encode_header("v1", (source, port), ("127.0.0.1", 7000))


async def _serve(nursery: trio.Nursery, **options: object) -> pytunnel.TunnelServer:
    server: pytunnel.TunnelServer = await nursery.start(
        functools.partial(pytunnel.serve, 0, token=TOKEN, **options)  # type: ignore[arg-type]
    )
    return server


# ------------------------------------------------------------------ the pieces


def test_trusted_networks_take_addresses_and_networks_and_name_a_bad_one() -> None:
    assert trusted_networks(["10.0.0.0/8", "127.0.0.1", " ::1 "]) == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("127.0.0.1/32"),
        ipaddress.ip_network("::1/128"),
    )
    with pytest.raises(ValueError, match="trusted proxy 'haproxy' is not an IP address"):
        trusted_networks(["haproxy"])
    with pytest.raises(ValueError, match="not an IP address"):
        pytunnel.ServerConfig(token=TOKEN, trusted_proxies=["10.0.0.0/33"])


def test_an_ipv4_mapped_peer_counts_as_its_ipv4_address() -> None:
    networks = trusted_networks(["10.1.0.0/16"])
    assert is_trusted("10.1.2.3", networks)
    assert is_trusted("::ffff:10.1.2.3", networks)
    assert not is_trusted("10.2.0.1", networks)
    assert not is_trusted("not an address", networks)
    assert not is_trusted("10.1.2.3", ())


def test_a_bad_trusted_proxy_is_a_usage_error() -> None:
    result = CliRunner().invoke(main, ["serve", "--token", "t", "--trusted-proxies", "nope"])
    assert result.exit_code == 2
    assert "trusted proxy 'nope' is not an IP address" in result.output


@pytest.mark.parametrize("split", [False, True], ids=["one-segment", "in-pieces"])
async def test_the_header_is_read_exactly_and_what_follows_stays(split: bool) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    header = encode_header("v2", ("198.51.100.7", 5555), ("127.0.0.1", port))
    async with trio.open_nursery() as nursery:
        client = await trio.open_tcp_stream("127.0.0.1", port)
        server = await listeners[0].accept()
        assert isinstance(server, trio.SocketStream)
        if split:

            async def trickle() -> None:
                await client.send_all(header[:7])
                await trio.sleep(0.05)
                await client.send_all(header[7:] + b"hello")

            nursery.start_soon(trickle)
        else:
            await client.send_all(header + b"hello")
        got = await read_proxy_header(server, timeout=5)
        assert got.source == ("198.51.100.7", 5555)
        assert await server.receive_some(5) == b"hello"
        await client.aclose()
        await server.aclose()
    await listeners[0].aclose()


@pytest.mark.parametrize(
    ("sent", "message"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", "does not start with a PROXY protocol header"),
        (b"PROXY TCP4 1.2.3.4\r\n", "malformed PROXY v1 header"),
        (b"", "closed before its PROXY header"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2", "no complete PROXY header within 0.3 s"),
    ],
    ids=["http", "malformed", "closed", "slow"],
)
async def test_a_missing_or_bad_header_is_one_typed_error(sent: bytes, message: str) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    client = await trio.open_tcp_stream("127.0.0.1", port)
    server = await listeners[0].accept()
    assert isinstance(server, trio.SocketStream)
    if sent:
        await client.send_all(sent)
    else:
        await client.send_eof()
    with trio.fail_after(10), pytest.raises(ProxyHeaderError, match=message):
        await read_proxy_header(server, timeout=0.3)
    for stream in (client, server):
        await stream.aclose()
    await listeners[0].aclose()


# ------------------------------------------------------------------ the control listener


async def test_the_throttle_counts_the_real_client_not_the_proxy(nursery: trio.Nursery) -> None:
    """Wrong tokens from one client behind the proxy get that client refused; another client
    behind the same proxy, and the proxy's own health checks, still get in."""
    server = await _serve(
        nursery, trusted_proxies=[PROXY_SOURCE], auth_failure_burst=1, auth_failure_interval=600
    )
    for _ in range(2):
        with pytest.raises(pytunnel.TunnelError) as info:
            await client_handshake(
                await _via_proxy(server, _v1("198.51.100.7")), "wrong", max_frame_size=2**20
            )
    assert isinstance(info.value, pytunnel.RateLimitedError), info.value
    other = await _via_proxy(server, _v1("198.51.100.8"))
    result = await client_handshake(other, TOKEN, max_frame_size=2**20)
    assert result is not None
    await other.aclose()
    assert server.auth_failures == 1


async def test_clients_behind_the_proxy_are_named_by_their_own_address(
    nursery: trio.Nursery, echo_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pytunnel.server")
    server = await _serve(nursery, trusted_proxies=["127.0.0.0/30"])
    stream = await _via_proxy(server, _v1("203.0.113.9", 4711))
    tunnel = await pytunnel.wrap_tunnel(nursery, stream, token=TOKEN)
    forward = await tunnel.forward_local("127.0.0.1", echo_port)
    assert await echo_once(forward.address, b"ping") == b"ping"
    await wait_until(lambda: len(server.clients) == 1)
    peer = server.clients[0].peer
    assert peer.startswith("203.0.113.9:4711 via 127.0.0.3:"), peer
    assert "client 203.0.113.9:4711 via 127.0.0.3:" in caplog.text
    await tunnel.aclose()


async def test_a_header_from_an_untrusted_peer_is_not_believed(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    """Only the trusted proxy's header is read: anyone else's is just bad handshake bytes,
    counted against its real address."""
    caplog.set_level(logging.DEBUG, logger="pytunnel")
    server = await _serve(nursery, trusted_proxies=[PROXY_SOURCE])
    stream = await trio.open_tcp_stream(*server.address, local_address="127.0.0.2")
    with trio.fail_after(10), pytest.raises(pytunnel.TunnelError):
        await client_handshake(
            _HeaderFirst(stream, _v1("198.51.100.66")), TOKEN, max_frame_size=2**20
        )
    assert "198.51.100.66" not in caplog.text
    assert server.clients == []


async def test_a_trusted_proxy_without_a_header_is_closed_with_one_warning(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="pytunnel.server")
    server = await _serve(nursery, trusted_proxies=[PROXY_SOURCE])
    stream = await trio.open_tcp_stream(*server.address, local_address=PROXY_SOURCE)
    with trio.fail_after(10), pytest.raises(pytunnel.TunnelError):
        await client_handshake(stream, TOKEN, max_frame_size=2**20)
    warnings = [r.getMessage() for r in caplog.records if "trusted proxy" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("closing a control connection from trusted proxy 127.0.0.3:")
    assert "does not start with a PROXY protocol header" in warnings[0]
    assert server.clients == []


async def test_a_health_check_without_addresses_keeps_the_proxys_address(
    nursery: trio.Nursery,
) -> None:
    """A ``PROXY UNKNOWN`` (or v2 ``LOCAL``) header names no source: the connection is the
    proxy's own, and is served as such."""
    server = await _serve(nursery, trusted_proxies=[PROXY_SOURCE])
    stream = await _via_proxy(server, b"PROXY UNKNOWN\r\n")
    tunnel = await pytunnel.wrap_tunnel(nursery, stream, token=TOKEN)
    await wait_until(lambda: len(server.clients) == 1)
    assert server.clients[0].peer.startswith("127.0.0.3:"), server.clients[0].peer
    await tunnel.aclose()


# ------------------------------------------------------------------ a real HAProxy


@asynccontextmanager
async def _haproxy(tmp: Path, backend_port: int, send: str) -> AsyncIterator[int]:
    """HAProxy in TCP mode on a free port, forwarding to the server with ``send``
    (``send-proxy`` or ``send-proxy-v2``) from 127.0.0.3."""
    assert HAPROXY is not None
    port = closed_port()
    config = tmp / "haproxy.cfg"
    config.write_text(
        f"""
global
    maxconn 64
defaults
    mode tcp
    timeout connect 2s
    timeout client 30s
    timeout server 30s
frontend control
    bind 127.0.0.1:{port}
    default_backend server
backend server
    server s1 127.0.0.1:{backend_port} {send} source {PROXY_SOURCE}
"""
    )
    process = await trio.lowlevel.open_process(
        [HAPROXY, "-db", "-f", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        await until_listening(process, "127.0.0.1", port)
        yield port
    finally:
        with trio.CancelScope(shield=True):
            process.kill()
            await process.wait()


@needs_haproxy
@pytest.mark.parametrize("send", ["send-proxy", "send-proxy-v2"])
async def test_a_tunnel_through_haproxy_names_the_real_client(
    nursery: trio.Nursery, echo_port: int, tmp_path: Path, send: str
) -> None:
    server = await _serve(nursery, trusted_proxies=[PROXY_SOURCE])
    async with _haproxy(tmp_path, server.address[1], send) as port:
        tunnel = await pytunnel.connect_tunnel(
            nursery, ("127.0.0.1", port), token=TOKEN, reconnect=False
        )
        local = await tunnel.forward_local("127.0.0.1", echo_port)
        remote = await tunnel.forward_remote("127.0.0.1", echo_port)
        assert await echo_once(local.address, b"through haproxy") == b"through haproxy"
        assert await echo_once(remote.address, b"and back") == b"and back"
        await wait_until(lambda: len(server.clients) == 1)
        peer = server.clients[0].peer
        assert peer.startswith("127.0.0.1:"), peer
        assert " via 127.0.0.3:" in peer, peer
        await tunnel.aclose()


@needs_haproxy
async def test_haproxy_in_front_of_a_server_that_does_not_trust_it_fails_clearly(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """The other misconfiguration: HAProxy sends headers the server was not told to expect.
    The client gets one typed error, nothing is served."""
    server = await _serve(nursery)
    async with _haproxy(tmp_path, server.address[1], "send-proxy-v2") as port:
        with trio.fail_after(20), pytest.raises(pytunnel.TunnelError):
            await pytunnel.connect_tunnel(
                nursery, ("127.0.0.1", port), token=TOKEN, reconnect=False
            )
    assert server.clients == []


# ------------------------------------------------------------------ public listeners


async def _header_target(nursery: trio.Nursery) -> tuple[HeaderTarget, int]:
    target = HeaderTarget()

    async def handler(stream: trio.SocketStream) -> None:
        # the public side of each test ends with a reset, which reaches the target
        with contextlib.suppress(trio.BrokenResourceError):
            await target.handler(stream)

    listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    return target, listeners[0].socket.getsockname()[1]


async def test_a_public_port_behind_the_proxy_tells_the_target_the_real_peer(
    nursery: trio.Nursery,
) -> None:
    """The public connection comes from the proxy with a header naming 198.51.100.7: the
    client's target is told 198.51.100.7 (PROXY v2 from the client), not the proxy."""
    server = await _serve(nursery, trusted_proxies=[PROXY_SOURCE])
    tunnel = await pytunnel.connect_tunnel(nursery, server.address, token=TOKEN, reconnect=False)
    target, port = await _header_target(nursery)
    forward = await tunnel.forward_remote("127.0.0.1", port, proxy_protocol="v2")
    stream = await trio.open_tcp_stream(*forward.address, local_address=PROXY_SOURCE)
    public = _HeaderFirst(stream, _v1("198.51.100.7", 5555))
    with trio.fail_after(10):
        await public.send_all(b"hello")
        assert await public.receive_some() == b"hello"
    await public.aclose()
    assert [h.source for h in target.headers] == [("198.51.100.7", 5555)]
    # a direct public connection (not from the proxy) is taken as it comes
    with trio.fail_after(10):
        direct = await trio.open_tcp_stream(*forward.address)
        ours = direct.socket.getsockname()
        await direct.send_all(b"direct")
        assert await direct.receive_some() == b"direct"
        await direct.aclose()
    assert target.headers[1].source == (ours[0], ours[1])
    await tunnel.aclose()


async def test_a_public_connection_from_the_proxy_without_a_header_is_closed(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="pytunnel.server")
    server = await _serve(nursery, trusted_proxies=[PROXY_SOURCE])
    tunnel = await pytunnel.connect_tunnel(nursery, server.address, token=TOKEN, reconnect=False)
    target, port = await _header_target(nursery)
    forward = await tunnel.forward_remote("127.0.0.1", port, proxy_protocol="v1")
    stream = await trio.open_tcp_stream(*forward.address, local_address=PROXY_SOURCE)
    await stream.send_all(b"no header, just data\r\n")
    with trio.fail_after(10):
        # closed with our bytes unread: a reset, or an EOF
        with contextlib.suppress(trio.BrokenResourceError):
            assert await stream.receive_some() == b""
    await stream.aclose()
    assert target.headers == []
    warnings = [r.getMessage() for r in caplog.records if "trusted proxy" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"closing a connection to port {forward.listen_port} from")
    await tunnel.aclose()


async def test_a_name_route_behind_the_proxy_forwards_the_real_peer(
    nursery: trio.Nursery,
) -> None:
    """On the shared HTTP port, the header comes before the request head: it is read first,
    the request is routed by its Host, and X-Forwarded-For names the real client."""
    server = await _serve(
        nursery,
        trusted_proxies=[PROXY_SOURCE],
        http_listen=("127.0.0.1", 0),
        domain="tunnel.test",
    )
    tunnel = await pytunnel.connect_tunnel(nursery, server.address, token=TOKEN, reconnect=False)
    seen: list[bytes] = []

    async def app(stream: trio.SocketStream) -> None:
        async with stream:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = await stream.receive_some()
                if not chunk:
                    return
                head += chunk
            seen.append(head)
            await stream.send_all(
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
            )

    listeners = await nursery.start(functools.partial(trio.serve_tcp, app, 0, host="127.0.0.1"))
    await tunnel.forward_name(
        "app", "127.0.0.1", listeners[0].socket.getsockname()[1], forwarded_headers=True
    )
    assert server.http_address is not None
    stream = await trio.open_tcp_stream(*server.http_address, local_address=PROXY_SOURCE)
    public = _HeaderFirst(stream, _v1("203.0.113.50", 6000))
    with trio.fail_after(10):
        await public.send_all(b"GET / HTTP/1.1\r\nHost: app.tunnel.test\r\n\r\n")
        answer = b""
        while chunk := await public.receive_some():
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200 OK"), answer
    assert b"X-Forwarded-For: 203.0.113.50\r\n" in seen[0], seen
    await public.aclose()
    await tunnel.aclose()


@needs_haproxy
async def test_a_public_port_behind_haproxy_names_the_real_peer(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    server = await _serve(nursery, trusted_proxies=[PROXY_SOURCE])
    tunnel = await pytunnel.connect_tunnel(nursery, server.address, token=TOKEN, reconnect=False)
    target, port = await _header_target(nursery)
    forward = await tunnel.forward_remote("127.0.0.1", port, proxy_protocol="v1")
    async with _haproxy(tmp_path, forward.listen_port, "send-proxy-v2") as front:
        with trio.fail_after(10):
            public = await trio.open_tcp_stream("127.0.0.1", front)
            ours = public.socket.getsockname()
            await public.send_all(b"via haproxy")
            assert await public.receive_some() == b"via haproxy"
            await public.aclose()
    # HAProxy also relays the probe that saw it listening, and the two may reach the target
    # in either order
    assert (ours[0], ours[1]) in [h.source for h in target.headers], target.headers
    assert all(h.source is not None and h.source[0] == "127.0.0.1" for h in target.headers)
    await tunnel.aclose()
