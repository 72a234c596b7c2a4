"""Tasks through a tunnel with no local port: a remote forward hands each public connection's
stream to the task server (``forward_remote(handler=...)``), over a real tunnel server."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
import trio
from helpers import count_tasks, describe_tasks, wait_until

import pytunnel
from pytunnel.tasks import ForbiddenError, TaskClient, TaskServer

TOKEN = "tasks-over-tunnel"


def build() -> TaskServer:
    server = TaskServer(token=TOKEN)

    @server.task("math.add")
    async def add(value: Any) -> Any:
        return value["a"] + value["b"]

    @server.task("clock.shift")
    async def shift(value: Any) -> Any:
        return value + dt.timedelta(days=1)

    return server


async def test_task_client_through_the_tunnel(tunnel: pytunnel.Tunnel) -> None:
    server = build()
    forward = await tunnel.forward_remote(remote_port=0, handler=server.handle_stream)
    assert forward.listen_port != 0
    assert forward.status is pytunnel.ForwardStatus.ACTIVE
    base = f"http://127.0.0.1:{forward.listen_port}/__runner"
    when = dt.datetime(2025, 3, 1, 12, 0, tzinfo=dt.timezone.utc)
    async with TaskClient(base, token=TOKEN) as client:
        for i in range(5):
            assert await client.task("math.add", {"a": i, "b": 2}) == i + 2
        assert await client.task("clock.shift", when) == when + dt.timedelta(days=1)
        with pytest.raises(ForbiddenError):
            await client.task("nope")
    assert forward.stats.total_connections >= 1
    await forward.aclose()


async def test_a_failing_handler_ends_one_connection_not_the_forward(
    tunnel: pytunnel.Tunnel,
) -> None:
    calls = 0

    async def handler(stream: trio.abc.HalfCloseableStream) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("first connection fails")
        await stream.send_all(b"hello")

    forward = await tunnel.forward_remote(handler=handler)
    for expected in (b"", b"hello"):
        stream = await trio.open_tcp_stream("127.0.0.1", forward.listen_port)
        out = b""
        with trio.fail_after(10):
            try:
                while chunk := await stream.receive_some():
                    out += chunk
            except trio.BrokenResourceError:
                pass
        await stream.aclose()
        assert out == expected
    assert forward.status is pytunnel.ForwardStatus.ACTIVE
    assert forward.stats.active_connections == 0


async def test_closing_the_forward_ends_its_handlers(tunnel: pytunnel.Tunnel) -> None:
    started = trio.Event()

    async def handler(stream: trio.abc.HalfCloseableStream) -> None:
        started.set()
        await trio.sleep_forever()

    before = count_tasks()
    forward = await tunnel.forward_remote(handler=handler)
    stream = await trio.open_tcp_stream("127.0.0.1", forward.listen_port)
    with trio.fail_after(10):
        await started.wait()
    with trio.fail_after(10):
        await forward.aclose()
    await stream.aclose()
    await wait_until(lambda: count_tasks() <= before, 30, describe_tasks)


async def test_handler_and_target_are_exclusive(tunnel: pytunnel.Tunnel) -> None:
    server = build()
    with pytest.raises(TypeError, match="not both"):
        await tunnel.forward_remote("127.0.0.1", 80, handler=server.handle_stream)
    with pytest.raises(TypeError, match="a target"):
        await tunnel.forward_remote()
    with pytest.raises(ValueError, match="TCP"):
        await tunnel.forward_remote(handler=server.handle_stream, protocol="udp")
    with pytest.raises(ValueError, match="PROXY"):
        await tunnel.forward_remote(handler=server.handle_stream, proxy_protocol="v1")
