"""Fault injection, measured: latency, bandwidth, blackhole, resets, cut-offs, on a forward and
through the ``FaultyStream`` wrapper under a plain relay."""

from __future__ import annotations

import functools

import attrs
import pytest
import trio
import trio.testing
from helpers import open_pair, session_pair, tcp_stream_pair
from trio.testing import check_half_closeable_stream

import pytunnel
import pytunnel._direct
from pytunnel import StreamResetError
from pytunnel._relay import relay
from pytunnel.testing import FaultyStream

pytestmark = pytest.mark.timeout(60)


async def _rtt(stream: trio.SocketStream, payload: bytes = b"ping") -> float:
    start = trio.current_time()
    await stream.send_all(payload)
    got = b""
    while len(got) < len(payload):
        got += await stream.receive_some()
    return trio.current_time() - start


async def test_latency_is_added(tunnel: pytunnel.Tunnel, echo_port: int) -> None:
    """Every reply waits at least the latency (a causal bound: load only adds to it); once
    cleared, a round trip takes less than the latency it no longer pays."""
    latency = 1.0
    forward = await tunnel.forward_local("127.0.0.1", echo_port)
    stream = await trio.open_tcp_stream(*forward.address)
    forward.faults.set("in", latency=latency)  # on replies only
    with trio.fail_after(30):
        slow = [await _rtt(stream) for _ in range(3)]
    assert all(rtt >= latency for rtt in slow), slow
    forward.faults.clear()
    with trio.fail_after(30):
        assert await _rtt(stream) < latency
    await stream.aclose()


async def test_jitter_varies_the_latency(tunnel: pytunnel.Tunnel, echo_port: int) -> None:
    """With a jitter of +- J, some replies come sooner than the latency alone allows, and none
    sooner than latency - J. Ignoring the jitter would make every round trip >= the latency,
    since load only ever adds delay."""
    latency, jitter = 0.3, 0.25
    forward = await tunnel.forward_local("127.0.0.1", echo_port)
    stream = await trio.open_tcp_stream(*forward.address)
    forward.faults.set("in", latency=latency, jitter=jitter)
    with trio.fail_after(60):
        rtts = [await _rtt(stream) for _ in range(16)]
    assert all(rtt >= latency - jitter for rtt in rtts), rtts
    assert any(rtt < latency for rtt in rtts), rtts  # P(false failure) ~ 0.5**16 unloaded
    await stream.aclose()


async def test_bandwidth_is_limited(tunnel: pytunnel.Tunnel, echo_port: int) -> None:
    forward = await tunnel.forward_local("127.0.0.1", echo_port)
    bandwidth = 2_000_000
    forward.faults.set("out", bandwidth=bandwidth)  # 2 MB/s towards the target
    stream = await trio.open_tcp_stream(*forward.address)
    payload = b"b" * 2_000_000
    start = trio.current_time()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream.send_all, payload)
            got = 0
            while got < len(payload):
                got += len(await stream.receive_some())
    elapsed = trio.current_time() - start
    # the cap is a floor on the time (a causal bound; a loaded machine only adds to it)
    assert elapsed >= 0.99 * len(payload) / bandwidth, elapsed
    await stream.aclose()


async def test_blackhole_keeps_the_connection_open(tunnel: pytunnel.Tunnel, echo_port: int) -> None:
    """An application heartbeat over the connection detects the blackhole; nothing closes."""
    forward = await tunnel.forward_local("127.0.0.1", echo_port)
    stream = await trio.open_tcp_stream(*forward.address)
    with trio.fail_after(30):
        await _rtt(stream)
    forward.faults.set("out", blackhole=True)
    with trio.move_on_after(0.5) as heartbeat:
        await _rtt(stream)
    assert heartbeat.cancelled_caught  # no answer: the heartbeat notices
    forward.faults.clear()
    with trio.fail_after(30):
        await _rtt(stream, b"back")  # the same connection works again
    await stream.aclose()


async def test_reset_every_connection_now(tunnel: pytunnel.Tunnel, echo_port: int) -> None:
    forward = await tunnel.forward_local("127.0.0.1", echo_port)
    streams = [await trio.open_tcp_stream(*forward.address) for _ in range(3)]
    for s in streams:
        await _rtt(s)
    assert forward.faults.reset_connections() == 3
    for s in streams:
        with trio.fail_after(5), pytest.raises(trio.BrokenResourceError):
            await s.receive_some()  # a reset, not a clean EOF
        await s.aclose()


async def test_close_after_n_bytes_and_slicing(tunnel: pytunnel.Tunnel, echo_port: int) -> None:
    forward = await tunnel.forward_local("127.0.0.1", echo_port)
    forward.faults.set("in", slice_size=3, slice_delay=0.1)
    stream = await trio.open_tcp_stream(*forward.address)
    start = trio.current_time()
    await stream.send_all(b"abcdefghi")
    pieces = []
    with trio.fail_after(30):
        while sum(map(len, pieces)) < 9:
            pieces.append(await stream.receive_some())
    assert b"".join(pieces) == b"abcdefghi"
    # delivered in three slices with a pause between each (a causal floor on the time)
    assert trio.current_time() - start >= 2 * 0.1
    await stream.aclose()
    forward.faults.clear()
    forward.faults.set("in", close_after=5)  # counted per connection, like toxiproxy's limit
    stream = await trio.open_tcp_stream(*forward.address)
    await stream.send_all(b"0123456789")
    got = b""
    with trio.fail_after(5):
        while chunk := await stream.receive_some():  # then a clean close
            got += chunk
    assert got == b"01234"
    await stream.aclose()


def test_unknown_fault_is_rejected() -> None:
    faults = pytunnel.testing.Faults()
    with pytest.raises(TypeError, match="unknown fault"):
        faults.set(latenzy=1)
    with pytest.raises(ValueError, match="direction"):
        faults.set("sideways", latency=1)


# ---------------------------------------------------------------- the wrapper on its own


async def _wrapped_pair(
    faults: pytunnel.testing.Faults,
) -> tuple[trio.SocketStream, trio.SocketStream, FaultyStream, FaultyStream]:
    """Two loopback connections whose relay-side ends are wrapped as a relay's would be:
    ``left`` is the accepting side's peer, ``right`` the target's."""
    left, accepted = await tcp_stream_pair()
    right, toward_target = await tcp_stream_pair()
    wrapped_a, wrapped_b = faults.wrap(accepted, toward_target)
    return left, right, wrapped_a, wrapped_b


async def test_faulty_stream_without_faults_is_a_conforming_half_closeable_stream() -> None:
    async def maker() -> tuple[FaultyStream, FaultyStream]:
        faults = pytunnel.testing.Faults()
        a, b = await tcp_stream_pair()
        return FaultyStream(a, faults, "out"), FaultyStream(b, faults, "in")

    await check_half_closeable_stream(maker, None)


async def test_a_plain_relay_applies_faults_through_wrapped_streams() -> None:
    """The relay has no fault logic: wrapped streams alone add the latency, and an injected
    delay longer than the idle timeout is not idleness (the wrapper is ``paced``)."""
    faults = pytunnel.testing.Faults()
    faults.set("in", latency=0.6)
    left, right, a, b = await _wrapped_pair(faults)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(functools.partial(relay, a, b, idle_timeout=0.3))
        await left.send_all(b"ping")
        with trio.fail_after(10):
            assert await right.receive_some() == b"ping"  # "out" has no fault
        start = trio.current_time()
        await right.send_all(b"pong")
        with trio.fail_after(10):
            assert await left.receive_some() == b"pong"  # not reset after 0.3 s idle
        assert trio.current_time() - start >= 0.6
        await left.send_eof()
        await right.send_eof()
        with trio.fail_after(10):
            assert await left.receive_some() == b""
            assert await right.receive_some() == b""
    await left.aclose()
    await right.aclose()


async def test_close_after_ends_both_directions_of_a_plain_relay_cleanly() -> None:
    faults = pytunnel.testing.Faults()
    faults.set("out", close_after=3)
    left, right, a, b = await _wrapped_pair(faults)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(relay, a, b)
        await left.send_all(b"abcdef")
        got = b""
        with trio.fail_after(10):
            while chunk := await right.receive_some():  # a clean EOF, not a reset
                got += chunk
            assert await left.receive_some() == b""  # the other way closes too
    assert got == b"abc"
    assert faults.reset_connections() == 0  # the connection is gone from the faults
    await left.aclose()
    await right.aclose()


async def test_a_cut_interrupts_the_reader_waiting_on_the_idle_side() -> None:
    """``close_after`` fires on replies while the accepting side sends nothing: the relay's
    reader of that side is parked waiting for it, and the cut must end that wait, so the
    target sees the clean EOF without the idle side doing anything."""
    faults = pytunnel.testing.Faults()
    faults.set("in", close_after=3)
    left, right, a, b = await _wrapped_pair(faults)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(relay, a, b)
        await trio.sleep(0.05)  # the reader of the idle side parks (a wait either way)
        await right.send_all(b"abcdef")
        got = b""
        with trio.fail_after(10):
            while chunk := await left.receive_some():
                got += chunk
            assert await right.receive_some() == b""  # left never sent, closed or shut down
    assert got == b"abc"
    assert faults.reset_connections() == 0
    await left.aclose()
    await right.aclose()


async def test_a_reset_interrupts_both_parked_readers() -> None:
    """Both sides idle, both readers parked: ``reset_connections`` ends both waits and
    resets both connections (not a clean EOF on either)."""
    faults = pytunnel.testing.Faults()
    left, right, a, b = await _wrapped_pair(faults)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(relay, a, b)
        await left.send_all(b"x")
        with trio.fail_after(10):
            assert await right.receive_some() == b"x"
        assert faults.reset_connections() == 1
        for end in (left, right):
            with trio.fail_after(10), pytest.raises(trio.BrokenResourceError):
                await end.receive_some()
    await left.aclose()
    await right.aclose()


async def test_reset_connections_resets_a_mux_stream_through_its_wrapper() -> None:
    """``reset_connections`` breaks the wrapped pair; the relay's reset reaches the mux
    stream inside the wrapper (``reset`` is a capability, not a class check)."""
    faults = pytunnel.testing.Faults()
    async with session_pair("tcp") as (client, server):
        mine, theirs = await open_pair(client, server)
        outside, relay_side = await tcp_stream_pair()
        a, b = faults.wrap(relay_side, mine)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(relay, a, b)
            await outside.send_all(b"hi")
            with trio.fail_after(10):
                assert await theirs.receive_some() == b"hi"
            assert faults.reset_connections() == 1
            with trio.fail_after(10), pytest.raises(trio.BrokenResourceError) as info:
                await theirs.receive_some()
            with trio.fail_after(10), pytest.raises(trio.BrokenResourceError):
                await outside.receive_some()
        assert isinstance(info.value.__cause__, StreamResetError)
        assert faults.reset_connections() == 0
        await outside.aclose()
        await theirs.aclose()


async def test_close_after_exact_boundary(tunnel: pytunnel.Tunnel, echo_port: int) -> None:
    forward = await tunnel.forward_local("127.0.0.1", echo_port)
    forward.faults.set("in", close_after=5)
    stream = await trio.open_tcp_stream(*forward.address)
    await stream.send_all(b"01234")
    got = b""
    with trio.fail_after(3):  # the fault should close the connection after these 5 bytes
        while chunk := await stream.receive_some():
            got += chunk
    assert got == b"01234"
    await stream.aclose()


def test_faults_set_is_all_or_nothing() -> None:
    faults = pytunnel.testing.Faults()
    with pytest.raises(TypeError):
        faults.set(latency=1.0, latenzy=2.0)
    assert faults.out.latency == 0.0
    assert not faults.out.active


@pytest.mark.parametrize("name", [f.name for f in attrs.fields(pytunnel.testing.DirectionFaults)])
def test_active_is_any_fault_off_its_default(name: str) -> None:
    """``active`` (asked on every write) says exactly "differs from the defaults", for each
    fault alone, set through ``set`` or by assignment, and cleared again."""
    faults = pytunnel.testing.Faults()
    value = True if name == "blackhole" else 3
    faults.set("out", **{name: value})
    assert faults.out.active
    assert faults.out != pytunnel.testing.DirectionFaults()
    assert not faults.in_.active
    faults.clear()
    assert not faults.out.active
    setattr(faults.in_, name, value)
    assert faults.in_.active
    default = attrs.fields_dict(pytunnel.testing.DirectionFaults)[name].default
    setattr(faults.in_, name, default)
    assert not faults.in_.active


async def test_an_end_does_not_wake_a_socket_that_took_a_closed_readers_descriptor() -> None:
    """A reader whose socket was closed while it waited (woken, not yet run) still has its
    entry; the descriptor number may already belong to another socket. A reset then must not
    interrupt that other socket's wait."""
    faults = pytunnel.testing.Faults()
    left, right, a, b = await _wrapped_pair(faults)
    other, far = await tcp_stream_pair()
    closed, _peer = await tcp_stream_pair()
    stale = pytunnel._direct.SocketReader(closed.socket)
    await closed.aclose()  # its descriptor is gone: fileno() is -1 now
    link = a._link
    link.waiting.append((other.socket.fileno(), stale))  # as if the number were reused
    woken: list[BaseException] = []
    async with trio.open_nursery() as nursery:

        async def wait_on_other() -> None:
            try:
                await trio.lowlevel.wait_readable(other.socket)
            except trio.ClosedResourceError as exc:
                woken.append(exc)

        nursery.start_soon(wait_on_other)
        await trio.testing.wait_all_tasks_blocked()
        assert faults.reset_connections() == 1
        await trio.testing.wait_all_tasks_blocked()
        assert woken == []  # the unrelated socket's wait goes on
        await far.send_all(b"x")  # and ends the normal way
    link.waiting.clear()
    for s in (left, right, a, b, other, far, _peer):
        await s.aclose()
