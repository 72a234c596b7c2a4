"""Heartbeats, reconnection with rule restore, health probes, status events and limits."""

from __future__ import annotations

import contextlib
import functools
import socket
import subprocess
import sys

import pytest
import trio
import trio.testing
from helpers import (
    TOKEN,
    LinkProxy,
    closed_port,
    count_fds,
    count_tasks,
    echo_once,
    port_is_free,
    wait_until,
)

import pytunnel
from pytunnel import ErrorCode
from pytunnel._handshake import open_server_session
from pytunnel.client import ForwardStatus
from pytunnel.protocol import routes
from pytunnel.protocol.frames import encode_message
from pytunnel.protocol.messages import Bound
from pytunnel.session import IncomingStream, Session

pytestmark = pytest.mark.timeout(180)
FAST = {"backoff_initial": 0.02, "backoff_max": 0.1, "backoff_jitter": 0.0}


class SilentStream(trio.abc.Stream):
    """Wraps a stream; once ``silence()`` is called nothing more is delivered in either
    direction, yet no error or EOF is seen: a half-open connection (the peer vanished)."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.silent = False
        self._forever = trio.Event()

    def silence(self) -> None:
        self.silent = True

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if not self.silent:
            await self.inner.send_all(data)
        else:
            await trio.lowlevel.checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        while True:
            if self.silent:
                await self._forever.wait()
            data = await self.inner.receive_some(max_bytes)
            if not self.silent:
                return data

    async def aclose(self) -> None:
        await self.inner.aclose()


async def _echo_once(address: tuple[str, int], payload: bytes = b"ping") -> bytes:
    with trio.fail_after(10):
        return await echo_once(address, payload)


# ----------------------------------------------------------------------------- heartbeats


async def test_client_detects_silent_link(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery
) -> None:
    """Ping every 10 s, dead after 30 s without a pong: found by the clock, not the kernel."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    server = pytunnel.TunnelServer(
        pytunnel.ServerConfig(token=TOKEN, heartbeat_timeout=10**6), listeners
    )
    a, b = trio.testing.memory_stream_pair()
    silent = SilentStream(a)
    nursery.start_soon(server.handle_stream, b)
    tunnel = await pytunnel.wrap_tunnel(nursery, silent, token=TOKEN, probe_interval=0)
    events = tunnel.events()
    await trio.sleep(25)
    assert tunnel.connected  # pongs came back
    assert tunnel.rtt is not None
    start = trio.current_time()
    silent.silence()
    await tunnel.wait_closed()
    assert 30 <= trio.current_time() - start <= 41  # next ping within 10 s, then 30 s
    assert isinstance(tunnel.failure, pytunnel.SessionClosedError)
    kinds = [event.kind async for event in events]  # ends with the tunnel
    assert pytunnel.EventKind.HEARTBEAT_LOST in kinds
    assert kinds[-1] is pytunnel.EventKind.DISCONNECTED
    await listeners[0].aclose()


async def test_server_drops_silent_client(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery
) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    server = pytunnel.TunnelServer(pytunnel.ServerConfig(token=TOKEN), listeners)
    a, b = trio.testing.memory_stream_pair()
    silent = SilentStream(b)
    done = trio.Event()

    async def serve_one() -> None:
        await server.handle_stream(silent)
        done.set()

    nursery.start_soon(serve_one)
    await pytunnel.wrap_tunnel(
        nursery, a, token=TOKEN, heartbeat_interval=10**6, heartbeat_timeout=10**6
    )
    await trio.sleep(1)
    assert server.session_count == 1
    start = trio.current_time()
    silent.silence()
    await done.wait()
    # checked every 5 s, dropped once silent for more than 30 s
    assert 30 <= trio.current_time() - start <= 36
    assert server.session_count == 0
    await listeners[0].aclose()


# ----------------------------------------------------------------------------- reconnect


async def test_reconnect_restores_forwards(nursery: trio.Nursery, echo_port: int) -> None:
    port = closed_port()
    async with trio.open_nursery() as server_nursery:
        await server_nursery.start(functools.partial(pytunnel.serve, port, token=TOKEN))
        tunnel = await pytunnel.connect_tunnel(nursery, ("127.0.0.1", port), token=TOKEN, **FAST)
        events = tunnel.events()
        remote = await tunnel.forward_remote("127.0.0.1", echo_port)
        local = await tunnel.forward_local("127.0.0.1", echo_port)
        assert await _echo_once(remote.address) == b"ping"
        public_port = remote.listen_port
        server_nursery.cancel_scope.cancel()
    with trio.fail_after(5):
        await remote.wait_status(pytunnel.ForwardStatus.SUSPENDED)
    assert local.status is pytunnel.ForwardStatus.SUSPENDED
    assert not tunnel.connected
    # a connection to the local forward during the outage waits for the link ...
    async with trio.open_nursery() as waiting:
        result: list[bytes] = []

        async def during_outage() -> None:
            result.append(await _echo_once(local.address, b"patient"))

        waiting.start_soon(during_outage)
        await trio.sleep(0.2)
        # ... the server comes back on the same port
        server_nursery2 = await nursery.start(functools.partial(pytunnel.serve, port, token=TOKEN))
    assert result == [b"patient"]
    with trio.fail_after(5):
        await remote.wait_status(pytunnel.ForwardStatus.ACTIVE)
    assert remote.listen_port == public_port  # the port it had before the outage ...
    assert await _echo_once(("127.0.0.1", public_port)) == b"ping"  # ... really relays again
    assert await _echo_once(local.address) == b"ping"
    assert tunnel.reconnects == 1
    seen = []
    kinds = set()
    while True:
        try:
            event = events.receive_nowait()
        except trio.WouldBlock:
            break
        kinds.add(event.kind)
        if event.kind is pytunnel.EventKind.STATUS:
            assert event.forward is not None
            assert event.old
            assert event.new
            seen.append((event.forward.kind, event.old.value, event.new.value))
    assert {
        pytunnel.EventKind.DISCONNECTED,
        pytunnel.EventKind.RECONNECT_ATTEMPT,
        pytunnel.EventKind.RECONNECT_FAILED,
        pytunnel.EventKind.CONNECTED,
    } <= kinds
    assert ("remote forward", "active", "suspended") in seen
    assert ("remote forward", "suspended", "active") in seen
    assert ("local forward", "suspended", "active") in seen
    await server_nursery2.aclose()
    await tunnel.aclose()


async def test_outage_waiting_connection_is_closed_cleanly(nursery: trio.Nursery) -> None:
    port = closed_port()
    async with trio.open_nursery() as server_nursery:
        await server_nursery.start(functools.partial(pytunnel.serve, port, token=TOKEN))
        tunnel = await pytunnel.connect_tunnel(
            nursery, ("127.0.0.1", port), token=TOKEN, outage_wait=0.2, **FAST
        )
        local = await tunnel.forward_local("127.0.0.1", 9)
        server_nursery.cancel_scope.cancel()
    with trio.fail_after(5):
        while tunnel.connected:
            await trio.sleep(0.01)
    stream = await trio.open_tcp_stream(*local.address)
    with trio.fail_after(5):
        assert await stream.receive_some() == b""  # closed after outage_wait, not hung
    await stream.aclose()
    assert local.stats.errors.get("LINK_DOWN") == 1
    await tunnel.aclose()


async def test_fifty_outages_leak_nothing(nursery: trio.Nursery, echo_port: int) -> None:
    port = closed_port()
    server: pytunnel.TunnelServer = await nursery.start(
        functools.partial(pytunnel.serve, port, token=TOKEN)
    )
    tunnel = await pytunnel.connect_tunnel(nursery, ("127.0.0.1", port), token=TOKEN, **FAST)
    remote = await tunnel.forward_remote("127.0.0.1", echo_port)
    local = await tunnel.forward_local("127.0.0.1", echo_port)
    public_port = remote.listen_port
    baseline: tuple[int, int] | None = None
    for cycle in range(50):
        await server.aclose()
        with trio.fail_after(5):
            while tunnel.connected:
                await trio.sleep(0.005)
        server = await nursery.start(functools.partial(pytunnel.serve, port, token=TOKEN))
        with trio.fail_after(5):
            await remote.wait_status(pytunnel.ForwardStatus.ACTIVE)
        assert remote.listen_port == public_port
        assert await _echo_once(remote.address) == b"ping"
        assert await _echo_once(local.address) == b"ping"
        await trio.sleep(0.02)
        if cycle == 0:
            baseline = (count_tasks(), count_fds())
    assert tunnel.reconnects == 50
    assert baseline is not None
    # the last echo's sockets may still be closing; a leak of one cycle's worth would show
    # as growth that never goes away (50 cycles: tens of tasks or descriptors)
    await wait_until(
        lambda: count_tasks() <= baseline[0] and count_fds() <= baseline[1],
        what=lambda: f"(tasks, fds) {(count_tasks(), count_fds())} grew from {baseline}",
    )
    await tunnel.aclose()
    await server.aclose()


async def test_authentication_failure_ends_at_once(nursery: trio.Nursery) -> None:
    """After a reconnect finds the token rejected, the tunnel gives up with code 1002."""
    port = closed_port()
    async with trio.open_nursery() as server_nursery:
        await server_nursery.start(functools.partial(pytunnel.serve, port, token=TOKEN))
        tunnel = await pytunnel.connect_tunnel(nursery, ("127.0.0.1", port), token=TOKEN, **FAST)
        server_nursery.cancel_scope.cancel()
    other = await nursery.start(functools.partial(pytunnel.serve, port, token="rotated-token"))
    with trio.fail_after(5):
        await tunnel.wait_closed()
    assert isinstance(tunnel.failure, pytunnel.AuthenticationError)
    assert tunnel.failure.code == 1002
    await other.aclose()


async def test_gives_up_after_max_attempts(nursery: trio.Nursery) -> None:
    port = closed_port()
    async with trio.open_nursery() as server_nursery:
        await server_nursery.start(functools.partial(pytunnel.serve, port, token=TOKEN))
        tunnel = await pytunnel.connect_tunnel(
            nursery, ("127.0.0.1", port), token=TOKEN, max_attempts=3, **FAST
        )
        forward = await tunnel.forward_local("127.0.0.1", 9)
        server_nursery.cancel_scope.cancel()
    with trio.fail_after(5):
        await tunnel.wait_closed()
    assert isinstance(tunnel.failure, pytunnel.ConnectError)
    assert "3 reconnection attempts" in str(tunnel.failure)
    assert forward.status is pytunnel.ForwardStatus.ERROR


def test_backoff_schedule() -> None:
    config = pytunnel.ClientConfig(token="t", backoff_jitter=0)
    assert [config.backoff(n) for n in range(1, 8)] == [1, 2, 4, 8, 16, 16, 16]
    jittery = pytunnel.ClientConfig(token="t", backoff_jitter=0.2)
    assert all(0.8 <= jittery.backoff(1) <= 1.2 for _ in range(100))


async def test_server_process_killed_and_restarted(nursery: trio.Nursery, echo_port: int) -> None:
    """The CLI server is SIGKILLed mid-traffic and started again on the same port."""
    port = closed_port()
    cmd = [
        sys.executable,
        "-m",
        "pytunnel",
        "serve",
        "--listen",
        f"127.0.0.1:{port}",
        "--token",
        TOKEN,
    ]

    async def start_server() -> trio.Process:
        proc = await trio.lowlevel.open_process(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
        assert proc.stdout is not None
        with trio.fail_after(20):
            await proc.stdout.receive_some()  # "pytunnel server listening on ..."
        return proc

    proc = await start_server()
    try:
        tunnel = await pytunnel.connect_tunnel(nursery, ("127.0.0.1", port), token=TOKEN, **FAST)
        remote = await tunnel.forward_remote("127.0.0.1", echo_port)
        public = remote.address
        stream = await trio.open_tcp_stream(*public)
        await stream.send_all(b"mid-traffic")
        assert await stream.receive_some() == b"mid-traffic"
        await trio.sleep(0.1)
        tasks, fds = count_tasks(), count_fds()
        proc.kill()
        await proc.wait()
        with trio.fail_after(5):  # the open connection through the dead server ends
            with contextlib.suppress(trio.BrokenResourceError):
                assert await stream.receive_some() == b""
        await stream.aclose()
        proc = await start_server()
        with trio.fail_after(10):
            while not (tunnel.reconnects == 1 and remote.status is pytunnel.ForwardStatus.ACTIVE):
                await trio.sleep(0.01)
        assert remote.address == public
        assert await _echo_once(public, b"after restart") == b"after restart"
        await trio.sleep(0.1)
        assert count_tasks() <= tasks  # no task left from the dead session
        assert count_fds() <= fds
        await tunnel.aclose()
    finally:
        proc.kill()
        await proc.wait()


# ----------------------------------------------------------------------------- probes


async def test_health_probes_take_forward_offline_and_back(nursery: trio.Nursery) -> None:
    server = await nursery.start(functools.partial(pytunnel.serve, 0, token=TOKEN))
    tunnel = await pytunnel.connect_tunnel(
        nursery, server.address, token=TOKEN, probe_interval=0.05, probe_failures=3
    )
    target = socket.socket()
    target.bind(("127.0.0.1", 0))
    target.listen()
    target_port = target.getsockname()[1]
    forward = await tunnel.forward_remote("127.0.0.1", target_port)
    public = forward.address
    (await trio.open_tcp_stream(*public)).socket.close()  # accepted while the target is up
    target.close()  # the service goes away
    with trio.fail_after(5):
        await forward.wait_status(pytunnel.ForwardStatus.OFFLINE)
    assert "3 health probes failed" in forward.reason
    await trio.sleep(0.1)
    with pytest.raises(OSError, match="connect"):  # refused at once: no black hole
        await trio.open_tcp_stream(*public)
    # the service comes back on the same port
    target = socket.socket()
    target.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    target.bind(("127.0.0.1", target_port))
    target.listen()
    with trio.fail_after(5):
        await forward.wait_status(pytunnel.ForwardStatus.ACTIVE)
    await trio.sleep(0.1)
    conn = await trio.open_tcp_stream(*public)
    await conn.aclose()
    target.close()
    await tunnel.aclose()


async def test_health_probes_with_virtual_time(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery
) -> None:
    """Default schedule (every 30 s, offline after 3 failures) in virtual time."""
    server = await nursery.start(functools.partial(pytunnel.serve, 0, token=TOKEN))
    tunnel = await pytunnel.connect_tunnel(nursery, server.address, token=TOKEN)
    target = socket.socket()
    target.bind(("127.0.0.1", 0))
    target.listen()
    target_port = target.getsockname()[1]
    forward = await tunnel.forward_remote("127.0.0.1", target_port)
    events = tunnel.events()
    await trio.sleep(100)
    assert forward.status is pytunnel.ForwardStatus.ACTIVE  # probes succeed
    target.close()
    gone = trio.current_time()
    await forward.wait_status(pytunnel.ForwardStatus.OFFLINE)
    assert 60 <= trio.current_time() - gone <= 91  # the third failed probe
    target = socket.socket()
    target.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    target.bind(("127.0.0.1", target_port))
    target.listen()
    back = trio.current_time()
    await forward.wait_status(pytunnel.ForwardStatus.ACTIVE)
    assert trio.current_time() - back <= 31  # the first successful probe
    kinds = []
    while True:
        try:
            kinds.append(events.receive_nowait().kind)
        except trio.WouldBlock:
            break
    assert kinds.count(pytunnel.EventKind.PROBE_FAILED) >= 3
    assert pytunnel.EventKind.PROBE_OK in kinds
    target.close()
    await tunnel.aclose()


# ----------------------------------------------------------------------------- limits


async def test_forward_limit_per_client(nursery: trio.Nursery) -> None:
    server = await nursery.start(
        functools.partial(pytunnel.serve, 0, token=TOKEN, max_forwards_per_client=2)
    )
    tunnel = await pytunnel.connect_tunnel(nursery, server.address, token=TOKEN)
    first = await tunnel.forward_remote("127.0.0.1", 9)
    await tunnel.forward_remote("127.0.0.1", 9)
    with pytest.raises(pytunnel.ForwardLimitError) as info:
        await tunnel.forward_remote("127.0.0.1", 9)
    assert info.value.code == pytunnel.ErrorCode.FORWARD_LIMIT
    await first.aclose()  # frees a slot
    await trio.sleep(0.05)
    await tunnel.forward_remote("127.0.0.1", 9)


async def test_server_wide_stream_limit(nursery: trio.Nursery, echo_port: int) -> None:
    server = await nursery.start(functools.partial(pytunnel.serve, 0, token=TOKEN, max_streams=2))
    tunnel = await pytunnel.connect_tunnel(nursery, server.address, token=TOKEN)
    held = [await tunnel.open_stream("127.0.0.1", echo_port) for _ in range(2)]
    with pytest.raises(pytunnel.StreamLimitError):
        await tunnel.open_stream("127.0.0.1", echo_port)
    # what already runs is unaffected
    await held[0].send_all(b"still fine")
    assert await held[0].receive_some() == b"still fine"
    for stream in held:
        await stream.aclose()
    await trio.sleep(0.05)
    stream = await tunnel.open_stream("127.0.0.1", echo_port)
    await stream.aclose()


async def test_offline_survives_a_reconnect(nursery: trio.Nursery) -> None:
    """A forward whose target is down stays offline (port refusing) after a reconnect,
    instead of accepting into a black hole until the probes notice again."""
    port = closed_port()
    async with trio.open_nursery() as server_nursery:
        await server_nursery.start(functools.partial(pytunnel.serve, port, token=TOKEN))
        tunnel = await pytunnel.connect_tunnel(
            nursery, ("127.0.0.1", port), token=TOKEN, probe_interval=0.05, **FAST
        )
        forward = await tunnel.forward_remote("127.0.0.1", closed_port())
        with trio.fail_after(5):
            await forward.wait_status(pytunnel.ForwardStatus.OFFLINE)
        server_nursery.cancel_scope.cancel()
    with trio.fail_after(5):
        await forward.wait_status(pytunnel.ForwardStatus.SUSPENDED)
    server = await nursery.start(functools.partial(pytunnel.serve, port, token=TOKEN))
    with trio.fail_after(5):
        await forward.wait_status(pytunnel.ForwardStatus.OFFLINE)
    await trio.sleep(0.1)
    with pytest.raises(OSError, match="connect"):
        await trio.open_tcp_stream(*forward.address)
    await tunnel.aclose()
    await server.aclose()


# ----------------------------------------------------------------------------- identity


async def test_one_sided_reset_gets_the_same_port_back_at_once(
    nursery: trio.Nursery, echo_port: int
) -> None:
    """Only the client's side of the link dies; the server still holds the session (and the
    public port) until its heartbeat would drop it, 30 s later. The reconnecting client has
    the same identity, so its new session replaces the ghost at once and gets the port."""
    server: pytunnel.TunnelServer = await nursery.start(
        functools.partial(pytunnel.serve, 0, token=TOKEN)
    )
    proxy = LinkProxy(server.address)
    await proxy.start(nursery)
    tunnel = await pytunnel.connect_tunnel(
        nursery, proxy.address, token=TOKEN, backoff_initial=0.2, backoff_jitter=0.0
    )
    remote = await tunnel.forward_remote("127.0.0.1", echo_port)
    public = ("127.0.0.1", remote.listen_port)
    assert await _echo_once(public) == b"ping"
    try:
        proxy.reset_client_side()
        with trio.fail_after(3):
            while tunnel.reconnects < 1:
                await trio.sleep(0.01)
            status = await remote.wait_status(
                pytunnel.ForwardStatus.ACTIVE, pytunnel.ForwardStatus.ERROR
            )
            assert status is pytunnel.ForwardStatus.ACTIVE, remote.reason
            assert remote.listen_port == public[1]
            assert await _echo_once(public) == b"ping"
        assert server.session_count == 1  # the ghost session is gone, not merely outnumbered
        assert proxy.ghosts  # ... although its connection is still open
    finally:
        await tunnel.aclose()
        proxy.close()


async def test_link_dropped_while_server_runs_then_port_comes_back(
    nursery: trio.Nursery, echo_port: int
) -> None:
    server: pytunnel.TunnelServer = await nursery.start(
        functools.partial(pytunnel.serve, 0, token=TOKEN)
    )
    proxy = LinkProxy(server.address)
    await proxy.start(nursery)
    tunnel = await pytunnel.connect_tunnel(nursery, proxy.address, token=TOKEN, **FAST)
    remote = await tunnel.forward_remote("127.0.0.1", echo_port)
    public = ("127.0.0.1", remote.listen_port)
    assert await _echo_once(public) == b"ping"
    try:
        proxy.cut()
        with trio.fail_after(5):
            while tunnel.reconnects < 1:
                await trio.sleep(0.01)
            status = await remote.wait_status(
                pytunnel.ForwardStatus.ACTIVE, pytunnel.ForwardStatus.ERROR
            )
        assert status is pytunnel.ForwardStatus.ACTIVE, remote.reason
        assert remote.listen_port == public[1]
        assert await _echo_once(public) == b"ping"
    finally:
        await tunnel.aclose()
        proxy.close()


async def test_restore_meeting_a_port_in_use_stays_suspended_and_retries(
    nursery: trio.Nursery, echo_port: int
) -> None:
    """Another client (another identity: no takeover) holds the port when the forward is
    restored: the forward waits, suspended and saying why, and gets the port once free."""
    server: pytunnel.TunnelServer = await nursery.start(
        functools.partial(pytunnel.serve, 0, token=TOKEN)
    )
    proxy = LinkProxy(server.address)
    await proxy.start(nursery)
    tunnel = await pytunnel.connect_tunnel(nursery, proxy.address, token=TOKEN, **FAST)
    remote = await tunnel.forward_remote("127.0.0.1", echo_port)
    port = remote.listen_port
    other = await pytunnel.connect_tunnel(nursery, server.address, token=TOKEN)
    assert other.client_id != tunnel.client_id
    try:
        proxy.refusing = True
        proxy.cut()
        await wait_until(lambda: server.session_count == 1, 5, "the cut session is still there")
        squatter = await other.forward_remote("127.0.0.1", echo_port, remote_port=port)
        proxy.refusing = False
        await wait_until(
            lambda: tunnel.reconnects >= 1 and "in use" in remote.reason, 5, "no restore attempt"
        )
        assert remote.status is pytunnel.ForwardStatus.SUSPENDED
        assert "retrying" in remote.reason
        assert squatter.status is pytunnel.ForwardStatus.ACTIVE  # not taken over
        await squatter.aclose()
        with trio.fail_after(5):
            status = await remote.wait_status(
                pytunnel.ForwardStatus.ACTIVE, pytunnel.ForwardStatus.ERROR
            )
        assert status is pytunnel.ForwardStatus.ACTIVE, remote.reason
        assert remote.listen_port == port
        assert await _echo_once(("127.0.0.1", port)) == b"ping"
    finally:
        await other.aclose()
        await tunnel.aclose()
        proxy.close()


async def test_restore_refused_for_good_is_final(nursery: trio.Nursery, echo_port: int) -> None:
    """A permanent refusal (the port is no longer allowed) ends the forward in ERROR."""
    port = closed_port()
    async with trio.open_nursery() as server_nursery:
        await server_nursery.start(functools.partial(pytunnel.serve, port, token=TOKEN))
        tunnel = await pytunnel.connect_tunnel(nursery, ("127.0.0.1", port), token=TOKEN, **FAST)
        remote = await tunnel.forward_remote("127.0.0.1", echo_port)
        public = remote.listen_port
        server_nursery.cancel_scope.cancel()
    others = f"{public + 1 if public < 65535 else public - 1}"
    server = await nursery.start(
        functools.partial(pytunnel.serve, port, token=TOKEN, allow_ports=others)
    )
    with trio.fail_after(5):
        await remote.wait_status(pytunnel.ForwardStatus.ERROR)
    assert "PORT_NOT_ALLOWED" in str(remote.error)
    await tunnel.aclose()
    await server.aclose()


async def test_closing_a_remote_forward_under_a_connection_storm(
    nursery: trio.Nursery, echo_port: int
) -> None:
    """Connections keep arriving while the forward closes: each is relayed or refused, none
    is left unanswered, nothing is started in a closed nursery, the tunnel lives on."""
    server: pytunnel.TunnelServer = await nursery.start(
        functools.partial(pytunnel.serve, 0, token=TOKEN)
    )
    tunnel = await pytunnel.connect_tunnel(nursery, server.address, token=TOKEN)
    for _ in range(50):
        remote = await tunnel.forward_remote("127.0.0.1", echo_port)
        address = remote.address
        stop = trio.Event()

        async def one(address: tuple[str, int] = address) -> bool:
            try:
                stream = await trio.open_tcp_stream(*address)
            except OSError:
                return False  # the port refuses: the forward is gone
            with trio.fail_after(10):  # hang detector: every connection gets an answer
                async with stream:
                    try:
                        await stream.send_all(b"x")
                        await stream.send_eof()
                        while await stream.receive_some():
                            pass
                    except trio.BrokenResourceError:
                        pass
            return True

        async def hammer(stop: trio.Event = stop) -> None:
            for _ in range(1000):
                if stop.is_set() or not await one():
                    return

        async with trio.open_nursery() as storm:
            for _ in range(8):
                storm.start_soon(hammer)
            await wait_until(
                functools.partial(lambda s: s.total_connections >= 4, remote.stats),
                10,
                "no connections",
            )
            for _ in range(48):  # and a burst: many opens reach the client in one read
                storm.start_soon(one)
            with trio.fail_after(10):
                await remote.aclose()
            stop.set()
        assert remote.status is pytunnel.ForwardStatus.STOPPED
        assert tunnel.connected, tunnel.failure
    await wait_until(lambda: server.active_streams == 0, 10, "the server still holds streams")
    local = await tunnel.forward_local("127.0.0.1", echo_port)
    assert await _echo_once(local.address) == b"ping"
    await tunnel.aclose()


async def test_session_end_closes_the_public_port_before_the_relays(
    nursery: trio.Nursery, echo_port: int
) -> None:
    """By the time any relayed connection of a dying session is reset, its forward's public
    port already refuses (and can be bound by the next owner): no connection is accepted
    into a forward that is going away."""
    server: pytunnel.TunnelServer = await nursery.start(
        functools.partial(pytunnel.serve, 0, token=TOKEN)
    )
    proxy = LinkProxy(server.address)
    await proxy.start(nursery)
    tunnel = await pytunnel.connect_tunnel(nursery, proxy.address, token=TOKEN, reconnect=False)
    remote = await tunnel.forward_remote("127.0.0.1", echo_port)
    port = remote.listen_port
    conns = []
    for _ in range(30):
        conn = await trio.open_tcp_stream("127.0.0.1", port)
        await conn.send_all(b"x")
        assert await conn.receive_some() == b"x"
        conns.append(conn)
    ended = trio.Event()
    free_at_first_end: list[bool] = []

    async def watch(conn: trio.SocketStream) -> None:
        with contextlib.suppress(trio.BrokenResourceError):
            await conn.receive_some()
        if not ended.is_set():
            free_at_first_end.append(port_is_free(port))
            ended.set()

    try:
        async with trio.open_nursery() as watchers:
            for conn in conns:
                watchers.start_soon(watch, conn)
            proxy.cut()
            with trio.fail_after(10):
                await ended.wait()
            watchers.cancel_scope.cancel()
        assert free_at_first_end == [True]
    finally:
        for conn in conns:
            await conn.aclose()
        await tunnel.aclose()
        proxy.close()


# ------------------------------------------------------------ a rate-limited reconnection waits


async def test_reconnection_waits_as_long_as_a_rate_limit_says(nursery: trio.Nursery) -> None:
    """A tunnel whose address is penalised (its NAT neighbour keeps failing authentication)
    waits for the retry time the refusal names instead of being refused at every backoff
    step, and is served once the penalty is over."""
    server: pytunnel.TunnelServer = await nursery.start(
        functools.partial(
            pytunnel.serve, 0, token=TOKEN, auth_failure_burst=1, auth_failure_interval=2.0
        )
    )
    tunnel = await pytunnel.connect_tunnel(
        nursery, server.address, token=TOKEN, backoff_initial=0.05, backoff_max=0.05
    )
    events = tunnel.events()
    for _ in range(2):  # the neighbour's stale token spends the address's budget
        with pytest.raises((pytunnel.AuthenticationError, pytunnel.RateLimitedError)):
            async with pytunnel.open_tunnel(server.address, token="stale", reconnect=False):
                pass
    [client] = list(server._sessions)
    await client.session.abort(pytunnel.SessionClosedError("link dropped"))
    failures = 0
    with trio.fail_after(20):  # hang detector
        async for event in events:
            if event.kind is pytunnel.EventKind.RECONNECT_FAILED:
                assert "RATE_LIMITED" in event.message or "retry in" in event.message, event
                failures += 1
            if event.kind is pytunnel.EventKind.CONNECTED:
                break
    # refused once, told when to come back, then served: not refused every 50 ms for 2 s
    assert 1 <= failures <= 2, failures
    assert tunnel.connected


async def _accept_forward(session: Session) -> IncomingStream:
    """The next stream the client opens other than its CLIENT_INFO (refused, as a server
    that records it does)."""
    while (incoming := await session.accept_stream()).tag == routes.CLIENT_INFO:
        incoming.refuse(ErrorCode.NORMAL, "")
    return incoming


async def test_reattach_failure_before_bound_does_not_kill_the_tunnel() -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    second_done = trio.Event()

    async def fake_server() -> None:
        # connection 1: register the forward properly, then drop the link
        stream = await listeners[0].accept()
        async with open_server_session(stream, TOKEN) as session:
            incoming = await _accept_forward(session)
            control = incoming.accept()
            await control.send_all(encode_message(Bound("127.0.0.1", 45678)))
            await trio.sleep(0.2)
        # connection 2 (the reconnect): accept the re-registration, then reset it before Bound
        stream = await listeners[0].accept()
        async with open_server_session(stream, TOKEN) as session:
            incoming = await _accept_forward(session)
            incoming.accept().reset(ErrorCode.FORWARD_FAILED, "cannot restore")
            second_done.set()
            await trio.sleep(1)

    error: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fake_server)
            tunnel = await pytunnel.connect_tunnel(
                nursery,
                ("127.0.0.1", port),
                token=TOKEN,
                probe_interval=0,
                backoff_initial=0.01,
                backoff_max=0.01,
            )
            forward = await tunnel.forward_remote("127.0.0.1", 9, remote_port=45678)
            with trio.fail_after(5):
                await second_done.wait()
                await forward.wait_status(ForwardStatus.ERROR)
            assert not tunnel.closed
            await tunnel.aclose()
    except BaseException as exc:
        error = exc
    finally:
        await listeners[0].aclose()
    assert error is None, repr(error)
