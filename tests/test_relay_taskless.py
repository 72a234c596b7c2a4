"""The taskless direction of a relay: from a mux stream into a socket, an idle relay runs that
direction without a task of its own (the session's reader writes what arrives), starts one only
when a reader is needed (the socket would block, EOF, a break, a close) and hands the direction
back once everything was read.

Over real loopback sockets: a session over TCP, relays at the accepting end into real TCP
connections whose far ends the tests hold. Each test checks the task count it is about (the
relays' tasks, found by name), so a regression that brought the second task back, or left one
running after a burst, fails here, as does any lost, reordered or unfinished byte.
"""

from __future__ import annotations

import contextlib
import functools
import socket
import struct

import pytest
import trio
import trio.testing
from helpers import (
    coroutine_names,
    live_tasks,
    open_pair,
    receive_exactly,
    session_pair,
    tcp_stream_pair,
    wait_until,
)

from pytunnel._build import compiled_modules
from pytunnel._relay import RelayStats, relay
from pytunnel.session import MuxStream
from pytunnel.testing import Faults

pytestmark = pytest.mark.timeout(60)

SMALL_BUFFER = 16 * 1024


async def _small_buffered_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    """A loopback connection whose both ends ask for ``SMALL_BUFFER`` socket buffers: a
    burst into it blocks the writer soon."""
    pair = await tcp_stream_pair()
    for stream in pair:
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_BUFFER)
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUFFER)
    return pair


def _relay_tasks() -> int:
    """Tasks running a relay or one of its directions (the relay's own task included)."""
    return sum(1 for task in live_tasks() if "relay" in task.name or "_Taskless" in task.name)


class _TaskNames(trio.abc.Instrument):
    """The names of the tasks spawned while installed."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def task_spawned(self, task: trio.lowlevel.Task) -> None:
        self.names.append(task.name)


def _pattern(size: int, seed: int) -> bytes:
    return bytes((seed * 131 + i * 7 + (i >> 8)) & 0xFF for i in range(size))


async def _receive_exactly(stream: trio.SocketStream, size: int) -> bytes:
    with trio.fail_after(10):
        return await receive_exactly(stream, size)


async def _read_until_eof(stream: trio.abc.ReceiveStream) -> bytes:
    got = bytearray()
    with trio.fail_after(10):
        while chunk := await stream.receive_some(65536):
            got += chunk
    return bytes(got)


async def test_idle_relays_hold_one_task_each_in_both_directions() -> None:
    """Twenty relays, each from an accepted stream into a TCP connection, carry a message
    each way and then sit idle: one task per relay (its own, on the socket's side); the
    stream's side took every byte without a task, directly."""
    async with session_pair("tcp") as (client, server):
        async with trio.open_nursery() as nursery:
            before = _relay_tasks()
            pairs = []
            for _ in range(20):
                opened, accepted = await open_pair(client, server)
                assert isinstance(accepted, MuxStream)
                target, relayed = await tcp_stream_pair()
                nursery.start_soon(functools.partial(relay, accepted, relayed, idle_timeout=30))
                pairs.append((opened, accepted, target))
            for i, (opened, _accepted, target) in enumerate(pairs):
                message = _pattern(100 + i, i)
                await opened.send_all(message)
                assert await _receive_exactly(target, len(message)) == message
                await target.send_all(b"back")
                with trio.fail_after(10):
                    assert await opened.receive_some() == b"back"
            await trio.testing.wait_all_tasks_blocked()
            assert _relay_tasks() - before == 20
            for i, (_opened, accepted, _target) in enumerate(pairs):
                assert accepted.bytes_delivered_directly == 100 + i
            nursery.cancel_scope.cancel()
        for opened, _accepted, target in pairs:
            await target.aclose()
            await opened.aclose()


async def test_a_burst_into_a_slow_socket_starts_a_task_that_ends_when_drained() -> None:
    """Far more than the socket takes at once, into small socket buffers: the socket would
    block, so a task starts and copies the rest (every byte in order); once the target has
    read everything the task ends and the relay is back to one task, and the next small
    message goes directly again."""
    async with session_pair("tcp") as (client, server):
        opened, accepted = await open_pair(client, server)
        assert isinstance(accepted, MuxStream)
        target, relayed = await _small_buffered_pair()
        async with trio.open_nursery() as nursery:
            before = _relay_tasks()
            nursery.start_soon(functools.partial(relay, accepted, relayed, idle_timeout=30))
            await trio.testing.wait_all_tasks_blocked()
            assert _relay_tasks() - before == 1
            payload = _pattern(2_000_000, 5)
            nursery.start_soon(opened.send_all, payload)
            await wait_until(lambda: accepted.bytes_buffered > 0)
            await trio.testing.wait_all_tasks_blocked()
            assert _relay_tasks() - before == 2, "no task took over from the blocked writer"
            assert await _receive_exactly(target, len(payload)) == payload
            await trio.testing.wait_all_tasks_blocked()
            assert _relay_tasks() - before == 1, "the task did not end once drained"
            direct = accepted.bytes_delivered_directly
            await opened.send_all(b"after")
            assert await _receive_exactly(target, 5) == b"after"
            assert accepted.bytes_delivered_directly == direct + 5
            nursery.cancel_scope.cancel()
        await target.aclose()
        await opened.aclose()


async def test_eof_on_the_taskless_side_is_carried_then_the_relay_ends_cleanly() -> None:
    """The opener half-closes while the relay is idle: the target reads the data, then EOF;
    the target answers and half-closes too, and the relay ends with a clean close (the opener
    reads the answer, then EOF, never a reset)."""
    async with session_pair("tcp") as (client, server):
        opened, accepted = await open_pair(client, server)
        target, relayed = await tcp_stream_pair()
        stats = RelayStats()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                functools.partial(relay, accepted, relayed, idle_timeout=30, stats=stats)
            )
            await trio.testing.wait_all_tasks_blocked()
            await opened.send_all(b"request")
            await opened.send_eof()
            assert await _read_until_eof(target) == b"request"
            await target.send_all(b"answer")
            await target.send_eof()
            assert await _read_until_eof(opened) == b"answer"
        assert stats.active_connections == 0
        assert stats.bytes_out == len(b"request")
        assert stats.bytes_in == len(b"answer")
        await target.aclose()
        await opened.aclose()


async def test_the_socket_side_ending_first_leaves_the_taskless_side_running_to_eof() -> None:
    """The target half-closes first, the relay's own direction ends; the stream's direction,
    taskless until then, is run to its EOF (the relay waits for it, and the direction does not
    go idle again even once it has read everything): more than the socket takes at once, read
    in full before anything else is sent, then a small message, then EOF, all reach the
    target, and the relay ends cleanly."""
    async with session_pair("tcp") as (client, server):
        opened, accepted = await open_pair(client, server)
        target, relayed = await _small_buffered_pair()
        big, small = _pattern(500_000, 1), _pattern(10, 2)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(functools.partial(relay, accepted, relayed, idle_timeout=30))
            await trio.testing.wait_all_tasks_blocked()
            await target.send_eof()
            assert await _read_until_eof(opened) == b""
            await trio.testing.wait_all_tasks_blocked()
            await opened.send_all(big)
            await trio.sleep(0.1)  # let the socket fill: the relay's task carries the rest
            assert await _receive_exactly(target, len(big)) == big
            await trio.testing.wait_all_tasks_blocked()
            await opened.send_all(small)
            await opened.send_eof()
            assert await _read_until_eof(target) == small
        await target.aclose()
        await opened.aclose()


async def test_a_reset_while_idle_resets_the_target_and_ends_the_relay() -> None:
    """The opener resets its stream while the relay has no task on that side: the target's
    connection is reset (not closed cleanly), and the relay ends."""
    async with session_pair("tcp") as (client, server):
        opened, accepted = await open_pair(client, server)
        target, relayed = await tcp_stream_pair()
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(functools.partial(relay, accepted, relayed, idle_timeout=30))
                await trio.testing.wait_all_tasks_blocked()
                opened.reset()
                with pytest.raises(trio.BrokenResourceError):
                    await _read_until_eof(target)
        await target.aclose()


@pytest.mark.parametrize("locally", [True, False])
async def test_a_session_ending_while_idle_ends_every_relay(locally: bool) -> None:
    """The accepting session is closed (locally) or loses its transport (the peer's end goes)
    while ten relays sit idle with no task on the stream's side: every relay ends, every
    target connection is closed or reset, no task is left. A stream that breaks (the
    transport lost) resets its connection at once and starts no task for its side: the
    relay's own task, woken by the closed socket, ends the relay."""
    spawned = _TaskNames()
    trio.lowlevel.add_instrument(spawned)
    async with session_pair("tcp") as (client, server):
        targets = []
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                before = _relay_tasks()
                for _ in range(10):
                    _opened, accepted = await open_pair(client, server)
                    target, relayed = await tcp_stream_pair()
                    targets.append(target)
                    nursery.start_soon(functools.partial(relay, accepted, relayed, idle_timeout=30))
                await trio.testing.wait_all_tasks_blocked()
                assert _relay_tasks() - before == 10
                if locally:
                    await server.aclose()
                else:
                    await client.aclose()
            for target in targets:
                with contextlib.suppress(trio.BrokenResourceError):
                    assert await _read_until_eof(target) == b""
        assert _relay_tasks() == before
        started = sum(1 for name in spawned.names if "_Taskless" in name)
        assert started == (10 if locally else 0)
        for target in targets:
            await target.aclose()
    trio.lowlevel.remove_instrument(spawned)


async def test_a_fault_wrapper_passes_the_taskless_direction_through() -> None:
    """Through the fault wrapper every ``-L`` relay runs in, with no fault set, the stream's
    direction is taskless too; a fault set later applies (``close_after`` cuts both ways)."""
    faults = Faults()
    async with session_pair("tcp") as (client, server):
        opened, accepted = await open_pair(client, server)
        assert isinstance(accepted, MuxStream)
        target, relayed = await tcp_stream_pair()
        async with trio.open_nursery() as nursery:
            before = _relay_tasks()
            # as -L wraps them: the accepted connection first, the stream towards the target
            nursery.start_soon(
                functools.partial(relay, relayed, accepted, idle_timeout=30, faults=faults)
            )
            await trio.testing.wait_all_tasks_blocked()
            assert _relay_tasks() - before == 1
            await opened.send_all(b"x" * 100)
            assert await _receive_exactly(target, 100) == b"x" * 100
            assert accepted.bytes_delivered_directly == 100
            faults.set("in", close_after=150)
            await opened.send_all(b"y" * 100)
            assert await _read_until_eof(target) == b"y" * 50
            assert await _read_until_eof(opened) == b""
        await target.aclose()
        await opened.aclose()


async def test_a_target_reset_while_idle_breaks_the_opener() -> None:
    """The target resets while the relay is idle: the relay's own task sees it, and the
    opener's stream breaks (a reset crosses the tunnel), whether or not data was on its way."""
    async with session_pair("tcp") as (client, server):
        opened, accepted = await open_pair(client, server)
        target, relayed = await tcp_stream_pair()
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(functools.partial(relay, accepted, relayed, idle_timeout=30))
                await trio.testing.wait_all_tasks_blocked()
                target.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                await target.aclose()
                with pytest.raises(trio.BrokenResourceError):
                    await _read_until_eof(opened)
        await opened.aclose()


@pytest.mark.parametrize("size", [100, 400_000])
async def test_data_buffered_before_the_relay_starts_goes_out_without_a_task(size: int) -> None:
    """What arrived before the relay started (early data, at the side that dials) is written
    into the socket when the relay starts, in order, with no task for it when the socket
    takes it all; more than the socket takes (within the window, so the opener is not held
    back) has a task carry the rest, and every byte
    arrives once, in order, before what is sent later."""
    spawned = _TaskNames()
    async with session_pair("tcp") as (client, server):
        opened, accepted = await open_pair(client, server)
        assert isinstance(accepted, MuxStream)
        target, relayed = await _small_buffered_pair()
        pieces = [_pattern(size // 4 + i, i) for i in range(4)]
        for piece in pieces:
            await opened.send_all(piece)
        total = sum(map(len, pieces))
        await wait_until(lambda: accepted.bytes_received == total)
        got: list[bytes] = []

        async def read() -> None:
            got.append(await _receive_exactly(target, total + 5))

        trio.lowlevel.add_instrument(spawned)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read)
                nursery.start_soon(functools.partial(relay, accepted, relayed, idle_timeout=30))
                await wait_until(lambda: accepted.bytes_buffered == 0)
                await opened.send_all(b"later")
                await wait_until(lambda: bool(got))
                nursery.cancel_scope.cancel()
        finally:
            trio.lowlevel.remove_instrument(spawned)
        assert got == [b"".join(pieces) + b"later"]
        started = sum(1 for name in spawned.names if "_Taskless" in name)
        if size == 100:
            assert started == 0
            assert accepted.bytes_delivered_directly == total + 5
        else:
            assert started >= 1
        await target.aclose()
        await opened.aclose()


@pytest.mark.parametrize("wrapped", [False, True], ids=["plain", "fault-wrapper"])
async def test_an_idle_relay_is_parked_in_trio_right_under_its_pump(wrapped: bool) -> None:
    """An idle relay's task waits in trio's ``wait_readable`` directly from the pump (with
    the fault wrapper: from its linked reader's wait): no read-loop or reader coroutines in
    between, whose frames thousands of idle relays would each hold. It still carries a
    message each way and its EOFs afterwards."""
    async with session_pair("tcp") as (client, server):
        async with trio.open_nursery() as nursery:
            opened, accepted = await open_pair(client, server)
            target, relayed = await tcp_stream_pair()
            a: trio.abc.HalfCloseableStream = accepted
            b: trio.abc.HalfCloseableStream = relayed
            if wrapped:
                a, b = Faults().wrap(accepted, relayed)
            nursery.start_soon(functools.partial(relay, a, b, idle_timeout=30), name="idle-relay")
            await trio.testing.wait_all_tasks_blocked()
            (task,) = [t for t in live_tasks() if t.name == "idle-relay"]
            chain = coroutine_names(task)
            if "pytunnel._relay" in compiled_modules():
                # trio runs a compiled coroutine under its own wrapper, and what the compiled
                # relay awaits cannot be walked: only the top can be checked
                assert chain == ["python_wrapper", "relay"]
            else:
                below = ["wait"] if wrapped else []
                assert chain[: 3 + len(below)] == ["relay", "_pump", *below, "wait_readable"]
            await opened.send_all(b"ping")
            assert await _receive_exactly(target, 4) == b"ping"
            await target.send_all(b"pong")
            with trio.fail_after(10):
                assert await opened.receive_some() == b"pong"
            await opened.send_eof()
            assert await _read_until_eof(target) == b""
            await target.send_eof()
            assert await _read_until_eof(opened) == b""
        await target.aclose()
        await opened.aclose()
