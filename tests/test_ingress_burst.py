"""Bursts of connections through a tunnel's own listeners (``-L`` at the client, a ``-R``
public port at the server): every connection waiting is accepted in one scheduler pass, each
in its own stream slot, and the limits behave as with one connection at a time."""

from __future__ import annotations

import contextlib
import functools
import logging
import socket

import pytest
import trio
from helpers import TOKEN, wait_until

import pytunnel

pytestmark = pytest.mark.timeout(120)

BURST = 200


class _Steps(trio.abc.Instrument):
    """How many times tasks whose name ends with ``name`` ran."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task.name.endswith(self.name):
            self.steps += 1


def _queue(port: int, count: int) -> list[trio.SocketStream]:
    """``count`` connections made synchronously: the event loop does not run meanwhile, so
    each is in the listener's backlog before the listener takes any."""
    socks = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(count)]
    return [trio.SocketStream(trio.socket.from_stdlib_socket(sock)) for sock in socks]


async def _echo(conn: trio.SocketStream, payload: bytes) -> bytes:
    """Send ``payload`` and read back as many bytes; b"" short if the connection ends."""
    await conn.send_all(payload)
    received = b""
    while len(received) < len(payload):
        chunk = await conn.receive_some()
        if not chunk:
            break
        received += chunk
    return received


async def _burst_is_served(port: int, name: str) -> int:
    """A burst of :data:`BURST` queued connections all echo their own bytes; returns how
    many times the accept loop named ``name`` ran meanwhile."""
    steps = _Steps(name)
    echoed: dict[int, bytes] = {}
    trio.lowlevel.add_instrument(steps)
    try:
        conns = _queue(port, BURST)

        async def one(i: int, conn: trio.SocketStream) -> None:
            async with conn:
                echoed[i] = await _echo(conn, b"burst connection %03d" % i)

        with trio.fail_after(90):  # a hang detector
            async with trio.open_nursery() as nursery:
                for i, conn in enumerate(conns):
                    nursery.start_soon(one, i, conn)
    finally:
        trio.lowlevel.remove_instrument(steps)
    assert echoed == {i: b"burst connection %03d" % i for i in range(BURST)}
    return steps.steps


async def test_a_burst_through_a_local_forward_is_accepted_a_batch_a_pass(
    tunnel: pytunnel.Tunnel, echo_port: int
) -> None:
    forward = await tunnel.forward_local("127.0.0.1", echo_port)
    steps = await _burst_is_served(forward.listen_port, "LocalForward._accept_loop")
    # one connection a pass would be BURST steps or more; 64 a pass is a handful
    assert steps <= BURST // 5, steps
    await wait_until(lambda: forward.stats.active_connections == 0, 30)
    assert forward.stats.total_connections == BURST
    assert not forward.stats.errors, forward.stats.errors


async def test_a_burst_through_a_remote_forward_is_accepted_a_batch_a_pass(
    nursery: trio.Nursery, echo_port: int
) -> None:
    # the client (in this busy process) may take longer than the default 5 s to answer the
    # last of 200 public connections at once
    tunnel_server: pytunnel.TunnelServer = await nursery.start(
        functools.partial(pytunnel.serve, 0, token=TOKEN, connect_timeout=60)
    )
    tunnel = await pytunnel.connect_tunnel(nursery, tunnel_server.address, token=TOKEN)
    forward = await tunnel.forward_remote("127.0.0.1", echo_port)
    steps = await _burst_is_served(forward.listen_port, "_PublicPort._accept_loop")
    assert steps <= BURST // 5, steps
    await wait_until(lambda: forward.stats.total_connections == BURST, 30)
    assert tunnel_server.limits_hit.get("streams", 0) == 0


async def test_a_burst_at_the_local_stream_cap_waits_in_the_backlog(
    nursery: trio.Nursery,
    tunnel_server: pytunnel.TunnelServer,
    echo_port: int,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Forty connections waiting at once with eight stream slots: eight are accepted, the
    rest stay in the backlog (not accepted, not reset: the listener stops accepting, it does
    not accept and reset) and are served as slots free up; the cap is logged once per
    episode, not once per connection."""
    cap, total = 8, 40
    caplog.set_level(logging.INFO, logger="pytunnel")
    tunnel = await pytunnel.connect_tunnel(
        nursery,
        tunnel_server.address,
        token=TOKEN,
        reconnect=False,
        probe_interval=0,
        session=pytunnel.SessionConfig(max_streams=cap),
    )
    forward = await tunnel.forward_local("127.0.0.1", echo_port)
    session = tunnel.session
    assert session is not None
    release = trio.Event()
    served: dict[int, bytes] = {}

    async def one(i: int, conn: trio.SocketStream) -> None:
        async with conn:
            served[i] = await _echo(conn, b"capped connection %02d" % i)
            await release.wait()

    conns = _queue(forward.listen_port, total)
    with trio.fail_after(90):  # a hang detector
        async with trio.open_nursery() as clients:
            for i, conn in enumerate(conns):
                clients.start_soon(one, i, conn)
            await wait_until(lambda: len(served) == cap, 30)
            await wait_until(
                lambda: any("limit of 8 streams" in r.getMessage() for r in caplog.records), 30
            )
            await trio.testing.wait_all_tasks_blocked()
            assert len(served) == cap
            assert session.open_streams == cap
            assert forward.stats.total_connections == cap  # the rest not accepted
            release.set()  # slots free up: the connections waiting are served in turn
    assert served == {i: b"capped connection %02d" % i for i in range(total)}
    assert forward.stats.total_connections == total
    assert not forward.stats.errors, forward.stats.errors
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    # once per episode, never once per connection (40 connections, at most 5 waves of 8)
    assert 1 <= len(warnings) <= total // cap, [r.getMessage() for r in warnings]
    assert not any("dropped" in r.getMessage() for r in warnings)


async def test_a_burst_past_the_servers_limit_on_a_public_port(
    nursery: trio.Nursery, echo_port: int
) -> None:
    """At the server's stream limit each public connection of a burst is accepted and closed
    at once (a public port never keeps callers waiting), each counted as one refusal and no
    more; once slots are back a burst is served whole."""
    limit = 12
    server: pytunnel.TunnelServer = await nursery.start(
        functools.partial(pytunnel.serve, 0, token=TOKEN, max_streams=limit)
    )
    tunnel = await pytunnel.connect_tunnel(
        nursery, server.address, token=TOKEN, reconnect=False, probe_interval=0
    )
    forward = await tunnel.forward_remote("127.0.0.1", echo_port)
    port = forward.listen_port
    room = limit - server.active_streams
    held = _queue(port, room)
    for i, conn in enumerate(held):
        with trio.fail_after(30):
            assert await _echo(conn, b"held %d" % i) == b"held %d" % i
    assert server.active_streams == limit

    refused = _queue(port, 30)
    with trio.fail_after(30):  # a hang detector
        for conn in refused:
            with contextlib.suppress(trio.BrokenResourceError):  # reset: our bytes unread
                assert await _echo(conn, b"refused") == b""
            await conn.aclose()
    assert server.limits_hit.get("streams") == len(refused)
    assert forward.stats.total_connections == room

    for conn in held:
        await conn.aclose()
    await wait_until(lambda: server.active_streams == limit - room, 30)
    again = _queue(port, room)
    with trio.fail_after(30):
        for i, conn in enumerate(again):
            async with conn:
                assert await _echo(conn, b"again %d" % i) == b"again %d" % i
    assert server.limits_hit.get("streams") == len(refused)
