"""A tunnel server faces the internet: hostile peers, hand-written clients, random frames."""

from __future__ import annotations

import contextlib
import functools
import logging

import pytest
import trio
import trio.testing
from helpers import TOKEN, Crash, count_fds, count_tasks, read_all, wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pytunnel
from pytunnel._handshake import client_handshake
from pytunnel.protocol import routes
from pytunnel.protocol.frames import FrameDecoder, encode_message
from pytunnel.protocol.messages import SESSION, GoAway, Open

pytestmark = pytest.mark.timeout(180)


async def test_nothing_before_authentication(tunnel_server: pytunnel.TunnelServer) -> None:
    """A stream request before the handshake gets a GoAway and a closed connection."""
    stream = await trio.open_tcp_stream(*tunnel_server.address)
    await stream.send_all(encode_message(Open(1, 1000, "127.0.0.1", 22, routes.CONNECT)))
    (goaway,) = FrameDecoder().feed(await read_all(stream))
    assert isinstance(goaway, GoAway)
    assert goaway.code == pytunnel.ErrorCode.UNEXPECTED_MESSAGE
    await stream.aclose()
    # a well-formed Hello with a wrong proof learns nothing but "authentication failed"
    stream = await trio.open_tcp_stream(*tunnel_server.address)
    with pytest.raises(pytunnel.AuthenticationError):
        await client_handshake(stream, "guess", max_frame_size=2**20)
    assert tunnel_server.session_count == 0


async def test_wrong_token_storm_is_throttled(
    nursery: trio.Nursery, echo_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    """2,000 wrong-token attempts from one address: refused cheaply after a few, no session,
    task or fd left behind, and an authenticated client elsewhere keeps working throughout."""
    caplog.set_level(logging.WARNING)
    server: pytunnel.TunnelServer = await nursery.start(
        functools.partial(
            pytunnel.serve, 0, token=TOKEN, auth_failure_burst=5, auth_failure_interval=600
        )
    )
    good = await pytunnel.connect_tunnel(nursery, server.address, token=TOKEN, reconnect=False)
    forward = await good.forward_local("127.0.0.1", echo_port)
    await trio.sleep(0.1)
    tasks, fds = count_tasks(), count_fds()
    outcomes: dict[str, int] = {}

    async def attacker(count: int) -> None:
        for _ in range(count):
            stream = await trio.open_tcp_stream(*server.address, local_address="127.0.0.2")
            try:
                await client_handshake(stream, "wrong-token-123", max_frame_size=2**20)
            except pytunnel.TunnelError as exc:
                name = type(exc).__name__
                outcomes[name] = outcomes.get(name, 0) + 1

    async def legit_traffic(done: trio.Event) -> None:
        while not done.is_set():
            conn = await trio.open_tcp_stream(*forward.address)
            await conn.send_all(b"still here")
            assert await conn.receive_some() == b"still here"
            await conn.aclose()
            await trio.sleep(0.01)

    done = trio.Event()
    async with trio.open_nursery() as storm:
        storm.start_soon(legit_traffic, done)
        async with trio.open_nursery() as attackers:
            for _ in range(50):
                attackers.start_soon(attacker, 40)
        done.set()
    assert sum(outcomes.values()) == 2_000
    # only attempts already in flight when the ban began (at most one per attacker task,
    # plus the first five) cost a handshake; everything else is refused up front
    assert outcomes["AuthenticationError"] <= 5 + 50
    assert outcomes["RateLimitedError"] >= 2_000 - 55
    assert server.session_count == 1
    # the last refused connections may still be closing: what is left must go, not grow
    await wait_until(
        lambda: count_tasks() <= tasks and count_fds() <= fds,
        what=lambda: f"tasks {count_tasks()} (was {tasks}), fds {count_fds()} (was {fds})",
    )
    assert any("throttled" in r.getMessage() for r in caplog.records)
    assert all("wrong-token-123" not in r.getMessage() for r in caplog.records)
    assert good.connected


async def test_policy_cannot_be_bypassed_by_a_modified_client(nursery: trio.Nursery) -> None:
    """A hand-written client that sends raw Open frames gets the same refusals."""
    server: pytunnel.TunnelServer = await nursery.start(
        functools.partial(
            pytunnel.serve,
            0,
            token=TOKEN,
            allow_ports="40000-40010",
            permit_open=["db.internal:5432"],
        )
    )
    stream = await trio.open_tcp_stream(*server.address)
    result = await client_handshake(stream, TOKEN, max_frame_size=2**20)
    async with pytunnel.session.open_session(
        stream,
        pytunnel.session.Role.CLIENT,
        decoder=result.decoder,
        peer_max_frame_size=result.peer_max_frame_size,
    ) as session:
        cases = [
            (("127.0.0.1", 22, routes.CONNECT), pytunnel.TargetForbiddenError),
            (("DB.internal", 5433, routes.CONNECT), pytunnel.TargetForbiddenError),
            (("", 0, routes.CONNECT), pytunnel.TargetForbiddenError),
            (("", 8080, routes.LISTEN), pytunnel.PortNotAllowedError),
            (("0.0.0.0", 40001, routes.LISTEN), pytunnel.PortNotAllowedError),
            (("127.0.0.1", 40001, 7), pytunnel.StreamRefusedError),  # unknown route
        ]
        for (host, port, tag), error in cases:
            with pytest.raises(error):
                await session.open_stream(host, port, tag=tag)
        assert not session.closed  # refusals, not a dead session


async def _fuzz_one(frames: list[bytes], authenticate: bool) -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    server = pytunnel.TunnelServer(
        pytunnel.ServerConfig(token=TOKEN, handshake_timeout=5, heartbeat_timeout=5), listeners
    )
    async with trio.open_nursery() as nursery:
        a, b = trio.testing.memory_stream_pair()
        nursery.start_soon(functools.partial(server.handle_stream, b, peer="fuzzer"))
        decoder = FrameDecoder(2**20)
        if authenticate:
            result = await client_handshake(a, TOKEN, max_frame_size=2**20)
            decoder = result.decoder
            decoder.layer = SESSION  # what follows are session frames (the server's ping)
        for frame in frames:
            try:
                await a.send_all(frame)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                break
        # whatever happened, the server answers with well-formed frames (or nothing)
        with trio.move_on_after(0.2):
            while data := await a.receive_some():
                decoder.receive_data(data)
                try:
                    while decoder.next_message() is not None:
                        pass
                except pytunnel.RemoteProtocolError as exc:  # pragma: no cover
                    raise AssertionError(f"server sent a malformed frame: {exc}") from exc
        # and it still serves a fresh, honest client
        c, d = trio.testing.memory_stream_pair()
        nursery.start_soon(server.handle_stream, d)
        tunnel = await pytunnel.wrap_tunnel(nursery, c, token=TOKEN, probe_interval=0)
        assert await tunnel.session.ping() >= 0  # type: ignore[union-attr]
        await tunnel.aclose()
        await a.aclose()
        nursery.cancel_scope.cancel()
    await listeners[0].aclose()


_field = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.text(max_size=20),
    st.binary(max_size=20),
    st.booleans(),
    st.none(),
)
_tags = st.sampled_from(
    [
        "open",
        "accept",
        "refuse",
        "data",
        "window",
        "fin",
        "reset",
        "ping",
        "pong",
        "goaway",
        "hello",
        "auth",
        "bound",
        "fwdstate",
        "nope",
    ]
)
_names = st.sampled_from(
    [
        "stream",
        "window",
        "host",
        "port",
        "tag",
        "code",
        "message",
        "data",
        "delta",
        "opaque",
        "versions",
        "nonce",
        "mac",
        "max_frame_size",
        "online",
        "reason",
    ]
)


@st.composite
def _frames(draw: st.DrawFn) -> bytes:
    import msgpack

    kind = draw(st.sampled_from(["message", "garbage", "huge"]))
    if kind == "garbage":
        body = draw(st.binary(max_size=64))
        return len(body).to_bytes(4, "big") + body
    if kind == "huge":
        return draw(st.integers(min_value=2**21, max_value=2**32 - 1)).to_bytes(4, "big")
    fields = draw(st.dictionaries(_names, _field, max_size=6))
    body = msgpack.packb({"t": draw(_tags), **fields})
    return len(body).to_bytes(4, "big") + body


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(frames=st.lists(_frames(), max_size=8), authenticate=st.booleans())
def test_fuzz_server_with_random_frames(frames: list[bytes], authenticate: bool) -> None:
    """Random frame sequences before and after authentication: the server only ever answers
    with typed protocol errors (GoAway) and a closed connection, and keeps serving others."""
    trio.run(_fuzz_one, frames, authenticate)


async def test_undialable_host_name_does_not_crash_the_server(nursery: trio.Nursery) -> None:
    crash = Crash()
    server: pytunnel.TunnelServer = await nursery.start(crash.serve)
    bystander = await pytunnel.connect_tunnel(
        nursery, server.address, token=TOKEN, reconnect=False, probe_interval=0
    )
    tunnel = await pytunnel.connect_tunnel(
        nursery, server.address, token=TOKEN, reconnect=False, probe_interval=0
    )
    # 'a' * 64 is a DNS label that is too long: a plain typo-level mistake, or a hostile client
    try:
        await tunnel.open_stream("a" * 64 + ".example", 80)
    except pytunnel.TunnelError as exc:
        refusal: BaseException = exc
    await trio.sleep(0.2)
    assert crash.error is None, repr(crash.error)
    assert isinstance(refusal, pytunnel.StreamRefusedError), repr(refusal)
    assert bystander.connected


async def test_queued_opens_then_eof_do_not_crash_the_server(nursery: trio.Nursery) -> None:
    crash = Crash()
    server: pytunnel.TunnelServer = await nursery.start(crash.serve)
    for _ in range(5):
        stream = await trio.open_tcp_stream(*server.address)
        await client_handshake(stream, TOKEN, max_frame_size=2**20)
        # 50 opens on an unknown route (refused in _ClientSession.run), then the link drops
        frames = b"".join(encode_message(Open(2 * i + 1, 65536, "x", 1, 77)) for i in range(50))
        await stream.send_all(frames)
        await stream.aclose()
        await trio.sleep(0.1)
        if crash.error is not None:
            break
    assert crash.error is None, repr(crash.error)


async def test_server_stream_limit_holds_for_a_burst(nursery: trio.Nursery, echo_port: int) -> None:
    server: pytunnel.TunnelServer = await nursery.start(
        functools.partial(pytunnel.serve, 0, token=TOKEN, max_streams=2)
    )
    tunnel = await pytunnel.connect_tunnel(
        nursery, server.address, token=TOKEN, reconnect=False, probe_interval=0
    )
    opened: list[trio.abc.Stream] = []

    async def one() -> None:
        with contextlib.suppress(pytunnel.StreamLimitError):
            opened.append(await tunnel.open_stream("127.0.0.1", echo_port))

    async with trio.open_nursery() as burst:
        for _ in range(20):
            burst.start_soon(one)
    await trio.sleep(0.1)
    peak = server.active_streams
    for s in opened:
        await s.aclose()
    assert len(opened) <= 2, (len(opened), peak)
    assert peak <= 2, (len(opened), peak)


async def test_cancelled_open_during_server_dial_does_not_crash_the_server(
    nursery: trio.Nursery, blackhole: object
) -> None:
    crash = Crash()
    server: pytunnel.TunnelServer = await nursery.start(
        functools.partial(crash.serve, connect_timeout=0.5)
    )
    tunnel = await pytunnel.connect_tunnel(
        nursery, server.address, token=TOKEN, reconnect=False, probe_interval=0
    )
    with trio.move_on_after(0.1):  # an impatient caller: a plain timeout around open_stream
        await tunnel.open_stream("127.0.0.1", blackhole.port)  # type: ignore[attr-defined]
    await trio.sleep(1.0)  # the server's dial times out and it answers the (reset) stream
    assert crash.error is None, repr(crash.error)
    assert tunnel.connected
