"""The bidirectional pump between two streams: half-close, idle timeout, byte counters.

One relay is one child nursery with the two pumps (one in a child task, the other in the
relay's own task), so cancelling the relay's parent (the forward, the session) ends both
directions at once and closes both streams. The direction from a mux stream into a socket
needs no task while it keeps up (:class:`_Taskless`): the session's reader writes into the
socket itself, and a child task runs only while something waits for a reader. There is no task
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
from time import perf_counter as _perf_counter
from typing import TYPE_CHECKING, cast

import trio

try:
    from trio._core._run import SystemClock as _SystemClock
except ImportError:  # pragma: no cover - another trio: every clock is read through its method
    _SystemClock = None  # type: ignore[assignment,misc]

from ._direct import (
    MAX_STREAK,
    DirectReader,
    PacedReads,
    SocketReader,
    raw_socket,
    socket_reader,
    write_now,
)
from ._relay_protocols import (
    BreakableStream,
    DirectReceive,
    DirectSink,
    DirectSource,
    PacedStream,
    ResettableStream,
)
from ._stream import DirectWriter
from ._util import aclose_all, implements, send_eof_now
from .errors import ErrorCode, InvalidTargetError, SessionClosedError, TargetForbiddenError

if TYPE_CHECKING:
    from .testing.faults import Faults

__all__ = [
    "DEFAULT_IDLE_TIMEOUT",
    "DirectReader",
    "DirectReceive",
    "DirectSink",
    "DirectSource",
    "PacedStream",
    "RelayStats",
    "ResettableStream",
    "abort",
    "direct_reader",
    "direct_writer",
    "relay",
]

log = logging.getLogger("pytunnel.relay")

#: Seconds without a byte moving in either direction before a relay is reset.
DEFAULT_IDLE_TIMEOUT = 300.0
_CHUNK = 256 * 1024
#: Progress granularity of a send: a whole chunk, the size of one Data frame of a tunnel
#: stream. Smaller pieces cut every chunk that waited for a session's write buffer into as
#: many frames, each with its own ``send_all``, its checkpoint and the far side's write: most
#: chunks wait when several streams of one session are busy (docs/performance.md, "Several
#: busy streams").
_PIECE = _CHUNK


def _idle_slack(idle_timeout: float) -> float:
    """How late an idle reset may come: ``min(1 s, idle_timeout / 10)``.

    Re-arming a cancel scope's deadline costs a clock read, a deadline-heap push and trio's
    bookkeeping; done on every chunk, that is a sizeable part of a small message's cost. So
    the deadline is moved only once activity has pushed it more than this slack: a relay is
    reset between ``idle_timeout`` and ``idle_timeout + slack`` after the last progress,
    never earlier.
    """
    return min(1.0, idle_timeout / 10)


#: Why a relay that was cut resets its streams (a shared tuple, not one per idle relay).
_CUT = (ErrorCode.CANCELLED, "the other side of the relay broke")

#: What a direction meets when a side breaks: the peer's reset or a lost transport
#: (``BrokenResourceError``, ``OSError``), or a stream closed under it (the relay is ending).
_BROKEN_SIDE = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class _Ending:
    """What the two pumps of one relay share: the idle clock and how their directions ended."""

    __slots__ = (
        "_now",
        "deadline",
        "finished",
        "idle_timeout",
        "offset",
        "scope",
        "sending",
        "slack",
    )

    def __init__(self, scope: trio.CancelScope, idle_timeout: float) -> None:
        self.scope = scope
        self.idle_timeout = idle_timeout
        #: Sends that stop the idle clock while they last: half-closes and sends into paced
        #: streams (whose delays are deliberate). Plain sends restart the clock piece by
        #: piece.
        self.sending = 0
        #: Directions that reached their EOF and carried it across. Only when both have is
        #: the relay complete: a pump that met a broken side may end without any
        #: ``Cancelled`` being raised (the other pump can meet the break too, before its next
        #: checkpoint), so the cancel scope alone cannot tell a cut relay from a finished one.
        self.finished = 0
        #: See :func:`_idle_slack`.
        self.slack = _idle_slack(idle_timeout)
        #: The scope's deadline as last set here (reading it back from the scope costs more).
        self.deadline: float = scope.deadline
        # the run's clock, read directly: trio.current_time() is two calls more per touch;
        # its bound method shared by the run's relays, not one per relay. With trio's own
        # clock, ``offset`` is its offset: the time is then ``offset + perf_counter()``, read
        # with no Python call (``SystemClock.current_time`` is one); ``None`` with any other
        # clock (a test's), which ``_now`` reads.
        self._now: Callable[[], float]
        self.offset: float | None
        self._now, self.offset = _clock_reader()

    def touch(self) -> None:
        """Restart the idle clock (a byte arrived or a send completed), within the slack.

        The pump and the taskless direction do the same inline, once per chunk."""
        if self.sending:
            return  # the deadline is off while such a send lasts
        offset = self.offset
        now = self._now() if offset is None else offset + _perf_counter()
        if now + self.idle_timeout > self.deadline:
            self.rearm(now)

    def rearm(self, now: float) -> None:
        """Move the deadline to ``now + idle_timeout + slack`` (see :func:`_idle_slack`)."""
        self.deadline = self.scope.deadline = now + self.idle_timeout + self.slack

    @contextlib.contextmanager
    def send(self) -> Iterator[None]:
        self.sending += 1
        self.deadline = self.scope.deadline = math.inf
        try:
            yield
        finally:
            self.sending -= 1
            if not self.sending:
                self.deadline = -math.inf  # re-armed from now
            self.touch()

    def broken(self, name: str, exc: BaseException) -> None:
        """A direction met a broken side: the other direction has nothing left to do either,
        so the relay is cut (and, not finished, ends with resets)."""
        log.debug("%s ended by a broken side: %r", name, exc)
        self.scope.cancel()


#: The last run's clock, its bound ``current_time`` and, for trio's own clock, its offset
#: (see :func:`_clock_reader`).
_clock: tuple[trio.abc.Clock | None, Callable[[], float], float | None] = (
    None,
    trio.current_time,
    None,
)


def _clock_reader() -> tuple[Callable[[], float], float | None]:
    """The current run's clock's ``current_time``, one bound method for all its relays, and
    the offset to ``time.perf_counter`` when that clock is trio's own ``SystemClock`` (whose
    ``current_time`` is exactly ``offset + perf_counter()``), else ``None``."""
    global _clock
    clock = trio.lowlevel.current_clock()
    if _clock[0] is not clock:
        offset = clock.offset if type(clock) is _SystemClock else None
        _clock = (clock, clock.current_time, offset)
    return _clock[1], _clock[2]


class RelayStats:
    """Live counters, shared by every relay of one forward."""

    __slots__ = (
        "active_connections",
        "bytes_in",
        "bytes_out",
        "datagrams_dropped",
        "errors",
        "total_connections",
    )

    def __init__(self) -> None:
        #: Bytes from the side that accepted the connection towards the target.
        self.bytes_out = 0
        #: Bytes from the target back.
        self.bytes_in = 0
        self.active_connections = 0
        self.total_connections = 0
        #: Failed connections by category: ``NODE_TIMEOUT``, ``NODE_UNSTABLE``,
        #: ``FORBIDDEN`` (the dialling side's policy), ``REFUSED`` (a limit, a failed
        #: negotiation, any other refusal), ``LINK_DOWN`` (no tunnel connection at the time).
        self.errors: dict[str, int] = {}
        #: UDP forwards: datagrams dropped (queue full, too many associations, send failed).
        self.datagrams_dropped = 0

    def __repr__(self) -> str:
        return (
            f"RelayStats(bytes_out={self.bytes_out}, bytes_in={self.bytes_in}, "
            f"active_connections={self.active_connections}, "
            f"total_connections={self.total_connections}, errors={self.errors!r}, "
            f"datagrams_dropped={self.datagrams_dropped})"
        )

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
    """One direction, to its EOF (carried across) or to a broken side (the relay is cut).

    A source read directly (a plain socket, or a wrapper around one: the relay's own
    direction at both ends of a ``-L`` forward) is read in this frame: an idle relay's task
    is parked here, in trio's ``wait_readable`` under it, with no coroutine of a read loop
    or a reader in between (each frame is a few hundred bytes, thousands of idle relays).
    The loop is :class:`~pytunnel._direct.PacedReads`'s: after a short read a wait first,
    and a checkpoint after :data:`~pytunnel._direct.MAX_STREAK` reads without one.
    """
    try:
        reader = direct_reader(source)
        if reader is None:
            await _copy(source, sink, stats, outbound, ending)
        else:
            paced = cast(PacedStream, sink) if implements(sink, PacedStream) else None
            writer = direct_writer(sink)
            # a plain socket's wait is trio's, called here rather than through the reader
            sock = (
                raw_socket(cast(trio.SocketStream, source).socket)
                if type(reader) is SocketReader
                else None
            )
            drained = False
            streak = 0
            while True:
                if drained:
                    if sock is None:
                        await reader.wait()
                    else:
                        fd = sock.fileno()
                        if fd < 0:
                            raise trio.ClosedResourceError("this socket was already closed")
                        await trio.lowlevel.wait_readable(fd)
                    streak = 0
                elif streak >= MAX_STREAK:
                    await trio.lowlevel.checkpoint()
                    streak = 0
                chunk = reader.receive_nowait(_CHUNK)
                if chunk is None:
                    drained = True
                    continue
                drained = len(chunk) < _CHUNK
                streak += 1
                if not ending.sending:  # ending.touch(), inline: once per chunk
                    offset = ending.offset
                    now = ending._now() if offset is None else offset + _perf_counter()
                    if now + ending.idle_timeout > ending.deadline:
                        ending.rearm(now)
                if not chunk:
                    break
                taken = writer(chunk) if writer is not None else 0
                if taken < len(chunk):
                    await _send_rest(sink, chunk, taken, paced, ending)
                if stats is not None:
                    if outbound:
                        stats.bytes_out += len(chunk)
                    else:
                        stats.bytes_in += len(chunk)
            await _carry_eof(sink, ending)
        ending.finished += 1
    except _BROKEN_SIDE as exc:
        ending.broken(name, exc)


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
    await _carry_eof(sink, ending)


async def _carry_eof(sink: trio.abc.HalfCloseableStream, ending: _Ending) -> None:
    """Half-close ``sink``: at once where it can be (then the idle clock needs no stopping),
    else with ``send_eof``, the idle clock stopped while it waits."""
    if send_eof_now(sink):
        ending.touch()
    else:
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


def direct_reader(stream: trio.abc.ReceiveStream) -> DirectReader | None:
    """A direct reader of ``stream`` for the pump, or ``None`` to use its ``receive_some``.

    A plain ``trio.SocketStream`` gets a :class:`~pytunnel._direct.SocketReader`; a wrapper
    (:class:`DirectReceive`) decides for itself, from its wrapped stream's reader; any other
    stream (a mux stream, TLS) gets none.
    """
    reader = socket_reader(stream)
    if reader is not None:
        return reader
    if implements(stream, DirectReceive):
        return cast(DirectReceive, stream).direct_reader()
    return None


def _socket_writer(sock: trio.socket.SocketType) -> DirectWriter:
    raw = raw_socket(sock)

    def write(data: bytes | bytearray | memoryview) -> int:
        return write_now(raw, data)

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
    idle: Callable[[], bool] | None = None,
) -> bool:
    """Copy until EOF (``True``), or until ``idle()``, asked after each chunk, says the
    direction can go on without this task (``False``)."""
    paced = cast(PacedStream, sink) if implements(sink, PacedStream) else None
    # what the sink takes at once needs no send_all, whose checkpoint would cost a scheduler
    # pass per chunk
    writer = direct_writer(sink)
    # a source read directly: no receive_some per chunk, and after a short read (the socket
    # was emptied) a wait first instead of a read that fails; a checkpoint every MAX_STREAK
    # reads that found data without a wait keeps a busy relay fair and cancellable
    reader = direct_reader(source)
    receive_some = source.receive_some if reader is None else PacedReads(reader).receive_some
    while True:
        chunk = await receive_some(_CHUNK)
        ending.touch()
        if not chunk:
            return True
        # a chunk the writer takes at once restarts nothing the receive did not: no time passed
        taken = writer(chunk) if writer is not None else 0
        if taken < len(chunk):
            await _send_rest(sink, chunk, taken, paced, ending)
        if stats is not None:
            if outbound:
                stats.bytes_out += len(chunk)
            else:
                stats.bytes_in += len(chunk)
        if idle is not None and idle():
            return False


async def _send_rest(
    sink: trio.abc.SendStream,
    chunk: bytes | bytearray,
    taken: int,
    paced: PacedStream | None,
    ending: _Ending,
) -> None:
    """Send what the direct writer did not take of ``chunk`` (from ``taken`` on)."""
    if paced is not None and paced.paced:
        with ending.send():  # deliberate delays are the test's, not the peers' idleness
            await sink.send_all(chunk[taken:])
    else:
        # in pieces, each completed piece restarting the idle clock: a reader that takes its
        # bytes slowly keeps the relay alive, one that takes nothing for idle_timeout (a
        # stalled or hostile peer holding the relay's sockets and slot) does not
        with memoryview(chunk) as view:
            for start in range(taken, len(view), _PIECE):
                await sink.send_all(view[start : start + _PIECE])
                ending.touch()


class _Taskless:
    """One direction of a relay, from a stream that delivers directly (a mux stream) into a
    sink with a non-blocking writer (a socket), run without a task of its own while it can.

    An idle relayed connection is most connections at scale, and a task with its coroutine
    frames is most of what one costs; this direction usually needs none: the session's
    reader task writes each Data frame into the sink itself
    (:meth:`pytunnel._stream.MuxStream.deliver_directly` with ``wake``). A task is started
    only when the stream has something a reader must handle (what the sink did not take, the
    EOF, a break, a close); it copies as the relay's pumps do, and hands the direction back
    and ends once it has read everything, unless the relay's other direction has finished,
    in which case it runs to this direction's EOF (the relay waits for it then).
    """

    __slots__ = ("_arming", "_inner", "_nursery", "_other_done", "_sock", "_state", "ending",
                 "name", "outbound", "sink", "source", "stats")  # fmt: skip

    def __init__(
        self,
        source: trio.abc.ReceiveStream,
        sink: trio.abc.HalfCloseableStream,
        sock: trio.socket.SocketType | None,
        writer: DirectWriter | None,
        stats: RelayStats | None,
        outbound: bool,
        name: str,
        ending: _Ending,
    ) -> None:
        self.source = source
        self.sink = sink
        #: The sink's socket when it is a plain one (written by :meth:`write` itself, with no
        #: writer closure per relay), else ``None`` and ``_inner`` is the sink's writer.
        self._sock = None if sock is None else raw_socket(sock)
        self._inner = writer
        self.stats = stats
        self.outbound = outbound
        self.name = name
        self.ending = ending
        #: _IDLE (no task, the writer takes what arrives), _RUNNING (a task, or the relay's
        #: own, reads the stream), _DONE (stopped)
        self._state = _DONE
        self._arming = False
        self._other_done = False
        self._nursery: trio.Nursery | None = None

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """The direct writer handed to the stream: what the sink takes now, counted as the
        pumps count what they send (the idle clock restarts, the byte counters grow)."""
        sock = self._sock
        if sock is None:
            assert self._inner is not None
            sent = self._inner(data)
        else:
            sent = write_now(sock, data)
        if sent:
            ending = self.ending
            if not ending.sending:  # ending.touch(), inline: once per message
                offset = ending.offset
                now = ending._now() if offset is None else offset + _perf_counter()
                if now + ending.idle_timeout > ending.deadline:
                    ending.rearm(now)
            stats = self.stats
            if stats is not None:
                if self.outbound:
                    stats.bytes_out += sent
                else:
                    stats.bytes_in += sent
        return sent

    def start(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        if not self._go_idle():
            nursery.start_soon(self._run)

    def _go_idle(self) -> bool:
        """Hand the direction to the writer alone, unless a reader is needed now (then
        ``False``, and the stream stays in the caller's hands)."""
        if self._other_done:
            return False
        self._state = _IDLE
        self._arming = True
        try:
            cast(DirectSource, self.source).deliver_directly(self.write, self._wake)
        finally:
            self._arming = False
        return self._state == _IDLE

    def _wake(self) -> None:
        if self._state == _IDLE:
            self._state = _RUNNING
            if not self._arming:
                assert self._nursery is not None
                self._nursery.start_soon(self._run)

    async def _run(self) -> None:
        try:
            if not await _copy_loop(
                self.source, self.sink, self.stats, self.outbound, self.ending, self._go_idle
            ):
                return  # idle again: no task until a reader is needed
            self._state = _DONE
            await _carry_eof(self.sink, self.ending)
            self.ending.finished += 1
        except _BROKEN_SIDE as exc:
            self.ending.broken(self.name, exc)

    async def finish(self) -> None:
        """The relay's other direction ended with its EOF: run this one to its own, in the
        relay's task if no task runs it now (the relay then waits for that task)."""
        self._other_done = True
        if self._state == _IDLE:
            self._state = _RUNNING
            cast(DirectSource, self.source).deliver_directly(self.write)
            await self._run()

    def abandon(self) -> None:
        """The relay is being cut: start no task for this direction any more."""
        self._state = _DONE

    def stop(self) -> None:
        """The relay is ending: no more writes, no task started."""
        self._state = _DONE
        cast(DirectSource, self.source).deliver_directly(None)


_IDLE, _RUNNING, _DONE = range(3)


def _taskless(
    source: trio.abc.ReceiveStream,
    sink: trio.abc.HalfCloseableStream,
    stats: RelayStats | None,
    outbound: bool,
    name: str,
    ending: _Ending,
) -> _Taskless | None:
    # a wrapper may pass direct delivery on, or not (it wraps a socket): ask
    if not implements(source, DirectSource) or not cast(DirectSource, source).deliver_directly(
        None
    ):
        return None
    if isinstance(sink, trio.SocketStream) and os.name == "posix":
        # direct_writer's socket write, done by the _Taskless itself
        return _Taskless(source, sink, sink.socket, None, stats, outbound, name, ending)
    writer = direct_writer(sink)
    if writer is None:
        return None
    return _Taskless(source, sink, None, writer, stats, outbound, name, ending)


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
    no progress either way: no byte arrived from either side and no piece (256 KiB) of a send
    completed, so a reader that takes its bytes slowly keeps the relay, while one that stops
    taking them (or a peer that never grants window) loses it after ``idle_timeout``, with a
    reset, instead of holding its sockets and slot for ever. The reset comes at most
    ``min(1 s, idle_timeout / 10)`` late, never early: the idle deadline is moved only once
    activity pushed it past that slack, not on every chunk. Never raises for the peers'
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
    reason = _CUT
    breakable: BreakableStream | None = None
    try:
        # the nursery's own scope is the idle clock and the relay's cut: one cancel scope
        # per relay, not two (thousands of idle relays hold them)
        async with trio.open_nursery() as nursery:
            scope = nursery.cancel_scope
            scope.deadline = trio.current_time() + idle_timeout
            ending = _Ending(scope, idle_timeout)
            # one direction from a mux stream into a socket needs no task while idle; the
            # other runs in this task (one task fewer per relay, its memory and its
            # start-up, with the same fate as a child, since the nursery ends with it)
            lazy = _taskless(a, b, stats, True, name, ending) or _taskless(
                b, a, stats, False, name, ending
            )
            breakable = _reset_on_break(a, b, lazy) or _reset_on_break(b, a, lazy)
            if lazy is None:
                nursery.start_soon(_pump, a, b, stats, True, name, ending)
                await _pump(b, a, stats, False, name, ending)
            else:
                try:
                    lazy.start(nursery)
                    if lazy.outbound:
                        await _pump(b, a, stats, False, name, ending)
                    else:
                        await _pump(a, b, stats, True, name, ending)
                    if not scope.cancel_called:
                        await lazy.finish()
                finally:
                    lazy.stop()
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
    tunnelled: trio.abc.AsyncResource,
    other: trio.abc.AsyncResource,
    lazy: _Taskless | None = None,
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

    call_on_break(_ResetNow(sock, lazy))
    return inner  # type: ignore[return-value]


class _ResetNow:
    """The reset-on-break callback of :func:`_reset_on_break` (an object with two slots
    rather than a closure with its cells: thousands of idle relays hold one each)."""

    __slots__ = ("lazy", "sock")

    def __init__(self, sock: trio.SocketStream, lazy: _Taskless | None) -> None:
        self.sock = sock
        self.lazy = lazy

    def __call__(self) -> None:
        sock = self.sock
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        # closing the trio socket wakes whatever waits on it with ClosedResourceError, which
        # the relay treats as the broken side it is
        sock.socket.close()
        if self.lazy is not None:
            # the relay's own task wakes on the closed socket and ends the relay; a task
            # started for the broken stream would only find it broken (and at scale, the
            # tasks started for thousands of streams breaking at once would delay the
            # resets of the streams after them)
            self.lazy.abandon()


def abort(stream: trio.abc.AsyncResource, code: int, message: str) -> None:
    """Arrange for the coming close of ``stream`` to be a reset, not a clean end: ``reset``
    on a stream that has it (a mux stream's ``Reset`` carries ``code`` and ``message``), RST
    (``SO_LINGER`` 0) on a TCP socket; other streams are left to close as they do."""
    if implements(stream, ResettableStream):
        cast(ResettableStream, stream).reset(code, message)
    elif isinstance(stream, trio.SocketStream):
        with contextlib.suppress(OSError):
            stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
