"""Binding listeners, with OS failures turned into typed forward errors."""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import weakref
from typing import Any

import trio

from ._dial import format_target
from ._util import aclose_all
from .errors import AddressInUseError, ForwardError, PermissionDeniedError

__all__ = [
    "accept",
    "bind",
    "bind_udp",
    "bound_port",
    "receive_batch",
    "tune_udp_socket",
    "udp_socket_for",
]

log = logging.getLogger("pytunnel.listen")

#: accept() failures that mean "out of resources right now", not "this listener is broken".
_RESOURCE_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}


#: Receive buffer asked for on every UDP socket (the kernel caps it at net.core.rmem_max):
#: bursts are absorbed instead of being dropped by the kernel before we read them.
UDP_RECEIVE_BUFFER = 4 * 1024 * 1024


def tune_udp_socket(sock: trio.socket.SocketType) -> None:
    """Ask for a larger receive buffer (best effort)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, UDP_RECEIVE_BUFFER)


def _bind_error(exc: OSError, address: str, what: str = "") -> ForwardError:
    """The typed forward error for a failed bind: in use, not permitted, or anything else."""
    reason = exc.strerror or str(exc)
    if exc.errno == errno.EADDRINUSE:
        return AddressInUseError(f"{address}{what} is already in use", address=address)
    if exc.errno in (errno.EACCES, errno.EPERM):
        return PermissionDeniedError(
            f"not allowed to listen on {address}{what}: {reason}", address=address
        )
    return ForwardError(f"cannot listen on {address}{what}: {reason}", address=address)


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
        raise _bind_error(exc, address) from None
    if port == 0 and len(listeners) > 1:
        await aclose_all(*listeners[1:])
        listeners = listeners[:1]
    return listeners


def bound_port(listeners: list[trio.SocketListener]) -> int:
    """The port the (first) listener actually got."""
    port: int = listeners[0].socket.getsockname()[1]
    return port


async def accept(listener: trio.SocketListener) -> trio.SocketStream:
    """Accept one connection, riding out resource exhaustion (out of fds, say) by pausing
    instead of crashing the listener, as ``trio.serve_listeners`` does."""
    while True:
        try:
            return await listener.accept()
        except OSError as exc:
            if exc.errno not in _RESOURCE_ERRNOS:
                raise
            log.error("accept failed (%s); pausing 100 ms", exc.strerror)
            await trio.sleep(0.1)


async def udp_socket_for(
    host: str, port: int
) -> tuple[trio.socket.SocketType, tuple[str, int] | tuple[str, int, int, int] | tuple[int, bytes]]:
    """A tuned UDP socket of the family ``host`` resolves to, and the address to bind or
    connect it to. Raises what the lookup raises (``OSError``, ``ValueError``): each caller
    says it its own way."""
    infos = await trio.socket.getaddrinfo(host, port, type=trio.socket.SOCK_DGRAM)
    family, _, _, _, sockaddr = infos[0]
    std = socket.socket(family, socket.SOCK_DGRAM)
    sock = trio.socket.from_stdlib_socket(std)  # non-blocking from here on
    _STDLIB[sock] = std
    tune_udp_socket(sock)
    return sock, sockaddr


#: The standard-library socket under each UDP socket made here, for :func:`receive_batch`.
_STDLIB: weakref.WeakKeyDictionary[trio.socket.SocketType, socket.socket] = (
    weakref.WeakKeyDictionary()
)
#: Datagrams taken per wake-up at most, so one busy forward cannot monopolise the loop.
_BATCH = 64


async def receive_batch(sock: trio.socket.SocketType, size: int) -> list[tuple[bytes, Any]]:
    """Every datagram ``sock`` holds (up to 64), with its source address, after at most one
    wait: one pass through the scheduler per batch instead of one per datagram, which is
    what caps a UDP forward's rate. ``ConnectionError`` (an ICMP error reported on the
    socket) is skipped as ``recvfrom`` callers skip it. A socket not made by
    :func:`udp_socket_for` is read one datagram at a time."""
    std = _STDLIB.get(sock)
    if std is None:
        while True:
            try:
                return [await sock.recvfrom(size)]
            except ConnectionError:
                continue
    while True:
        batch: list[tuple[bytes, Any]] = []
        while len(batch) < _BATCH:
            try:
                batch.append(std.recvfrom(size))
            except BlockingIOError:
                break
            except ConnectionError:
                continue
        if batch:
            await trio.lowlevel.checkpoint()
            return batch
        await trio.lowlevel.wait_readable(std)


async def bind_udp(host: str, port: int) -> trio.socket.SocketType:
    """A UDP socket bound to ``host:port`` (0 = any free port), with the same typed errors as
    :func:`bind`."""
    address = format_target(host, port)
    try:
        sock, sockaddr = await udp_socket_for(host, port)
    except OSError as exc:
        raise ForwardError(f"cannot listen on {address}: {exc}", address=address) from None
    try:
        await sock.bind(sockaddr)
    except OSError as exc:
        sock.close()
        raise _bind_error(exc, address, " (udp)") from None
    return sock
