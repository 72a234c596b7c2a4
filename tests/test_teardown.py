"""Deterministic teardown: with 500 relayed connections open and moving data, every way of
ending the tunnel resets every relayed socket within 1 s (a transfer cut by the teardown must
never look complete), frees the public port and leaves no task behind."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing
from helpers import TOKEN, Crash, count_tasks, describe_tasks, port_is_free, wait_until

import pytunnel

# each test has hang detectors of its own (HANG, per stage); this outer bound only has to stay
# clear of their sum on a loaded machine, because pytest-timeout interrupting trio from a signal
# handler corrupts the run of every later test in the process
pytestmark = pytest.mark.timeout(300)
PER_FORWARD = 250  # 250 through -R and 250 through -L: 500 relays
PACE = 1.0  # seconds between round trips of one connection: 500 a second in all


class EchoService:
    """An echo target that counts the connections it still holds and how they ended."""

    def __init__(self) -> None:
        self.live = 0
        self.port = 0
        self.resets = 0

    async def handler(self, stream: trio.SocketStream) -> None:
        self.live += 1
        try:
            async for chunk in stream:
                await stream.send_all(chunk)
        except trio.BrokenResourceError:
            self.resets += 1
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
        #: How each connection ended: a reset, or an EOF (which a cut transfer must not be).
        self.resets = 0
        self.eofs = 0
        #: Verified round trips, per connection.
        self.roundtrips: list[int] = []

    async def pinger(self, address: tuple[str, int], *, task_status: trio.TaskStatus[None]) -> None:
        index = len(self.roundtrips)
        self.roundtrips.append(0)
        # each connection sends its own bytes, so a relay that crossed two connections shows
        payload = f"{id(self):x}-{index:06d}".encode().ljust(100, b".")
        stream = await trio.open_tcp_stream(*address)
        self.open += 1
        started = False
        try:
            while True:
                await stream.send_all(payload)
                got = b""
                while len(got) < len(payload):
                    chunk = await stream.receive_some(len(payload) - len(got))
                    if not chunk:
                        self.eofs += 1
                        return
                    got += chunk
                assert got == payload, f"connection {index} got {got!r}"
                self.roundtrips[index] += 1
                if not started:
                    started = True
                    task_status.started()
                # between round trips the connection is watched, so its end is seen at once
                with trio.move_on_after(PACE):
                    unexpected = await stream.receive_some()
                    if not unexpected:
                        self.eofs += 1
                        return
                    raise AssertionError(f"connection {index} got {unexpected!r} unasked")
        except trio.BrokenResourceError:
            self.resets += 1
        finally:
            self.ended += 1
            await stream.aclose()

    async def start(self, nursery: trio.Nursery, address: tuple[str, int], count: int) -> None:
        for _ in range(count):
            await nursery.start(self.pinger, address)

    async def all_moving(self) -> None:
        """Wait until every connection completed one more round trip after all of them were
        open: the teardown then cuts relays that are all carrying bytes at that moment."""
        before = list(self.roundtrips)
        await wait_until(
            lambda: all(now > then for now, then in zip(self.roundtrips, before, strict=True)),
            HANG,
            lambda: "some connections stopped carrying data before the teardown",
        )


#: A hang detector, not a timing claim: 500 relays are torn down in 0.1-1.5 s on a quiet
#: 2-core machine (the slowest case waits for the server's GoAway flush to reach the client).
#: Also the servers' dial timeout: opening 500 relays in one busy process may take a target's
#: accept past the default 5 s.
HANG = 30.0


class Loads:
    """The load through the remote forward and the load through the local forward."""

    def __init__(self) -> None:
        self.remote = Load()
        self.local = Load()

    @property
    def ended(self) -> int:
        return self.remote.ended + self.local.ended

    @property
    def resets(self) -> int:
        return self.remote.resets + self.local.resets


@asynccontextmanager
async def _loaded_tunnel(
    server_address: tuple[str, int], echo: EchoService
) -> AsyncIterator[tuple[pytunnel.Tunnel, Loads, int]]:
    """A tunnel with 250 connections through each forward. The connections live in a nursery
    outside the tunnel, so they end because the tunnel ends them, not because they were
    cancelled with it."""
    loads = Loads()
    async with trio.open_nursery() as load_nursery:
        try:
            async with pytunnel.open_tunnel(server_address, token=TOKEN, reconnect=False) as tunnel:
                remote = await tunnel.forward_remote("127.0.0.1", echo.port)
                local = await tunnel.forward_local("127.0.0.1", echo.port)
                await loads.remote.start(load_nursery, remote.address, PER_FORWARD)
                await loads.local.start(load_nursery, local.address, PER_FORWARD)
                assert loads.remote.open == loads.local.open == PER_FORWARD
                assert echo.live == 2 * PER_FORWARD
                await loads.remote.all_moving()
                await loads.local.all_moving()
                yield tunnel, loads, remote.listen_port
            await wait_until(
                lambda: loads.ended == 2 * PER_FORWARD, HANG, lambda: f"only {loads.ended} closed"
            )
        finally:
            load_nursery.cancel_scope.cancel()


async def _check_after(loads: Loads, echo: EchoService, port: int, baseline: int) -> None:
    await wait_until(
        lambda: loads.ended == 2 * PER_FORWARD, HANG, lambda: f"only {loads.ended} sockets closed"
    )
    await wait_until(lambda: echo.live == 0, HANG, lambda: f"{echo.live} target sockets still open")
    _assert_all_reset(loads, echo)
    assert port_is_free(port), "the remote forward's port is still bound"
    await wait_until(
        lambda: count_tasks() <= baseline,
        HANG,
        lambda: f"tasks outlived the teardown ({count_tasks()} > {baseline}): {describe_tasks()}",
    )


def _assert_all_reset(loads: Loads, echo: EchoService) -> None:
    """The teardown cut every relay mid-conversation: each end must see a reset, not an EOF."""
    assert (loads.resets, loads.remote.eofs + loads.local.eofs) == (2 * PER_FORWARD, 0)
    assert echo.resets == 2 * PER_FORWARD


async def test_leaving_client_block(nursery: trio.Nursery) -> None:
    echo = EchoService()
    await echo.start(nursery)
    server: pytunnel.TunnelServer = await nursery.start(
        functools.partial(pytunnel.serve, 0, token=TOKEN, connect_timeout=HANG)
    )
    baseline = count_tasks()
    async with _loaded_tunnel(server.address, echo) as (_tunnel, loads, port):
        pass
    await _check_after(loads, echo, port, baseline)
    assert server.session_count == 0


async def test_closing_the_server(nursery: trio.Nursery) -> None:
    echo = EchoService()
    await echo.start(nursery)
    server: pytunnel.TunnelServer = await nursery.start(
        functools.partial(pytunnel.serve, 0, token=TOKEN, connect_timeout=HANG)
    )
    baseline = count_tasks()
    async with _loaded_tunnel(server.address, echo) as (tunnel, loads, port):
        await server.aclose()
        await wait_until(
            lambda: loads.ended == 2 * PER_FORWARD, HANG, lambda: f"only {loads.ended} closed"
        )
        await wait_until(
            lambda: echo.live == 0, HANG, lambda: f"{echo.live} target sockets still open"
        )
        _assert_all_reset(loads, echo)
        assert port_is_free(port)
        await tunnel.wait_closed()
    await wait_until(
        lambda: count_tasks() <= baseline - 2, HANG, lambda: "tasks outlived the teardown"
    )


async def test_cancelling_the_server_from_outside(nursery: trio.Nursery) -> None:
    echo = EchoService()
    await echo.start(nursery)
    baseline = count_tasks()
    # the server runs under a scope of its own: cancelling it must not cancel the checks below
    server_scope = trio.CancelScope()

    async def run_server(*, task_status: trio.TaskStatus[pytunnel.TunnelServer]) -> None:
        with server_scope:
            await pytunnel.serve(0, token=TOKEN, connect_timeout=HANG, task_status=task_status)

    server: pytunnel.TunnelServer = await nursery.start(run_server)
    async with _loaded_tunnel(server.address, echo) as (tunnel, loads, port):
        server_scope.cancel()
        await wait_until(
            lambda: loads.ended == 2 * PER_FORWARD, HANG, lambda: f"only {loads.ended} closed"
        )
        await wait_until(
            lambda: echo.live == 0, HANG, lambda: f"{echo.live} target sockets still open"
        )
        _assert_all_reset(loads, echo)
        assert port_is_free(port)
        await tunnel.wait_closed()
    await wait_until(
        lambda: count_tasks() <= baseline,
        HANG,
        lambda: f"tasks outlived the teardown ({count_tasks()} > {baseline}): {describe_tasks()}",
    )


async def test_client_process_killed(nursery: trio.Nursery) -> None:
    """SIGKILL the CLI client: the server notices, closes the public port and every relay."""
    echo = EchoService()
    await echo.start(nursery)
    server: pytunnel.TunnelServer = await nursery.start(
        functools.partial(pytunnel.serve, 0, token=TOKEN, connect_timeout=HANG)
    )
    await trio.testing.wait_all_tasks_blocked()  # the server's tasks are all parked
    baseline = count_tasks()
    host, port = server.address
    proc = await trio.lowlevel.open_process(
        [
            sys.executable,
            "-m",
            "pytunnel",
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
        loads = Loads()
        async with trio.open_nursery() as load_nursery:
            await loads.remote.start(load_nursery, ("127.0.0.1", remote_port), PER_FORWARD)
            await loads.local.start(load_nursery, ("127.0.0.1", local_port), PER_FORWARD)
            assert echo.live == 2 * PER_FORWARD
            await loads.remote.all_moving()
            await loads.local.all_moving()
            os.kill(proc.pid, signal.SIGKILL)
            await wait_until(
                lambda: loads.ended == 2 * PER_FORWARD, HANG, lambda: f"only {loads.ended} closed"
            )
            await wait_until(
                lambda: echo.live == 0, HANG, lambda: f"{echo.live} target sockets still open"
            )
            await wait_until(
                lambda: server.session_count == 0, HANG, lambda: "server kept the session"
            )
            # the server's relays (the public port's connections, the local forward's targets)
            # are reset; the killed process's own sockets are closed by its kernel, FIN or RST
            assert (loads.remote.resets, loads.remote.eofs) == (PER_FORWARD, 0)
            assert echo.resets >= PER_FORWARD
            assert port_is_free(remote_port)
        await wait_until(
            lambda: count_tasks() <= baseline, HANG, lambda: "server tasks outlived the client"
        )
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def _sees_eof_or_reset(conn: trio.SocketStream, within: float) -> bool:
    with trio.move_on_after(within):
        try:
            while await conn.receive_some():
                pass
        except trio.BrokenResourceError:
            pass
        return True
    return False


async def test_local_connection_waiting_for_dial_is_closed_with_the_tunnel(
    tunnel_server: pytunnel.TunnelServer, blackhole: object
) -> None:
    async with pytunnel.open_tunnel(tunnel_server.address, token=TOKEN) as tunnel:
        forward = await tunnel.forward_local("127.0.0.1", blackhole.port)  # type: ignore[attr-defined]
        conn = await trio.open_tcp_stream(*forward.address)
        await trio.sleep(0.3)  # the server is now dialling the black hole (5 s)
    try:
        assert await _sees_eof_or_reset(conn, 1.0)
    finally:
        await conn.aclose()


async def test_public_connection_waiting_for_client_dial_is_closed_on_server_shutdown(
    nursery: trio.Nursery, blackhole: object
) -> None:
    crash = Crash()
    server: pytunnel.TunnelServer = await nursery.start(crash.serve)
    tunnel = await pytunnel.connect_tunnel(
        nursery, server.address, token=TOKEN, reconnect=False, probe_interval=0
    )
    forward = await tunnel.forward_remote("127.0.0.1", blackhole.port)  # type: ignore[attr-defined]
    conn = await trio.open_tcp_stream(*forward.address)
    await trio.sleep(0.3)  # the client is now dialling the black hole (5 s)
    await server.aclose()
    try:
        assert await _sees_eof_or_reset(conn, 1.0)
    finally:
        await conn.aclose()
