"""Binding listeners, with OS failures turned into typed forward errors."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import socket
import struct
import sys
import weakref
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import trio

from ._dial import format_target
from ._util import aclose_all
from .errors import AddressInUseError, ForwardError, PermissionDeniedError

__all__ = [
    "UDP_SOCKET_BUFFER",
    "accept",
    "adopt_datagram_socket",
    "bind",
    "bind_udp",
    "bound_port",
    "kernel_drops",
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


#: Receive and send buffer asked for on every UDP socket pytunnel opens (the kernel caps
#: them at net.core.rmem_max and net.core.wmem_max, and doubles what it grants for its own
#: bookkeeping): a burst is absorbed instead of being dropped by the kernel before we read
#: it, and a burst we write waits in the kernel instead of making ``sendto`` fail. 4 MiB is
#: about 100 ms of 1400-byte datagrams at 400 Mbit/s. ``udp_socket_buffer`` in the client's
#: and the server's configuration overrides it (0: the kernel's defaults).
UDP_SOCKET_BUFFER = 4 * 1024 * 1024
#: The former name of :data:`UDP_SOCKET_BUFFER`, when it set the receive buffer only.
UDP_RECEIVE_BUFFER = UDP_SOCKET_BUFFER


def tune_udp_socket(sock: trio.socket.SocketType, buffer: int = UDP_SOCKET_BUFFER) -> None:
    """Ask for ``buffer`` bytes of receive and of send buffer (best effort: the kernel grants
    at most its ``rmem_max`` / ``wmem_max``; 0 keeps its defaults)."""
    if buffer <= 0:
        return
    for option in (trio.socket.SO_RCVBUF, trio.socket.SO_SNDBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(trio.socket.SOL_SOCKET, option, buffer)


#: ``SO_MEMINFO`` (Linux; the socket module does not name it) and the index, in the array of
#: counters it reads, of the datagrams the kernel dropped for the socket (its receive
#: buffer full, mostly: the "drops" column of /proc/net/udp).
_SO_MEMINFO = getattr(socket, "SO_MEMINFO", 55)
_SK_MEMINFO_DROPS = 8
_MEMINFO_SIZE = 9 * 4


def kernel_drops(sock: trio.socket.SocketType) -> int:
    """Datagrams the kernel dropped on ``sock`` so far, before any read: one ``getsockopt``.
    0 where the system cannot say (not Linux, or too old for ``SO_MEMINFO``)."""
    if not sys.platform.startswith("linux"):
        return 0
    try:
        raw = sock.getsockopt(trio.socket.SOL_SOCKET, _SO_MEMINFO, _MEMINFO_SIZE)
    except OSError:
        return 0
    if len(raw) < _MEMINFO_SIZE:
        return 0
    return int(struct.unpack_from("=I", raw, _SK_MEMINFO_DROPS * 4)[0])


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
    host: str, port: int, *, buffer: int = UDP_SOCKET_BUFFER
) -> tuple[trio.socket.SocketType, tuple[str, int] | tuple[str, int, int, int] | tuple[int, bytes]]:
    """A UDP socket of the family ``host`` resolves to, with ``buffer`` bytes of socket
    buffers asked for (:func:`tune_udp_socket`), and the address to bind or connect it to.
    Raises what the lookup raises (``OSError``, ``ValueError``): each caller says it its
    own way."""
    infos = await trio.socket.getaddrinfo(host, port, type=trio.socket.SOCK_DGRAM)
    family, _, _, _, sockaddr = infos[0]
    sock = adopt_datagram_socket(socket.socket(family, socket.SOCK_DGRAM))
    tune_udp_socket(sock, buffer)
    return sock, sockaddr


def adopt_datagram_socket(std: socket.socket) -> trio.socket.SocketType:
    """The trio socket over the datagram socket ``std`` (made non-blocking), read and
    written in batches by :func:`receive_batch` and :func:`send_batch`; it owns ``std``."""
    sock = trio.socket.from_stdlib_socket(std)
    _STDLIB[sock] = std
    return sock


#: The standard-library socket under each UDP socket made here, for :func:`receive_batch`.
_STDLIB: weakref.WeakKeyDictionary[trio.socket.SocketType, socket.socket] = (
    weakref.WeakKeyDictionary()
)
#: Datagrams taken per wake-up at most, so one busy forward cannot monopolise the loop.
_BATCH = 64


async def receive_batch(
    sock: trio.socket.SocketType, size: int, max_bytes: int | None = None
) -> list[tuple[bytes, Any]]:
    """Every datagram ``sock`` holds (up to 64, and no more once they add up to ``max_bytes``),
    with its source address, after at most one wait: one pass through the scheduler per
    batch instead of one per datagram, which is what caps a UDP forward's rate.
    ``ConnectionError`` (an ICMP error reported on the socket) is skipped as ``recvfrom``
    callers skip it. A socket not made by :func:`udp_socket_for` is read one datagram at a
    time."""
    std = _STDLIB.get(sock)
    if std is None:
        while True:
            try:
                return [await sock.recvfrom(size)]
            except ConnectionError:
                continue
    limit = max_bytes if max_bytes is not None and max_bytes > 0 else None
    while True:
        batch: list[tuple[bytes, Any]] = []
        taken = 0
        while len(batch) < _BATCH:
            try:
                item = std.recvfrom(size)
            except BlockingIOError:
                break
            except ConnectionError:
                continue
            batch.append(item)
            if limit is not None:
                taken += len(item[0])
                if taken >= limit:
                    break
        if batch:
            await trio.lowlevel.checkpoint()
            return batch
        await trio.lowlevel.wait_readable(std)


async def send_batch(
    sock: trio.socket.SocketType, batch: list[bytes], address: Any = None
) -> tuple[int, int]:
    """Send every datagram of ``batch`` on ``sock`` (to ``address``, or the connected peer),
    in order, with one checkpoint for them all: a tight loop of non-blocking sends, waiting
    only when the socket's buffer is full (``EAGAIN``: until it is writable) or the device's
    queue is (``ENOBUFS``: retried every :data:`ENOBUFS_RETRY`), for at most
    :data:`SEND_WAIT_LIMIT` per datagram; after that wait the rest of the batch is dropped
    (a full buffer) or that datagram alone (``ENOBUFS``). One that fails otherwise
    (``OSError``, such as an ICMP error reported by an earlier send) is skipped. Returns how
    many were sent and their bytes. A socket not made by :func:`udp_socket_for` (or adopted,
    :func:`adopt_datagram_socket`) sends through trio one at a time."""
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
        deadline: float | None = None  # of the ENOBUFS retries of this datagram
        while True:
            try:
                if address is None:
                    std.send(data)
                else:
                    std.sendto(data, address)
            except BlockingIOError:
                # the send buffer is full: wait for room (the datagrams behind this one wait
                # in the caller's bounded queue meanwhile) rather than drop it
                if await _wait_writable(std):
                    continue
                return sent, size  # no room for SEND_WAIT_LIMIT: the rest is dropped
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:  # a device queue full: transient, as above
                    now = trio.current_time()
                    if deadline is None:
                        deadline = now + SEND_WAIT_LIMIT
                    if now < deadline:
                        await trio.sleep(ENOBUFS_RETRY)
                        continue
                break
            sent += 1
            size += len(data)
            break
    await trio.lowlevel.checkpoint()
    return sent, size


#: How long :func:`send_batch` waits for a full send buffer to take a datagram before it
#: drops the rest of its batch: long enough for any receiver that reads at all, short
#: enough that a stuck one cannot hold the association's queue for ever.
SEND_WAIT_LIMIT = 1.0
#: The pause before a send that failed with ``ENOBUFS`` is tried again (no readiness event
#: says when a device queue has room again).
ENOBUFS_RETRY = 0.001


async def _wait_writable(std: socket.socket) -> bool:
    """Wait until ``std`` is writable; ``False`` if it was not within SEND_WAIT_LIMIT."""
    with trio.move_on_after(SEND_WAIT_LIMIT):
        await trio.lowlevel.wait_writable(std)
        return True
    return False


async def bind_udp(
    host: str, port: int, *, buffer: int = UDP_SOCKET_BUFFER
) -> trio.socket.SocketType:
    """A UDP socket bound to ``host:port`` (0 = any free port), with the same typed errors as
    :func:`bind`; ``buffer`` as for :func:`tune_udp_socket`."""
    address = format_target(host, port)
    try:
        sock, sockaddr = await udp_socket_for(host, port, buffer=buffer)
    except OSError as exc:
        raise ForwardError(f"cannot listen on {address}: {exc}", address=address) from None
    try:
        await sock.bind(sockaddr)
    except OSError as exc:
        sock.close()
        raise _bind_error(exc, address, " (udp)") from None
    return sock
