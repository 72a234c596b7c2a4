"""Ingress as a module: a listener whose connections each take a slot and are carried."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from pytunnel._ingress import serve_ingress
from pytunnel._listen import bind

pytestmark = pytest.mark.timeout(60)


async def _refusing(_conn: trio.SocketStream, admitted: bool) -> None:
    assert not admitted


async def test_ingress_without_a_slot_closes_the_connection() -> None:
    """A refused slot: the connection is accepted and closed at once, and nothing is
    released that was not taken."""
    released: list[bool] = []

    async def no_slot() -> bool:
        return False

    with trio.fail_after(30):
        [listener] = await bind("127.0.0.1", 0)
        port = listener.socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                serve_ingress, listener, no_slot, _refusing, released.append, nursery
            )
            conn = await trio.open_tcp_stream("127.0.0.1", port)
            assert await conn.receive_some() == b""  # closed by the server side
            await conn.aclose()
            nursery.cancel_scope.cancel()
        await listener.aclose()
    assert released == [False]


async def test_ingress_waits_for_a_slot_before_accepting() -> None:
    """While no slot is free the connection stays in the backlog; once one is, it is
    accepted, carried in that slot, and the slot is given back."""
    free = trio.Event()
    carried: list[int] = []
    released: list[int] = []

    async def wait_slot() -> int:
        await free.wait()
        return 7

    async def carry(conn: trio.SocketStream, slot: int) -> None:
        carried.append(slot)
        await conn.send_all(b"hi")

    with trio.fail_after(30):
        [listener] = await bind("127.0.0.1", 0)
        port = listener.socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_ingress, listener, wait_slot, carry, released.append, nursery)
            conn = await trio.open_tcp_stream("127.0.0.1", port)
            await trio.testing.wait_all_tasks_blocked()
            assert carried == []
            free.set()
            assert await conn.receive_some() == b"hi"
            assert await conn.receive_some() == b""
            await conn.aclose()
            nursery.cancel_scope.cancel()
        await listener.aclose()
    assert carried == [7]
    assert released == [7]


async def test_ingress_returns_quietly_on_a_listener_closed_under_it() -> None:
    """A port that goes offline or away between two connections ends the loop, not the
    session with an error."""

    async def slot() -> bool:
        return True

    async def carry(_conn: trio.SocketStream, _slot: bool) -> None:
        pass

    with trio.fail_after(30):
        [listener] = await bind("127.0.0.1", 0)
        listener.socket.close()
        async with trio.open_nursery() as nursery:
            await serve_ingress(listener, slot, carry, lambda _slot: None, nursery)
