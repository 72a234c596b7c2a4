"""What the session keeps the same in the pure and the compiled build: the names of its tasks,
and the causes of the errors it raises.

Compiled by mypyc (``pytunnel._session``), a method has no module for trio to name its task
after, and a ``raise ... from`` may lose its ``from``; these tests hold either build to what the
pure one did.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing
from helpers import live_tasks, session_pair

from pytunnel import ErrorCode, LocalProtocolError, SessionClosedError, SessionConfig
from pytunnel.protocol.frames import encode_message
from pytunnel.protocol.messages import GoAway
from pytunnel.session import Role, open_session

pytestmark = pytest.mark.timeout(30)


async def test_the_session_tasks_are_named_after_their_methods(transport: str) -> None:
    """Logs, leak checks (``helpers.describe_tasks``) and debuggers show these names."""
    with trio.fail_after(10):
        async with session_pair(transport) as (client, server):
            await trio.testing.wait_all_tasks_blocked()
            names = [task.name for task in live_tasks()]
            for method in ("_run", "_reader", "_writer", "_reaper"):
                assert names.count(f"pytunnel.session.Session.{method}") == 2, names
            assert not client.closed
            assert not server.closed


async def test_the_answer_timer_is_named_after_its_method() -> None:
    """The timer task starts with the first early open that has an answer timeout."""
    a, _raw = trio.testing.memory_stream_pair()
    with trio.fail_after(10):
        async with open_session(a, Role.CLIENT, version=2, peer_early_window=8192) as client:
            await client.open_stream("example.com", 80, early=True, answer_timeout=5)
            await trio.testing.wait_all_tasks_blocked()
            names = [task.name for task in live_tasks()]
            assert "pytunnel.session.Session._answer_timer" in names, names


async def test_after_the_peers_goaway_accept_and_open_raise_with_their_causes() -> None:
    """The peer said GoAway and keeps the transport open: no more streams either way. An
    accept raises without a cause (the channel's end is no news), an open with the refusal of
    the multiplexer as its cause."""
    a, raw = trio.testing.memory_stream_pair()
    with trio.fail_after(10):
        async with open_session(a, Role.CLIENT) as client:
            await raw.send_all(encode_message(GoAway(ErrorCode.GOING_AWAY, "maintenance")))
            with pytest.raises(SessionClosedError) as accepted:
                await client.accept_stream()
            assert accepted.value.__cause__ is None
            assert accepted.value.__suppress_context__
            assert not client.closed
            with pytest.raises(SessionClosedError) as opened:
                await client.open_stream("example.com", 80)
            assert opened.value.code == ErrorCode.GOING_AWAY
            assert isinstance(opened.value.__cause__, LocalProtocolError)


async def test_a_sender_waiting_for_room_learns_why_the_session_ended() -> None:
    """A transport that takes nothing (a lockstep stream whose peer does not read) holds a
    write in flight and the queue behind it; the peer then closes it. The parked sender
    raises ``BrokenResourceError`` whose cause is the session's ``close_reason``."""
    a, raw = trio.testing.lockstep_stream_pair()
    with trio.fail_after(10):
        async with (
            open_session(
                a,
                Role.CLIENT,
                SessionConfig(write_buffer_high=0),
                version=2,
                peer_early_window=8192,
            ) as client,
            trio.open_nursery() as nursery,
        ):
            # the first Open goes out, and the writer blocks in send_all...
            await client.open_stream("a.example", 80, early=True)
            await trio.testing.wait_all_tasks_blocked()
            await client.open_stream("b.example", 80, early=True)  # ...the second waits
            assert not client.has_room(1)
            raised: list[BaseException] = []

            async def wait() -> None:
                try:
                    await client.wait_for_room(1)
                except trio.BrokenResourceError as exc:
                    raised.append(exc)

            nursery.start_soon(wait)
            await trio.testing.wait_all_tasks_blocked()
            assert raised == []
            await raw.aclose()
            await client.wait_closed()
            await trio.testing.wait_all_tasks_blocked()
            (error,) = raised
            assert client.close_reason is not None
            assert error.__cause__ is client.close_reason
