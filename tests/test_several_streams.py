"""Several streams sending bulk at once through one session over real loopback TCP: relays
that had to wait for the write buffer still send whole reads as one Data frame each, senders
parked for room are woken only as far as the room takes them, and none is left waiting when
a sender woken before it does not use its room."""

from __future__ import annotations

import random
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio
import trio.testing
from helpers import count_tasks, open_pair, read_to_eof, tcp_stream_pair

from pytunnel import SessionConfig
from pytunnel._relay import relay
from pytunnel.session import Role, Session, open_session

#: Small frames and a mark of one frame: every sender parks for room at almost every frame.
_CONFIG = SessionConfig(write_buffer_high=64 * 1024, max_data_chunk=64 * 1024)

_Pair = tuple[trio.abc.HalfCloseableStream, trio.abc.HalfCloseableStream]


@asynccontextmanager
async def _congested(
    streams: int, config: SessionConfig = _CONFIG
) -> AsyncIterator[tuple[Session, Session, trio.SocketStream, list[_Pair]]]:
    """A client and a server session over loopback TCP with kernel buffers small enough
    that the client's writer soon meets a full socket, ``streams`` streams opened from the
    client (ports 1, 2, ...), and the server's socket itself, for a test that stops the
    server session and reads the bytes raw (:func:`_drain`)."""
    a, b = await tcp_stream_pair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
    b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    async with (
        open_session(a, Role.CLIENT, config) as client,
        open_session(b, Role.SERVER, config) as server,
    ):
        pairs = [await open_pair(client, server, host="t", port=i + 1) for i in range(streams)]
        yield client, server, b, pairs


async def _drain(far: trio.SocketStream) -> None:
    """Read the server's socket raw until EOF: with the server session stopped, this is
    what makes room in the client's writer again."""
    while await far.receive_some(1 << 20):
        pass


class _Steps(trio.abc.Instrument):
    """Counts the scheduler steps of the tasks in ``tasks``."""

    def __init__(self) -> None:
        self.tasks: set[trio.lowlevel.Task] = set()
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task in self.tasks:
            self.steps += 1


async def test_parked_senders_are_woken_only_as_far_as_the_room_takes_them() -> None:
    """Eight senders of 1 MiB each share a 64 KiB write buffer over a socket that fills:
    every frame but the first makes its sender wait for room. Each time the writer makes
    room for one frame it wakes one sender, not all eight (of which seven would only park
    again): the senders' scheduler steps stay near one per frame, and every byte arrives."""
    rng = random.Random(7)
    payloads = [rng.randbytes(1024 * 1024) for _ in range(8)]
    steps = _Steps()
    tasks_before = count_tasks()
    with trio.fail_after(120):
        async with _congested(8) as (client, _, _, pairs):
            received: dict[int, bytes] = {}

            async def send(i: int) -> None:
                steps.tasks.add(trio.lowlevel.current_task())
                await pairs[i][0].send_all(payloads[i])
                await pairs[i][0].send_eof()

            async def receive(i: int) -> None:
                received[i] = await read_to_eof(pairs[i][1])

            trio.lowlevel.add_instrument(steps)
            try:
                async with trio.open_nursery() as nursery:
                    for i in range(8):
                        nursery.start_soon(receive, i)
                        nursery.start_soon(send, i)
            finally:
                trio.lowlevel.remove_instrument(steps)
            assert not client._room_waiters
            for mine, theirs in pairs:
                await mine.aclose()
                await theirs.aclose()
    for i, payload in enumerate(payloads):
        assert received[i] == payload, f"stream {i} arrived damaged"
    frames = sum(map(len, payloads)) // _CONFIG.max_data_chunk
    # one wake-up per frame, plus each sender's first and last steps; waking all eight
    # senders per frame made about seven steps per frame
    assert steps.steps <= 2 * frames + 4 * len(payloads), f"{steps.steps} steps, {frames} frames"
    assert count_tasks() == tasks_before


async def test_senders_woken_for_room_that_break_instead_strand_no_one() -> None:
    """Senders parked for room whose streams are reset (by us, while they wait) are woken
    in their turn and raise; the senders behind them still get their room and finish, and
    no waiter is left behind. The peer's reading is stopped until all of them wait, so the
    reset ones are at the head of the line when the writer makes room again."""
    with trio.fail_after(120):
        async with _congested(6) as (client, server, far, pairs):
            # the server session stops reading: its socket fills and the client's writer blocks
            server._cancel_scope.cancel()
            outcomes: dict[int, str] = {}

            async def send(i: int) -> None:
                try:
                    await pairs[i][0].send_all(b"x" * (512 * 1024))
                    outcomes[i] = "sent"
                except trio.ClosedResourceError:
                    outcomes[i] = "closed"

            async with trio.open_nursery() as nursery:
                for i in range(6):
                    nursery.start_soon(send, i)
                    await trio.testing.wait_all_tasks_blocked()
                waiting = len(client._room_waiters)
                # the first three in line are reset while they wait for room
                for mine, _ in pairs[:3]:
                    mine.reset()

                nursery.start_soon(_drain, far)
                while len(outcomes) < 6:
                    await trio.sleep(0.01)
                nursery.cancel_scope.cancel()
            assert waiting >= 5, f"only {waiting} senders waited for room"
            assert outcomes == {0: "closed", 1: "closed", 2: "closed"} | {
                3: "sent",
                4: "sent",
                5: "sent",
            }, outcomes
            assert not client._room_waiters


async def test_cancelled_room_waiters_leave_nothing_behind() -> None:
    """Forty senders wait for room; thirty of them are cancelled while they wait. The ten
    left still get their room and finish once the peer reads again, and the line of waiters
    is empty afterwards (cancelled waiters are not kept)."""
    with trio.fail_after(120):
        async with _congested(40) as (client, server, far, pairs):
            server._cancel_scope.cancel()  # stops reading: the client's writer blocks
            sent: list[int] = []

            async def send(i: int, scope: trio.CancelScope) -> None:
                with scope:
                    await pairs[i][0].send_all(b"y" * (128 * 1024))
                    sent.append(i)

            scopes = [trio.CancelScope() for _ in range(40)]
            async with trio.open_nursery() as nursery:
                for i in range(40):
                    nursery.start_soon(send, i, scopes[i])
                await trio.testing.wait_all_tasks_blocked()
                assert len(client._room_waiters) >= 35
                for scope in scopes[:30]:
                    scope.cancel()
                await trio.testing.wait_all_tasks_blocked()
                # cancelled waiters are marked and compacted, never woken
                assert sum(w.task is not None for w in client._room_waiters) <= 10
                nursery.start_soon(_drain, far)
                while not set(range(30, 40)) <= set(sent):
                    await trio.sleep(0.01)
                nursery.cancel_scope.cancel()
            # (a sender or two may have finished before the socket filled)
            assert len(sent) <= 12, sent
            assert not client._room_waiters


async def test_relays_that_wait_for_room_still_send_whole_reads_as_one_frame() -> None:
    """Four relays copy a socket each into a stream of one session whose transport is
    congested, so most chunks they read do not fit the write buffer at once and wait for
    room. What waited still crosses as Data frames of up to a whole read (256 KiB), not cut
    into 64 KiB pieces: the far side receives its bytes in chunks of more than 64 KiB.
    (Each chunk ``receive_some()`` returns to a reader with no relay is one Data frame.)"""
    size = 4 * 1024 * 1024
    rng = random.Random(3)
    payloads = [rng.randbytes(size) for _ in range(4)]
    chunks: dict[int, list[int]] = {i: [] for i in range(4)}
    received: dict[int, bytes] = {}
    tasks_before = count_tasks()
    with trio.fail_after(120):
        async with (
            _congested(4, SessionConfig()) as (_, _, _, pairs),
            trio.open_nursery() as nursery,
        ):
            for i in range(4):
                outer, inner = await tcp_stream_pair()

                async def feed(stream: trio.SocketStream, data: bytes) -> None:
                    await stream.send_all(data)
                    await stream.send_eof()
                    await stream.receive_some()  # until the relay closes it

                async def receive(i: int) -> None:
                    parts = []
                    while chunk := await pairs[i][1].receive_some():
                        chunks[i].append(len(chunk))
                        parts.append(chunk)
                    received[i] = b"".join(parts)
                    await pairs[i][1].aclose()

                nursery.start_soon(relay, inner, pairs[i][0])
                nursery.start_soon(feed, outer, payloads[i])
                nursery.start_soon(receive, i)
    for i, payload in enumerate(payloads):
        assert received[i] == payload, f"stream {i} arrived damaged"
    sizes = [n for i in range(4) for n in chunks[i]]
    large = sum(n for n in sizes if n > 64 * 1024)
    # cut into 64 KiB pieces, none would be larger
    assert large >= 2 * size, f"{large} of {4 * size} bytes in frames over 64 KiB: {sizes[:40]}"
    assert count_tasks() == tasks_before


async def test_a_send_parks_or_checkpoints_once_and_one_that_fits_still_checkpoints() -> None:
    """A ``send_all`` that fits at once ends with a checkpoint, as every trio operation; one
    that had to wait for room has yielded already and adds no scheduler pass of its own: a
    sender parked behind another stream's bulk is woken once, and that step finishes it."""
    steps = _Steps()
    with trio.fail_after(60):
        async with _congested(2) as (client, server, far, pairs):
            (bulk, _), (mine, theirs) = pairs
            with trio.testing.assert_checkpoints():
                await mine.send_all(b"z" * 1000)
            assert await theirs.receive_some() == b"z" * 1000
            server._cancel_scope.cancel()  # the peer stops reading: the link is congested
            done: list[str] = []

            async def send() -> None:
                steps.tasks.add(trio.lowlevel.current_task())
                await mine.send_all(b"w" * 1000)
                done.append("sent")

            trio.lowlevel.add_instrument(steps)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(bulk.send_all, b"x" * (1024 * 1024))
                    await trio.testing.wait_all_tasks_blocked()
                    assert len(client._room_waiters) == 1  # the bulk sender waits for room
                    nursery.start_soon(send)
                    await trio.testing.wait_all_tasks_blocked()
                    assert len(client._room_waiters) == 2  # and the small one behind it
                    before = steps.steps
                    nursery.start_soon(_drain, far)
                    while not done:
                        await trio.sleep(0.01)
                    await trio.testing.wait_all_tasks_blocked()
                    # woken once; that step queued the bytes and returned
                    assert steps.steps == before + 1
                    nursery.cancel_scope.cancel()
            finally:
                trio.lowlevel.remove_instrument(steps)
