"""Shared fixtures: session pairs over memory streams and over real loopback TCP."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import pytest
import trio
import trio.testing

from pytunnel import Role, Session, SessionConfig, open_session

SessionPair = tuple[Session, Session]
PairFactory = Callable[..., AbstractAsyncContextManager[SessionPair]]


async def tcp_stream_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    """Two ends of a real loopback TCP connection."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    listener = listeners[0]
    try:
        port = listener.socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            client_box: list[trio.SocketStream] = []

            async def dial() -> None:
                client_box.append(await trio.open_tcp_stream("127.0.0.1", port))

            nursery.start_soon(dial)
            server = await listener.accept()
        return client_box[0], server
    finally:
        await listener.aclose()


@asynccontextmanager
async def session_pair(
    transport: str = "memory", config: SessionConfig | None = None, **kw: object
) -> AsyncIterator[SessionPair]:
    """A client and a server session connected to each other (no handshake)."""
    config = config or SessionConfig(**kw)  # type: ignore[arg-type]
    a: trio.abc.Stream
    b: trio.abc.Stream
    if transport == "memory":
        a, b = trio.testing.memory_stream_pair()
    else:
        a, b = await tcp_stream_pair()
    async with (
        open_session(a, Role.CLIENT, config, name="client") as client,
        open_session(b, Role.SERVER, config, name="server") as server,
    ):
        yield client, server


@pytest.fixture(params=["memory", "tcp"])
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def open_pair(client: Session, server: Session, **kw: object) -> tuple[trio.abc.HalfCloseableStream, trio.abc.HalfCloseableStream]:
    """Open one stream from ``client`` and accept it on ``server``."""
    async with trio.open_nursery() as nursery:
        box: list[trio.abc.HalfCloseableStream] = []

        async def accept() -> None:
            incoming = await server.accept_stream()
            box.append(incoming.accept())

        nursery.start_soon(accept)
        opened = await client.open_stream(**kw)  # type: ignore[arg-type]
    return opened, box[0]


def count_tasks() -> int:
    """Every live task in this run, walking the task tree from the root."""
    root = trio.lowlevel.current_root_task()
    assert root is not None
    count = 0
    stack = [root]
    while stack:
        task = stack.pop()
        count += 1
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return count
