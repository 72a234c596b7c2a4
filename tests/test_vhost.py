"""Name routing on a shared port (``_vhost``): HTTP by ``Host`` with curl, TLS by SNI with
Python's ssl and ``openssl s_client`` against services holding their own certificates, and
every way a connection can fail to be routed."""

from __future__ import annotations

import functools
import pathlib
import shutil

import pytest
import trio
import trustme
from helpers import (
    count_fds,
    count_tasks,
    curl,
    describe_tasks,
    exchange,
    http_service,
    needs_curl,
    raw_echo,
    tls_get,
    tls_service,
    wait_until,
)

from pytunnel._vhost import NameRoutes, serve_name_routing
from pytunnel.errors import NameInUseError, NameNotAllowedError

OPENSSL = shutil.which("openssl")


# --------------------------------------------------------------------------- the name table


async def _nothing(stream: trio.abc.HalfCloseableStream, peer: tuple[str, int]) -> None:
    await stream.aclose()


async def _other(stream: trio.abc.HalfCloseableStream, peer: tuple[str, int]) -> None:
    await stream.aclose()


def test_a_label_goes_under_the_domain_and_full_names_must_be_allowed() -> None:
    routes = NameRoutes(domain="Tunnel.Example.com.", allow_domains=["*.example.org", "a.b.c"])
    assert routes.full_name("App") == "app.tunnel.example.com"
    assert routes.full_name("app.tunnel.example.com") == "app.tunnel.example.com"
    assert routes.full_name("shop.example.org") == "shop.example.org"
    assert routes.full_name("x.y.example.org") == "x.y.example.org"
    assert routes.full_name("a.b.c") == "a.b.c"
    for refused in ["example.org", "a.app.tunnel.example.com", "evil.com", "b.c"]:
        with pytest.raises(NameNotAllowedError):
            routes.full_name(refused)


def test_without_a_domain_a_single_label_is_refused() -> None:
    with pytest.raises(NameNotAllowedError, match="no --domain"):
        NameRoutes().full_name("app")


@pytest.mark.parametrize("name", ["", "a b", "-a", "a..b", "é.example", "a" * 64, "x/y"])
def test_a_name_that_is_not_a_host_name_is_refused(name: str) -> None:
    with pytest.raises(NameNotAllowedError, match="not a valid host name"):
        NameRoutes(domain="example.com").full_name(name)


def test_one_name_one_route_and_only_its_holder_gives_it_back() -> None:
    routes = NameRoutes(domain="example.com")
    full = routes.register("app", _nothing)
    with pytest.raises(NameInUseError, match=r"app\.example\.com is already routed"):
        routes.register("APP.example.com", _other)
    routes.unregister(full, _other)  # not the holder: nothing changes
    assert routes.lookup("app.example.com") is _nothing
    routes.unregister(full, _nothing)
    assert routes.lookup("app.example.com") is None
    assert len(routes) == 0


def test_lookup_ignores_case_port_and_trailing_dot() -> None:
    routes = NameRoutes(domain="example.com")
    routes.register("app", _nothing)
    for host in ["app.example.com", "APP.Example.Com", "app.example.com:8080", "app.example.com."]:
        assert routes.lookup(host) is _nothing
    assert routes.lookup("[::1]:80") is None
    assert routes.lookup("other.example.com") is None


# --------------------------------------------------------------------------- HTTP


async def _router(nursery: trio.Nursery, routes: NameRoutes, *, tls: bool, **options: float) -> int:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    await nursery.start(
        functools.partial(serve_name_routing, listeners, routes, tls=tls, **options)
    )
    return int(listeners[0].socket.getsockname()[1])


@needs_curl
async def test_curl_reaches_each_name_on_one_port(nursery: trio.Nursery) -> None:
    routes = NameRoutes(domain="tunnel.test", allow_domains=["shop.example.org"])
    routes.register("app", http_service("app"))
    routes.register("shop.example.org", http_service("shop"))
    port = await _router(nursery, routes, tls=False)
    assert await curl(port, "app.tunnel.test", "/a") == (200, "app /a from 127.0.0.1\n")
    assert await curl(port, "shop.example.org", "/b?c=d") == (200, "shop /b?c=d from 127.0.0.1\n")
    code, body = await curl(port, "nobody.tunnel.test")
    assert (code, body) == (
        404,
        f"404 Not Found: no tunnel is serving nobody.tunnel.test:{port}\n",
    )


async def test_an_upgrade_and_everything_after_it_pass_untouched(nursery: trio.Nursery) -> None:
    routes = NameRoutes(domain="tunnel.test")
    routes.register("ws", raw_echo)
    port = await _router(nursery, routes, tls=False)
    head = (
        b"GET /socket HTTP/1.1\r\nHost: ws.tunnel.test\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n"
    )
    frames = b"\x81\x85\x00\x00\x00\x00hello" + bytes(range(256))
    assert await exchange(port, head + frames, read_until_close=False) == head + frames


async def test_a_second_request_on_the_connection_goes_to_the_same_route(
    nursery: trio.Nursery,
) -> None:
    routes = NameRoutes(domain="tunnel.test")
    routes.register("app", http_service("app"))
    port = await _router(nursery, routes, tls=False)
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        request = b"GET /%d HTTP/1.1\r\nHost: app.tunnel.test\r\n\r\n"
        await stream.send_all(request % 1 + request % 2)
        answers = b""
        with trio.fail_after(10):
            while answers.count(b"from 127.0.0.1") < 2:
                answers += await stream.receive_some()
    assert b"app /1 from" in answers
    assert b"app /2 from" in answers


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"\x16\x03\x01 not http at all\r\n\r\n", b"400 Bad Request"),
        (b"GET / HTTP/1.0\r\n\r\n", b"400 Bad Request"),  # no Host to route on
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", b"400 Bad Request"),
        (
            b"GET / HTTP/1.1\r\nHost: a\r\nX-Long: " + b"x" * 20000 + b"\r\n\r\n",
            b"431 Request Header Fields Too Large",
        ),
    ],
)
async def test_a_connection_that_cannot_be_routed_gets_one_clear_answer(
    nursery: trio.Nursery, data: bytes, status: bytes
) -> None:
    routes = NameRoutes(domain="tunnel.test")
    routes.register("app", raw_echo)
    port = await _router(nursery, routes, tls=False)
    answer = await exchange(port, data)
    assert answer.startswith(b"HTTP/1.1 " + status + b"\r\n"), answer[:100]
    assert b"connection: close" in answer.lower()


async def test_a_slow_head_is_cut_off_and_nothing_is_left_behind(nursery: trio.Nursery) -> None:
    routes = NameRoutes(domain="tunnel.test")
    port = await _router(nursery, routes, tls=False, head_timeout=0.3)
    fds = count_fds()
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(b"GET / HTTP/1.1\r\nHo")  # and then nothing (slow-loris)
        with trio.fail_after(10):
            assert await stream.receive_some() == b""
    await wait_until(lambda: count_fds() == fds, 10, lambda: f"fds {count_fds()} != {fds}")


# --------------------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


async def test_tls_is_routed_by_sni_end_to_end_encrypted(
    nursery: trio.Nursery, ca: trustme.CA
) -> None:
    """Each service holds its own certificate; the router holds none, and the client's
    verification against the CA succeeds, so the TLS session is the service's own."""
    routes = NameRoutes(domain="tunnel.test", allow_domains=["shop.example.org"])
    routes.register("app", tls_service(ca, "app.tunnel.test"))
    routes.register("shop.example.org", tls_service(ca, "shop.example.org"))
    port = await _router(nursery, routes, tls=True)
    assert await tls_get(ca, port, "app.tunnel.test") == b"hello from app.tunnel.test: ping"
    assert await tls_get(ca, port, "shop.example.org") == b"hello from shop.example.org: ping"


@pytest.mark.parametrize("name", ["nobody.tunnel.test", None])
async def test_an_unknown_or_missing_server_name_gets_an_alert(
    nursery: trio.Nursery, ca: trustme.CA, name: str | None
) -> None:
    routes = NameRoutes(domain="tunnel.test")
    routes.register("app", tls_service(ca, "app.tunnel.test"))
    port = await _router(nursery, routes, tls=True)
    with pytest.raises(trio.BrokenResourceError) as info:
        await tls_get(ca, port, name)
    assert "UNRECOGNIZED_NAME" in repr(info.value.__cause__).upper()


async def test_not_tls_at_all_is_closed(nursery: trio.Nursery) -> None:
    port = await _router(nursery, NameRoutes(domain="tunnel.test"), tls=True)
    assert await exchange(port, b"GET / HTTP/1.1\r\nHost: app.tunnel.test\r\n\r\n") == b""


@pytest.mark.skipif(OPENSSL is None, reason="openssl is not installed")
async def test_openssl_s_client_verifies_the_services_certificate_through_the_router(
    nursery: trio.Nursery, ca: trustme.CA, tmp_path: pathlib.Path
) -> None:
    assert OPENSSL is not None
    routes = NameRoutes(allow_domains=["shop.example.org"])
    routes.register("shop.example.org", tls_service(ca, "shop.example.org"))
    port = await _router(nursery, routes, tls=True)
    ca_file = f"{tmp_path}/ca.pem"
    ca.cert_pem.write_to_path(ca_file)
    result = await trio.run_process(
        [
            OPENSSL,
            "s_client",
            "-connect",
            f"127.0.0.1:{port}",
            "-servername",
            "shop.example.org",
            "-verify_hostname",
            "shop.example.org",
            "-CAfile",
            ca_file,
            "-verify_return_error",
            "-quiet",
        ],
        stdin=b"ping",
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert b"hello from shop.example.org: ping" in result.stdout, result.stderr


async def test_connections_still_in_their_head_are_capped(nursery: trio.Nursery) -> None:
    """With the cap reached by silent connections, a new one is closed at once; once they
    are gone (head timeout), connections are routed again."""
    routes = NameRoutes(domain="tunnel.test")
    routes.register("app", raw_echo)
    port = await _router(nursery, routes, tls=False, max_pending=3, head_timeout=1.0)
    tasks = count_tasks()
    silent = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(3)]
    try:
        # the router accepted them (a task each), though they never send a byte
        await wait_until(lambda: count_tasks() >= tasks + 3, 10, describe_tasks)
        with trio.fail_after(10):
            assert await exchange(port, b"GET / HTTP/1.1\r\nHost: app.tunnel.test\r\n\r\n") == b""
            for stream in silent:  # closed by the head timeout
                assert await stream.receive_some() == b""
        head = b"GET / HTTP/1.1\r\nHost: app.tunnel.test\r\n\r\n"
        with trio.fail_after(10):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(head)
                assert await stream.receive_some() == head
    finally:
        for stream in silent:
            await stream.aclose()
