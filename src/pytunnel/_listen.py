"""Binding listeners, with OS failures turned into typed forward errors."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import socket
import weakref
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

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
    "send_batch",
    "serve_backlog",
    "tune_udp_socket",
    "udp_socket_for",
]

log = logging.getLogger("pytunnel.listen")

#: accept() failures that mean "out of resources right now", not "this listener is broken".
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
#: accept() failures that concern only the connection being accepted (it is gone): the next
#: one waiting is taken instead (the list trio's ``SocketListener.accept`` skips).
_GONE_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "ECONNABORTED",
        "EPROTO",
        "EPERM",
        "ENETDOWN",
        "ENOPROTOOPT",
        "EHOSTDOWN",
        "ENONET",
        "EHOSTUNREACH",
        "EOPNOTSUPP",
        "ENETUNREACH",
    )
    if hasattr(errno, name)
)
#: How long to wait after an accept failed for want of descriptors or memory: long enough
#: for connections to end and give some back, short enough that a burst is not kept waiting.
ACCEPT_RETRY_TIME = 0.1
#: Connections taken from one listener per scheduler pass at most, so that a burst on one
#: port cannot hold up everything else the process runs.
ACCEPT_BATCH = 64

_Slot = TypeVar("_Slot")


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
            log.error(
                "accept failed (%s); accepting again in %s s", exc.strerror, ACCEPT_RETRY_TIME
            )
            await trio.sleep(ACCEPT_RETRY_TIME)


async def serve_backlog(
    listener: trio.SocketListener,
    reserve: Callable[[], Awaitable[_Slot]],
    start: Callable[[trio.SocketStream, _Slot], object],
    release: Callable[[_Slot], None],
) -> None:
    """Accept connections on ``listener`` until it is closed, then return: all those waiting
    in one scheduler pass (up to :data:`ACCEPT_BATCH`), each after its own ``reserve()``.

    trio's ``SocketListener.accept`` yields to the scheduler after each connection, so a
    burst of N connections is taken one per pass, and under load a pass lasts long: the
    last of a burst waits in a backlog nobody reads. Here the connections that wait are
    taken in one pass, as asyncio's servers do, by non-blocking ``accept(2)`` calls.

    Args:
      reserve: takes whatever a connection needs before it is accepted (a stream slot);
        it may wait, leaving the connection in the kernel's backlog meanwhile. It is
        called only when a connection is known to wait, so a refusal it counts or logs is
        always a real one.
      start: hands on an accepted connection with its slot (``nursery.start_soon``, say);
        it must not wait. From then on the connection and the slot are its to close and
        release.
      release: gives back a slot that no connection got (the one waiting went away, the
        accept failed, or ``start`` raised; the connection is closed then).

    Resources: while the system is out of descriptors or memory (``EMFILE``, ``ENFILE``,
    ...) the failure is logged, the slot given back and the accepting paused for
    :data:`ACCEPT_RETRY_TIME`; the connections keep waiting in the backlog, none is lost.
    A failure of one connection only (``ECONNABORTED``, ...) skips it. Any other
    ``OSError`` of ``accept(2)`` is raised.
    """
    sock = listener.socket
    waiting = select.poll()
    while True:
        if sock.fileno() < 0:  # closed between two passes: waiting on it would be an error
            return
        try:
            await trio.lowlevel.wait_readable(sock)
        except trio.ClosedResourceError:
            return
        fd = sock.fileno()
        if fd < 0:
            return
        waiting.register(fd, select.POLLIN)
        try:
            for _ in range(ACCEPT_BATCH):
                slot = await reserve()
                try:
                    accepted = _accept_now(sock)
                except trio.ClosedResourceError:  # closed while ``reserve`` waited
                    release(slot)
                    return
                except OSError as exc:
                    release(slot)
                    if exc.errno not in _RESOURCE_ERRNOS:
                        raise
                    log.error(
                        "accept failed (%s); accepting again in %s s",
                        os.strerror(exc.errno),
                        ACCEPT_RETRY_TIME,
                    )
                    await trio.sleep(ACCEPT_RETRY_TIME)
                    break
                if accepted is None:  # it went away while the slot was taken
                    release(slot)
                    break
                try:
                    start(trio.SocketStream(trio.socket.from_stdlib_socket(accepted)), slot)
                except BaseException:
                    accepted.close()
                    release(slot)
                    raise
                if not waiting.poll(0):  # the backlog is empty: wait for the next one
                    break
            else:
                await trio.lowlevel.checkpoint()  # a full batch: let the rest run first
        finally:
            waiting.unregister(fd)


def _accept_now(sock: trio.socket.SocketType) -> socket.socket | None:
    """One connection waiting on the listening ``sock``, or ``None`` if none is left; raises
    ``ClosedResourceError`` if ``sock`` has been closed and ``OSError`` if accept(2) fails
    for more than the one connection."""
    with _borrowed(sock) as view:
        while True:
            try:
                accepted, _ = view.accept()
            except BlockingIOError:
                return None
            except OSError as exc:
                if exc.errno in _GONE_ERRNOS:
                    continue
                raise
            return accepted


@contextlib.contextmanager
def _borrowed(sock: trio.socket.SocketType) -> Iterator[socket.socket]:
    """A standard-library socket object over ``sock``'s descriptor, for synchronous calls
    without trio's checkpoint; it does not own the descriptor (it is detached, never closed,
    on the way out), so it must not outlive the synchronous stretch it is made in.

    trio's own socket object has no public way to make a call without its checkpoint, and a
    duplicate descriptor held across waits would keep the port listening after trio's
    listener is closed (connections would queue in a backlog nobody reads).
    """
    fd = sock.fileno()
    if fd < 0:
        raise trio.ClosedResourceError("the listener was closed")
    view = socket.socket(sock.family, sock.type, sock.proto, fileno=fd)
    try:
        if view.gettimeout() is not None:  # a process-wide default timeout would make it wait
            view.setblocking(False)
        yield view
    finally:
        view.detach()


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


async def send_batch(
    sock: trio.socket.SocketType, batch: list[bytes], address: Any = None
) -> tuple[int, int]:
    """Send every datagram of ``batch`` on ``sock`` (to ``address``, or the connected peer),
    in order, with one checkpoint for them all: a tight loop of non-blocking sends, waiting
    only when the socket's buffer is full. One that fails (``OSError``, such as an ICMP
    error reported by an earlier send) is skipped. Returns how many were sent and their
    bytes. A socket not made by :func:`udp_socket_for` sends through trio one at a time."""
    sent = size = 0
    std = _STDLIB.get(sock)
    if std is None:
        for data in batch:
            try:
                if address is None:
                    await sock.send(data)
                else:
                    await sock.sendto(data, address)
            except OSError:
                continue
            sent += 1
            size += len(data)
        return sent, size
    for data in batch:
        while True:
            try:
                if address is None:
                    std.send(data)
                else:
                    std.sendto(data, address)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(std)
                continue
            except OSError:
                break
            sent += 1
            size += len(data)
            break
    await trio.lowlevel.checkpoint()
    return sent, size


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
