"""Remote forwards with the PROXY protocol: the local service learns the public peer's
address, checked with our own reader and with a real nginx (``listen ... proxy_protocol``)."""

from __future__ import annotations

import contextlib
import functools
import pathlib
import tempfile

import pytest
import trio
from helpers import TOKEN, closed_port, running_nginx, wait_until
from nginx_conf import NGINX, nginx_conf

import pytunnel
from pytunnel.protocol.proxy import ProxyHeader, ProxyHeaderReader, ProxyVersion


class HeaderTarget:
    """A target that reads the PROXY header, records it, then echoes what follows."""

    def __init__(self) -> None:
        self.headers: list[ProxyHeader] = []

    async def handler(self, stream: trio.SocketStream) -> None:
        reader = ProxyHeaderReader()
        header = None
        async with stream:
            while header is None:
                data = await stream.receive_some()
                if not data:
                    return
                header = reader.feed(data)
            self.headers.append(header)
            if reader.rest:
                await stream.send_all(reader.rest)
            async for chunk in stream:
                await stream.send_all(chunk)


@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_the_target_is_told_the_public_peers_address(
    nursery: trio.Nursery, tunnel: pytunnel.Tunnel, version: ProxyVersion
) -> None:
    target = HeaderTarget()
    listeners = await nursery.start(
        functools.partial(trio.serve_tcp, target.handler, 0, host="127.0.0.1")
    )
    port = listeners[0].socket.getsockname()[1]
    forward = await tunnel.forward_remote("127.0.0.1", port, proxy_protocol=version)
    with trio.fail_after(10):
        public = await trio.open_tcp_stream(*forward.address)
        async with public:
            peer = public.socket.getsockname()
            await public.send_all(b"hello")
            assert await public.receive_some() == b"hello"
    assert target.headers == [
        ProxyHeader(version, (peer[0], peer[1]), (forward.address[0], forward.listen_port))
    ]


async def test_without_the_option_the_target_gets_the_bytes_alone(
    tunnel: pytunnel.Tunnel, echo_port: int
) -> None:
    forward = await tunnel.forward_remote("127.0.0.1", echo_port)
    assert forward.proxy_protocol is None
    with trio.fail_after(10):
        public = await trio.open_tcp_stream(*forward.address)
        async with public:
            await public.send_all(b"PROXY? no")
            assert await public.receive_some() == b"PROXY? no"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"proxy_protocol": "v3"}, "'v1' or 'v2' on a TCP forward, not 'v3'"),
        ({"proxy_protocol": "v1", "protocol": "udp"}, "this forward is UDP"),
    ],
)
async def test_proxy_protocol_is_refused_where_it_cannot_apply(
    tunnel: pytunnel.Tunnel, options: dict[str, str], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        await tunnel.forward_remote("127.0.0.1", 9, **options)  # type: ignore[arg-type]
    assert tunnel.forwards == []


# --------------------------------------------------------------------------- nginx


def _nginx_config(prefix: pathlib.Path, port: int) -> str:
    return nginx_conf(
        prefix,
        f"""
    server {{
        listen 127.0.0.1:{port} proxy_protocol;
        location / {{
            default_type text/plain;
            return 200
                "client=$proxy_protocol_addr:$proxy_protocol_port
                    server=$proxy_protocol_server_port";
        }}
    }}""",
    )


async def _get(address: tuple[str, int]) -> tuple[bytes, tuple[str, int]]:
    """One HTTP/1.0 GET over a fresh connection; the whole answer and our own address."""
    stream = await trio.open_tcp_stream(*address)
    async with stream:
        ours = stream.socket.getsockname()
        await stream.send_all(b"GET / HTTP/1.0\r\nHost: app\r\n\r\n")
        answer = b""
        while chunk := await stream.receive_some():
            answer += chunk
    return answer, (ours[0], ours[1])


@pytest.mark.skipif(NGINX is None, reason="nginx is not installed (.ci/run installs nginx-light)")
@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_nginx_behind_a_remote_forward_sees_the_public_peer(
    tunnel: pytunnel.Tunnel, version: ProxyVersion
) -> None:
    assert NGINX is not None
    with tempfile.TemporaryDirectory() as tmp:
        prefix = pathlib.Path(tmp)
        port = closed_port()
        (prefix / "nginx.conf").write_text(_nginx_config(prefix, port))
        async with running_nginx(prefix, port):
            forward = await tunnel.forward_remote("127.0.0.1", port, proxy_protocol=version)
            with trio.fail_after(10):
                answer, ours = await _get(forward.address)
            assert answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer
            body = b" ".join(answer.partition(b"\r\n\r\n")[2].split())
            assert body == f"client={ours[0]}:{ours[1]} server={forward.listen_port}".encode()


async def test_a_target_that_refuses_is_counted_as_a_dial_failure(
    nursery: trio.Nursery,
) -> None:
    """The header is written only after the dial succeeds: a refused target is the usual
    NODE_UNSTABLE, and the public connection is closed."""
    server = await nursery.start(functools.partial(pytunnel.serve, 0, token=TOKEN))
    tunnel = await pytunnel.connect_tunnel(nursery, server.address, token=TOKEN)
    forward = await tunnel.forward_remote("127.0.0.1", closed_port(), proxy_protocol="v2")
    with trio.fail_after(10):
        public = await trio.open_tcp_stream(*forward.address)
        async with public:
            # EOF or a reset: either way nothing reached a target
            with contextlib.suppress(trio.BrokenResourceError):
                assert await public.receive_some() == b""
    await wait_until(lambda: forward.stats.errors.get("NODE_UNSTABLE") == 1)
