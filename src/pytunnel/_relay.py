"""The bidirectional pump between two streams: half-close, idle timeout, byte counters.

One relay is one child nursery with the two pumps (one in a child task, the other in the
relay's own task), so cancelling the relay's parent (the forward, the session) ends both
directions at once and closes both streams. There is no task
per chunk and no buffer beyond the chunk in hand: back-pressure flows through ``send_all``.

Every stream is treated alike, whatever its class: a stream that can be reset (``reset``: a mux
stream, or a wrapper around one) is reset when the relay is cut, a TCP socket gets RST instead
of FIN, and a stream whose sends are slow on purpose (``paced``: fault injection) does not count
as idle while it sends. Fault injection itself is a stream wrapper
(:mod:`pytunnel.testing.faults`) that this module does not depend on.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import struct
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Protocol, cast, runtime_checkable

import attrs
import trio

from ._stream import DirectWriter
from ._util import aclose_all, implements
from .errors import ErrorCode, InvalidTargetError, SessionClosedError, TargetForbiddenError

if TYPE_CHECKING:
    from .testing.faults import Faults

__all__ = [
    "DEFAULT_IDLE_TIMEOUT",
    "DirectSink",
    "DirectSource",
    "PacedStream",
    "RelayStats",
    "ResettableStream",
    "abort",
    "direct_writer",
    "relay",
]

log = logging.getLogger("pytunnel.relay")

#: Seconds without a byte moving in either direction before a relay is reset.
DEFAULT_IDLE_TIMEOUT = 300.0
_CHUNK = 256 * 1024
#: Progress granularity of a send: the size of one Data frame of a tunnel stream.
_PIECE = 64 * 1024


@attrs.define
class _Ending:
    """What the two pumps of one relay share: the idle clock and how their directions ended."""

    scope: trio.CancelScope
    idle_timeout: float
    #: Sends that stop the idle clock while they last: half-closes and sends into paced
    #: streams (whose delays are deliberate). Plain sends restart the clock piece by piece.
    sending: int = 0
    #: Directions that reached their EOF and carried it across. Only when both have is the
    #: relay complete: a pump that met a broken side may end without any ``Cancelled`` being
    #: raised (the other pump can meet the break too, before its next checkpoint), so the
    #: cancel scope alone cannot tell a cut relay from a finished one.
    finished: int = 0

    def touch(self) -> None:
        """Restart the idle clock (a byte arrived or a send completed)."""
        if self.sending:
            self.scope.deadline = math.inf
        else:
            self.scope.deadline = trio.current_time() + self.idle_timeout

    @contextlib.contextmanager
    def send(self) -> Iterator[None]:
        self.sending += 1
        self.scope.deadline = math.inf
        try:
            yield
        finally:
            self.sending -= 1
            self.touch()


@runtime_checkable
class ResettableStream(Protocol):
    """A stream that can abort both directions at once, so its peer sees a reset, not EOF."""

    def reset(self, code: int, message: str) -> None: ...


class BreakableStream(Protocol):
    """A stream that can tell, synchronously, the moment it breaks (a mux stream)."""

    def call_on_break(self, callback: Callable[[], None] | None) -> None: ...


@runtime_checkable
class PacedStream(Protocol):
    """A stream whose sends may be slow on purpose (injected latency, bandwidth caps)."""

    @property
    def paced(self) -> bool:
        """True while sends are delayed deliberately: the relay's idle clock stops for them."""
        ...


@runtime_checkable
class DirectSource(Protocol):
    """A stream that can hand arriving data to a writer while its reader waits (a mux
    stream: :meth:`pytunnel._stream.MuxStream.deliver_directly`)."""

    def deliver_directly(self, writer: DirectWriter | None) -> None: ...


@runtime_checkable
class DirectSink(Protocol):
    """A stream that takes bytes without waiting when it can: a mux stream (within its
    window), or a wrapper that lets the writer of the stream it wraps (:func:`direct_writer`)
    bypass its ``send_all`` (a fault injector with no fault set)."""

    def direct_writer(self) -> DirectWriter | None: ...


@attrs.define
class RelayStats:
    """Live counters, shared by every relay of one forward."""

    #: Bytes from the side that accepted the connection towards the target.
    bytes_out: int = 0
    #: Bytes from the target back.
    bytes_in: int = 0
    active_connections: int = 0
    total_connections: int = 0
    #: Failed connections by category: ``NODE_TIMEOUT``, ``NODE_UNSTABLE``, ``FORBIDDEN``
    #: (the dialling side's policy), ``REFUSED`` (a limit, a failed negotiation, any other
    #: refusal), ``LINK_DOWN`` (no tunnel connection at the time).
    errors: dict[str, int] = attrs.field(factory=dict)
    #: UDP forwards: datagrams dropped (queue full, too many associations, send failed).
    datagrams_dropped: int = 0

    def count_error(self, category: str) -> None:
        self.errors[category] = self.errors.get(category, 0) + 1

    def count_failure(self, exc: BaseException) -> None:
        """Count a connection that failed with ``exc`` under its category: the dial's own
        (``NODE_TIMEOUT`` / ``NODE_UNSTABLE``), ``FORBIDDEN``, ``LINK_DOWN``, or else
        ``REFUSED``."""
        category = getattr(exc, "category", None)
        if category in ("NODE_TIMEOUT", "NODE_UNSTABLE"):
            self.count_error(category)
        elif isinstance(exc, TargetForbiddenError) and not isinstance(exc, InvalidTargetError):
            # the dialling side's policy (--permit-open), apart from the limits: an operator
            # tells a client asking for what it may not have from a server that is full
            self.count_error("FORBIDDEN")
        elif isinstance(exc, SessionClosedError):
            self.count_error("LINK_DOWN")
        else:
            self.count_error("REFUSED")


async def _pump(
    source: trio.abc.ReceiveStream,
    sink: trio.abc.HalfCloseableStream,
    stats: RelayStats | None,
    outbound: bool,
    name: str,
    ending: _Ending,
) -> None:
    try:
        await _copy(source, sink, stats, outbound, ending)
        ending.finished += 1
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        # one side broke: the other direction has nothing left to do either
        log.debug("%s ended by a broken side: %r", name, exc)
        ending.scope.cancel()


async def _copy(
    source: trio.abc.ReceiveStream,
    sink: trio.abc.HalfCloseableStream,
    stats: RelayStats | None,
    outbound: bool,
    ending: _Ending,
) -> None:
    writer = direct_writer(sink) if implements(source, DirectSource) else None
    if writer is not None:
        direct = cast(DirectSource, source)
        direct.deliver_directly(_counted(writer, stats, outbound, ending))
        try:
            await _copy_loop(source, sink, stats, outbound, ending)
        finally:
            direct.deliver_directly(None)
    else:
        await _copy_loop(source, sink, stats, outbound, ending)
    with ending.send():
        await sink.send_eof()


def direct_writer(stream: trio.abc.SendStream) -> DirectWriter | None:
    """A non-blocking write into ``stream`` for a source that delivers data directly, or
    ``None`` if ``stream`` cannot take one.

    A plain ``trio.SocketStream`` (final: its ``send_all`` only writes to the socket) gets a
    write to its socket, so the session's reader writes a Data frame's bytes itself while the
    pump waits, and a small message reaches the socket without waking the pump. A mux stream
    (:class:`DirectSink`) queues what its window and write buffer take; a wrapper decides for
    itself, from its wrapped stream's writer; a TLS stream or any other stream gets none. The
    pump also writes each chunk it holds through it first, before ``send_all``. A write that
    would block, or fails, takes nothing: the data waits (in the source's buffer, or in the
    pump's hands) and the pump's ``send_all`` waits for the sink or raises the typed error.
    """
    if isinstance(stream, trio.SocketStream):
        return _socket_writer(stream.socket) if os.name == "posix" else None
    if implements(stream, DirectSink):
        return cast(DirectSink, stream).direct_writer()
    return None


def _socket_writer(sock: trio.socket.SocketType) -> DirectWriter:
    def write(data: bytes | bytearray | memoryview) -> int:
        fd = sock.fileno()  # -1 once closed: never a descriptor reused by someone else
        if fd < 0:
            return 0
        try:
            return os.write(fd, data)
        except OSError:  # BlockingIOError included
            return 0

    return write


def _counted(
    writer: DirectWriter, stats: RelayStats | None, outbound: bool, ending: _Ending
) -> DirectWriter:
    """``writer`` with what it took counted as the pump counts what it sends: the idle
    clock restarts and the forward's byte counters grow."""

    def write(data: bytes | bytearray | memoryview) -> int:
        sent = writer(data)
        if sent:
            ending.touch()
            if stats is not None:
                if outbound:
                    stats.bytes_out += sent
                else:
                    stats.bytes_in += sent
        return sent

    return write


async def _copy_loop(
    source: trio.abc.ReceiveStream,
    sink: trio.abc.HalfCloseableStream,
    stats: RelayStats | None,
    outbound: bool,
    ending: _Ending,
) -> None:
    paced = cast(PacedStream, sink) if implements(sink, PacedStream) else None
    # what the sink takes at once needs no send_all, whose checkpoint would cost a scheduler
    # pass per chunk; receive_some still checkpoints on every round
    writer = direct_writer(sink)
    while True:
        chunk = await source.receive_some(_CHUNK)
        ending.touch()
        if not chunk:
            break
        taken = writer(chunk) if writer is not None else 0
        if taken:
            ending.touch()
        if taken >= len(chunk):
            pass
        elif paced is not None and paced.paced:
            with ending.send():  # deliberate delays are the test's, not the peers' idleness
                await sink.send_all(chunk[taken:])
        else:
            # in pieces, each completed piece restarting the idle clock: a reader that takes
            # its bytes slowly keeps the relay alive, one that takes nothing for idle_timeout
            # (a stalled or hostile peer holding the relay's sockets and slot) does not
            with memoryview(chunk) as view:
                for start in range(taken, len(view), _PIECE):
                    await sink.send_all(view[start : start + _PIECE])
                    ending.touch()
        if stats is not None:
            if outbound:
                stats.bytes_out += len(chunk)
            else:
                stats.bytes_in += len(chunk)


async def relay(
    a: trio.abc.HalfCloseableStream,
    b: trio.abc.HalfCloseableStream,
    *,
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
    stats: RelayStats | None = None,
    name: str = "relay",
    faults: Faults | None = None,
) -> None:
    """Copy ``a`` -> ``b`` and ``b`` -> ``a`` until both directions have ended, then close both.

    A half-close is carried across (EOF on one side becomes ``send_eof`` on the other), so a
    client that shuts down its write side still receives the whole reply. Only a relay whose
    two directions both reached EOF ends with a clean close: when either side breaks, the
    relay is cancelled, or it is idle for ``idle_timeout`` seconds, both streams are reset
    (RST on TCP, ``Reset`` on a mux stream), because a direction that had not reached its EOF
    was cut short and its reader must not take what it got for the whole transfer. Idle means
    no progress either way: no byte arrived from either side and no piece (64 KiB) of a send
    completed, so a reader that takes its bytes slowly keeps the relay, while one that stops
    taking them (or a peer that never grants window) loses it after ``idle_timeout``, with a
    reset, instead of holding its sockets and slot for ever. Never raises for the peers'
    failures; those are logged at debug level.

    ``faults`` wraps both streams first (:meth:`pytunnel.testing.Faults.wrap`), for the
    callers that hold a forward's faults; the relay itself never looks at them.
    """
    if stats is not None:
        stats.active_connections += 1
        stats.total_connections += 1
    if faults is not None:
        a, b = faults.wrap(a, b, name)
    clean = False
    reason = (ErrorCode.CANCELLED, "the other side of the relay broke")
    breakable = _reset_on_break(a, b) or _reset_on_break(b, a)
    try:
        with trio.CancelScope(deadline=trio.current_time() + idle_timeout) as scope:
            ending = _Ending(scope, idle_timeout)
            async with trio.open_nursery() as nursery:
                # the way back runs in this task: one task fewer per relay (its memory and
                # its start-up), with the same fate as a child, since the nursery ends with it
                nursery.start_soon(_pump, a, b, stats, True, name, ending)
                await _pump(b, a, stats, False, name, ending)
        if scope.cancelled_caught and trio.current_time() >= scope.deadline:
            log.info("%s reset after %g s idle", name, idle_timeout)
            reason = (ErrorCode.IDLE_TIMEOUT, f"idle for {idle_timeout:g} s")
        # both directions ended with EOF: a clean close
        clean = ending.finished == 2
    finally:
        if breakable is not None:
            breakable.call_on_break(None)
        if stats is not None:
            stats.active_connections -= 1
            if _refused(a) or _refused(b):
                # opened with early data and refused by the peer: a failed open, which the
                # opener counts as its error, not a relayed connection
                stats.total_connections -= 1
        if not clean:
            # a direction was cut before its EOF (a broken side, a cancelled relay, the idle
            # timeout): the other end must not mistake the truncated transfer for a complete
            # one, so it is reset rather than closed with EOF
            abort(a, *reason)
            abort(b, *reason)
        await aclose_all(a, b)


def _unwrapped(stream: trio.abc.AsyncResource) -> trio.abc.AsyncResource:
    """What the relay's own wrappers (faults, rate limits) wrap: they keep it as ``stream``."""
    while isinstance(inner := getattr(stream, "stream", None), trio.abc.AsyncResource):
        stream = inner
    return stream


def _refused(stream: trio.abc.AsyncResource) -> bool:
    """A mux stream opened with early data and refused by the peer (``MuxStream.refusal``)."""
    return getattr(_unwrapped(stream), "refusal", None) is not None


def _reset_on_break(
    tunnelled: trio.abc.AsyncResource, other: trio.abc.AsyncResource
) -> BreakableStream | None:
    """When ``tunnelled`` is a mux stream and ``other`` a TCP connection, have the stream
    reset the connection the moment it breaks (its session died or its peer reset it), not
    once the relay's tasks have unwound; the relay would reset it then anyway. Returns the
    stream the callback was given to, for the relay to take it back when it ends."""
    inner, sock = _unwrapped(tunnelled), _unwrapped(other)
    if not isinstance(sock, trio.SocketStream):
        return None
    call_on_break = getattr(inner, "call_on_break", None)
    if call_on_break is None:
        return None

    def reset_now() -> None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        # closing the trio socket wakes whatever waits on it with ClosedResourceError, which
        # the relay treats as the broken side it is
        sock.socket.close()

    call_on_break(reset_now)
    return inner  # type: ignore[return-value]


def abort(stream: trio.abc.AsyncResource, code: int, message: str) -> None:
    """Arrange for the coming close of ``stream`` to be a reset, not a clean end: ``reset``
    on a stream that has it (a mux stream's ``Reset`` carries ``code`` and ``message``), RST
    (``SO_LINGER`` 0) on a TCP socket; other streams are left to close as they do."""
    if implements(stream, ResettableStream):
        cast(ResettableStream, stream).reset(code, message)
    elif isinstance(stream, trio.SocketStream):
        with contextlib.suppress(OSError):
            stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
