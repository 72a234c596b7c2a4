"""Binding listeners, with OS failures turned into typed forward errors."""

from __future__ import annotations

import errno

import trio

from ._dial import format_target
from ._util import aclose_all
from .errors import AddressInUseError, ForwardError, PermissionDeniedError

__all__ = ["bind"]


async def bind(host: str, port: int) -> list[trio.SocketListener]:
    """Listen on ``host:port`` (0 = any free port); raise ``AddressInUseError``,
    ``PermissionDeniedError`` or ``ForwardError`` naming the address.

    With port 0 and a host that resolves to several addresses, only the first is kept so the
    forward has exactly one port to report.
    """
    address = format_target(host, port)
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if exc.errno == errno.EADDRINUSE:
            raise AddressInUseError(f"{address} is already in use", address=address) from None
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise PermissionDeniedError(
                f"not allowed to listen on {address}: {reason}", address=address
            ) from None
        raise ForwardError(f"cannot listen on {address}: {reason}", address=address) from None
    if port == 0 and len(listeners) > 1:
        await aclose_all(*listeners[1:])
        listeners = listeners[:1]
    return listeners


def bound_port(listeners: list[trio.SocketListener]) -> int:
    """The port the (first) listener actually got."""
    port: int = listeners[0].socket.getsockname()[1]
    return port
