"""Deterministic teardown: with 500 relayed connections open and moving data, every way of
ending the tunnel closes every relayed socket within 1 s, frees the public port and leaves no
task behind."""

from __future__ import annotations

import functools
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest
import trio
from conftest import TOKEN, count_tasks

import pytunnel

pytestmark = pytest.mark.timeout(120)
PER_FORWARD = 250  # 250 through -R and 250 through -L: 500 relays


class EchoService:
    """An echo target that counts the connections it still holds."""

    def __init__(self) -> None:
        self.live = 0
        self.port = 0

    async def handler(self, stream: trio.SocketStream) -> None:
        self.live += 1
        try:
            async for chunk in stream:
                await stream.send_all(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self.live -= 1

    async def start(self, nursery: trio.Nursery) -> None:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, self.handler, 0, host="127.0.0.1")
        )
        self.port = listeners[0].socket.getsockname()[1]


class Load:
    """Connections that keep exchanging small messages until the tunnel drops them."""

    def __init__(self) -> None:
        self.open = 0
        self.ended = 0
        self.roundtrips = 0

    async def pinger(self, address: tuple[str, int], *, task_status: trio.TaskStatus[None]) -> None:
        stream = await trio.open_tcp_stream(*address)
        self.open += 1
        started = False
        try:
            while True:
                await stream.send_all(b"p" * 100)
                got = 0
                while got < 100:
                    chunk = await stream.receive_some(100 - got)
                    if not chunk:
                        return
                    got += len(chunk)
                self.roundtrips += 1
                if not started:
                    started = True
                    task_status.started()
                await trio.sleep(0.2)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self.ended += 1
            await stream.aclose()

    async def start(self, nursery: trio.Nursery, address: tuple[str, int], count: int) -> None:
        for _ in range(count):
            await nursery.start(self.pinger, address)


async def _until(predicate: Callable[[], bool], seconds: float, what: str) -> None:
    with trio.move_on_after(seconds):
        while not predicate():
            await trio.sleep(0.01)
    assert predicate(), what


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@asynccontextmanager
async def _loaded_tunnel(
    server_address: tuple[str, int], echo: EchoService
) -> AsyncIterator[tuple[pytunnel.Tunnel, Load, int]]:
    async with pytunnel.connect(server_address, token=TOKEN, reconnect=False) as tunnel:
        remote = await tunnel.forward_remote("127.0.0.1", echo.port)
        local = await tunnel.forward_local("127.0.0.1", echo.port)
        load = Load()
        async with trio.open_nursery() as load_nursery:
            await load.start(load_nursery, remote.address, PER_FORWARD)
            await load.start(load_nursery, local.address, PER_FORWARD)
            assert load.open == 2 * PER_FORWARD
            assert echo.live == 2 * PER_FORWARD
            yield tunnel, load, remote.listen_port
            load_nursery.cancel_scope.cancel()


async def _check_after(load: Load, echo: EchoService, port: int, baseline: int) -> None:
    await _until(lambda: load.ended == 2 * PER_FORWARD, 1, f"only {load.ended} sockets closed")
    await _until(lambda: echo.live == 0, 1, f"{echo.live} target sockets still open")
    assert _port_is_free(port), "the remote forward's port is still bound"
    await _until(lambda: count_tasks() <= baseline, 1, "tasks outlived the teardown")


async def test_leaving_client_block(nursery: trio.Nursery) -> None:
    echo = EchoService()
    await echo.start(nursery)
    server: pytunnel.TunnelServer = await nursery.start(pytunnel.serve, TOKEN, 0)
    baseline = count_tasks()
    async with _loaded_tunnel(server.address, echo) as (_tunnel, load, port):
        await trio.sleep(0.3)
        assert load.roundtrips >= 2 * PER_FORWARD
    await _check_after(load, echo, port, baseline)
    assert server.session_count == 0


async def test_closing_the_server(nursery: trio.Nursery) -> None:
    echo = EchoService()
    await echo.start(nursery)
    server: pytunnel.TunnelServer = await nursery.start(pytunnel.serve, TOKEN, 0)
    baseline = count_tasks()
    async with _loaded_tunnel(server.address, echo) as (tunnel, load, port):
        await server.aclose()
        await _until(lambda: load.ended == 2 * PER_FORWARD, 1, f"only {load.ended} closed")
        await _until(lambda: echo.live == 0, 1, f"{echo.live} target sockets still open")
        assert _port_is_free(port)
        await tunnel.wait_closed()
    await _until(lambda: count_tasks() <= baseline - 2, 1, "tasks outlived the teardown")


async def test_cancelling_the_server_from_outside(nursery: trio.Nursery) -> None:
    echo = EchoService()
    await echo.start(nursery)
    baseline = count_tasks()
    async with trio.open_nursery() as server_nursery:
        server: pytunnel.TunnelServer = await server_nursery.start(pytunnel.serve, TOKEN, 0)
        async with _loaded_tunnel(server.address, echo) as (tunnel, load, port):
            server_nursery.cancel_scope.cancel()
            await _until(lambda: load.ended == 2 * PER_FORWARD, 1, f"only {load.ended} closed")
            await _until(lambda: echo.live == 0, 1, f"{echo.live} target sockets still open")
            assert _port_is_free(port)
            await tunnel.wait_closed()
    await _until(lambda: count_tasks() <= baseline, 1, "tasks outlived the teardown")


async def test_client_process_killed(nursery: trio.Nursery) -> None:
    """SIGKILL the CLI client: the server notices, closes the public port and every relay."""
    echo = EchoService()
    await echo.start(nursery)
    server: pytunnel.TunnelServer = await nursery.start(pytunnel.serve, TOKEN, 0)
    await trio.sleep(0.05)
    baseline = count_tasks()
    host, port = server.address
    proc = await trio.lowlevel.open_process(
        [
            sys.executable,
            "-m",
            "cli.main",
            "connect",
            f"{host}:{port}",
            "--token",
            TOKEN,
            "-R",
            f"0:127.0.0.1:{echo.port}",
            "-L",
            f"0:127.0.0.1:{echo.port}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        output = b""
        with trio.fail_after(20):
            while output.count(b"\n") < 3:
                output += await proc.stdout.receive_some()
        lines = output.decode().splitlines()
        remote_port = int(lines[1].split()[2].rsplit(":", 1)[1])
        local_port = int(lines[2].split()[2].rsplit(":", 1)[1])
        load = Load()
        async with trio.open_nursery() as load_nursery:
            await load.start(load_nursery, ("127.0.0.1", remote_port), PER_FORWARD)
            await load.start(load_nursery, ("127.0.0.1", local_port), PER_FORWARD)
            assert echo.live == 2 * PER_FORWARD
            os.kill(proc.pid, signal.SIGKILL)
            await _until(lambda: load.ended == 2 * PER_FORWARD, 1, f"only {load.ended} closed")
            await _until(lambda: echo.live == 0, 1, f"{echo.live} target sockets still open")
            await _until(lambda: server.session_count == 0, 1, "server kept the session")
            assert _port_is_free(remote_port)
        await _until(lambda: count_tasks() <= baseline, 1, "server tasks outlived the client")
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
