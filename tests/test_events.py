"""Tunnel events and their subscribers (``_events.py``), through the public ``Tunnel.events``:
an unread subscriber never makes the buffer grow, abandoned ones are forgotten, the number
kept is capped, and a subscription ends with the tunnel."""

from __future__ import annotations

import functools

import pytest
import trio
from helpers import TOKEN

import pytunnel

pytestmark = pytest.mark.timeout(180)


async def test_events_never_buffer_without_bound(nursery: trio.Nursery) -> None:
    server = await nursery.start(functools.partial(pytunnel.serve, 0, token=TOKEN))
    tunnel = await pytunnel.connect_tunnel(nursery, server.address, token=TOKEN)
    unread = tunnel.events(buffer=2)
    for _ in range(5):
        forward = await tunnel.forward_local("127.0.0.1", 9)
        await forward.aclose()
    assert unread.statistics().current_buffer_used == 2
    assert tunnel.dropped_events >= 8
    await tunnel.aclose()


async def test_abandoned_event_subscribers_are_dropped(
    nursery: trio.Nursery, tunnel_server: pytunnel.TunnelServer, echo_port: int
) -> None:
    """Receivers dropped without closing (garbage-collected) or closed are forgotten, and
    the number kept is capped; a live subscriber keeps getting events throughout."""
    tunnel = await pytunnel.connect_tunnel(nursery, tunnel_server.address, token=TOKEN)
    live = tunnel.events()
    for _ in range(10_000):
        tunnel.events()  # dropped at once
        tunnel.events().close()
        assert tunnel.subscriber_count <= 3
    kept = [tunnel.events() for _ in range(tunnel.max_subscribers + 100)]
    assert tunnel.subscriber_count == tunnel.max_subscribers
    assert tunnel.dropped_subscribers == 101  # the oldest (including ``live``) went first
    with trio.fail_after(5):
        async for _ in live:  # unsubscribed: the iteration ends
            pass
    newest = kept[-1]
    del kept
    live = tunnel.events()
    forward = await tunnel.forward_local("127.0.0.1", echo_port)
    with trio.fail_after(5):
        event = await live.receive()
    assert event.kind is pytunnel.EventKind.STATUS
    assert event.forward is forward
    assert tunnel.subscriber_count <= 2  # the 1,124 kept receivers were collected
    with trio.fail_after(5):
        assert (await newest.receive()).forward is forward
    await tunnel.aclose()


async def test_events_after_the_tunnel_ended_terminate(
    nursery: trio.Nursery, tunnel_server: pytunnel.TunnelServer
) -> None:
    tunnel = await pytunnel.connect_tunnel(nursery, tunnel_server.address, token=TOKEN)
    await tunnel.aclose()
    with trio.fail_after(1):
        async for _ in tunnel.events():
            pass
