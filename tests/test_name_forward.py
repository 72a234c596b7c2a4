"""Name routes end to end (``forwards/name.py``, ``forwards/_public_name.py``): a real server
with shared HTTP and HTTPS listeners, real clients registering names, curl and Python's ssl
(and openssl) as the public, services holding their own certificates."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import pathlib
import shutil
import socket
import ssl
import struct
import threading
from collections.abc import AsyncIterator
from typing import Any

import h11
import pytest
import trio
import trustme
from helpers import (
    TOKEN,
    LinkProxy,
    closed_port,
    count_fds,
    count_tasks,
    curl,
    describe_tasks,
    exchange,
    http_service,
    needs_curl,
    raw_echo,
    serve_route_target,
    tls_get,
    tls_service,
    wait_until,
)

import pytunnel
from pytunnel.protocol.proxy import ProxyHeaderReader

OPENSSL = shutil.which("openssl")
DOMAIN = "tunnel.test"
LOOPBACK = ("127.0.0.1", 0)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@contextlib.asynccontextmanager
async def name_server(**options: object) -> AsyncIterator[pytunnel.TunnelServer]:
    async with pytunnel.open_server(
        token=TOKEN,
        http_listen=LOOPBACK,
        https_listen=LOOPBACK,
        domain=DOMAIN,
        allow_domains=["*.example.org"],
        **options,  # type: ignore[arg-type]
    ) as server:
        yield server


@pytest.fixture
async def server() -> AsyncIterator[pytunnel.TunnelServer]:
    async with name_server() as server:
        yield server


def http_port(server: pytunnel.TunnelServer) -> int:
    assert server.http_address is not None
    return server.http_address[1]


def https_port(server: pytunnel.TunnelServer) -> int:
    assert server.https_address is not None
    return server.https_address[1]


# --------------------------------------------------------------------------- HTTP


@needs_curl
async def test_two_clients_each_get_their_name_on_one_shared_port(
    nursery: trio.Nursery, server: pytunnel.TunnelServer
) -> None:
    app = await serve_route_target(nursery, http_service("app"))
    shop = await serve_route_target(nursery, http_service("shop"))
    async with (
        pytunnel.open_tunnel(server.address, token=TOKEN) as one,
        pytunnel.open_tunnel(server.address, token=TOKEN) as two,
    ):
        first = await one.forward_name("app", "127.0.0.1", app)
        second = await two.forward_name("shop.example.org", "127.0.0.1", shop)
        port = http_port(server)
        assert first.address == (f"app.{DOMAIN}", port)
        assert first.url == f"http://app.{DOMAIN}:{port}"
        assert first.kind is pytunnel.ForwardKind.NAME
        assert first.kind.remote
        assert second.address == ("shop.example.org", port)
        # the services see the tunnel client's connection, as for any remote forward
        assert await curl(port, f"app.{DOMAIN}", "/a") == (200, "app /a from 127.0.0.1\n")
        assert await curl(port, "shop.example.org", "/b") == (200, "shop /b from 127.0.0.1\n")
        code, body = await curl(port, f"nobody.{DOMAIN}")
        assert code == 404
        assert f"no tunnel is serving nobody.{DOMAIN}" in body
        assert first.stats.total_connections == 1
        assert second.stats.total_connections == 1


async def test_a_kept_alive_connection_and_an_upgrade_pass_as_bytes(
    nursery: trio.Nursery, tunnel: pytunnel.Tunnel, server: pytunnel.TunnelServer
) -> None:
    """After the first head the route is a byte pipe: a second request, a WebSocket-style
    upgrade and the frames after it arrive exactly as sent."""
    del tunnel  # the conftest tunnel's server has no shared listener
    echo = await serve_route_target(nursery, raw_echo)
    async with pytunnel.open_tunnel(server.address, token=TOKEN) as client:
        await client.forward_name("ws", "127.0.0.1", echo)
        sent = (
            f"GET /chat HTTP/1.1\r\nHost: ws.{DOMAIN}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode() + bytes(range(256)) * 64
        stream = await trio.open_tcp_stream("127.0.0.1", http_port(server))
        async with stream:
            await stream.send_all(sent)
            await stream.send_eof()
            got = b""
            with trio.fail_after(10):
                async for chunk in stream:
                    got += chunk
        assert got == sent


@needs_curl
async def test_a_name_held_by_another_client_is_refused_until_it_leaves(
    nursery: trio.Nursery, server: pytunnel.TunnelServer
) -> None:
    app = await serve_route_target(nursery, http_service("first"))
    other = await serve_route_target(nursery, http_service("second"))
    async with pytunnel.open_tunnel(server.address, token=TOKEN) as two:
        async with pytunnel.open_tunnel(server.address, token=TOKEN) as one:
            await one.forward_name("app", "127.0.0.1", app)
            with pytest.raises(pytunnel.NameInUseError) as info:
                await two.forward_name("app", "127.0.0.1", other)
            assert info.value.code == pytunnel.ErrorCode.NAME_IN_USE
            assert f"app.{DOMAIN} is already routed to another client" in str(info.value)
            # never a silent takeover: the first client still serves
            assert (await curl(http_port(server), f"app.{DOMAIN}"))[1] == "first / from 127.0.0.1\n"
        # the first client is gone: its name is free at once
        await two.forward_name("app", "127.0.0.1", other)
        assert (await curl(http_port(server), f"app.{DOMAIN}"))[1] == "second / from 127.0.0.1\n"


@needs_curl
async def test_closing_the_forward_gives_the_name_back_at_once(
    nursery: trio.Nursery, server: pytunnel.TunnelServer
) -> None:
    app = await serve_route_target(nursery, http_service("app"))
    async with pytunnel.open_tunnel(server.address, token=TOKEN) as client:
        forward = await client.forward_name("app", "127.0.0.1", app)
        await forward.aclose()
        assert forward.status is pytunnel.ForwardStatus.STOPPED
        code, _ = await curl(http_port(server), f"app.{DOMAIN}")
        assert code == 404
        again = await client.forward_name("app", "127.0.0.1", app)
        assert again.status is pytunnel.ForwardStatus.ACTIVE
        assert (await curl(http_port(server), f"app.{DOMAIN}"))[0] == 200


@pytest.mark.parametrize(
    ("name", "error", "text"),
    [
        ("bad_name!", pytunnel.NameNotAllowedError, "not a valid host name"),
        ("shop.elsewhere.org", pytunnel.NameNotAllowedError, "not a name this server routes"),
        (f"a.b.{DOMAIN}", pytunnel.NameNotAllowedError, "not a name this server routes"),
        ("example.org", pytunnel.NameNotAllowedError, "not a name this server routes"),
    ],
)
async def test_a_name_the_server_does_not_route_is_refused_clearly(
    server: pytunnel.TunnelServer, name: str, error: type[Exception], text: str
) -> None:
    async with pytunnel.open_tunnel(server.address, token=TOKEN) as client:
        with pytest.raises(error, match=text) as info:
            await client.forward_name(name, "127.0.0.1", 9)
        assert isinstance(info.value, pytunnel.TunnelError)
        assert info.value.code == pytunnel.ErrorCode.NAME_NOT_ALLOWED
        assert client.forwards == []


async def test_a_server_without_shared_listeners_refuses_name_routes(
    tunnel: pytunnel.Tunnel,
) -> None:
    for tls in (False, True):
        with pytest.raises(pytunnel.NameNotAllowedError, match=r"no shared HTTPS? listener"):
            await tunnel.forward_name("app", "127.0.0.1", 9, tls=tls)


async def test_names_per_client_are_limited() -> None:
    async with (
        name_server(max_names_per_client=2) as server,
        pytunnel.open_tunnel(server.address, token=TOKEN) as client,
    ):
        await client.forward_name("a", "127.0.0.1", 9)
        await client.forward_name("b", "127.0.0.1", 9, tls=True)
        with pytest.raises(pytunnel.ForwardLimitError, match="limit of 2 names"):
            await client.forward_name("c", "127.0.0.1", 9)


@needs_curl
async def test_a_reconnecting_client_gets_its_name_back(
    nursery: trio.Nursery, server: pytunnel.TunnelServer
) -> None:
    """The name is restored after the link is lost, under the full name the server gave."""
    app = await serve_route_target(nursery, http_service("app"))
    async with pytunnel.open_tunnel(
        server.address, token=TOKEN, backoff_initial=0.05, backoff_max=0.2
    ) as client:
        forward = await client.forward_name("app", "127.0.0.1", app)
        session = client.session
        assert session is not None
        await session.abort(pytunnel.SessionClosedError("cut"))
        await wait_until(
            lambda: (
                client.session is not session and forward.status is pytunnel.ForwardStatus.ACTIVE
            ),
            10,
            lambda: f"forward {forward.status}: {forward.reason}",
        )
        assert forward.address == (f"app.{DOMAIN}", http_port(server))
        assert await curl(http_port(server), f"app.{DOMAIN}") == (200, "app / from 127.0.0.1\n")


@needs_curl
async def test_an_offline_target_gets_a_502_not_a_black_hole(
    nursery: trio.Nursery, server: pytunnel.TunnelServer
) -> None:
    port = closed_port()
    async with pytunnel.open_tunnel(
        server.address, token=TOKEN, probe_interval=0.05, probe_failures=2
    ) as client:
        forward = await client.forward_name("app", "127.0.0.1", port)
        with trio.fail_after(10):
            await forward.wait_status(pytunnel.ForwardStatus.OFFLINE)
        await wait_until(
            lambda: _offline_seen(server),
            10,
            lambda: "the server never saw the name go offline",
        )
        code, body = await curl(http_port(server), f"app.{DOMAIN}")
        assert code == 502
        assert "its service is offline" in body
        assert str(port) not in body  # the client's own target is not told to the public


def _offline_seen(server: pytunnel.TunnelServer) -> bool:
    routes = server.http_routes
    assert routes is not None
    target = routes.lookup(f"app.{DOMAIN}")
    route = getattr(target, "__self__", None)
    return route is not None and not route.online


async def test_the_public_peer_reaches_the_service_in_a_proxy_header(
    nursery: trio.Nursery, server: pytunnel.TunnelServer
) -> None:
    seen: list[tuple[str, int] | None] = []

    async def target(stream: trio.SocketStream) -> None:
        reader = ProxyHeaderReader()
        async with stream:
            header = None
            while header is None:
                data = await stream.receive_some()
                if not data:
                    return
                header = reader.feed(data)
            seen.append(header.source)
            if reader.rest:
                await stream.send_all(reader.rest)
            with contextlib.suppress(trio.BrokenResourceError):  # reset when the test ends
                async for chunk in stream:
                    await stream.send_all(chunk)

    listeners = await nursery.start(functools.partial(trio.serve_tcp, target, 0, host="127.0.0.1"))
    async with pytunnel.open_tunnel(server.address, token=TOKEN) as client:
        await client.forward_name(
            "app", "127.0.0.1", listeners[0].socket.getsockname()[1], proxy_protocol="v2"
        )
        stream = await trio.open_tcp_stream("127.0.0.1", http_port(server))
        async with stream:
            head = f"GET / HTTP/1.1\r\nHost: app.{DOMAIN}\r\n\r\n".encode()
            await stream.send_all(head)
            with trio.fail_after(10):
                assert await stream.receive_some() == head
            assert seen == [stream.socket.getsockname()[:2]]


async def test_bad_heads_are_answered_and_leave_nothing_behind(
    nursery: trio.Nursery, server: pytunnel.TunnelServer
) -> None:
    echo = await serve_route_target(nursery, raw_echo)
    async with pytunnel.open_tunnel(server.address, token=TOKEN) as client:
        await client.forward_name("app", "127.0.0.1", echo)
        fds, tasks = count_fds(), count_tasks()
        port = http_port(server)
        assert (await exchange(port, b"\x16\x03\x01garbage\r\n\r\n")).startswith(b"HTTP/1.1 400 ")
        big = b"GET / HTTP/1.1\r\nHost: app.tunnel.test\r\nX: " + b"a" * 40_000 + b"\r\n\r\n"
        assert (await exchange(port, big)).startswith(b"HTTP/1.1 431 ")
        assert (await exchange(port, b"GET / HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 400 ")
        tls = https_port(server)
        assert await exchange(tls, b"\x16\x03\x01\x00\x05hello") == b""  # not a ClientHello
        await wait_until(lambda: count_fds() <= fds, 10, lambda: f"fds {count_fds()} > {fds}")
        await wait_until(lambda: count_tasks() <= tasks, 10, describe_tasks)


# --------------------------------------------------------------------------- TLS


async def test_tls_names_pass_through_to_services_holding_their_certificates(
    nursery: trio.Nursery, server: pytunnel.TunnelServer, ca: trustme.CA
) -> None:
    app = await serve_route_target(nursery, tls_service(ca, f"app.{DOMAIN}"))
    shop = await serve_route_target(nursery, tls_service(ca, "shop.example.org"))
    async with pytunnel.open_tunnel(server.address, token=TOKEN) as client:
        first = await client.forward_name("app", "127.0.0.1", app, tls=True)
        await client.forward_name("shop.example.org", "127.0.0.1", shop, tls=True)
        port = https_port(server)
        assert first.url == f"https://app.{DOMAIN}:{port}"
        assert await tls_get(ca, port, f"app.{DOMAIN}") == f"hello from app.{DOMAIN}: ping".encode()
        assert await tls_get(ca, port, "shop.example.org") == b"hello from shop.example.org: ping"
        with pytest.raises(trio.BrokenResourceError) as info:
            await tls_get(ca, port, f"nobody.{DOMAIN}")
        assert "UNRECOGNIZED_NAME" in repr(info.value.__cause__).upper()


async def test_the_same_name_may_be_http_for_one_client_and_https_for_another(
    nursery: trio.Nursery, server: pytunnel.TunnelServer, ca: trustme.CA
) -> None:
    plain = await serve_route_target(nursery, raw_echo)
    secure = await serve_route_target(nursery, tls_service(ca, f"app.{DOMAIN}"))
    async with (
        pytunnel.open_tunnel(server.address, token=TOKEN) as one,
        pytunnel.open_tunnel(server.address, token=TOKEN) as two,
    ):
        await one.forward_name("app", "127.0.0.1", plain)
        await two.forward_name("app", "127.0.0.1", secure, tls=True)
        assert await tls_get(ca, https_port(server), f"app.{DOMAIN}") == (
            f"hello from app.{DOMAIN}: ping".encode()
        )
        head = f"GET / HTTP/1.1\r\nHost: app.{DOMAIN}\r\n\r\n".encode()
        stream = await trio.open_tcp_stream("127.0.0.1", http_port(server))
        async with stream:
            await stream.send_all(head)
            with trio.fail_after(10):
                assert await stream.receive_some() == head


async def test_a_client_without_the_ca_cannot_read_a_passed_through_session(
    nursery: trio.Nursery, server: pytunnel.TunnelServer, ca: trustme.CA
) -> None:
    """The certificate the public sees is the service's, not one the server made."""
    app = await serve_route_target(nursery, tls_service(ca, f"app.{DOMAIN}"))
    async with pytunnel.open_tunnel(server.address, token=TOKEN) as client:
        await client.forward_name("app", "127.0.0.1", app, tls=True)
        stream = await trio.open_tcp_stream("127.0.0.1", https_port(server))
        tls = trio.SSLStream(stream, ssl.create_default_context(), server_hostname=f"app.{DOMAIN}")
        async with stream:
            with pytest.raises(trio.BrokenResourceError) as info, trio.fail_after(10):
                await tls.do_handshake()
        assert isinstance(info.value.__cause__, ssl.SSLCertVerificationError)


# --------------------------------------------------------------------------- HTTP options


def header_echo():  # type: ignore[no-untyped-def]
    """A service that answers each request with its head as it arrived and its body's size
    and digest, so a test sees exactly what the route changed."""

    async def serve(stream: trio.abc.HalfCloseableStream, peer: tuple[str, int]) -> None:
        conn = h11.Connection(h11.SERVER)
        request: h11.Request | None = None
        body = b""
        async with stream:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    try:
                        data = await stream.receive_some()
                    except trio.BrokenResourceError:
                        return
                    conn.receive_data(data)
                    if not data and conn.their_state is not h11.DONE:
                        return
                    continue
                if isinstance(event, h11.Request):
                    request, body = event, b""
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    assert request is not None
                    lines = [f"{request.method.decode()} {request.target.decode()}"]
                    lines += [f"{n.decode()}: {v.decode()}" for n, v in request.headers.raw_items()]
                    lines.append(f"body {len(body)} {hashlib.sha256(body).hexdigest()}")
                    answer = ("\n".join(lines) + "\n").encode()
                    headers = [("content-length", str(len(answer)))]
                    await stream.send_all(conn.send(h11.Response(status_code=200, headers=headers)))
                    await stream.send_all(conn.send(h11.Data(data=answer)))
                    await stream.send_all(conn.send(h11.EndOfMessage()))
                    if conn.our_state is h11.MUST_CLOSE:
                        return
                    conn.start_next_cycle()
                else:
                    return

    return serve


@needs_curl
async def test_forwarded_headers_name_the_public_peer_on_every_request(
    nursery: trio.Nursery, server: pytunnel.TunnelServer
) -> None:
    service = await serve_route_target(nursery, header_echo())
    async with pytunnel.open_tunnel(server.address, token=TOKEN) as client:
        await client.forward_name("app", "127.0.0.1", service, forwarded_headers=True)
        port = http_port(server)
        host = f"app.{DOMAIN}:{port}"
        # two requests in one curl run: both are rewritten (keep-alive itself is pinned by
        # test_a_kept_alive_connection_carries_request_after_request)
        code, body = await curl(
            port,
            f"app.{DOMAIN}",
            "/one",
            "-H",
            "X-Forwarded-For: 203.0.113.9",
            "-H",
            "X-Forwarded-Proto: https",
            f"http://{host}/two",
        )
        assert code == 200
        answers = body.split("GET ")[1:]
        assert sorted(a.splitlines()[0] for a in answers) == ["/one", "/two"]
        for answer in answers:
            lines = answer.splitlines()
            assert "X-Forwarded-For: 203.0.113.9, 127.0.0.1" in lines
            assert "X-Forwarded-Proto: http" in lines  # the public's own claim is replaced
            assert "X-Forwarded-Proto: https" not in lines
            assert f"X-Forwarded-Host: {host}" in lines
            assert f'Forwarded: for=127.0.0.1;proto=http;host="{host}"' in lines
            assert f"Host: {host}" in lines


@needs_curl
async def test_a_chunked_body_and_a_sized_body_arrive_whole(
    nursery: trio.Nursery, server: pytunnel.TunnelServer, tmp_path: pathlib.Path
) -> None:
    service = await serve_route_target(nursery, header_echo())
    payload = bytes(range(256)) * 4096  # 1 MiB
    (tmp_path / "body").write_bytes(payload)
    digest = hashlib.sha256(payload).hexdigest()
    async with pytunnel.open_tunnel(server.address, token=TOKEN) as client:
        await client.forward_name("app", "127.0.0.1", service, rewrite_host="internal.local")
        for extra in ([], ["-H", "Transfer-Encoding: chunked"]):
            code, body = await curl(
                http_port(server), f"app.{DOMAIN}", "/up", "--data-binary", f"@{tmp_path}/body",
                *extra,
            )  # fmt: skip
            assert code == 200
            assert f"body {len(payload)} {digest}" in body.splitlines()
            assert "Host: internal.local" in body.splitlines()


@needs_curl
async def test_basic_auth_is_checked_at_the_client_and_never_passed_on(
    nursery: trio.Nursery, server: pytunnel.TunnelServer
) -> None:
    service = await serve_route_target(nursery, header_echo())
    async with pytunnel.open_tunnel(server.address, token=TOKEN) as client:
        forward = await client.forward_name(
            "app", "127.0.0.1", service, basic_auth=("alice", "s3cret")
        )
        port, name = http_port(server), f"app.{DOMAIN}"
        code, body = await curl(port, name)
        assert code == 401
        assert "requires a user name and password" in body
        assert (await curl(port, name, "/", "-u", "alice:wrong"))[0] == 401
        assert (await curl(port, name, "/", "-H", "Authorization: Basic !!!"))[0] == 401
        code, body = await curl(port, name, "/in", "-u", "alice:s3cret")
        assert code == 200
        assert body.startswith("GET /in\n")
        assert "authorization" not in body.lower()
        assert "s3cret" not in repr(forward.http)


async def test_header_options_on_a_tls_route_are_refused(tunnel: pytunnel.Tunnel) -> None:
    with pytest.raises(ValueError, match="need an HTTP route"):
        await tunnel.forward_name("app", "127.0.0.1", 9, tls=True, forwarded_headers=True)


# --------------------------------------------------------------------------- WebSocket


async def test_a_websocket_client_talks_to_its_server_through_a_name_route(
    server: pytunnel.TunnelServer,
) -> None:
    """The ``websockets`` library on both ends (its own server as the target, its own client
    as the public): the upgrade and every frame after it pass through the route."""
    ws_sync = pytest.importorskip("websockets.sync.server")
    ws_client = pytest.importorskip("websockets.sync.client")

    def echo(connection: Any) -> None:
        for message in connection:
            connection.send(message)

    target = ws_sync.serve(echo, "127.0.0.1", 0)
    thread = threading.Thread(target=target.serve_forever, daemon=True)
    thread.start()
    try:
        port = target.socket.getsockname()[1]
        async with pytunnel.open_tunnel(server.address, token=TOKEN) as client:
            await client.forward_name("ws", "127.0.0.1", port, forwarded_headers=True)
            url = f"ws://ws.{DOMAIN}:{http_port(server)}/chat"

            def talk() -> list[str | bytes]:
                sock = socket.create_connection(("127.0.0.1", http_port(server)), timeout=10)
                with ws_client.connect(url, sock=sock, open_timeout=10) as ws:
                    replies: list[str | bytes] = []
                    for message in ("hello", b"\x00\x01binary", "x" * 100_000):
                        ws.send(message)
                        replies.append(ws.recv(timeout=10))
                    return replies

            replies = await trio.to_thread.run_sync(talk)
            assert replies == ["hello", b"\x00\x01binary", "x" * 100_000]
    finally:
        target.shutdown()
        thread.join(10)


@pytest.mark.skipif(OPENSSL is None, reason="openssl is not installed")
async def test_openssl_s_client_verifies_the_services_own_certificate_through_the_tunnel(
    nursery: trio.Nursery, server: pytunnel.TunnelServer, ca: trustme.CA, tmp_path: pathlib.Path
) -> None:
    assert OPENSSL is not None
    service = await serve_route_target(nursery, tls_service(ca, "shop.example.org"))
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    async with pytunnel.open_tunnel(server.address, token=TOKEN) as client:
        await client.forward_name("shop.example.org", "127.0.0.1", service, tls=True)
        result = await trio.run_process(
            [
                OPENSSL, "s_client", "-connect", f"127.0.0.1:{https_port(server)}",
                "-servername", "shop.example.org", "-verify_hostname", "shop.example.org",
                "-CAfile", str(ca_file), "-verify_return_error", "-quiet",
            ],
            stdin=b"ping",
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )  # fmt: skip
        assert b"hello from shop.example.org: ping" in result.stdout, result.stderr


@needs_curl
async def test_a_one_sided_reset_gets_the_same_name_back_at_once(
    nursery: trio.Nursery, server: pytunnel.TunnelServer
) -> None:
    """Only the client's side of the link dies; the server still holds the session and the
    name. The reconnecting client has the same identity, so its new session replaces the
    ghost and gets the name back at once (never NAME_IN_USE against itself)."""
    app = await serve_route_target(nursery, http_service("app"))
    proxy = LinkProxy(server.address)
    await proxy.start(nursery)
    tunnel = await pytunnel.connect_tunnel(
        nursery, proxy.address, token=TOKEN, backoff_initial=0.2, backoff_jitter=0.0
    )
    try:
        forward = await tunnel.forward_name("app", "127.0.0.1", app)
        assert (await curl(http_port(server), f"app.{DOMAIN}"))[0] == 200
        proxy.reset_client_side()
        with trio.fail_after(5):
            while tunnel.reconnects < 1:
                await trio.sleep(0.01)
            status = await forward.wait_status(
                pytunnel.ForwardStatus.ACTIVE, pytunnel.ForwardStatus.ERROR
            )
        assert status is pytunnel.ForwardStatus.ACTIVE, forward.reason
        assert await curl(http_port(server), f"app.{DOMAIN}") == (200, "app / from 127.0.0.1\n")
        assert server.session_count == 1
        assert proxy.ghosts
    finally:
        await tunnel.aclose()
        proxy.close()


@pytest.mark.parametrize("forwarded", [False, True], ids=["bytes", "rewritten"])
async def test_a_kept_alive_connection_carries_request_after_request(
    nursery: trio.Nursery, server: pytunnel.TunnelServer, forwarded: bool
) -> None:
    """One raw connection, each request sent after the previous answer: every one is
    answered (and rewritten, with the options), none lost to an early end of input."""
    service = await serve_route_target(nursery, header_echo())
    async with pytunnel.open_tunnel(server.address, token=TOKEN) as client:
        await client.forward_name("app", "127.0.0.1", service, forwarded_headers=forwarded)
        stream = await trio.open_tcp_stream("127.0.0.1", http_port(server))
        conn = h11.Connection(h11.CLIENT)
        async with stream:
            for path in ("/one", "/two", "/three"):
                request = h11.Request(
                    method="GET", target=path, headers=[("Host", "app.tunnel.test")]
                )
                await stream.send_all(conn.send(request) + conn.send(h11.EndOfMessage()))
                body = b""
                with trio.fail_after(10):
                    while True:
                        event = conn.next_event()
                        if event is h11.NEED_DATA:
                            conn.receive_data(await stream.receive_some())
                        elif isinstance(event, h11.Data):
                            body += event.data
                        elif isinstance(event, h11.EndOfMessage):
                            break
                conn.start_next_cycle()
                assert body.startswith(f"GET {path}\n".encode())
                assert (b"X-Forwarded-For: 127.0.0.1" in body) is forwarded


@pytest.mark.parametrize("forwarded", [False, True], ids=["bytes", "rewritten"])
async def test_a_service_that_dies_mid_answer_resets_the_public_connection(
    nursery: trio.Nursery, server: pytunnel.TunnelServer, forwarded: bool
) -> None:
    """A close-delimited answer cut short must not look complete: the public sees a reset."""

    async def dies(stream: trio.SocketStream) -> None:
        await stream.receive_some()
        await stream.send_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\npartial")
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        stream.socket.close()

    listeners = await nursery.start(functools.partial(trio.serve_tcp, dies, 0, host="127.0.0.1"))
    async with pytunnel.open_tunnel(server.address, token=TOKEN) as client:
        await client.forward_name(
            "app", "127.0.0.1", listeners[0].socket.getsockname()[1], forwarded_headers=forwarded
        )
        stream = await trio.open_tcp_stream("127.0.0.1", http_port(server))
        async with stream:
            await stream.send_all(b"GET / HTTP/1.1\r\nHost: app.tunnel.test\r\n\r\n")
            got = b""
            with pytest.raises(trio.BrokenResourceError), trio.fail_after(10):  # noqa: PT012
                while chunk := await stream.receive_some():
                    got += chunk
            assert got.endswith(b"partial") or got == b""
