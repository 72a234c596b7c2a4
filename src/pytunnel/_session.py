"""The session itself (:class:`Session`): the only place where frames meet I/O.

One reader task feeds transport bytes into the sans-IO :class:`Multiplexer` and dispatches its
events to :class:`MuxStream` objects; one writer task drains the multiplexer's queued frames to
the transport, coalescing whatever accumulated since its last write into a single ``send_all``.
There is no task per frame or per stream: application tasks calling ``send_all`` enqueue frames
synchronously and park only when the stream's window or the session's write buffer is full.

Over a plain TCP transport the writer task is skipped while it is idle: whoever queues a frame
hands the queue to the kernel at once with one non-blocking write (``Session._kick_writer``),
because waking the writer costs a scheduler pass per message, most of a small message's
latency. What the kernel does not take waits, ahead of everything queued later, for the writer.

Both background tasks live in the session's own nursery, so leaving
:func:`~pytunnel.session.open_session` (or losing the transport, or a protocol violation) ends
them and wakes every parked stream with ``ClosedResourceError`` (we closed) or
``BrokenResourceError`` (the peer or transport did).

This module is one of the hot modules mypyc compiles (``pytunnel._build.HOT_MODULES``): what
it runs per message (queueing data, the inline write, window credit, the reader's dispatch)
is a large part of a small message's cost. The public namespace is ``pytunnel.session``, which
re-exports :class:`Session` and holds what mypyc cannot compile (``open_session``, an async
generator; ``SessionConfig``, an attrs class). Being compiled, :class:`Session` takes no
attributes beyond its own, cannot be patched, and raises with ``caused_by`` rather than
``raise ... from`` (compiled code drops the ``from``).

Over 500 lines on purpose: the reader's dispatch, the writer, the reaper and the carrier calls
all read and write the same multiplexer and the same tables of streams, openers and pings;
split apart, each half would have to reach into the other's state.
"""

from __future__ import annotations

import heapq
import logging
import math
import os
from collections import deque
from collections.abc import Callable

import trio

from ._direct import PacedReads, socket_reader
from ._incoming import IncomingStream, StreamSlot
from ._session_config import SessionConfig
from ._spec import check_target
from ._stream import MuxStream
from ._tls_stream import TLSSocketStream
from .errors import (
    ErrorCode,
    LocalProtocolError,
    RemoteProtocolError,
    SessionClosedError,
    StreamResetError,
    TunnelError,
    UnansweredError,
    caused_by,
    goaway_error,
    printable,
    refusal_error,
)
from .protocol.frames import FrameDecoder
from .protocol.messages import MAX_DATAGRAM
from .protocol.mux import (
    DatagramReceived,
    DatagramsReceived,
    DataReceived,
    Event,
    GoAwayReceived,
    Multiplexer,
    PingReceived,
    PongReceived,
    Role,
    StreamAccepted,
    StreamEnded,
    StreamOpened,
    StreamRefused,
    StreamReset,
    WindowOpened,
)

__all__ = ["Session"]

log = logging.getLogger("pytunnel.session")

#: Frames decoded between two checkpoints of the reader (a 512 KiB read of pings is ~18,000).
_FRAMES_PER_BATCH = 256

#: The prefix of the session's task names, given explicitly: trio names a task after its
#: function, and a compiled method has no module (its name would be the session's repr). The
#: names are the pure build's from before ``Session`` left ``pytunnel.session``.
_TASK = "pytunnel.session.Session."


class _RoomWaiter:
    """A sender parked in :meth:`Session.wait_for_room`: the bytes it wants queued, and its
    task (``None`` once it was cancelled: dropped when it reaches the head)."""

    __slots__ = ("size", "task")

    def __init__(self, size: int, task: trio.lowlevel.Task) -> None:
        self.size = size
        self.task: trio.lowlevel.Task | None = task


class Session:
    """Many streams over one transport. Create with :func:`open_session`."""

    def __init__(
        self,
        transport: trio.abc.Stream,
        role: Role,
        config: SessionConfig,
        *,
        decoder: FrameDecoder | None = None,
        peer_max_frame_size: int | None = None,
        name: str = "",
        version: int = 1,
        early_window: int = 0,
        peer_early_window: int = 0,
    ) -> None:
        self._transport = transport
        self.role = role
        self.config = config
        self.name = name or role.name.lower()
        #: The protocol version the handshake chose (1 when there was none, as in tests that
        #: run a bare session): what either side may send beyond version 1 depends on it.
        self.version = version
        self._mux = Multiplexer(
            role,
            window=config.window,
            max_frame_size=config.max_frame_size,
            peer_max_frame_size=peer_max_frame_size or config.max_frame_size,
            max_data_chunk=config.max_data_chunk,
            max_streams=config.max_streams,
            max_control_queue=config.max_control_queue,
            decoder=decoder,
            receive_budget=config.receive_budget,
            datagram_batches=version >= 2,
            version=version,
            early_window=early_window,
            peer_early_window=peer_early_window,
        )
        # read per message: native ints here, not attribute reads of the (pure) attrs config
        self._chunk: int = config.max_data_chunk
        self._high: int = config.write_buffer_high
        self._streams: dict[int, MuxStream] = {}
        # a Data frame with no event before it in its read goes to its stream as it is decoded
        self._mux.data_sink = self._deliver_data
        # a datagram must fit the peer's frame limit with its envelope
        self._max_datagram = min(MAX_DATAGRAM, (peer_max_frame_size or config.max_frame_size) - 64)
        self._opening: dict[int, trio.Event] = {}
        #: Streams opened with early data that the peer has not answered yet: a refusal
        #: breaks them with its typed error, an Accept lets their senders use the new window.
        self._early: dict[int, MuxStream] = {}
        #: ``(deadline, stream id, timeout)`` of early-data opens with an answer timeout, a
        #: heap; an entry whose stream was answered since is skipped when it comes up.
        self._answer_deadlines: list[tuple[float, int, float]] = []
        #: The answer timer's sleep, whose deadline a shorter timeout moves earlier.
        self._answer_scope: trio.CancelScope | None = None
        self._answer_running = False
        self._task_nursery: trio.Nursery | None = None
        #: Streams the peer opened that we have not answered yet (their cancel scopes fire if
        #: the peer resets them first).
        self._unanswered: dict[int, IncomingStream] = {}
        self._refusals: dict[int, BaseException] = {}
        # Bounded in practice by max_streams: the multiplexer refuses opens beyond it.
        self._incoming_send, self._incoming_receive = trio.open_memory_channel[IncomingStream](
            math.inf
        )
        self._pings: dict[int, trio.Event] = {}
        self._next_ping = 0
        #: Stream slots reserved by wait_stream_slot and not yet used or released.
        self._reserved = 0
        self._slot_lot = trio.lowlevel.ParkingLot()
        self._write_event = trio.Event()
        #: Set when a closed stream starts lingering (wakes the reaper).
        self._linger_event = trio.Event()
        #: Tasks waiting for the queue to empty (:meth:`_flush`).
        self._drain_lot = trio.lowlevel.ParkingLot()
        #: Senders waiting for room in the write buffer, oldest first. The writer wakes only
        #: those the room it just made takes (see :meth:`_grant_room`): waking them all, as a
        #: parking lot would, made every busy stream but one run only to park again, once per
        #: write, when several streams sent bulk at once.
        self._room_waiters: deque[_RoomWaiter] = deque()
        #: Waiters in ``_room_waiters`` that were cancelled (compacted when they are half).
        self._room_cancelled = 0
        self._closed_event = trio.Event()
        #: Set with ``_closed_event`` (a plain flag: asked on every frame sent or read).
        self._ended = False
        self._cancel_scope = trio.CancelScope()
        self._writer_scope = trio.CancelScope(shield=True)
        self.close_reason: BaseException | None = None
        #: What the peer's GoAway said, once it came (the reason its end is then given).
        self._goaway_reason: TunnelError | None = None
        self._on_terminate: list[Callable[[], None]] = []
        #: True when we ended the session (streams then raise ClosedResourceError).
        self._closed_locally = False
        self._writing = False
        #: The socket of a plain TCP transport, which a sender may write to itself while the
        #: writer task is idle; ``None`` for any other transport (WebSocket, memory...), whose
        #: ``send_all`` is the only way to write it.
        self._inline_socket: trio.socket.SocketType | None = (
            transport.socket
            if isinstance(transport, trio.SocketStream) and os.name == "posix"
            else None
        )
        #: The same for TLS on a plain TCP socket: its ``send_nowait`` encrypts and writes
        #: without waiting, and what it did not take is exactly what must be written next.
        self._inline_tls = transport if isinstance(transport, TLSSocketStream) else None
        #: The tail of an inline write the kernel did not take: it goes out before anything
        #: queued since (it may end mid-frame), and only the writer task sends it.
        self._unsent: memoryview | None = None
        #: ``trio.current_time()`` when the transport last delivered bytes (heartbeat checks).
        self.last_received = trio.current_time()
        # the run's clock, read directly: trio.current_time() is two calls more per read
        self._now = trio.lowlevel.current_clock().current_time
        self.bytes_written = 0
        self.bytes_read = 0

    def __repr__(self) -> str:
        return f"<Session {self.name} streams={len(self._streams)} closed={self.closed}>"

    # -------------------------------------------------------------- public API

    @property
    def closed(self) -> bool:
        return self._ended

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    @property
    def early_data(self) -> bool:
        """Whether :meth:`open_stream` ``early=True`` can send data before the peer's answer
        (a version 2 peer that announced an early window)."""
        return self._mux.peer_early_window > 0

    @property
    def bytes_buffered(self) -> int:
        """Bytes received on all streams that the application has not read yet (at most
        ``config.receive_budget``)."""
        return self._mux.bytes_buffered

    @property
    def receive_committed(self) -> int:
        """Bytes the peer could make this session hold right now: :attr:`bytes_buffered` plus
        the windows still granted (at most ``config.receive_budget``)."""
        return self._mux.receive_committed

    async def wait_closed(self) -> None:
        """Wait until the session has ended, for whatever reason (see ``close_reason``)."""
        await self._closed_event.wait()

    def on_terminate(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (which must not raise) the moment the session ends, before any
        stream learns of it; at once if it has already ended.

        Waking tasks are run in no set order, so this is the only way to act strictly before
        the streams' users do: the server closes a client's public listeners here, so that no
        connection is accepted into a forward whose relays are about to break.
        """
        if self.closed:
            callback()
        else:
            self._on_terminate.append(callback)

    @property
    def free_stream_slots(self) -> int:
        """Streams that could still be opened: the cap minus open streams (both directions)
        and slots reserved but not yet used."""
        return self.config.max_streams - self._mux.open_streams - self._reserved

    async def wait_stream_slot(self) -> StreamSlot:
        """Reserve a stream slot, waiting until one is free; pass it to :meth:`open_stream`.

        Raises ``SessionClosedError`` if the session ends while waiting.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            self._check_open()
            if self.free_stream_slots > 0:
                break
            await self._slot_lot.park()
        self._reserved += 1
        return StreamSlot(self, self._release_slot)

    def _release_slot(self) -> None:
        self._reserved -= 1
        self._wake_slot_waiters()

    def _wake_slot_waiters(self) -> None:
        if self._slot_lot:
            self._slot_lot.unpark_all()

    async def open_stream(
        self,
        host: str = "",
        port: int = 0,
        tag: int = 0,
        *,
        datagrams: bool = False,
        slot: StreamSlot | None = None,
        early: bool = False,
        answer_timeout: float | None = None,
    ) -> MuxStream:
        """Open a stream and wait for the peer's answer. ``datagrams`` opens a datagram stream
        (a UDP association) instead of a byte stream.

        ``early`` (a byte stream to a peer that takes early data, see :attr:`early_data`)
        returns at once, without waiting for the answer: the stream can be written to right
        away, within the early window the peer announced, and reads wait for the peer's data
        as usual. A refusal (or a reset before the answer, or the session's end) then breaks
        the stream: its operations raise ``BrokenResourceError`` whose ``__cause__`` is the
        typed refusal (``SessionClosedError`` for the end; also :attr:`MuxStream.refusal`
        and :meth:`MuxStream.call_on_refusal`); the bytes already sent are dropped by the
        peer.
        Without early data the call waits as it does without ``early``. ``answer_timeout``
        bounds the wait for the answer of a stream opened with early data: without an answer
        by then the stream is reset and broken with :class:`UnansweredError` (a
        ``NodeTimeoutError``), as a refusal would break it; one timer task per session keeps
        every such deadline, not a scope per stream. (A waiting open is bounded by its
        caller, with a cancel scope.)

        Raises the typed refusal (``NodeTimeoutError``, ``StreamLimitError``...) if the peer
        refuses, ``InvalidTargetError`` for a target no ``Open`` can carry (nothing is sent),
        ``SessionClosedError`` if the session ends first. If cancelled while waiting,
        the half-open stream is reset so nothing is left behind on either side. ``slot``, a
        reservation from :meth:`wait_stream_slot`, is used up (whatever the outcome).
        """
        if slot is not None:
            if slot.session is not self:
                raise LocalProtocolError("that stream slot belongs to another session")
            slot.release()
        check_target(host, port, allow_port_zero=True)  # InvalidTargetError, a refusal
        self._check_open()
        try:
            stream_id = self._mux.open_stream(host, port, tag, datagrams=datagrams)
        except LocalProtocolError as exc:
            raise caused_by(
                SessionClosedError("session is going away", code=ErrorCode.GOING_AWAY), exc
            ) from exc
        stream = MuxStream(self, stream_id, host, port, tag, datagrams=datagrams)
        self._streams[stream_id] = stream
        if early and not datagrams and self._mux.send_window(stream_id):
            self._early[stream_id] = stream
            if answer_timeout is not None:
                self._arm_answer_timer(stream_id, answer_timeout)
            self._kick_writer()
            return stream
        answered = self._opening[stream_id] = trio.Event()
        self._kick_writer()
        try:
            await answered.wait()
        except BaseException:
            self._opening.pop(stream_id, None)
            self._streams.pop(stream_id, None)
            self._refusals.pop(stream_id, None)
            if not self.closed:
                self._mux.reset_stream(stream_id, ErrorCode.CANCELLED, "open cancelled")
                self._kick_writer()
                self._wake_slot_waiters()
            raise
        refusal = self._refusals.pop(stream_id, None)
        if refusal is not None:
            raise refusal
        if self.closed:
            raise self._closed_error()
        return stream

    async def accept_stream(self) -> IncomingStream:
        """Wait for the peer to open a stream. Raises ``SessionClosedError`` once it ends."""
        try:
            return await self._incoming_receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise caused_by(self._closed_error(), None) from None

    async def ping(self) -> float:
        """Round-trip time of one Ping/Pong, in seconds."""
        self._check_open()
        self._next_ping = (self._next_ping + 1) % 2**64
        opaque = self._next_ping
        done = self._pings[opaque] = trio.Event()
        start = trio.current_time()
        self._mux.ping(opaque)
        self._kick_writer()
        try:
            await done.wait()
        finally:
            self._pings.pop(opaque, None)
        if self.closed:
            raise self._closed_error()
        return trio.current_time() - start

    async def aclose(self, code: int = ErrorCode.NORMAL, message: str = "") -> None:
        """End the session: send ``GoAway``, flush it briefly, close the transport.

        Every stream still open raises ``ClosedResourceError`` afterwards. Idempotent and safe
        to call from any task, including when cancelled (the teardown itself is shielded and
        bounded by ``close_timeout``).
        """
        if self.closed:
            # the session may have ended by itself (peer EOF, protocol violation, write error):
            # the transport must still be released
            await trio.aclose_forcefully(self._transport)
            return
        self._closed_locally = True
        with trio.CancelScope(shield=True):
            self._mux.go_away(code, message)
            self._kick_writer()
            with trio.move_on_after(self.config.close_timeout):
                await self._flush()
            self._terminate(SessionClosedError(message or "session closed locally", code=code))
            await trio.aclose_forcefully(self._transport)

    async def abort(self, error: TunnelError) -> None:
        """End the session at once because the link is unusable (a missed heartbeat, say).

        Unlike :meth:`aclose` nothing is flushed, since a dead link would only make us wait;
        streams raise ``BrokenResourceError`` with ``error`` as the cause, as if the peer had
        vanished.
        """
        if not self.closed:
            self._terminate(error)
        await trio.aclose_forcefully(self._transport)

    # -------------------------------------------------------------- internals

    def _check_open(self) -> None:
        if self.closed:
            raise self._closed_error()

    def _closed_error(self) -> SessionClosedError:
        reason = self.close_reason
        if isinstance(reason, SessionClosedError):
            err = SessionClosedError(reason.message, code=reason.code)
        elif isinstance(reason, TunnelError):
            err = SessionClosedError(str(reason), code=reason.code)
        else:
            err = SessionClosedError(f"session ended: {reason!r}")
        err.__cause__ = reason
        return err

    # -------------------------------------------------------------- StreamCarrier, for MuxStream

    @property
    def max_data_chunk(self) -> int:
        """Largest payload of one Data frame we send (``config.max_data_chunk``)."""
        return self._chunk

    def send_window(self, stream_id: int) -> int:
        """Bytes the peer accepts on ``stream_id`` now."""
        return self._mux.send_window(stream_id)

    def send_data(self, stream_id: int, data: memoryview) -> None:
        """Queue ``data`` on ``stream_id``; the caller checked window and :meth:`has_room`."""
        self._mux.send_data(stream_id, data)
        self._kick_writer()

    def send_data_nowait(self, stream_id: int, data: bytes | bytearray | memoryview) -> int:
        """Queue what the window and the write buffer take of ``data`` now, in Data frames of
        at most ``max_data_chunk``, as ``send_window``, ``has_room`` and ``send_data`` would
        chunk by chunk, and get it moving with one kick; returns the bytes queued.

        One call instead of three per frame: it is what a relay's direct writer does for
        every chunk it copies into a stream."""
        mux = self._mux
        window = mux.send_window(stream_id)
        total = len(data)
        if window <= 0 or not total:
            return 0
        chunk = self._chunk
        high = self._high
        if window >= total and total <= chunk:  # one frame, the usual case: no slicing
            queued = self._queued()
            if queued and queued + total > high:
                return 0
            mux.send_data(stream_id, data)
            self._kick_writer()
            return total
        pos = 0
        with memoryview(data) as view:
            while pos < total and window > 0:
                size = min(window, total - pos, chunk)
                queued = self._queued()
                if queued and queued + size > high:
                    break
                mux.send_data(stream_id, view[pos : pos + size])
                pos += size
                window -= size
        if pos:
            self._kick_writer()
        return pos

    def consumed(self, stream_id: int, size: int) -> None:
        """The application read ``size`` bytes of ``stream_id`` (window credit for the peer)."""
        if not self._ended:
            mux = self._mux
            if mux.consumed(stream_id, size):
                self._wake_slot_waiters()  # an ended stream's last unread byte: a free slot
            if mux.bytes_to_send:  # a window update, or frames already waiting: no harm
                self._kick_writer()

    def send_fin(self, stream_id: int) -> None:
        """Queue a Fin on ``stream_id`` unless it can no longer send."""
        if not self.closed and self._mux.can_send(stream_id):
            self._mux.send_fin(stream_id)
            self._kick_writer()

    def close_stream(self, stream_id: int, *, abort: bool) -> None:
        """The application closed ``stream_id``: Fin (then linger) or, if ``abort``, Reset."""
        self._streams.pop(stream_id, None)
        self._early.pop(stream_id, None)
        if self.closed:
            return
        if abort:
            self._mux.reset_stream(stream_id, ErrorCode.CANCELLED, "closed with unread data")
        else:
            self._mux.close_stream(stream_id, trio.current_time())
            if self._mux.lingering:
                self._linger_event.set()
        self._kick_writer()
        self._wake_slot_waiters()

    def reset_stream(self, stream_id: int, code: int, message: str) -> None:
        """The application reset ``stream_id``."""
        self._streams.pop(stream_id, None)
        self._early.pop(stream_id, None)
        if not self.closed:
            self._mux.reset_stream(stream_id, code, message)
            self._kick_writer()
        self._wake_slot_waiters()

    def _accept(self, stream: MuxStream) -> None:
        self._unanswered.pop(stream.stream_id, None)
        if not self._mux.has_stream(stream.stream_id):
            # the opener gave up (Reset) while we were dialling: hand back a broken stream so
            # the caller's relay ends at once, rather than raising into its nursery
            stream.break_with(StreamResetError("the opener cancelled the stream"))
            return
        self._mux.accept_stream(stream.stream_id)
        self._kick_writer()

    def _refuse(self, stream: MuxStream, code: int, message: str) -> None:
        self._unanswered.pop(stream.stream_id, None)
        if self.closed:  # the opener learns of the end from the session instead
            return
        self._streams.pop(stream.stream_id, None)
        if self._mux.has_stream(stream.stream_id):
            self._mux.refuse_stream(stream.stream_id, code, message)
            self._kick_writer()
        self._wake_slot_waiters()

    def send_datagram(self, stream_id: int, data: bytes | bytearray | memoryview) -> bool:
        """Queue one datagram on ``stream_id`` unless the write buffer is over its mark or it
        does not fit the peer's frames; ``False`` if dropped."""
        if self.closed or self._queued() > self._high:
            return False
        if not self._mux.can_send_datagram(stream_id) or len(data) > self._max_datagram:
            return False
        self._mux.send_datagram(stream_id, data)
        self._kick_writer()
        return True

    def send_datagrams(self, stream_id: int, payloads: list[bytes]) -> tuple[int, int]:
        """Queue several datagrams on ``stream_id`` with one write, as :meth:`send_datagram`
        would one by one: each goes while the write buffer is not over its mark, and one that
        does not fit the peer's frames is dropped alone. Returns how many datagrams were queued
        and their bytes; the others were dropped."""
        if self.closed or not self._mux.can_send_datagram(stream_id):
            return 0, 0
        room = self._high - self._queued()
        limit = self._max_datagram
        take: list[bytes] = []
        size = 0
        for data in payloads:
            if size > room:
                break
            if len(data) <= limit:
                take.append(data)
                size += len(data)
        if take:
            self._mux.send_datagrams(stream_id, take)
            self._kick_writer()
        return len(take), size

    def _kick_writer(self) -> None:
        """Get what was just queued moving: written inline when the writer task is idle over a
        plain TCP transport (or TLS on one), else handed to the writer task.

        Inline only when nothing is in flight (the writer is not inside ``send_all``) and no
        earlier tail waits (``_unsent``): the write then takes the whole queue, control frames
        first, exactly what the writer task would have sent next, so no frame overtakes another
        and the control queue's priority is the writer's. A write that would block or fails
        leaves its tail to the writer task, which waits for the socket and reports the error.
        """
        sock = self._inline_socket
        tls = self._inline_tls
        if (
            (sock is not None or tls is not None)
            and not self._writing
            and self._unsent is None
            and self._mux.bytes_to_send
            and not self._ended
        ):
            data = self._mux.data_to_send()
            if tls is not None:
                sent = tls.send_nowait(data)  # never raises; an error is the writer's
            else:
                assert sock is not None
                fd = sock.fileno()
                try:
                    sent = os.write(fd, data) if fd >= 0 else 0
                except OSError:  # BlockingIOError included; the writer raises a real error
                    sent = 0
            self.bytes_written += sent
            if sent < len(data):
                self._unsent = memoryview(data)[sent:]
            elif not self._mux.bytes_to_send:
                # every waiter: with the writer task idle, nothing would wake one that a grant
                # passed over (see _grant_room)
                if self._room_waiters:
                    self._wake_all_room()
                if self._drain_lot:
                    self._drain_lot.unpark_all()
                return
        self._write_event.set()

    def _queued(self) -> int:
        """Bytes waiting for the transport (not counting a write in flight)."""
        unsent = self._unsent
        return self._mux.bytes_to_send + (0 if unsent is None else len(unsent))

    def has_room(self, size: int) -> bool:
        """Whether ``size`` more bytes fit under the write buffer's high-water mark (always
        when nothing is queued, so a chunk larger than the mark still goes)."""
        queued = self._queued()
        return queued == 0 or queued + size <= self._high

    async def wait_for_room(self, size: int) -> None:
        """Back-pressure: park until ``size`` more bytes fit under the high-water mark.

        Waiters are woken in the order they came, each when the room the writer makes takes
        its ``size`` (:meth:`_grant_room`), and all of them whenever the queue empties."""
        while not self.has_room(size):
            if self.closed:
                if self._closed_locally:
                    raise trio.ClosedResourceError("session was closed")
                raise caused_by(trio.BrokenResourceError("session ended"), self.close_reason)
            waiter = _RoomWaiter(size, trio.lowlevel.current_task())
            self._room_waiters.append(waiter)

            def abort(_: object, waiter: _RoomWaiter = waiter) -> trio.lowlevel.Abort:
                waiter.task = None  # left in place: removing it from the middle is O(n)
                self._room_cancelled += 1
                if self._room_cancelled * 2 > len(self._room_waiters):
                    self._room_waiters = deque(w for w in self._room_waiters if w.task)
                    self._room_cancelled = 0
                return trio.lowlevel.Abort.SUCCEEDED

            await trio.lowlevel.wait_task_rescheduled(abort)

    def _grant_room(self) -> None:
        """Wake the oldest room waiters, as many as fit under the mark now (the first always
        when the queue is empty, as :meth:`has_room` lets any size into an empty queue).

        Called by the writer task before each write. A waiter woken that does not queue after
        all (its stream broke, its window closed) leaves room unused for one write at most:
        the writer wakes the next at its next write, and every waiter once the queue empties
        (:meth:`_wake_all_room`), so none waits while there is room and nothing to write."""
        waiters = self._room_waiters
        queued = self._queued()
        high = self._high
        while waiters:
            waiter = waiters[0]
            task = waiter.task
            if task is None:
                waiters.popleft()
                self._room_cancelled -= 1
                continue
            if queued and queued + waiter.size > high:
                return
            waiters.popleft()
            queued += waiter.size
            trio.lowlevel.reschedule(task)

    def _wake_all_room(self) -> None:
        """Wake every room waiter (the queue is empty, or the session ended)."""
        waiters = self._room_waiters
        if waiters:
            self._room_waiters = deque()
            self._room_cancelled = 0
            for waiter in waiters:
                if waiter.task is not None:
                    trio.lowlevel.reschedule(waiter.task)

    async def _flush(self) -> None:
        """Wait until everything queued so far has been handed to the transport."""
        while (self._queued() or self._writing) and not self.closed:
            await self._drain_lot.park()

    # -------------------------------------------------------------- background tasks

    async def _run(self) -> None:
        with self._cancel_scope:
            async with trio.open_nursery() as nursery:
                self._task_nursery = nursery
                nursery.start_soon(self._reader, name=_TASK + "_reader")
                nursery.start_soon(self._writer, name=_TASK + "_writer")
                nursery.start_soon(self._reaper, name=_TASK + "_reaper")
                if self._answer_deadlines:  # armed before the tasks started
                    self._answer_running = True
                    nursery.start_soon(self._answer_timer, name=_TASK + "_answer_timer")

    async def _reaper(self) -> None:
        """Reset the streams we closed whose peer has not sent its Fin within
        ``close_linger``: their slots are freed instead of held by a silent peer."""
        mux = self._mux
        linger = self.config.close_linger
        while True:
            oldest = mux.oldest_lingering
            if oldest is None:
                self._linger_event = trio.Event()
                await self._linger_event.wait()
                continue
            await trio.sleep_until(oldest + linger)
            if mux.expire_lingering(trio.current_time() - linger):
                self._kick_writer()
                self._wake_slot_waiters()  # the freed slots may be what a listener waits for

    def _arm_answer_timer(self, stream_id: int, timeout: float) -> None:
        deadline = trio.current_time() + timeout
        heap = self._answer_deadlines
        heapq.heappush(heap, (deadline, stream_id, timeout))
        if self._task_nursery is None:  # not running (yet, or any more): nothing to time
            return
        if not self._answer_running:
            self._answer_running = True
            self._task_nursery.start_soon(self._answer_timer, name=_TASK + "_answer_timer")
        elif self._answer_scope is not None and deadline < self._answer_scope.deadline:
            self._answer_scope.deadline = deadline  # only a shorter timeout than the others

    async def _answer_timer(self) -> None:
        """Break the streams opened with early data whose answer did not come in time
        (``open_stream(..., answer_timeout=)``). Runs while deadlines are pending: a
        session whose opens are all answered and past their deadlines holds no timer task."""
        heap = self._answer_deadlines
        while True:
            if not heap:
                self._answer_running = False
                return
            # late by up to a tenth of the timeout (at most 1 s), never early: the deadlines
            # of a burst of opens, most of them answered long before, expire in one wake-up
            first, _, timeout = heap[0]
            with trio.CancelScope(deadline=first + min(1.0, timeout / 10)) as self._answer_scope:
                await trio.sleep_forever()
            self._answer_scope = None
            now = trio.current_time()
            while heap and heap[0][0] <= now:  # every deadline passed, the slack's included
                _, stream_id, timeout = heapq.heappop(heap)
                stream = self._early.get(stream_id)
                if stream is None:
                    continue  # answered (or ended) in time
                self.reset_stream(stream_id, ErrorCode.CANCELLED, "no answer in time")
                stream.refuse_early(
                    UnansweredError(
                        f"no answer within {timeout:g} s",
                        target=f"{stream.host}:{stream.port}",
                    )
                )

    async def _writer(self) -> None:
        # Shielded: when the surrounding task tree is cancelled, the writer must stay alive long
        # enough for aclose() to flush GoAway; _terminate() cancels this scope explicitly.
        mux = self._mux
        transport = self._transport
        with self._writer_scope:
            try:
                while True:
                    data: bytes | bytearray | memoryview
                    if self._unsent is not None:
                        data, self._unsent = self._unsent, None
                    elif mux.bytes_to_send:
                        data = mux.data_to_send()
                    else:
                        self._wake_all_room()
                        self._drain_lot.unpark_all()
                        self._write_event = trio.Event()
                        await self._write_event.wait()
                        continue
                    self._grant_room()
                    self._drain_lot.unpark_all()
                    self._writing = True
                    try:
                        await transport.send_all(data)
                    finally:
                        self._writing = False
                    self.bytes_written += len(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self._terminate(exc)

    async def _reader(self) -> None:
        mux = self._mux
        transport = self._transport
        size = self.config.receive_size
        now = self._now
        # a plain TCP transport is read directly (pytunnel._direct): no receive_some per read,
        # and after a short read (the socket was emptied) a wait first instead of a read that
        # fails; a checkpoint every MAX_STREAK reads that found data keeps a busy peer from
        # holding the event loop even when its reads decode into few frames
        reader = socket_reader(transport) or self._inline_tls  # TLS on TCP: the same
        reads = None if reader is None else PacedReads(reader)
        eof = False
        try:
            while True:
                # Frames already buffered go first: the handshake may have read some past
                # Auth/Welcome. A large burst is decoded in batches with a checkpoint between
                # them, so one busy peer cannot monopolise the event loop.
                try:
                    events = mux.next_events(_FRAMES_PER_BATCH)
                except RemoteProtocolError as exc:
                    log.warning("%s: protocol violation by the peer: %s", self.name, exc)
                    self._closed_locally = False
                    self._mux.go_away(exc.code, exc.message)
                    self._kick_writer()
                    with trio.move_on_after(self.config.close_timeout):
                        await self._flush()
                    self._terminate(exc)
                    await trio.aclose_forcefully(transport)
                    return
                for event in events:
                    self._dispatch(event)
                if events:
                    self._wake_slot_waiters()
                if mux.bytes_to_send:
                    self._kick_writer()
                if mux.frames_pending:
                    await trio.lowlevel.checkpoint()
                    if reads is not None:
                        reads.streak = 0
                    continue
                if eof:
                    if mux.goaway_received and self.close_reason is None:
                        return self._terminate(self._goaway_reason or SessionClosedError())
                    self._terminate(trio.BrokenResourceError("transport closed by the peer"))
                    return
                data: bytes | bytearray
                if reads is not None:  # a native call and await in a compiled build
                    data = await reads.receive_some(size)
                else:
                    data = await transport.receive_some(size)
                self.bytes_read += len(data)
                self.last_received = now()
                mux.feed(data)
                eof = not data
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._terminate(exc)

    def _deliver_data(self, stream_id: int, data: bytes) -> None:
        """A Data frame's payload to its stream (the multiplexer's ``data_sink``, and the
        ``DataReceived`` events it returns)."""
        stream = self._streams.get(stream_id)
        if stream is not None:
            stream.deliver_data(data)
        elif self._mux.consumed(stream_id, len(data)):  # the app closed it: credit back
            self._wake_slot_waiters()

    def _dispatch(self, event: Event) -> None:
        match event:
            case DataReceived(stream_id, data):
                self._deliver_data(stream_id, data)
            case DatagramReceived(stream_id, data):
                stream = self._streams.get(stream_id)
                if stream is not None:
                    stream.deliver_datagram(data)
            case DatagramsReceived(stream_id, batch):
                stream = self._streams.get(stream_id)
                if stream is not None:
                    stream.deliver_datagrams(batch)
            case WindowOpened(stream_id):
                stream = self._streams.get(stream_id)
                if stream is not None:
                    stream.window_opened()
            case StreamOpened(stream_id, host, port, tag, datagrams):
                stream = MuxStream(self, stream_id, host, port, tag, datagrams=datagrams)
                self._streams[stream_id] = stream
                incoming = self._unanswered[stream_id] = IncomingStream(
                    self, stream, on_accept=self._accept, on_refuse=self._refuse
                )
                self._incoming_send.send_nowait(incoming)
            case StreamAccepted(stream_id):
                answered = self._opening.pop(stream_id, None)
                if answered is not None:
                    answered.set()
                elif (stream := self._early.pop(stream_id, None)) is not None:
                    stream.window_opened()  # a sender past the early window may go on
            case StreamRefused(stream_id, code, message):
                self._refused(stream_id, self._streams.pop(stream_id, None), code, message)
            case StreamEnded(stream_id):
                stream = self._streams.get(stream_id)
                if stream is not None:
                    stream.deliver_eof()
            case StreamReset(stream_id, code, message):
                stream = self._streams.pop(stream_id, None)
                unanswered = self._unanswered.pop(stream_id, None)
                if unanswered is not None:
                    unanswered.cancel_scope.cancel()
                self._refused(stream_id, stream, code, message)  # reset before Accept
                if stream is not None:  # (no-op if _refused broke it with the refusal)
                    stream.break_with(StreamResetError(printable(message), code=code))
            case PongReceived(opaque):
                waiter = self._pings.get(opaque)
                if waiter is not None:
                    waiter.set()
            case GoAwayReceived(code, message):
                self._goaway_reason = goaway_error(code, message)
                log.debug("%s: peer sent GoAway: %s", self.name, self._goaway_reason)
                self._incoming_send.close()
            case PingReceived():
                pass

    def _refused(self, stream_id: int, stream: MuxStream | None, code: int, message: str) -> None:
        """A stream we are opening was refused (or reset before it was accepted): its opener
        wakes to raise the typed refusal."""
        answered = self._opening.pop(stream_id, None)
        if answered is not None:
            target = f"{stream.host}:{stream.port}" if stream is not None else ""
            self._refusals[stream_id] = refusal_error(code, message, target=target)
            answered.set()
        elif (early := self._early.pop(stream_id, None)) is not None:
            # opened with early data: its user holds it already, and learns of it there
            early.refuse_early(refusal_error(code, message, target=f"{early.host}:{early.port}"))

    def _terminate(self, reason: BaseException) -> None:
        """End everything synchronously: streams, waiters, background tasks."""
        if self.closed:
            return
        if self._goaway_reason is not None and not self._closed_locally:
            reason = self._goaway_reason
        self.close_reason = reason
        self._ended = True
        self._mux.data_sink = None  # session -> mux -> this bound method: the cycle ends here
        self._closed_event.set()
        callbacks, self._on_terminate = self._on_terminate, []
        for callback in callbacks:
            callback()
        self._cancel_scope.cancel()
        self._writer_scope.cancel()
        # streams opened with early data and not answered: their openers learn of the end as
        # a waiting open_stream would have
        early, self._early = list(self._early.values()), {}
        for stream in early:
            self._streams.pop(stream.stream_id, None)
            stream.refuse_early(self._closed_error())
        for stream in list(self._streams.values()):
            stream.session_ended(reason, locally=self._closed_locally)
        self._streams.clear()
        for incoming in list(self._unanswered.values()):
            incoming.cancel_scope.cancel()
        self._unanswered.clear()
        for event in list(self._opening.values()):
            event.set()
        self._opening.clear()
        for event in list(self._pings.values()):
            event.set()
        self._incoming_send.close()
        self._wake_all_room()
        self._drain_lot.unpark_all()
        self._slot_lot.unpark_all()
        self._write_event.set()
        if not self._closed_locally:
            log.debug("%s: session ended: %r", self.name, reason)
