"""The dynamic forward (-D): a real SOCKS proxy whose connections exit at the server."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import queue
import shutil
import socket
import threading
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
from helpers import TOKEN, Blackhole, closed_port, wait_until
from python_socks import ProxyError, ProxyType
from python_socks.async_.trio import Proxy

import pytunnel

pytestmark = pytest.mark.timeout(120)


async def _through(proxy_port: int, host: str, port: int, payload: bytes, **kw: object) -> bytes:
    proxy = Proxy(ProxyType.SOCKS5, "127.0.0.1", proxy_port, rdns=True, **kw)  # type: ignore[arg-type]
    sock = await proxy.connect(dest_host=host, dest_port=port, timeout=10)
    stream = trio.SocketStream(sock)
    async with trio.open_nursery() as nursery:

        async def send() -> None:
            for i in range(0, len(payload), 1 << 20):
                await stream.send_all(payload[i : i + (1 << 20)])
            await stream.send_eof()

        nursery.start_soon(send)
        parts = []
        while chunk := await stream.receive_some():
            parts.append(chunk)
    await stream.aclose()
    return b"".join(parts)


#: A name that only the server's resolver knows (``.test`` is reserved: no DNS has it).
SERVER_ONLY_NAME = "only-the-server-knows.test"


class _Resolver(trio.abc.HostnameResolver):
    """Records every name looked up; ``known`` resolves to 127.0.0.1, ``refused`` fails as an
    unknown name would, anything else goes to the system resolver."""

    def __init__(self, known: str | None = None, refused: str | None = None) -> None:
        self.known, self.refused = known, refused
        self.asked: list[str] = []

    async def getaddrinfo(
        self,
        host: bytes | None,
        port: bytes | str | int | None,
        family: int = 0,
        type: int = 0,
        proto: int = 0,
        flags: int = 0,
    ) -> list[Any]:
        name = host.decode() if isinstance(host, bytes) else str(host)
        self.asked.append(name)
        if name == self.known:
            number = int(port.decode() if isinstance(port, bytes) else port or 0)
            return [
                (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("127.0.0.1", number))
            ]
        if name == self.refused:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return await trio.to_thread.run_sync(
            lambda: socket.getaddrinfo(host, port, family, type, proto, flags)
        )

    async def getnameinfo(
        self, sockaddr: tuple[str, int] | tuple[str, int, int, int], flags: int
    ) -> tuple[str, str]:
        return await trio.to_thread.run_sync(socket.getnameinfo, sockaddr, flags)


@contextlib.asynccontextmanager
async def _server_in_its_own_run(resolver: _Resolver) -> AsyncIterator[tuple[str, int]]:
    """A tunnel server in another thread's ``trio.run``, with ``resolver`` as its resolver.

    Trio keeps the custom resolver per run, so the server and the client below have
    different resolvers although they share the process: what one can resolve, the other
    cannot, which tells where a name was resolved."""
    ready: queue.Queue[
        tuple[tuple[str, int], trio.lowlevel.TrioToken, trio.CancelScope] | BaseException
    ] = queue.Queue()

    def run() -> None:
        async def main() -> None:
            trio.socket.set_custom_hostname_resolver(resolver)
            async with trio.open_nursery() as nursery:
                server = await nursery.start(functools.partial(pytunnel.serve, 0, token=TOKEN))
                token = trio.lowlevel.current_trio_token()
                ready.put((server.address, token, nursery.cancel_scope))

        try:
            trio.run(main)
        except BaseException as exc:
            ready.put(exc)
            raise

    thread = threading.Thread(target=run, name="tunnel-server-run", daemon=True)
    thread.start()
    item = await trio.to_thread.run_sync(functools.partial(ready.get, timeout=30))
    if isinstance(item, BaseException):
        raise item
    address, token, scope = item
    try:
        yield address
    finally:
        token.run_sync_soon(scope.cancel)
        await trio.to_thread.run_sync(functools.partial(thread.join, timeout=30))
        assert not thread.is_alive()


async def test_socks5_domain_resolved_at_server_byte_exact(
    nursery: trio.Nursery, echo_port: int
) -> None:
    """The SOCKS client names a host only the server can resolve: the bytes get through, the
    server's resolver was asked, the client's never was."""
    at_server = _Resolver(known=SERVER_ONLY_NAME)
    at_client = _Resolver(refused=SERVER_ONLY_NAME)
    previous = trio.socket.set_custom_hostname_resolver(at_client)
    try:
        async with _server_in_its_own_run(at_server) as address:
            tunnel = await pytunnel.connect_tunnel(nursery, address, token=TOKEN, reconnect=False)
            forward = await tunnel.forward_dynamic()
            payload = os.urandom(3_000_000)
            got = await _through(forward.listen_port, SERVER_ONLY_NAME, echo_port, payload)
            assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
            got = await _through(forward.listen_port, "127.0.0.1", echo_port, b"ipv4 literal")
            assert got == b"ipv4 literal"
            await wait_until(lambda: forward.stats.active_connections == 0)
            assert forward.stats.total_connections == 2
            assert forward.status is pytunnel.ForwardStatus.ACTIVE
            await tunnel.aclose()
    finally:
        trio.socket.set_custom_hostname_resolver(previous)
    assert SERVER_ONLY_NAME in at_server.asked
    assert SERVER_ONLY_NAME not in at_client.asked


async def test_200_concurrent_socks_connections(tunnel: pytunnel.Tunnel, echo_port: int) -> None:
    forward = await tunnel.forward_dynamic()
    results: list[bool] = []

    async def one(i: int) -> None:
        payload = os.urandom(10_000 + i)
        results.append(
            await _through(forward.listen_port, "127.0.0.1", echo_port, payload) == payload
        )

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for i in range(200):
                nursery.start_soon(one, i)
    assert results == [True] * 200


async def test_socks_errors_map_to_replies(
    nursery: trio.Nursery, blackhole: Blackhole, echo_port: int
) -> None:
    server = await nursery.start(
        functools.partial(
            pytunnel.serve,
            0,
            token=TOKEN,
            connect_timeout=0.3,
            permit_open=["127.0.0.1:*", "localhost:*"],
        )
    )
    tunnel = await pytunnel.connect_tunnel(nursery, server.address, token=TOKEN)
    forward = await tunnel.forward_dynamic()
    cases = [
        ("127.0.0.1", closed_port(), "refused"),
        ("127.0.0.1", blackhole.port, "TTL expired"),
        ("example.invalid", 80, "not allowed"),  # forbidden by permit_open
    ]
    for host, port, expected in cases:
        with pytest.raises(ProxyError) as info:
            await _through(forward.listen_port, host, port, b"x")
        assert expected in str(info.value).lower() or expected in str(info.value)
    assert forward.stats.errors == {"NODE_UNSTABLE": 1, "NODE_TIMEOUT": 1, "FORBIDDEN": 1}


async def test_socks_username_password(tunnel: pytunnel.Tunnel, echo_port: int) -> None:
    forward = await tunnel.forward_dynamic(auth=("alice", "s3cret"))
    assert (
        await _through(
            forward.listen_port, "127.0.0.1", echo_port, b"hi", username="alice", password="s3cret"
        )
        == b"hi"
    )
    with pytest.raises(ProxyError):
        await _through(
            forward.listen_port, "127.0.0.1", echo_port, b"hi", username="alice", password="nope"
        )
    with pytest.raises(ProxyError):
        await _through(forward.listen_port, "127.0.0.1", echo_port, b"hi")


async def test_socks4a(tunnel: pytunnel.Tunnel, echo_port: int) -> None:
    forward = await tunnel.forward_dynamic()
    proxy = Proxy(ProxyType.SOCKS4, "127.0.0.1", forward.listen_port, rdns=True)
    sock = await proxy.connect(dest_host="localhost", dest_port=echo_port, timeout=10)
    stream = trio.SocketStream(sock)
    await stream.send_all(b"four-a")
    assert await stream.receive_some() == b"four-a"
    await stream.aclose()


async def test_garbage_and_silence_close_cleanly(tunnel: pytunnel.Tunnel) -> None:
    forward = await tunnel.forward_dynamic(negotiation_timeout=0.3)
    stream = await trio.open_tcp_stream("127.0.0.1", forward.listen_port)
    await stream.send_all(b"GET / HTTP/1.1\r\n\r\n")
    with trio.fail_after(5):
        assert await stream.receive_some() == b""
    await stream.aclose()
    stream = await trio.open_tcp_stream("127.0.0.1", forward.listen_port)
    await stream.send_all(b"\x05")  # half a greeting, then nothing
    with trio.fail_after(5):
        assert await stream.receive_some() == b""  # dropped by the negotiation deadline
    await stream.aclose()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_curl_socks5_hostname(tunnel: pytunnel.Tunnel, nursery: trio.Nursery) -> None:
    """A real SOCKS client: curl --socks5-hostname against a local HTTP server."""
    body = b"hello from behind the tunnel\n"

    async def http(stream: trio.SocketStream) -> None:
        request = b""
        while b"\r\n\r\n" not in request:
            chunk = await stream.receive_some()
            if not chunk:
                return
            request += chunk
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
            % (len(body), body)
        )
        await stream.aclose()

    listeners = await nursery.start(functools.partial(trio.serve_tcp, http, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    forward = await tunnel.forward_dynamic()
    result = await trio.run_process(
        [
            "curl",
            "-sS",
            "--max-time",
            "20",
            "--socks5-hostname",
            f"127.0.0.1:{forward.listen_port}",
            f"http://localhost:{port}/",
        ],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == body
