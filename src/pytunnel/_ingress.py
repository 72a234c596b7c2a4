"""Ingress: a listening socket whose connections each take a stream slot and are carried
through the tunnel.

The role is the same at the server (a remote forward's public port) and at the client (a
local forward's listener); what differs is passed in: how a slot is taken (at once or
refused at the server's limit; waiting through the session's cap or an outage at the
client), how a connection is carried, how the slot is given back. This module knows nothing
of sessions, forwards, limits or logs.

It does not use ``trio.serve_listeners``: that accepts every connection as soon as it arrives,
while here the slot is taken *before* the accept, so that a side waiting for a slot leaves
the connections in the kernel's backlog instead of accepting them to reset them. The
accepting is :func:`._listen.serve_backlog`'s: every connection waiting is taken in one
scheduler pass (a burst is not accepted one per pass), each after its own slot, and
``EMFILE`` is ridden out.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

from ._listen import serve_backlog
from ._util import aclose_all
from .errors import TunnelError
from .session import MuxStream

__all__ = ["carry_over_stream", "serve_ingress"]

_Slot = TypeVar("_Slot")
_Conn = TypeVar("_Conn", bound=trio.abc.HalfCloseableStream)


async def serve_ingress(
    listener: trio.SocketListener,
    reserve: Callable[[], Awaitable[_Slot]],
    carry: Callable[[trio.SocketStream, _Slot], Awaitable[object]],
    release: Callable[[_Slot], None],
    handler_nursery: trio.Nursery,
) -> None:
    """Accept connections on ``listener`` for ever, each in a slot and a task of its own.

    For each connection waiting: ``reserve()`` takes a slot (it may wait; what it returns,
    even a refusal such as ``False``, is handed on), then the connection is accepted and
    ``carry(conn, slot)`` runs in ``handler_nursery``. The connection is closed and
    ``release(slot)`` called when ``carry`` returns, whatever happened; a slot taken for an
    accept that failed is released at once. All the connections waiting are taken in one
    pass (up to :data:`._listen.ACCEPT_BATCH`): ``reserve`` runs once per connection, with
    no scheduler pass between them unless it waits.

    Returns quietly when the listener is closed under it (a port going offline or away).
    """

    def start(conn: trio.SocketStream, slot: _Slot) -> None:
        handler_nursery.start_soon(_carry, conn, slot, carry, release)

    await serve_backlog(listener, reserve, start, release)


async def _carry(
    conn: trio.SocketStream,
    slot: _Slot,
    carry: Callable[[trio.SocketStream, _Slot], Awaitable[object]],
    release: Callable[[_Slot], None],
) -> None:
    try:
        await carry(conn, slot)
    finally:
        release(slot)
        await aclose_all(conn)


async def carry_over_stream(
    conn: _Conn,
    open_stream: Callable[[], Awaitable[MuxStream | None]],
    carry: Callable[[_Conn, MuxStream], Awaitable[object]],
    on_failure: Callable[[TunnelError | OSError], None],
) -> None:
    """The second half of ingress: open the stream an accepted connection goes through, then
    ``carry`` the two. A stream that cannot be opened closes the connection, after
    ``on_failure`` (the caller's count and log line); ``open_stream`` returning ``None`` means
    it gave up and has said why. A stream opened with early data and refused while carried
    is reported to ``on_failure`` too, when the refusal arrives."""
    try:
        stream = await open_stream()
    except (TunnelError, OSError) as exc:
        on_failure(exc)
        stream = None
    # this frame stays parked above the relay for the connection's life: what only the open
    # needed is let go of (thousands of idle connections)
    del open_stream
    if stream is None:
        await trio.aclose_forcefully(conn)
        return
    # opened with early data (version 2): a refusal arrives while the relay runs; it is
    # reported first, as a failed open is, then breaks the stream and so the relay, which
    # resets the connection
    stream.call_on_refusal(on_failure)
    # the stream alone holds it from here, and lets go of it when it breaks (one object
    # fewer left behind by each relay of a dying session: see MuxStream.break_with)
    del on_failure
    await carry(conn, stream)
