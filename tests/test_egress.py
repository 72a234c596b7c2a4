"""Egress as a module: an incoming stream dials its target, is answered, and is relayed."""

from __future__ import annotations

import functools
import socket

import pytest
import trio
from helpers import session_pair

from pytunnel._dial import dial
from pytunnel._egress import refuse_wrong_kind, serve_egress
from pytunnel._relay import relay
from pytunnel.errors import (
    DialError,
    NodeTimeoutError,
    NodeUnstableError,
    StreamRefusedError,
)
from pytunnel.session import MuxStream, Session

pytestmark = pytest.mark.timeout(60)


def _closed_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _serve_one(server: Session, connect_timeout: float, failures: list[DialError]) -> None:
    incoming = await server.accept_stream()

    async def carry(stream: MuxStream, target: trio.SocketStream) -> None:
        await relay(stream, target, name="egress test")

    await serve_egress(
        incoming,
        functools.partial(dial, incoming.host, incoming.port, timeout=connect_timeout),
        carry,
        failures.append,
    )


async def test_egress_dial_refused_refuses_the_stream_node_unstable() -> None:
    failures: list[DialError] = []
    with trio.fail_after(30):
        async with session_pair("tcp") as (client, server), trio.open_nursery() as nursery:
            nursery.start_soon(_serve_one, server, 5.0, failures)
            with pytest.raises(NodeUnstableError):
                await client.open_stream("127.0.0.1", _closed_port())
    assert [type(f) for f in failures] == [NodeUnstableError]


async def test_egress_dial_timed_out_refuses_the_stream_node_timeout() -> None:
    failures: list[DialError] = []
    # a listener that never accepts, its backlog filled: the kernel drops further SYNs
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    fillers = []
    try:
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(full.getsockname())
            fillers.append(filler)
        with trio.fail_after(30):
            async with session_pair("tcp") as (client, server), trio.open_nursery() as nursery:
                nursery.start_soon(_serve_one, server, 0.5, failures)
                with pytest.raises(NodeTimeoutError):
                    await client.open_stream("127.0.0.1", full.getsockname()[1])
    finally:
        for filler in fillers:
            filler.close()
        full.close()
    assert [type(f) for f in failures] == [NodeTimeoutError]


async def test_egress_relays_to_the_dialled_target() -> None:
    async def echo(conn: trio.SocketStream) -> None:
        async with conn:
            async for data in conn:
                await conn.send_all(data)

    with trio.fail_after(30):
        async with trio.open_nursery() as outer:
            [listener] = await outer.start(
                functools.partial(trio.serve_tcp, echo, 0, host="127.0.0.1")
            )
            port = listener.socket.getsockname()[1]
            async with session_pair("tcp") as (client, server), trio.open_nursery() as nursery:
                nursery.start_soon(_serve_one, server, 5.0, [])
                stream = await client.open_stream("127.0.0.1", port)
                await stream.send_all(b"ping")
                got = b""
                while got != b"ping":
                    data = await stream.receive_some()
                    assert data, "the relay ended early"
                    got += data
                await stream.aclose()
            outer.cancel_scope.cancel()


async def test_stream_of_the_wrong_kind_is_refused_protocol_error() -> None:
    with trio.fail_after(30):
        async with session_pair("tcp") as (client, server), trio.open_nursery() as nursery:

            async def answer() -> None:
                incoming = await server.accept_stream()
                assert refuse_wrong_kind(incoming, takes_datagrams=False)

            nursery.start_soon(answer)
            with pytest.raises(StreamRefusedError, match="does not take a datagram stream"):
                await client.open_stream("127.0.0.1", 9, datagrams=True)
