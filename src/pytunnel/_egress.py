"""Egress: an incoming stream asks for a target; dial it, answer the stream, relay.

The role is the same at the server (a client's local forward: TCP under the permit-open
policy, or a UDP association) and at the client (a remote forward's public connection); what
differs is passed in: how to dial, how to relay, how to account for a failed dial. This module
knows nothing of routes' meaning, policies, forwards or counters.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

from ._util import aclose_all
from .errors import DialError, ErrorCode, SessionClosedError
from .session import IncomingStream, MuxStream

__all__ = ["refuse_wrong_kind", "serve_egress"]

_Target = TypeVar("_Target", trio.SocketStream, trio.socket.SocketType)


async def _close(target: trio.SocketStream | trio.socket.SocketType) -> None:
    if isinstance(target, trio.SocketStream):
        await aclose_all(target)
    else:
        target.close()


async def serve_egress(
    incoming: IncomingStream,
    connect: Callable[[], Awaitable[_Target]],
    carry: Callable[[MuxStream, _Target], Awaitable[object]],
    on_failure: Callable[[DialError], None] | None = None,
) -> bool:
    """Dial what ``incoming`` asks for, accept it, and relay until the relay ends.

    The dial runs while the opener still wants it (see :meth:`IncomingStream.dial`): an
    opener that resets the stream, or a session that ends, cancels it. A failed dial refuses
    the stream with its typed code (``NODE_TIMEOUT``, ``NODE_UNSTABLE``, ``TARGET_FORBIDDEN``)
    after ``on_failure``. The target is closed if the stream can no longer be accepted.

    Args:
      incoming: the stream, not yet answered.
      connect: dials the target: a ``trio.SocketStream`` (TCP) or a connected UDP socket.
      carry: relays between the accepted stream and the target (a byte relay or a UDP
        association); it owns the target once called.
      on_failure: the caller's accounting and log line for a failed dial.

    Returns:
      Whether the stream was accepted and carried; false when it was refused or abandoned.
    """
    target = await incoming.dial(connect, on_failure)
    # this frame stays parked above the relay for the connection's life: what only the dial
    # needed is let go of (thousands of idle connections)
    del connect, on_failure
    if target is None:
        return False
    try:
        stream = incoming.accept()
    except SessionClosedError:
        await _close(target)
        return False
    relaying = carry(stream, target)
    del carry, stream, target  # the relay holds what it needs
    await relaying
    return True


def refuse_wrong_kind(incoming: IncomingStream, takes_datagrams: bool, what: str = "route") -> bool:
    """Refuse ``incoming`` if its kind (datagram or byte stream) is not its route's.

    The kind is fixed at Open: a byte stream never gets a datagram queue, and a UDP
    association never a byte relay, so a mismatch is the opener's protocol error.
    Returns whether it was refused. ``what`` names the route in the refusal ("route",
    "forward").
    """
    if incoming.datagrams == takes_datagrams:
        return False
    incoming.refuse(
        ErrorCode.PROTOCOL_ERROR,
        f"{what} {incoming.tag} does not take a "
        f"{'datagram' if incoming.datagrams else 'byte'} stream",
    )
    return True
