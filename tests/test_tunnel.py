"""The tunnel end to end over real loopback sockets: forwards, dial errors, policies."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import random
import socket
from collections.abc import Callable

import pytest
import trio
import trio.testing
from helpers import (
    TOKEN,
    Blackhole,
    closed_port,
    coroutine_names,
    count_fds,
    count_tasks,
    describe_tasks,
    echo_once,
    live_tasks,
    wait_until,
)

import pytunnel
from pytunnel._handshake import client_handshake, server_handshake
from pytunnel.protocol import routes
from pytunnel.protocol.frames import FrameDecoder, encode_message
from pytunnel.protocol.messages import Accept, Bound, Message, Open, Reset

pytestmark = pytest.mark.timeout(120)


async def _expect_closed(address: tuple[str, int]) -> None:
    """The tunnel closes the connection (EOF, or reset since our byte was never read)."""
    stream = await trio.open_tcp_stream(*address)
    try:
        await stream.send_all(b"x")
        with trio.fail_after(5):
            assert await stream.receive_some() == b""
    except trio.BrokenResourceError:
        pass
    finally:
        await stream.aclose()


async def test_remote_forward_relays_bytes(tunnel: pytunnel.Tunnel, echo_port: int) -> None:
    forward = await tunnel.forward_remote("127.0.0.1", echo_port)
    assert forward.listen_port != 0
    assert forward.status is pytunnel.ForwardStatus.ACTIVE
    for _ in range(3):
        assert await echo_once(forward.address, b"hello remote") == b"hello remote"
    await wait_until(lambda: forward.stats.active_connections == 0)
    assert forward.stats.total_connections == 3
    assert forward.stats.bytes_out == forward.stats.bytes_in == 3 * len(b"hello remote")
    assert forward.stats.active_connections == 0


async def test_local_forward_relays_bytes(tunnel: pytunnel.Tunnel, echo_port: int) -> None:
    forward = await tunnel.forward_local("127.0.0.1", echo_port)
    assert forward.address[0] == "127.0.0.1"
    assert forward.listen_port != 0
    assert await echo_once(forward.address, b"hello local") == b"hello local"
    await wait_until(lambda: forward.stats.active_connections == 0)
    assert forward.stats.total_connections == 1
    assert forward.stats.bytes_out == len(b"hello local")


async def test_open_stream_exits_at_server(tunnel: pytunnel.Tunnel, echo_port: int) -> None:
    stream = await tunnel.open_stream("127.0.0.1", echo_port)
    assert isinstance(stream, trio.abc.HalfCloseableStream)
    await stream.send_all(b"abc")
    await stream.send_eof()
    assert await stream.receive_some() == b"abc"
    assert await stream.receive_some() == b""
    await stream.aclose()


@pytest.mark.parametrize("kind", ["local", "remote"])
async def test_exact_bytes_random_sizes(tunnel: pytunnel.Tunnel, echo_port: int, kind: str) -> None:
    """Random sizes from 1 byte to 64 MiB, SHA-256 compared, with half-close carried."""
    if kind == "local":
        forward: pytunnel.Forward = await tunnel.forward_local("127.0.0.1", echo_port)
    else:
        forward = await tunnel.forward_remote("127.0.0.1", echo_port)
    rng = random.Random(7)
    sizes = [1, 2, 1000, 65_535, 65_536, 65_537, rng.randint(1, 5_000_000)]
    if kind == "local":
        sizes.append(64 * 1024 * 1024)
    for size in sizes:
        payload = rng.randbytes(size)
        got = await echo_once(forward.address, payload)
        assert len(got) == size
        assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()


async def test_half_close_carried_end_to_end(
    tunnel: pytunnel.Tunnel, nursery: trio.Nursery
) -> None:
    """A client that sends its request and shuts down writing still gets the whole reply."""

    async def slow_reply(stream: trio.SocketStream) -> None:
        request = b""
        while chunk := await stream.receive_some():
            request += chunk
        for _ in range(50):  # reply only after EOF, in pieces
            await stream.send_all(request.upper())
            await trio.sleep(0.001)
        await stream.aclose()

    listeners = await nursery.start(
        functools.partial(trio.serve_tcp, slow_reply, 0, host="127.0.0.1")
    )
    port = listeners[0].socket.getsockname()[1]
    for forward in (
        await tunnel.forward_local("127.0.0.1", port),
        await tunnel.forward_remote("127.0.0.1", port),
    ):
        assert await echo_once(forward.address, b"get /") == b"GET /" * 50


async def test_refused_target_is_node_unstable(
    tunnel: pytunnel.Tunnel, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    port = closed_port()
    with pytest.raises(pytunnel.NodeUnstableError) as info:
        await tunnel.open_stream("127.0.0.1", port)
    assert info.value.code == pytunnel.ErrorCode.NODE_UNSTABLE
    assert info.value.target == f"127.0.0.1:{port}"
    assert "[NODE_UNSTABLE]" in caplog.text
    assert "Connection refused" in caplog.text
    # through a local forward: the local connection is closed, nothing hangs
    forward = await tunnel.forward_local("127.0.0.1", port)
    await _expect_closed(forward.address)


async def test_dns_failure_is_node_unstable(tunnel: pytunnel.Tunnel) -> None:
    with pytest.raises(pytunnel.NodeUnstableError) as info:
        await tunnel.open_stream("does-not-exist.invalid", 80)
    assert "name resolution" in info.value.message


async def test_dial_timeout_is_node_timeout(
    nursery: trio.Nursery,
    tunnel_server: pytunnel.TunnelServer,
    blackhole: Blackhole,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    server = await nursery.start(
        functools.partial(pytunnel.serve, 0, token=TOKEN, connect_timeout=0.2)
    )
    tunnel = await pytunnel.connect_tunnel(nursery, server.address, token=TOKEN)
    with pytest.raises(pytunnel.NodeTimeoutError) as info:
        await tunnel.open_stream("127.0.0.1", blackhole.port)
    assert info.value.code == pytunnel.ErrorCode.NODE_TIMEOUT
    assert "[NODE_TIMEOUT]" in caplog.text


async def test_remote_forward_dial_failures_close_public_connection(
    tunnel: pytunnel.Tunnel, blackhole: Blackhole, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    refused = await tunnel.forward_remote("127.0.0.1", closed_port())
    await _expect_closed(refused.address)
    timing_out = await tunnel.forward_remote("127.0.0.1", blackhole.port, connect_timeout=0.2)
    await _expect_closed(timing_out.address)
    # the client (the dialling side) logged the category; so did the server
    records = [r for r in caplog.records if r.name == "pytunnel.dial"]
    assert any("[NODE_UNSTABLE]" in r.getMessage() for r in records)
    assert any("[NODE_TIMEOUT]" in r.getMessage() for r in records)
    server_lines = [r.getMessage() for r in caplog.records if r.name == "pytunnel.server"]
    assert any("[NODE_TIMEOUT]" in m for m in server_lines)
    assert any("[NODE_UNSTABLE]" in m for m in server_lines)


async def test_failed_dials_leave_nothing_behind(
    nursery: trio.Nursery, blackhole: Blackhole
) -> None:
    """1,000 failed dials of each kind; tasks and fds return to their baseline."""
    # refused dials go through a server whose timeout no refused dial reaches even on a busy
    # machine (250 at once); timed-out dials through one with a short timeout
    patient = await nursery.start(
        functools.partial(pytunnel.serve, 0, token=TOKEN, connect_timeout=30.0)
    )
    server = await nursery.start(
        functools.partial(pytunnel.serve, 0, token=TOKEN, connect_timeout=0.5)
    )
    tunnel = await pytunnel.connect_tunnel(nursery, server.address, token=TOKEN)
    refused_via = await pytunnel.connect_tunnel(nursery, patient.address, token=TOKEN)
    logging.getLogger("pytunnel").setLevel(logging.ERROR)
    try:
        await trio.sleep(0.1)
        tasks, fds = count_tasks(), count_fds()
        port = closed_port()
        errors: dict[type[BaseException], int] = {}

        async def attempt(via: pytunnel.Tunnel, target_port: int) -> None:
            try:
                await via.open_stream("127.0.0.1", target_port)
            except pytunnel.DialError as exc:
                errors[type(exc)] = errors.get(type(exc), 0) + 1

        for via, target_port in ((refused_via, port), (tunnel, blackhole.port)):
            for _ in range(4):  # batches of 250 concurrent dials
                async with trio.open_nursery() as batch:
                    for _ in range(250):
                        batch.start_soon(attempt, via, target_port)
        assert errors == {pytunnel.NodeUnstableError: 1000, pytunnel.NodeTimeoutError: 1000}
        await wait_until(
            lambda: count_tasks() == tasks and count_fds() == fds,
            30,
            lambda: (
                f"tasks {count_tasks()} (baseline {tasks}): {describe_tasks()}; "
                f"fds {count_fds()} (baseline {fds})"
            ),
        )
        assert count_tasks() == tasks
        assert count_fds() == fds
        for via in (tunnel, refused_via):
            assert via.session.open_streams == 0
            assert via.session._mux.open_streams == 0
    finally:
        logging.getLogger("pytunnel").setLevel(logging.NOTSET)


async def test_remote_port_in_use(tunnel: pytunnel.Tunnel) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(pytunnel.AddressInUseError) as info:
            await tunnel.forward_remote("127.0.0.1", 1, remote_port=port)
    assert info.value.code == pytunnel.ErrorCode.ADDRESS_IN_USE
    assert str(port) in info.value.address
    assert tunnel.forwards == []


async def test_local_port_in_use(tunnel: pytunnel.Tunnel) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(pytunnel.AddressInUseError):
            await tunnel.forward_local("127.0.0.1", 1, local_port=port)
    assert tunnel.forwards == []


async def test_port_outside_allowed_range(nursery: trio.Nursery) -> None:
    free = closed_port()
    server = await nursery.start(
        functools.partial(pytunnel.serve, 0, token=TOKEN, allow_ports=f"{free}-{free}")
    )
    tunnel = await pytunnel.connect_tunnel(nursery, server.address, token=TOKEN)
    with pytest.raises(pytunnel.PortNotAllowedError) as info:
        await tunnel.forward_remote(
            "127.0.0.1", 1, remote_port=free + 1 if free < 65535 else free - 1
        )
    assert "outside the allowed range" in str(info.value)
    with pytest.raises(pytunnel.PortNotAllowedError):
        await tunnel.forward_remote("127.0.0.1", 1, remote_port=free, remote_host="0.0.0.0")
    # port 0 picks from the range
    forward = await tunnel.forward_remote("127.0.0.1", 1)
    assert forward.listen_port == free


async def test_permit_open_refuses_and_logs(
    nursery: trio.Nursery, echo_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    server = await nursery.start(
        functools.partial(pytunnel.serve, 0, token=TOKEN, permit_open=[f"localhost:{echo_port}"])
    )
    tunnel = await pytunnel.connect_tunnel(nursery, server.address, token=TOKEN)
    stream = await tunnel.open_stream("LOCALHOST", echo_port)  # case-insensitive, like OpenSSH
    await stream.aclose()
    with pytest.raises(pytunnel.TargetForbiddenError) as info:
        await tunnel.open_stream("127.0.0.1", echo_port)
    assert info.value.code == pytunnel.ErrorCode.TARGET_FORBIDDEN
    forward = await tunnel.forward_local("127.0.0.1", echo_port)
    await _expect_closed(forward.address)
    server_lines = [r.getMessage() for r in caplog.records if r.name == "pytunnel.server"]
    client_lines = [r.getMessage() for r in caplog.records if r.name == "pytunnel.client"]
    assert any("[TARGET_FORBIDDEN]" in m for m in server_lines)
    assert any("not permitted" in m for m in client_lines)


async def test_session_end_frees_remote_port_at_once(
    nursery: trio.Nursery, tunnel_server: pytunnel.TunnelServer, echo_port: int
) -> None:
    """The same client can bind the same public port again immediately after reconnecting."""
    async with pytunnel.open_tunnel(tunnel_server.address, token=TOKEN) as tunnel:
        forward = await tunnel.forward_remote("127.0.0.1", echo_port)
        port = forward.listen_port
        assert await echo_once(forward.address, b"1") == b"1"
    async with pytunnel.open_tunnel(tunnel_server.address, token=TOKEN) as tunnel:
        forward = await tunnel.forward_remote("127.0.0.1", echo_port, remote_port=port)
        assert forward.listen_port == port
        assert await echo_once(forward.address, b"2") == b"2"


async def test_forward_closable_on_its_own(tunnel: pytunnel.Tunnel, echo_port: int) -> None:
    remote = await tunnel.forward_remote("127.0.0.1", echo_port)
    local = await tunnel.forward_local("127.0.0.1", echo_port)
    await remote.aclose()
    await local.aclose()
    assert remote.status is local.status is pytunnel.ForwardStatus.STOPPED
    assert tunnel.forwards == []
    for address in (remote.address, local.address):
        with pytest.raises(OSError, match="connect"):
            await trio.open_tcp_stream(*address)
    # the tunnel itself still works
    assert (
        await echo_once((await tunnel.forward_local("127.0.0.1", echo_port)).address, b"k") == b"k"
    )


async def test_idle_timeout_closes_relay(nursery: trio.Nursery, echo_port: int) -> None:
    server = await nursery.start(
        functools.partial(pytunnel.serve, 0, token=TOKEN, idle_timeout=0.2)
    )
    tunnel = await pytunnel.connect_tunnel(nursery, server.address, token=TOKEN, idle_timeout=0.2)
    forward = await tunnel.forward_local("127.0.0.1", echo_port)
    stream = await trio.open_tcp_stream(*forward.address)
    await stream.send_all(b"a")
    assert await stream.receive_some() == b"a"
    with trio.fail_after(5), pytest.raises(trio.BrokenResourceError):
        await stream.receive_some()  # reset by the idle timeout, never a clean EOF
    await stream.aclose()


async def test_wrong_token_and_unreachable_server(tunnel_server: pytunnel.TunnelServer) -> None:
    with pytest.raises(pytunnel.AuthenticationError) as info:
        async with pytunnel.open_tunnel(tunnel_server.address, token="nope"):
            pass  # pragma: no cover
    assert info.value.code == 1002
    with pytest.raises(pytunnel.ConnectError) as info2:
        async with pytunnel.open_tunnel(("127.0.0.1", closed_port()), token=TOKEN):
            pass  # pragma: no cover
    assert info2.value.code == 1001
    assert "Connection refused" in str(info2.value)


async def test_leaving_connect_block_leaves_nothing(
    tunnel_server: pytunnel.TunnelServer, echo_port: int
) -> None:
    await trio.sleep(0.05)
    tasks, fds = count_tasks(), count_fds()
    async with pytunnel.open_tunnel(tunnel_server.address, token=TOKEN) as tunnel:
        forward = await tunnel.forward_local("127.0.0.1", echo_port)
        remote = await tunnel.forward_remote("127.0.0.1", echo_port)
        held = [await trio.open_tcp_stream(*f.address) for f in (forward, remote) for _ in range(5)]
        for s in held:
            await s.send_all(b"x")
            assert await s.receive_some() == b"x"
    for s in held:
        # cut off mid-conversation: a reset (not a clean EOF that would fake completion)
        with trio.fail_after(1), pytest.raises(trio.BrokenResourceError):
            await s.receive_some()
        await s.aclose()
    await trio.sleep(0.1)
    assert tunnel.closed
    assert tunnel_server.session_count == 0
    assert count_tasks() == tasks
    assert count_fds() == fds


async def test_memory_stream_tunnel(nursery: trio.Nursery, echo_port: int) -> None:
    """The whole tunnel over an in-memory transport: server.handle_stream + wrap_tunnel."""
    server_config = pytunnel.ServerConfig(token=TOKEN)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    server = pytunnel.TunnelServer(server_config, listeners)
    a, b = trio.testing.memory_stream_pair()
    nursery.start_soon(server.handle_stream, b)
    tunnel = await pytunnel.wrap_tunnel(nursery, a, token=TOKEN)
    forward = await tunnel.forward_local("127.0.0.1", echo_port)
    assert await echo_once(forward.address, b"over memory") == b"over memory"
    await tunnel.aclose()
    for listener in listeners:
        await listener.aclose()


async def test_server_aclose_ends_clients(
    nursery: trio.Nursery, tunnel_server: pytunnel.TunnelServer, echo_port: int
) -> None:
    quitter = await pytunnel.connect_tunnel(
        nursery, tunnel_server.address, token=TOKEN, reconnect=False
    )
    stayer = await pytunnel.connect_tunnel(
        nursery, tunnel_server.address, token=TOKEN, backoff_initial=0.05
    )
    forward = await stayer.forward_local("127.0.0.1", echo_port)
    assert tunnel_server.session_count == 2
    with trio.fail_after(5):
        await tunnel_server.aclose()
        await quitter.wait_closed()
        while stayer.connected:
            await trio.sleep(0.01)
    assert isinstance(quitter.failure, pytunnel.SessionClosedError)
    with pytest.raises(OSError, match="connect"):
        await trio.open_tcp_stream(*tunnel_server.address)
    # the reconnecting client keeps its forward declared, suspended, and its port open
    assert not stayer.closed
    assert forward.status is pytunnel.ForwardStatus.SUSPENDED
    probe = await trio.open_tcp_stream(*forward.address)
    await probe.aclose()
    await stayer.aclose()
    assert forward.status is pytunnel.ForwardStatus.STOPPED


_ = os


# ------------------------------------------------------------------------ open then reset


async def _next_message(
    stream: trio.abc.ReceiveStream, decoder: FrameDecoder, kind: type[Message]
) -> Message:
    """The next message of type ``kind`` read from ``stream`` (others are skipped)."""
    while True:
        while (message := decoder.next_message()) is not None:
            if isinstance(message, kind):
                return message
        data = await stream.receive_some()
        assert data, "stream ended"
        decoder.receive_data(data)


async def _wait_for(predicate: Callable[[], bool], within: float) -> bool:
    """Poll ``predicate`` until it holds or ``within`` seconds pass (a hang detector)."""
    with trio.move_on_after(within):
        while not predicate():
            await trio.sleep(0.01)
        return True
    return predicate()


async def test_open_then_reset_releases_the_server_slot_and_cancels_the_dial(
    nursery: trio.Nursery, blackhole: Blackhole, echo_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="pytunnel.server")
    # the dial would hang for a minute: only the Reset can end it promptly
    server: pytunnel.TunnelServer = await nursery.start(
        functools.partial(pytunnel.serve, 0, token=TOKEN, connect_timeout=60.0)
    )
    stream = await trio.open_tcp_stream(*server.address)
    try:
        await client_handshake(stream, TOKEN, max_frame_size=2**20)
        pairs = 500
        burst = b"".join(
            encode_message(Open(2 * i + 1, 65536, "127.0.0.1", blackhole.port, routes.CONNECT))
            + encode_message(Reset(2 * i + 1, pytunnel.ErrorCode.CANCELLED, ""))
            for i in range(pairs)
        )
        # then one real open: once it is accepted, the server has admitted every stream before
        last = 2 * pairs + 1
        burst += encode_message(Open(last, 65536, "127.0.0.1", echo_port, routes.CONNECT))
        await stream.send_all(burst)
        with trio.fail_after(10):
            assert await _next_message(stream, FrameDecoder(2**20), Accept) == Accept(
                last, pytunnel.SessionConfig().window
            )
        # only the accepted stream holds a slot: the 500 dials were cancelled by their resets
        assert await _wait_for(lambda: server.active_streams == 1, 10.0), server.active_streams
        assert server.session_count == 1
        # each said so once, at debug level, and none was taken for a failed dial
        said = f"open of 127.0.0.1:{blackhole.port} cancelled during the dial"
        assert caplog.text.count(said) == pairs
        assert "NODE_" not in caplog.text
    finally:
        await stream.aclose()


async def test_public_connection_gives_up_when_the_client_never_answers(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    server: pytunnel.TunnelServer = await nursery.start(
        functools.partial(pytunnel.serve, 0, token=TOKEN, connect_timeout=0.5)
    )
    transport = await trio.open_tcp_stream(*server.address)
    result = await client_handshake(transport, TOKEN, max_frame_size=2**20)
    async with pytunnel.session.open_session(
        transport, pytunnel.session.Role.CLIENT, decoder=result.decoder
    ) as session:
        # a client that registers a forward and then never answers the server's opens
        control = await session.open_stream("", 0, tag=routes.LISTEN)
        bound = await _next_message(control, FrameDecoder(4096), Bound)
        assert isinstance(bound, Bound)
        conn = await trio.open_tcp_stream("127.0.0.1", bound.port)
        with trio.fail_after(10):  # hang detector; the server gives up after 0.5 s
            with contextlib.suppress(trio.BrokenResourceError):
                assert await conn.receive_some() == b""
        assert await _wait_for(lambda: server.active_streams == 0, 10.0)
        await conn.aclose()
    assert "did not answer a public connection" in caplog.text


async def test_public_connection_to_an_early_data_client_that_never_answers(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    """A version 2 client that takes early data: the server starts the relay at once (the
    public peer's first bytes reach the client before any answer), and its session's answer
    timer, not a wait, gives the connection up after ``connect_timeout``: reset, logged as
    before, nothing left open."""
    server: pytunnel.TunnelServer = await nursery.start(
        functools.partial(pytunnel.serve, 0, token=TOKEN, connect_timeout=0.5)
    )
    config = pytunnel.SessionConfig()
    transport = await trio.open_tcp_stream(*server.address)
    result = await client_handshake(
        transport, TOKEN, max_frame_size=2**20, early_window=config.early_window
    )
    assert result.version >= 2
    assert result.peer_early_window > 0
    async with result.open_session(
        transport, pytunnel.session.Role.CLIENT, config, name="client"
    ) as session:
        control = await session.open_stream("", 0, tag=routes.LISTEN)
        bound = await _next_message(control, FrameDecoder(4096), Bound)
        assert isinstance(bound, Bound)
        conn = await trio.open_tcp_stream("127.0.0.1", bound.port)
        await conn.send_all(b"first bytes")
        with trio.fail_after(10):
            await session.accept_stream()  # never answered
            await wait_until(lambda: session.bytes_buffered == len(b"first bytes"))
            with pytest.raises(trio.BrokenResourceError):  # a reset, not a clean end
                await conn.receive_some()
        assert await _wait_for(lambda: server.active_streams == 0, 10.0)
        await wait_until(lambda: session.bytes_buffered == 0)  # the server's Reset came
        await conn.aclose()
    assert "[NODE_TIMEOUT]" in caplog.text
    assert "did not answer a public connection within 0.5 s" in caplog.text


async def test_public_connection_given_up_by_the_server_cancels_the_client_dial(
    nursery: trio.Nursery, blackhole: Blackhole
) -> None:
    server: pytunnel.TunnelServer = await nursery.start(
        functools.partial(pytunnel.serve, 0, token=TOKEN, connect_timeout=0.5)
    )
    tunnel = await pytunnel.connect_tunnel(
        nursery, server.address, token=TOKEN, reconnect=False, probe_interval=0
    )
    # the client would wait a minute for its target; the server gives up after 0.5 s
    forward = await tunnel.forward_remote("127.0.0.1", blackhole.port, connect_timeout=60.0)
    tasks = count_tasks()
    conns = [await trio.open_tcp_stream("127.0.0.1", forward.listen_port) for _ in range(20)]
    with trio.fail_after(10):  # hang detector
        for conn in conns:
            with contextlib.suppress(trio.BrokenResourceError):
                assert await conn.receive_some() == b""
            await conn.aclose()
    # the server's Reset cancelled every dial at the client: its handler tasks are gone
    assert await _wait_for(lambda: count_tasks() <= tasks, 10.0), (count_tasks(), tasks)
    assert await _wait_for(lambda: server.active_streams == 0, 10.0)
    assert "NODE_TIMEOUT" not in forward.stats.errors
    assert tunnel.connected


# ------------------------------------------------------------------------ client stream cap


async def test_idle_listeners_hold_no_stream_slot(
    nursery: trio.Nursery, tunnel_server: pytunnel.TunnelServer, echo_port: int
) -> None:
    """With a cap of one stream, each of two idle forwards still serves its connection: a
    listener reserves a slot only once a connection is waiting for it."""
    tunnel = await pytunnel.connect_tunnel(
        nursery,
        tunnel_server.address,
        token=TOKEN,
        reconnect=False,
        probe_interval=0,
        session=pytunnel.SessionConfig(max_streams=1),
    )
    first = await tunnel.forward_local("127.0.0.1", echo_port)
    second = await tunnel.forward_local("127.0.0.1", echo_port)
    await trio.testing.wait_all_tasks_blocked()
    assert tunnel.session is not None
    assert tunnel.session.free_stream_slots == 1
    for forward in (second, first, second):
        with trio.fail_after(10):  # hang detector
            assert await echo_once(forward.address, b"through") == b"through"
        await wait_until(
            lambda: tunnel.session is not None and tunnel.session.free_stream_slots == 1
        )


async def test_server_logs_refusals_at_its_stream_limit_once_per_episode(
    nursery: trio.Nursery, echo_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pytunnel.server")
    server: pytunnel.TunnelServer = await nursery.start(
        functools.partial(pytunnel.serve, 0, token=TOKEN, max_streams=2)
    )
    tunnel = await pytunnel.connect_tunnel(
        nursery, server.address, token=TOKEN, reconnect=False, probe_interval=0
    )
    held = [await tunnel.open_stream("127.0.0.1", echo_port) for _ in range(2)]
    for _ in range(20):
        with pytest.raises(pytunnel.StreamLimitError):
            await tunnel.open_stream("127.0.0.1", echo_port)
    refusing = [r for r in caplog.records if "refusing streams" in r.getMessage()]
    assert len(refusing) == 1, [r.getMessage() for r in refusing]
    for stream in held:
        await stream.aclose()
    assert await _wait_for(lambda: server.active_streams == 0, 10.0)
    again = await tunnel.open_stream("127.0.0.1", echo_port)
    await again.aclose()
    assert any("admitted again after 20 refused" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------ invalid targets


async def test_forward_to_a_host_over_255_bytes_is_rejected_when_declared(
    tunnel: pytunnel.Tunnel,
) -> None:
    long_host = "a" * 300
    with pytest.raises(pytunnel.InvalidTargetError, match="at most 255"):
        await tunnel.forward_local(long_host, 80)
    with pytest.raises(pytunnel.InvalidTargetError, match="at most 255"):
        await tunnel.forward_remote(long_host, 80)
    with pytest.raises(pytunnel.InvalidTargetError):
        await tunnel.forward_local("localhost", 0)
    assert tunnel.forwards == []
    # a direct open of such a target is one refusal for its caller, not the tunnel's end
    with pytest.raises(pytunnel.InvalidTargetError):
        await tunnel.open_stream(long_host, 80)
    assert tunnel.connected


async def test_peer_supplied_hosts_are_logged_escaped(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    server: pytunnel.TunnelServer = await nursery.start(
        functools.partial(pytunnel.serve, 0, token=TOKEN, permit_open=["127.0.0.1:*"])
    )
    tunnel = await pytunnel.connect_tunnel(
        nursery, server.address, token=TOKEN, reconnect=False, probe_interval=0
    )
    caplog.clear()
    for host in ("evil\nFORGED server line", "fine.example\r\nFORGED"):
        with pytest.raises(pytunnel.TargetForbiddenError) as refused:
            await tunnel.open_stream(host, 80)
        assert "\n" not in str(refused.value)
    messages = [r.getMessage() for r in caplog.records if r.name == "pytunnel.server"]
    assert any("evil\\nFORGED server line" in m for m in messages), messages
    assert any("fine.example\\r\\nFORGED" in m for m in messages), messages
    assert not any("\n" in m or "\r" in m for m in messages), messages
    assert tunnel.connected


async def test_remote_forward_bind_hosts_are_logged_escaped(
    tunnel: pytunnel.Tunnel, caplog: pytest.LogCaptureFixture
) -> None:
    """A remote-forward request names the host to bind: the server's refusal and its log
    line carry it escaped, so a client cannot forge server log lines through it."""
    caplog.clear()
    with pytest.raises(pytunnel.PortNotAllowedError) as refused:
        await tunnel.forward_remote("127.0.0.1", 80, remote_host="x\nCRITICAL pytunnel: forged")
    assert "\n" not in str(refused.value)
    messages = [r.getMessage() for r in caplog.records if r.name == "pytunnel.server"]
    assert any("x\\nCRITICAL pytunnel: forged" in m for m in messages), messages
    assert not any("\n" in m for m in messages), messages
    assert tunnel.connected


# ------------------------------------------------------------------------ IPv6 end to end


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


ipv6 = pytest.mark.skipif(not _ipv6_loopback(), reason="::1 is not available on this machine")


@pytest.fixture
async def echo_port_v6(nursery: trio.Nursery) -> int:
    """The echo service on ``::1`` only, so a dial that went over IPv4 would be refused."""
    from helpers import echo_handler

    listeners = await nursery.start(functools.partial(trio.serve_tcp, echo_handler, 0, host="::1"))
    assert listeners[0].socket.family == socket.AF_INET6
    return int(listeners[0].socket.getsockname()[1])


async def _echo_over_ipv6(address: tuple[str, int], payload: bytes) -> bytes:
    assert address[0] == "::1"
    stream = await trio.open_tcp_stream(*address)
    try:
        assert stream.socket.family == socket.AF_INET6
        await stream.send_all(payload)
        await stream.send_eof()
        parts = []
        while chunk := await stream.receive_some():
            parts.append(chunk)
        return b"".join(parts)
    finally:
        await stream.aclose()


@ipv6
async def test_ipv6_forwards_bind_and_dial_loopback_v6(
    nursery: trio.Nursery, echo_port_v6: int
) -> None:
    """The control connection, both listeners and both dials on ``::1``."""
    server: pytunnel.TunnelServer = await nursery.start(
        functools.partial(pytunnel.serve, 0, token=TOKEN, host="::1", public_host="::1")
    )
    assert server.address[0] == "::1"
    tunnel = await pytunnel.connect_tunnel(
        nursery, f"[::1]:{server.address[1]}", token=TOKEN, reconnect=False
    )
    local = await tunnel.forward_local("::1", echo_port_v6, local_host="::1")
    remote = await tunnel.forward_remote("::1", echo_port_v6, remote_host="::1")
    for forward in (local, remote):
        assert forward.address[0] == "::1"
        assert forward.target == f"[::1]:{echo_port_v6}"
        payload = os.urandom(200_000)
        assert await _echo_over_ipv6(forward.address, payload) == payload
        await wait_until(lambda f=forward: f.stats.active_connections == 0)  # type: ignore[misc]
        assert forward.stats.total_connections == 1
        assert forward.stats.bytes_out == forward.stats.bytes_in == len(payload)
    stream = await tunnel.open_stream("::1", echo_port_v6)
    await stream.send_all(b"v6")
    await stream.send_eof()
    assert await stream.receive_some() == b"v6"
    await stream.aclose()
    await tunnel.aclose()


@ipv6
async def test_ipv6_target_through_socks(tunnel: pytunnel.Tunnel, echo_port_v6: int) -> None:
    """A SOCKS5 request with an IPv6 address (ATYP 4) is dialled at the server over IPv6."""
    forward = await tunnel.forward_dynamic()
    stream = await trio.open_tcp_stream("127.0.0.1", forward.listen_port)
    try:
        await stream.send_all(b"\x05\x01\x00")
        assert await stream.receive_some(2) == b"\x05\x00"
        request = socket.inet_pton(socket.AF_INET6, "::1") + echo_port_v6.to_bytes(2, "big")
        await stream.send_all(b"\x05\x01\x00\x04" + request)
        reply = b""
        with trio.fail_after(10):
            while len(reply) < 4 or len(reply) < (10 if reply[3] == 1 else 22):
                chunk = await stream.receive_some()
                assert chunk, reply
                reply += chunk
        assert reply[:2] == b"\x05\x00", reply
        await stream.send_all(b"six")
        assert await stream.receive_some() == b"six"
    finally:
        await stream.aclose()


async def test_client_survives_queued_opens_then_eof() -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    outcome: list[BaseException | None] = []

    async def fake_server() -> None:
        stream = await listeners[0].accept()
        await server_handshake(stream, TOKEN, max_frame_size=2**20)
        frames = b"".join(encode_message(Open(2 * i + 2, 65536, "x", 1, 999)) for i in range(50))
        await stream.send_all(frames)
        await stream.aclose()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fake_server)
            tunnel = await pytunnel.connect_tunnel(
                nursery, ("127.0.0.1", port), token=TOKEN, reconnect=False, probe_interval=0
            )
            with trio.fail_after(5):
                await tunnel.wait_closed()
        outcome.append(None)
    except BaseException as exc:
        outcome.append(exc)
    finally:
        await listeners[0].aclose()
    assert outcome == [None], repr(outcome)
    assert isinstance(tunnel.failure, pytunnel.SessionClosedError)


async def test_connect_does_not_wrap_cancelled(tunnel_server: pytunnel.TunnelServer) -> None:
    seen: list[BaseException] = []
    with trio.CancelScope() as scope:
        try:
            async with pytunnel.open_tunnel(tunnel_server.address, token=TOKEN) as _:
                scope.cancel()
                await trio.sleep(1)
        except BaseException as exc:
            seen.append(exc)
            raise
    assert len(seen) == 1
    assert isinstance(seen[0], trio.Cancelled), repr(seen)


async def test_an_idle_local_forward_connection_parks_no_wrapper_frames(
    tunnel: pytunnel.Tunnel, echo_port: int
) -> None:
    """With one connection through a local forward open and idle, each side's relay task
    is suspended in the relay with no wrapper coroutines above it that only hand the call
    on (thousands of idle connections would hold their frames), and the connection still
    echoes and closes cleanly afterwards."""
    forward = await tunnel.forward_local("127.0.0.1", echo_port)
    conn = await trio.open_tcp_stream(*forward.address)
    try:
        await conn.send_all(b"first")
        with trio.fail_after(10):
            assert await conn.receive_some() == b"first"
        await trio.testing.wait_all_tasks_blocked()
        chains = [names for task in live_tasks() if "relay" in (names := coroutine_names(task))]
        assert len(chains) == 2  # the client's relay and the server's
        for names in chains:
            above = names[: names.index("relay")]
            assert "_relay" not in above, names
            assert "_handle" not in above, names
        await conn.send_all(b"again")
        with trio.fail_after(10):
            assert await conn.receive_some() == b"again"
        await conn.send_eof()
        with trio.fail_after(10):
            assert await conn.receive_some() == b""
    finally:
        await conn.aclose()
    await wait_until(lambda: forward.stats.active_connections == 0)
