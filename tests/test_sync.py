"""pytunnel.sync: the tunnel from plain threads and from inside an asyncio program."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Iterator

import pytest
from helpers import roundtrip, threaded_echo

import pytunnel
import pytunnel.sync

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def echo_address() -> Iterator[tuple[str, int]]:
    with threaded_echo() as address:
        yield address


def test_plain_threads(echo_address: tuple[str, int]) -> None:
    with (
        pytunnel.sync.open_server(token="t") as server,
        pytunnel.sync.open_tunnel(server.address, token="t") as tunnel,
    ):
        assert tunnel.connected
        with tunnel.forward_local(*echo_address) as fwd:
            assert fwd.status == "active"
            assert roundtrip(fwd.address, b"local") == b"local"
        with tunnel.forward_remote(*echo_address) as fwd:
            assert roundtrip(fwd.address, b"remote") == b"remote"


def test_typed_errors_cross_the_thread() -> None:
    # no failed-authentication penalty, so the right token may follow the wrong one at once
    with pytunnel.sync.open_server(token="t", auth_failure_interval=0) as server:
        with (
            pytest.raises(pytunnel.AuthenticationError),
            pytunnel.sync.open_tunnel(server.address, token="wrong"),
        ):
            pass  # pragma: no cover
        with pytunnel.sync.open_tunnel(server.address, token="t") as tunnel:
            taken = socket.socket()
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            with pytest.raises(pytunnel.AddressInUseError):
                tunnel.forward_local("127.0.0.1", 9, local_port=taken.getsockname()[1])
            taken.close()


def test_stop_is_bounded_with_connections_open(echo_address: tuple[str, int]) -> None:
    """sshtunnel's stop() can hang with connections open; ours returns promptly."""
    held = []
    start = time.monotonic()
    with (
        pytunnel.sync.open_server(token="t") as server,
        pytunnel.sync.open_tunnel(server.address, token="t") as tunnel,
    ):
        fwd = tunnel.forward_local(*echo_address)
        for _ in range(20):
            s = socket.create_connection(fwd.address, timeout=10)
            s.sendall(b"x")
            assert s.recv(10) == b"x"
            held.append(s)
        start = time.monotonic()
    elapsed = time.monotonic() - start
    for s in held:
        s.settimeout(5)
        with contextlib.suppress(ConnectionResetError):
            assert s.recv(10) == b""
        s.close()
    assert elapsed < 10  # a hang detector: stopping is bounded (5 s per loop at most)


def test_from_an_asyncio_program(echo_address: tuple[str, int]) -> None:
    async def main() -> bytes:
        with (
            pytunnel.sync.open_server(token="t") as server,
            pytunnel.sync.open_tunnel(server.address, token="t") as tunnel,
            tunnel.forward_local(*echo_address) as fwd,
        ):
            reader, writer = await asyncio.open_connection(*fwd.address)
            writer.write(b"from asyncio")
            await writer.drain()
            data = await reader.readexactly(len(b"from asyncio"))
            writer.close()
            await writer.wait_closed()
            return data

    assert asyncio.run(main()) == b"from asyncio"
