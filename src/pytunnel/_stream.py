"""One stream of a multiplexed session: :class:`MuxStream`, a ``trio.abc.HalfCloseableStream``.

It holds what the application has not read yet, the parked readers and writers, and the
stream's half of the close semantics (Fin when everything was read, Reset otherwise). It knows
nothing of frames, the transport or the other streams: everything it sends goes through the
session that carries it.
"""

from __future__ import annotations

import operator
from collections import deque
from collections.abc import Callable, Sequence
from typing import Protocol

import trio

from .errors import ErrorCode, LocalProtocolError, TunnelError, caused_by

__all__ = ["DirectWriter", "MuxStream", "StreamCarrier"]

#: Writes what it can of a chunk without blocking and returns how many bytes it took (0 when
#: it would block or failed, which the sink's ``send_all`` then waits for or raises).
DirectWriter = Callable[[bytes | bytearray | memoryview], int]

#: Datagrams a datagram stream's queue holds (``MuxStream.datagram_queue``), and bytes
#: (``datagram_queue_bytes``): 2 KiB a datagram, so a queue full of full-size Ethernet ones
#: (1,472 bytes of UDP payload) is bounded by its count, while one of datagrams near 64 KiB
#: holds 512 KiB instead of 16 MiB.
DATAGRAM_QUEUE = 256
DATAGRAM_QUEUE_BYTES = DATAGRAM_QUEUE * 2048


class StreamCarrier(Protocol):
    """What a :class:`MuxStream` needs from the session that carries it, and nothing more.

    The stream decides *when* to send (its own state, its parked tasks); the carrier decides
    *how* (frames, windows, the shared write buffer). Keeping the boundary this narrow is what
    lets a stream be tested, or carried, without a multiplexer behind it.
    """

    @property
    def max_data_chunk(self) -> int:
        """Largest payload of one Data frame."""
        ...

    def send_window(self, stream_id: int) -> int:
        """Bytes the peer will accept on the stream now (0 once it cannot send any more)."""
        ...

    def has_room(self, size: int) -> bool:
        """Whether ``size`` more bytes fit in the shared write buffer now."""
        ...

    async def wait_for_room(self, size: int) -> None:
        """Park until ``size`` more bytes fit in the shared write buffer (called only when
        :meth:`has_room` just said no: it always yields, which the caller counts on).

        Raises ``ClosedResourceError`` or ``BrokenResourceError`` if the session ends first."""
        ...

    def send_data(self, stream_id: int, data: memoryview) -> None:
        """Queue ``data`` (within the window and the room just checked) for the peer."""
        ...

    def send_fin(self, stream_id: int) -> None:
        """Queue the end of what we send on the stream."""
        ...

    def send_data_nowait(self, stream_id: int, data: bytes | bytearray | memoryview) -> int:
        """Queue what the window and the shared write buffer take of ``data`` now, in Data
        frames of at most :attr:`max_data_chunk`; how many bytes were queued."""
        ...

    def send_datagram(self, stream_id: int, data: bytes | bytearray | memoryview) -> bool:
        """Queue one datagram if it fits now; ``False`` if it was dropped."""
        ...

    def send_datagrams(self, stream_id: int, payloads: list[bytes]) -> tuple[int, int]:
        """Queue the datagrams that fit now, in order; how many were queued, and their bytes."""
        ...

    def consumed(self, stream_id: int, size: int) -> None:
        """The application read ``size`` bytes: the peer may send that much more."""
        ...

    def close_stream(self, stream_id: int, *, abort: bool) -> None:
        """The application closed the stream: Fin, or Reset if ``abort`` (unread data)."""
        ...

    def reset_stream(self, stream_id: int, code: int, message: str) -> None:
        """The application reset the stream with ``code``."""
        ...


class MuxStream(trio.abc.HalfCloseableStream):
    """One stream of a session: a full-duplex, half-closeable trio stream.

    ``receive_some`` returns buffered chunks without copying when it can; the buffer never holds
    more than the stream's receive window because the peer may not send more than that.
    """

    # one per stream, thousands per session: no per-instance dict
    __slots__ = (
        "_broken",
        "_buffer",
        "_carrier",
        "_closed",
        "_datagram_bytes",
        "_datagram_bytes_peak",
        "_datagram_lot",
        "_datagrams",
        "_direct",
        "_eof",
        "_fin_sent",
        "_offset",
        "_on_break",
        "_on_refusal",
        "_on_wake",
        "_receive_lot",
        "_receiving",
        "_send_broken",
        "_send_lot",
        "_sending",
        "bytes_delivered_directly",
        "bytes_received",
        "bytes_sent",
        "datagram_queue",
        "datagram_queue_bytes",
        "datagrams",
        "datagrams_dropped",
        "datagrams_received",
        "datagrams_sent",
        "host",
        "port",
        "refusal",
        "stream_id",
        "tag",
    )

    def __init__(
        self,
        carrier: StreamCarrier,
        stream_id: int,
        host: str = "",
        port: int = 0,
        tag: int = 0,
        *,
        datagrams: bool = False,
    ) -> None:
        self._carrier = carrier
        self.stream_id = stream_id
        #: A datagram stream (UDP association) or a byte stream, fixed when it was opened.
        self.datagrams = datagrams
        #: What the opener asked for (target address and application tag).
        self.host = host
        self.port = port
        self.tag = tag
        #: Chunks received and not read yet; created when one has to wait (data delivered
        #: directly, or read at once, never needs it), dropped when empty again.
        self._buffer: deque[bytes] | None = None
        #: Bytes of ``_buffer[0]`` already handed out: a small ``max_bytes`` reads on from here
        #: instead of re-slicing the rest of the chunk each time (quadratic).
        self._offset = 0
        self._eof = False
        self._fin_sent = False
        self._closed = False
        self._broken: BaseException | None = None
        #: Set when only the sending side is gone (the peer had finished before the end).
        self._send_broken: BaseException | None = None
        #: Created when a reader first waits (a relay direction with no task never does).
        self._receive_lot: trio.lowlevel.ParkingLot | None = None
        #: Created when a sender first waits for window (most streams never do).
        self._send_lot: trio.lowlevel.ParkingLot | None = None
        #: A task is receiving / sending now (a second one raises ``BusyResourceError``): two
        #: flags rather than two conflict-detector objects per stream.
        self._receiving = False
        self._sending = False
        self.bytes_sent = 0
        self.bytes_received = 0
        # UDP associations: datagrams ride on the stream, outside its flow control, in a
        # bounded queue that drops (and counts) when full instead of growing. Only a datagram
        # stream ever gets one (the multiplexer rejects datagrams on byte streams), created on
        # first use. Full means ``datagram_queue`` datagrams, or a datagram that would take it
        # past ``datagram_queue_bytes`` (one always fits an empty queue: MAX_DATAGRAM may be
        # above a bound set low).
        self._datagrams: deque[bytes] | None = None
        self._datagram_lot: trio.lowlevel.ParkingLot | None = None
        self.datagram_queue = DATAGRAM_QUEUE
        self.datagram_queue_bytes = DATAGRAM_QUEUE_BYTES
        self._datagram_bytes = 0
        self._datagram_bytes_peak = 0
        self.datagrams_sent = 0
        self.datagrams_received = 0
        #: Datagrams dropped because a queue was full (either direction).
        self.datagrams_dropped = 0
        self._direct: DirectWriter | None = None
        #: Set while the direct writer's owner has no task reading this stream: called
        #: (once) instead of waking a parked reader.
        self._on_wake: Callable[[], None] | None = None
        #: Bytes the direct writer took (included in ``bytes_received``).
        self.bytes_delivered_directly = 0
        self._on_break: Callable[[], None] | None = None
        #: Opened with early data and then refused: the typed refusal, which is also the
        #: ``__cause__`` of what its operations raise. ``None`` otherwise.
        self.refusal: TunnelError | None = None
        self._on_refusal: Callable[[TunnelError], None] | None = None

    def __repr__(self) -> str:
        return f"<MuxStream {self.stream_id} {self.host}:{self.port}>"

    @property
    def bytes_buffered(self) -> int:
        """Bytes received and not read yet (never more than the stream's receive window)."""
        buffer = self._buffer
        return 0 if buffer is None else sum(map(len, buffer)) - self._offset

    @property
    def datagram_bytes_queued(self) -> int:
        """Bytes of the datagrams received and not read yet (never more than
        ``datagram_queue_bytes``, but for a single datagram larger than that)."""
        return self._datagram_bytes

    @property
    def datagram_bytes_peak(self) -> int:
        """The most :attr:`datagram_bytes_queued` has been: how close a burst came to the
        bound, which a look now and then would miss."""
        return self._datagram_bytes_peak

    # -------------------------------------------------------------- called by the carrier

    def deliver_data(self, data: bytes) -> None:
        """The peer sent ``data``: hand it to the direct writer if one may take it now, else
        buffer it (what the writer did not take) for ``receive_some``.

        The direct writer runs only while the buffer is empty and a reader is parked in
        ``receive_some``: that reader then holds no chunk it has yet to pass on (it is waiting
        for one), so bytes written directly cannot overtake any, and the reader stays asleep.
        Window credit goes back for what the writer took, as if it had been read; the rest
        earns its credit when it is read.
        """
        self.bytes_received += len(data)
        direct = self._direct
        if (
            direct is not None
            and not self._buffer
            and (self._receive_lot or self._on_wake is not None)
        ):
            sent = direct(data)
            if sent:
                self.bytes_delivered_directly += sent
                self._carrier.consumed(self.stream_id, sent)
                if sent >= len(data):
                    return
                data = data[sent:]
        if self._buffer is None:
            self._buffer = deque()
        self._buffer.append(data)
        self._wake_reader()

    def deliver_directly(
        self, writer: DirectWriter | None, wake: Callable[[], None] | None = None
    ) -> bool:
        """Let ``writer`` take arriving data while this stream's reader waits for some
        (``None`` stops it). Returns ``True``: this stream delivers directly (a wrapper
        around a stream that does not answers ``False``).

        For a relay whose only job is to copy this stream into a socket: when the reader
        task of the session can write a chunk to the socket itself, the relay task is not
        woken for it, which is most of a small message's cost. The caller must be the only
        reader of the stream and the only writer of the writer's sink, writing to the sink
        only with what it read from this stream (a chunk the writer left over, then
        ``send_eof``), and must stop the writer before the sink is closed.

        With ``wake``, the writer also takes data while *no* task reads the stream: the
        caller has no reader task (an idle relay direction then costs no task at all), and
        ``wake`` is called synchronously, once, the first time a reader is needed: data the
        writer left over, the peer's EOF, a break or a close. It is called at once if one is
        needed already. The caller then reads the stream from a task as usual, and may hand
        a new ``wake`` over once it has read everything. ``wake`` must not raise or block.
        """
        self._direct = writer
        self._on_wake = wake
        if wake is not None:
            if self._buffer and writer is not None:
                self._drain_into(writer)
            if self._buffer or self._eof or self._broken is not None or self._closed:
                self._wake_reader()
        return True

    def _drain_into(self, writer: DirectWriter) -> None:
        """Hand what waits in the buffer to ``writer``, oldest first, as if it had just
        arrived (the caller has no reader task, so nobody holds a later chunk); stop at the
        first chunk it does not take whole. Data that came before the relay started (early
        data, at the side that dials) then needs no task to pass it on."""
        buffer = self._buffer
        while buffer and not self._closed:
            head, start = buffer[0], self._offset
            piece = head if start == 0 else memoryview(head)[start:]
            sent = writer(piece)
            if sent:
                self.bytes_delivered_directly += sent
                self._carrier.consumed(self.stream_id, sent)
            if sent < len(piece):
                self._offset = start + sent
                return
            buffer.popleft()
            self._offset = 0
        if not buffer:
            self._buffer = None

    def _wake_reader(self) -> None:
        """Something for a reader: wake the parked one, or have one started."""
        lot = self._receive_lot
        if lot:
            lot.unpark_all()
        wake = self._on_wake
        if wake is not None:
            self._on_wake = None
            wake()

    def _wake_datagram_readers(self) -> None:
        if self._datagram_lot is not None:
            self._datagram_lot.unpark_all()

    def deliver_eof(self) -> None:
        """The peer finished sending: ``receive_some`` returns ``b""`` after the buffer."""
        self._eof = True
        self._wake_reader()
        self._wake_datagram_readers()

    def deliver_datagram(self, data: bytes) -> None:
        """The peer sent a datagram: queue it, or drop and count it if the queue is full.
        (What :meth:`deliver_datagrams` does for one, without its loop: a datagram alone in
        its frame is what every datagram is at low rates.)"""
        if not self.datagrams:  # the multiplexer already refuses these; never queue one
            return
        queue = self._datagrams
        if queue is None:
            queue = self._datagrams = deque()
        queued = self._datagram_bytes + len(data)
        if len(queue) >= self.datagram_queue or (queue and queued > self.datagram_queue_bytes):
            self.datagrams_dropped += 1
            return
        queue.append(data)
        self._datagram_bytes = queued
        if queued > self._datagram_bytes_peak:
            self._datagram_bytes_peak = queued
        self.datagrams_received += 1
        self._wake_datagram_readers()

    def deliver_datagrams(self, batch: Sequence[bytes]) -> None:
        """The peer sent several datagrams in one frame: queue what the queue has room for,
        in order, drop and count the rest, and wake the reader once."""
        if not self.datagrams:
            return
        queue = self._datagrams
        if queue is None:
            queue = self._datagrams = deque()
        queued = self._datagram_bytes + sum(map(len, batch))
        if len(queue) + len(batch) <= self.datagram_queue and queued <= self.datagram_queue_bytes:
            queue.extend(batch)  # the usual case: all of it fits
            taken = len(batch)
        else:
            queued, taken = self._datagram_bytes, 0
            count, limit = self.datagram_queue, self.datagram_queue_bytes
            for data in batch:
                # a datagram that does not fit is dropped alone: a smaller one after it may fit
                if len(queue) < count and (not queue or queued + len(data) <= limit):
                    queue.append(data)
                    queued += len(data)
                    taken += 1
            self.datagrams_dropped += len(batch) - taken
        if taken:
            self._datagram_bytes = queued
            if queued > self._datagram_bytes_peak:
                self._datagram_bytes_peak = queued
            self.datagrams_received += taken
            self._wake_datagram_readers()

    def break_with(self, cause: BaseException) -> None:
        """The stream is unusable (the peer reset it, the session died): every operation,
        pending or later, raises ``BrokenResourceError`` caused by ``cause``."""
        if self._broken is None:
            self._broken = cause
        self._buffer = None
        self._offset = 0
        # the break callback first: with thousands of streams breaking in one pass, their
        # relays' resets go out before any reader is woken or started
        callback, self._on_break = self._on_break, None
        if callback is not None:
            callback()
        # nothing is delivered to a broken stream, nor can it be refused any more: let go of
        # the writer and the refusal callback now. A session's death breaks thousands of
        # streams in one pass, and trio allocates three or four objects to wake each relay's
        # task (the error, its outcome, the bound send); releasing at least as many per
        # stream keeps the pass from driving the garbage collector into collections, one of
        # which may be a full pass over every object of every live relay
        # (docs/performance.md, "Teardown after a kill, profiled")
        self._direct = None
        self._on_refusal = None
        self._wake_reader()
        self._wake_senders()
        self._wake_datagram_readers()

    def refuse_early(self, error: TunnelError) -> None:
        """The peer refused this stream after we had started using it (opened with early
        data), or the session ended before its answer: tell the refusal callback, then break
        the stream with ``error``."""
        self.refusal = error
        callback, self._on_refusal = self._on_refusal, None
        if callback is not None:
            callback(error)
        self.break_with(error)

    def call_on_refusal(self, callback: Callable[[TunnelError], None]) -> None:
        """Run ``callback`` with the refusal if the peer refuses this stream (opened with
        early data) before it is answered, synchronously and before the stream breaks (so
        before :meth:`call_on_break`'s callback); at once if it was refused already.

        For the opener's accounting and log line, which come first, as they do when a stream
        is refused before it is handed out. ``callback`` must not raise or block.
        """
        if self.refusal is not None:
            callback(self.refusal)
        else:
            self._on_refusal = callback

    def call_on_break(self, callback: Callable[[], None] | None) -> None:
        """Run ``callback`` synchronously, once, when the stream breaks (:meth:`break_with`);
        ``None`` takes it back.

        A session that dies breaks all its streams in one pass, before any of their tasks
        runs again; a relay uses this to reset its other side right then, so with thousands
        of relays the peers see their resets at once instead of after every task has
        unwound in turn. ``callback`` must not raise or block.
        """
        self._on_break = callback

    def _break_sending(self, cause: BaseException) -> None:
        self._send_broken = cause
        self._wake_senders()
        self._wake_datagram_readers()

    def direct_writer(self) -> DirectWriter:
        """Queue what the window and the write buffer take now, without waiting (for a
        relay that copies into this stream: no checkpoint, so no scheduler pass, per chunk
        that fits)."""
        return self._send_nowait

    def _send_nowait(self, data: bytes | bytearray | memoryview) -> int:
        if self._sending:  # a send_all is in progress: it goes first
            return 0
        if self._closed or self._fin_sent or self._broken or self._send_broken:
            return 0  # send_all raises the error
        if type(data) is memoryview and data.format != "B":
            data = data.cast("B")  # lengths in bytes, as frames count them
        pos = self._carrier.send_data_nowait(self.stream_id, data)
        self.bytes_sent += pos
        return pos

    def _senders(self) -> trio.lowlevel.ParkingLot:
        lot = self._send_lot
        if lot is None:
            lot = self._send_lot = trio.lowlevel.ParkingLot()
        return lot

    def _wake_senders(self) -> None:
        if self._send_lot is not None:
            self._send_lot.unpark_all()

    def window_opened(self) -> None:
        """The peer granted more window: a parked sender may go on."""
        self._wake_senders()

    def session_ended(self, reason: BaseException, *, locally: bool) -> None:
        """The carrying session ended. Closed ``locally`` (we closed it), the stream raises
        ``ClosedResourceError``; otherwise ``BrokenResourceError`` caused by ``reason``,
        except that what a peer that had finished sending sent stays readable, then ``b""``."""
        if locally:
            self._closed = True
            self._wake_reader()
            self._wake_senders()
            self._wake_datagram_readers()
        elif self._eof:
            self._break_sending(reason)
        else:
            self.break_with(reason)

    def _check_send(self) -> None:
        if self._closed or self._fin_sent:
            raise trio.ClosedResourceError("stream was closed for sending")
        broken = self._broken or self._send_broken
        if broken is not None:
            raise caused_by(trio.BrokenResourceError("stream is broken"), broken)

    # -------------------------------------------------------------- trio stream API

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Next chunk of data, ``b""`` at the peer's Fin."""
        if max_bytes is not None:
            max_bytes = operator.index(max_bytes)
            if max_bytes < 1:
                raise ValueError("max_bytes must be >= 1")
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving on this stream")
        self._receiving = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            while True:
                if self._closed:
                    raise trio.ClosedResourceError("stream was closed")
                if self._buffer:
                    break
                if self._broken is not None:
                    raise caused_by(trio.BrokenResourceError("stream is broken"), self._broken)
                if self._eof:
                    await trio.lowlevel.cancel_shielded_checkpoint()
                    return b""
                lot = self._receive_lot
                if lot is None:
                    lot = self._receive_lot = trio.lowlevel.ParkingLot()
                await lot.park()
            buffer = self._buffer
            assert buffer is not None  # not empty: the loop above checked
            head, start = buffer[0], self._offset
            end = len(head) if max_bytes is None else min(len(head), start + max_bytes)
            if end == len(head):
                buffer.popleft()
                if not buffer:
                    self._buffer = None
                self._offset = 0
                chunk = head if start == 0 else head[start:]
            else:
                self._offset = end
                chunk = head[start:end]
            self._carrier.consumed(self.stream_id, len(chunk))
            await trio.lowlevel.cancel_shielded_checkpoint()
            return chunk
        finally:
            self._receiving = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Send every byte, parking while the peer's window or our write buffer is full."""
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        self._sending = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            self._check_send()
            carrier = self._carrier
            # a send that parked (for window or room) has yielded already: a checkpoint at the
            # end would be one more scheduler pass per chunk of a busy session, for nothing
            parked = False
            with memoryview(data) as view:
                view = view.cast("B")
                total = len(view)
                pos = 0
                chunk = carrier.max_data_chunk
                while pos < total:
                    self._check_send()
                    window = carrier.send_window(self.stream_id)
                    if window <= 0:
                        parked = True
                        await self._senders().park()
                        continue
                    size = min(window, total - pos, chunk)
                    # Room first, then queue (nothing awaits in between): however many
                    # streams send at once, the queue holds at most the mark plus one chunk.
                    if not carrier.has_room(size):
                        parked = True
                        await carrier.wait_for_room(size)
                        continue
                    carrier.send_data(self.stream_id, view[pos : pos + size])
                    pos += size
                    self.bytes_sent += size
            if not parked:
                await trio.lowlevel.cancel_shielded_checkpoint()
        finally:
            self._sending = False

    def send_datagram(self, data: bytes | bytearray | memoryview) -> bool:
        """Send one datagram on this stream, never waiting: if the session's write buffer is
        full the datagram is dropped and counted (``False``), as UDP would; a bulk transfer on
        another stream is never stalled by datagrams, nor the other way round.

        Raises ``LocalProtocolError`` on a byte stream: only a stream opened with
        ``datagrams=True`` carries datagrams."""
        if not self.datagrams:
            raise LocalProtocolError(
                f"stream {self.stream_id} is a byte stream, not a datagram stream",
                code=ErrorCode.STREAM_STATE_ERROR,
            )
        self._check_send_datagram()
        if self._carrier.send_datagram(self.stream_id, data):
            self.datagrams_sent += 1
            return True
        self.datagrams_dropped += 1
        return False

    def send_datagrams(self, payloads: list[bytes]) -> tuple[int, int]:
        """Send several datagrams on this stream with one write to the session, never
        waiting: those the write buffer has no room for (the last ones) or that do not fit
        the peer's frames are dropped and counted, as :meth:`send_datagram` drops one.
        Returns how many were sent and their bytes.

        Raises ``LocalProtocolError`` on a byte stream."""
        if not self.datagrams:
            raise LocalProtocolError(
                f"stream {self.stream_id} is a byte stream, not a datagram stream",
                code=ErrorCode.STREAM_STATE_ERROR,
            )
        self._check_send_datagram()
        sent, size = self._carrier.send_datagrams(self.stream_id, payloads)
        self.datagrams_sent += sent
        self.datagrams_dropped += len(payloads) - sent
        return sent, size

    def _check_send_datagram(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("stream was closed")
        broken = self._broken or self._send_broken
        if broken is not None:
            raise caused_by(trio.BrokenResourceError("stream is broken"), broken)

    async def receive_datagram(self) -> bytes:
        """The next datagram; ``trio.EndOfChannel`` once the peer closed the stream.

        Raises ``LocalProtocolError`` on a byte stream, where no datagram can ever arrive."""
        data = (await self._datagrams_queued()).popleft()
        self._datagram_bytes -= len(data)
        await trio.lowlevel.cancel_shielded_checkpoint()
        return data

    async def receive_datagrams(self) -> list[bytes]:
        """Every datagram queued (at least one, oldest first), with one checkpoint for them
        all; ``trio.EndOfChannel`` once the peer closed the stream and nothing is queued.

        Raises ``LocalProtocolError`` on a byte stream, where no datagram can ever arrive."""
        queue = await self._datagrams_queued()
        batch = list(queue)
        queue.clear()
        self._datagram_bytes = 0
        await trio.lowlevel.cancel_shielded_checkpoint()
        return batch

    async def _datagrams_queued(self) -> deque[bytes]:
        """The queue, once a datagram is in it; raise what a receive raises instead (the
        stream closed, broken or at its end, a byte stream). The caller takes the datagrams
        with no checkpoint between, so nothing else can take them first."""
        if not self.datagrams:
            raise LocalProtocolError(
                f"stream {self.stream_id} is a byte stream, not a datagram stream",
                code=ErrorCode.STREAM_STATE_ERROR,
            )
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            if self._closed:
                raise trio.ClosedResourceError("stream was closed")
            if self._datagrams:
                return self._datagrams
            if self._broken is not None:
                raise caused_by(trio.BrokenResourceError("stream is broken"), self._broken)
            if self._eof:
                raise trio.EndOfChannel
            if self._datagram_lot is None:
                self._datagram_lot = trio.lowlevel.ParkingLot()
            await self._datagram_lot.park()

    async def wait_send_all_might_not_block(self) -> None:
        """Return once the peer's window has room (or the stream can no longer send)."""
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        self._sending = True
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
            self._check_send()
            while self._broken is None and self._send_broken is None and not self._closed:
                if self._carrier.send_window(self.stream_id) > 0:
                    break
                await self._senders().park()
            self._check_send()
            await trio.lowlevel.cancel_shielded_checkpoint()
        finally:
            self._sending = False

    async def send_eof(self) -> None:
        """Half-close: the peer reads ``b""`` after everything sent so far. Idempotent."""
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        self._sending = True
        try:
            if self._closed:
                raise trio.ClosedResourceError("stream was closed")
            await trio.lowlevel.checkpoint_if_cancelled()
            self._send_fin()
            await trio.lowlevel.cancel_shielded_checkpoint()
        finally:
            self._sending = False

    def send_eof_now(self) -> bool:
        """What :meth:`send_eof` does, without its checkpoints (see ``_util.send_eof_now``)."""
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        self._sending = True
        try:
            if self._closed:
                raise trio.ClosedResourceError("stream was closed")
            self._send_fin()
        finally:
            self._sending = False
        return True

    def _send_fin(self) -> None:
        if not self._fin_sent:
            if self._broken is not None:
                raise caused_by(trio.BrokenResourceError("stream is broken"), self._broken)
            self._fin_sent = True
            self._carrier.send_fin(self.stream_id)

    def reset(self, code: int = ErrorCode.CANCELLED, message: str = "") -> None:
        """Abort both directions now. The peer's operations on the stream raise
        ``BrokenResourceError`` caused by a :class:`StreamResetError` carrying ``code``."""
        if not self._closed:
            self._closed = True
            self._buffer = None
            self._offset = 0
            self._carrier.reset_stream(self.stream_id, code, message)
            self._wake_reader()
            self._wake_senders()

    async def aclose(self) -> None:
        """Close both directions. Clean (Fin) if everything received was read, else Reset.

        Completes its work before its checkpoint, so a cancelled ``aclose`` still closes.
        """
        self.close_now()
        await trio.lowlevel.checkpoint()

    def close_now(self) -> bool:
        """What :meth:`aclose` does, without its checkpoint (see ``_util.close_now``)."""
        if not self._closed:
            self._closed = True
            unread = bool(self._buffer)
            self._buffer = None
            self._offset = 0
            self._datagrams = None
            self._datagram_bytes = 0
            self._carrier.close_stream(self.stream_id, abort=unread)
            self._wake_reader()
            self._wake_senders()
            self._wake_datagram_readers()
        return True
