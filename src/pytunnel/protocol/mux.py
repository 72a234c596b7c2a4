"""The multiplexer state machine: many streams over one ordered byte stream (sans-IO).

Modelled on yamux and HTTP/2. Bytes from the transport go into :meth:`Multiplexer.receive_data`
and come out as events; calls such as :meth:`Multiplexer.send_data` queue frames that the I/O
layer drains with :meth:`Multiplexer.data_to_send`. All protocol rules live here: stream id
parity, flow control, and the per-stream state machine, whose rules are the one transition
table of :mod:`.streams`. Every violation by the peer is a :class:`RemoteProtocolError`; every
misuse by our caller a :class:`LocalProtocolError` that changes nothing.

Stream lifecycle (one side's view; the table in :mod:`.streams` is the authority)::

    opened by us:    OPENING --Accept--> OPEN       OPENING --Refuse--> (gone)
    opened by peer:  PENDING --accept--> OPEN       PENDING --refuse--> (gone)
    OPEN --our Fin--> LOCAL_FIN, OPEN --their Fin--> REMOTE_FIN; the other Fin: gone.
    Reset, from either side and in any state, ends the stream at once.

A violation by the peer is sticky, as h11's ERROR state: the multiplexer stops (see
:attr:`Multiplexer.error`), nothing the peer sent after it is processed, and the only frame
still queued is the ``GoAway`` that tells the peer why.

Flow control: each side announces a receive window when it opens or accepts a stream. The
sender may have at most that many unacknowledged payload bytes in flight; the receiver grants
more with ``WindowUpdate`` once the application has consumed at least half the window (the
rule h2's ``WindowManager`` uses), so a slow reader bounds its own buffer without touching any
other stream.

Early data (protocol version 2): an opener may send ``Data`` right after its ``Open``, before
the ``Accept``, up to the *early window* the acceptor announced in its handshake. The acceptor
announces no more than its per-stream floor (below), so what a peer parks on streams it has
not been answered on is inside the receive budget like any received data; a ``Refuse`` (or a
``Reset``) drops it. The ``Accept`` of such a stream counts its ``window`` from the start of the
stream, early bytes included, so the two ends agree on the window without knowing how many
early bytes were in flight when it was sent. An opener's ``Fin`` before the ``Accept`` waits
here until the ``Accept`` arrives: the acceptor never sees a ``Fin`` on a stream it has not
answered. In a version 1 session none of this exists (the table of :mod:`.streams` forbids it).

Receive budget: every byte of window we grant is a byte the peer may make us buffer, so the
credit outstanding on all streams together (bytes received and not yet consumed, plus the
windows still open) never exceeds ``receive_budget``. Half of the budget is reserved as a
*floor* for every stream slot (``receive_budget / (2 * max_streams)`` each, at most ``window``):
a stream always gets at least its floor back once it has been read, however much the others
hold, so readers that stopped cannot starve the rest. The other half is a *pool* the streams
grow into up to ``window``, each at most its fair share (the pool divided among the streams
holding some of it); streams not read from yet (new, idle) may hold at most half of the pool
between them, so a stream that is being read can grow however many idle ones are open. Credit
taken from the pool returns to it as the stream is read. Purely a rule about what we grant:
nothing on the wire changes and the peer needs no support for it.

Output goes into two queues, drained control first: frames that are not ordered relative to a
stream's payload (``WindowUpdate``, ``Ping``, ``Pong``, ``Refuse`` and a ``Reset``
of a stream with nothing queued) overtake bulk data, so a heartbeat answer never waits behind
megabytes; ``Open``/``Accept``/``Data``/``Fin``/``Datagram`` keep their order. Replies to the
peer's requests (``Pong``, ``Refuse``, the ``Reset`` of data sent to a closed stream) are
bounded: a peer that keeps asking while not reading the answers is cut off with ``FLOOD``.

Over 500 lines because the stream table, the two output queues and flow control share every
stream's record; split apart they would reach into each other's private state.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Union, cast

import attrs

from ..errors import (
    ErrorCode,
    LocalProtocolError,
    RemoteProtocolError,
    StreamLimitError,
    caused_by,
)
from .frames import (
    DATA_FRAME,
    DATAGRAMS_ENVELOPE,
    DEFAULT_MAX_FRAME_SIZE,
    FrameDecoder,
    append_data_frame,
    append_datagrams_frame,
    datagram_entry_size,
    encode_message,
)
from .messages import (
    MAX_DATAGRAM,
    MAX_DATAGRAM_BATCH,
    MAX_WINDOW,
    SESSION,
    Accept,
    Data,
    Datagram,
    Datagrams,
    Fin,
    GoAway,
    Message,
    Open,
    Ping,
    Pong,
    Refuse,
    Reset,
    SessionMessage,
    WindowUpdate,
    truncate_text,
)
from .streams import StreamEvent, StreamState, allows, next_state, table_for

__all__ = [
    "DEFAULT_MAX_CONTROL_QUEUE",
    "DEFAULT_MAX_DATA_CHUNK",
    "DEFAULT_MAX_STREAMS",
    "DEFAULT_RECEIVE_BUDGET",
    "DEFAULT_WINDOW",
    "DataReceived",
    "DatagramReceived",
    "DatagramsReceived",
    "Event",
    "GoAwayReceived",
    "Multiplexer",
    "PingReceived",
    "PongReceived",
    "Role",
    "StreamAccepted",
    "StreamEnded",
    "StreamOpened",
    "StreamRefused",
    "StreamReset",
    "WindowOpened",
    "window_floor",
]

#: Per-stream receive window. Chosen from ``bench/bench_session.py --window-sweep`` (see
#: docs/performance.md): on loopback, single-stream throughput stops growing at this size.
DEFAULT_WINDOW = 1024 * 1024
#: Largest payload put in one Data frame: a relay's whole 256 KiB read, so each read crosses as
#: one frame and the far side makes one write of it (per-frame and per-write costs were most
#: of a bulk transfer's CPU at 64 KiB; see docs/performance.md, "Bulk and TLS data path"),
#: and no longer than the write buffer's mark, the head-of-line delay another stream's frames
#: can see behind a bulk one anyway.
DEFAULT_MAX_DATA_CHUNK = 256 * 1024
#: Concurrent streams per session, both directions. The receive budget, not this cap, bounds
#: what a session may buffer, so it only has to cover the connections one client relays.
DEFAULT_MAX_STREAMS = 16384
#: Bytes all streams of a session together may hold unread plus the window still granted.
#: Half of it is the floors: 8 KiB per stream slot at the default ``max_streams``; the other
#: half lets 128 streams at once run with a full 1 MiB window.
DEFAULT_RECEIVE_BUDGET = 256 * 1024 * 1024
#: Bytes of replies (Pong, Refuse, Reset) that may wait for the transport before the peer is
#: considered a flood: about 9,000 unanswered pings. A peer that reads never gets near it,
#: since every transport write takes the whole queue.
DEFAULT_MAX_CONTROL_QUEUE = 256 * 1024
_REMOTE_FIN = StreamState.REMOTE_FIN
_PENDING = StreamState.PENDING
#: Room for a Data frame's msgpack envelope around its payload.
_DATA_OVERHEAD = 64


def window_floor(window: int, receive_budget: int, max_streams: int) -> int:
    """The credit every stream slot can always have (see the module docstring): half the
    budget shared by all slots, at least one byte, at most a window. Also the largest early
    window a session may announce, since a pending stream's credit must come from its floor."""
    return max(1, min(window, receive_budget // (2 * max_streams)))


class Role(enum.Enum):
    """Which end of the connection we are; decides stream id parity."""

    CLIENT = 1  # opens odd stream ids
    SERVER = 2  # opens even stream ids


# ----------------------------------------------------------------------------- events


@attrs.frozen
class StreamOpened:
    """The peer asks to open ``stream``; answer with accept_stream or refuse_stream."""

    stream: int
    host: str
    port: int
    tag: int
    #: The stream's kind: a datagram stream (UDP association) or a byte stream.
    datagrams: bool = False


@attrs.frozen
class StreamAccepted:
    """The peer accepted a stream we opened; it is now open in both directions."""

    stream: int


@attrs.frozen
class StreamRefused:
    """The peer refused a stream we opened; the stream is gone."""

    stream: int
    code: int
    message: str


@attrs.frozen
class DataReceived:
    """Payload arrived. Call :meth:`Multiplexer.consumed` once the application has used it."""

    stream: int
    data: bytes


@attrs.frozen
class DatagramReceived:
    """A datagram arrived on ``stream`` (not flow-controlled; see ``Datagram``)."""

    stream: int
    data: bytes


@attrs.frozen
class DatagramsReceived:
    """Several datagrams arrived on ``stream`` in one ``Datagrams`` frame, in order."""

    stream: int
    data: tuple[bytes, ...]


@attrs.frozen
class StreamEnded:
    """The peer sent Fin: no more data will arrive on ``stream``."""

    stream: int


@attrs.frozen
class StreamReset:
    """The stream was aborted by the peer; it is gone."""

    stream: int
    code: int
    message: str


@attrs.frozen
class WindowOpened:
    """The peer granted more send window on ``stream``."""

    stream: int


@attrs.frozen
class PingReceived:
    """The peer pinged; the Pong has already been queued."""

    opaque: int


@attrs.frozen
class PongReceived:
    """Answer to one of our pings."""

    opaque: int


@attrs.frozen
class GoAwayReceived:
    """The peer is ending the session."""

    code: int
    message: str


Event = Union[  # noqa: UP007
    StreamOpened,
    StreamAccepted,
    StreamRefused,
    DataReceived,
    DatagramReceived,
    DatagramsReceived,
    StreamEnded,
    StreamReset,
    WindowOpened,
    PingReceived,
    PongReceived,
    GoAwayReceived,
]


class _Stream:
    __slots__ = (
        "datagrams",
        "fin_pending",
        "held",
        "id",
        "local_closed",
        "queued",
        "read",
        "recv_window",
        "send_window",
        "state",
    )

    def __init__(
        self,
        stream_id: int,
        state: StreamState,
        send_window: int,
        recv_window: int,
        datagrams: bool = False,
    ) -> None:
        self.id = stream_id
        #: Fixed at Open: only a datagram stream may carry Datagram messages.
        self.datagrams = datagrams
        #: The data-queue generation that last received a frame of this stream (-1: none), so
        #: a Reset knows whether it may overtake the data queue without passing this stream's
        #: own Open.
        self.queued = -1
        #: Where the stream is in :data:`.streams.TRANSITIONS`.
        self.state = state
        self.send_window = send_window
        #: How many more bytes the peer may send before a WindowUpdate.
        self.recv_window = recv_window
        #: Bytes delivered to the application and not consumed yet. ``recv_window + held`` is
        #: the stream's credit: what the peer may make us buffer on it.
        self.held = 0
        #: The application has consumed from it: its credit no longer counts as unproven.
        self.read = False
        #: The application closed its end: further data from the peer is answered with Reset.
        self.local_closed = False
        #: Our Fin, asked for before the Accept (early data): sent when the Accept comes.
        self.fin_pending = False


def _error(code: ErrorCode, message: str) -> RemoteProtocolError:
    return RemoteProtocolError(message, code=code)


class Multiplexer:
    """Stream multiplexing state for one end of one connection.

    ``window`` is the receive window we announce for every stream; ``peer_max_frame_size`` the
    largest frame body the peer accepts (we chunk data to fit it); ``max_frame_size`` the largest
    we accept. ``max_streams`` caps concurrently open streams, counting both directions.
    ``max_control_queue`` bounds the replies waiting for the transport (see ``FLOOD``).
    ``receive_budget`` bounds the credit of all streams together (see the module docstring).
    ``datagram_batches`` (both ends speak version 2) allows ``Datagrams`` frames both ways.
    ``version`` is the protocol version of the session; from version 2 on, ``early_window`` is
    what we announced the peer may send on a stream before our Accept (at most
    :func:`window_floor`) and ``peer_early_window`` what the peer announced we may.
    """

    def __init__(
        self,
        role: Role,
        *,
        window: int = DEFAULT_WINDOW,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        peer_max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        max_data_chunk: int = DEFAULT_MAX_DATA_CHUNK,
        max_streams: int = DEFAULT_MAX_STREAMS,
        max_control_queue: int = DEFAULT_MAX_CONTROL_QUEUE,
        decoder: FrameDecoder | None = None,
        receive_budget: int = DEFAULT_RECEIVE_BUDGET,
        datagram_batches: bool = False,
        version: int = 1,
        early_window: int = 0,
        peer_early_window: int = 0,
    ) -> None:
        if not 1 <= window <= MAX_WINDOW:
            raise ValueError(f"window must be in 1..2**31-1, got {window}")
        if max_streams < 1:
            raise ValueError("max_streams must be at least 1")
        if receive_budget < 1:
            raise ValueError("receive_budget must be at least 1")
        self.role = role
        self.window = window
        self.max_streams = max_streams
        self.receive_budget = receive_budget
        #: Credit every stream slot can always have: half the budget shared by all slots (at
        #: least one byte, so a stream can always make progress, at most a window).
        self.window_floor = window_floor(window, receive_budget, max_streams)
        if not 0 <= early_window <= self.window_floor:
            raise ValueError(
                f"early_window must be in 0..{self.window_floor} (the per-stream floor)"
            )
        if not 0 <= peer_early_window <= MAX_WINDOW:
            raise ValueError(f"peer_early_window must be in 0..2**31-1, got {peer_early_window}")
        self.version = version
        #: The transition table of the session's version (early data from version 2 on).
        self._table = table_for(version)
        v2 = version >= 2
        self.early_window = early_window if v2 else 0
        self.peer_early_window = peer_early_window if v2 else 0
        #: Credit above the floors, shared by the streams that use it.
        self._pool = max(0, receive_budget - max_streams * self.window_floor)
        #: A stream holding more credit than this is never due a window update.
        self._no_grant_above = window - window // 2
        #: Credit taken from the pool: the sum over streams of what each holds above its floor.
        self._extra = 0
        #: Streams holding pool credit (the fair share divides the pool among them).
        self._holders = 0
        #: Pool credit of streams whose application has not read from them yet (opened and
        #: idle, or written to and never read): at most half the pool, so idle streams cannot
        #: take what streams that are being read need.
        self._unproven = 0
        #: Bytes delivered to the application and not consumed yet, all streams together.
        self._held = 0
        #: Streams that ended both ways while the application still had unread bytes of them:
        #: those bytes, which still count against the budget and the stream cap until read.
        self._unread: dict[int, int] = {}
        self.max_control_queue = max_control_queue
        self.max_data_chunk = max(1, min(max_data_chunk, peer_max_frame_size - _DATA_OVERHEAD))
        self._peer_max_frame_size = peer_max_frame_size
        #: Both ends speak protocol version 2: several datagrams may share one ``Datagrams``
        #: frame, either way (without it a ``Datagrams`` frame is ``UNEXPECTED_MESSAGE``).
        self.datagram_batches = datagram_batches
        self._decoder = decoder if decoder is not None else FrameDecoder(max_frame_size)
        self._decoder.max_frame_size = max_frame_size
        # the decoder rejects every other layer's messages, so _handle sees session frames only
        self._decoder.layer = SESSION
        self._streams: dict[int, _Stream] = {}
        self._next_id = 1 if role is Role.CLIENT else 2
        self._peer_parity = 0 if role is Role.CLIENT else 1
        self._last_peer_id = 0
        #: Payload-ordered frames (Open, Accept, Data, Fin, Datagram) and, ahead of them, the
        #: frames that may overtake payload.
        self._out = bytearray()
        self._control = bytearray()
        #: Incremented each time the data queue is taken (see ``_Stream.queued``).
        self._generation = 0
        #: Bytes of replies to the peer queued since the transport last took the queues.
        self._replies = 0
        #: Streams the application closed while the peer had not finished, in closing order,
        #: with the time the caller gave (see :meth:`expire_lingering`).
        self._lingering: dict[int, float] = {}
        self.goaway_sent = False
        self.goaway_received = False
        #: Whether the last :meth:`next_events` stopped at its limit (more may be decodable).
        self.frames_pending = False
        #: The peer's violation once the multiplexer has stopped (see :attr:`error`).
        self._error: RemoteProtocolError | None = None
        #: Optional: called as ``data_sink(stream_id, data)`` during :meth:`next_events` for
        #: a ``DataReceived`` that no other event of the same call precedes, in place of the
        #: event (one that an earlier event precedes is returned as usual, so that every event
        #: is seen in frame order). For a caller that would hand each such event straight to
        #: its stream: no event object per Data frame. It may call back into the multiplexer
        #: (``consumed``) but must not raise.
        self.data_sink: Callable[[int, bytes], None] | None = None

    # ------------------------------------------------------------------ introspection

    @property
    def open_streams(self) -> int:
        """Streams currently tracked (any phase), counting those that have ended but still
        have bytes the application has not read: each holds a slot of ``max_streams``."""
        return len(self._streams) + len(self._unread)

    @property
    def bytes_buffered(self) -> int:
        """Bytes received on all streams and not yet consumed by the application."""
        return self._held

    @property
    def receive_committed(self) -> int:
        """The most the peer could make us hold right now: bytes buffered plus every window
        still granted. Never above ``max(receive_budget, max_streams)``."""
        return self._held + sum(st.recv_window for st in self._streams.values())

    def _charge(self, old: int, new: int, unproven: bool = False) -> None:
        """A stream's credit went from ``old`` to ``new``: book the change of the part above
        its floor, which is the pool's."""
        floor = self.window_floor
        before = old - floor if old > floor else 0
        after = new - floor if new > floor else 0
        if before != after:
            self._extra += after - before
            if unproven:
                self._unproven += after - before
            if not before:
                self._holders += 1
            elif not after:
                self._holders -= 1

    def _credit_limit(self, credit: int, *, first: bool = False) -> int:
        """The most credit a stream holding ``credit`` may have: its fair share of the pool
        (divided among the streams holding some) up to a window, as far as the pool has
        room, and never less than its floor. A ``first`` grant (a stream not read yet) takes
        from the half of the pool that such streams may hold."""
        floor = self.window_floor
        over = credit - floor if credit > floor else 0
        pool = self._pool
        share = min(self.window, floor + pool // (self._holders + (0 if over else 1)))
        free = pool - self._extra
        if first:
            free = min(free, pool // 2 - self._unproven)
        room = floor + over + (free if free > 0 else 0)
        return share if share < room else room

    def _initial_window(self) -> int:
        """Credit for a stream that is being added, taken from the pool as far as it may."""
        window = self._credit_limit(0, first=True)
        self._charge(0, window, unproven=True)
        return window

    def has_stream(self, stream_id: int) -> bool:
        return stream_id in self._streams

    def send_window(self, stream_id: int) -> int:
        """How many payload bytes may be sent on ``stream_id`` right now (0 if none)."""
        st = self._streams.get(stream_id)
        if st is None or st.fin_pending or not allows(st.state, StreamEvent.SEND_DATA, self._table):
            return 0
        return st.send_window

    def can_send_datagram(self, stream_id: int) -> bool:
        """Whether a datagram may be sent on the stream (an open datagram stream; Fin does not
        matter)."""
        st = self._streams.get(stream_id)
        return st is not None and st.datagrams and allows(st.state, StreamEvent.SEND_DATAGRAM)

    @property
    def lingering(self) -> int:
        """Streams closed by the application that still wait for the peer's Fin."""
        return len(self._lingering)

    @property
    def oldest_lingering(self) -> float | None:
        """The closing time of the stream that has lingered longest, or ``None``."""
        for closed_at in self._lingering.values():
            return closed_at
        return None

    def can_send(self, stream_id: int) -> bool:
        """Whether the stream still accepts data from us at all (open, no Fin sent)."""
        st = self._streams.get(stream_id)
        return (
            st is not None
            and not st.fin_pending
            and allows(st.state, StreamEvent.SEND_DATA, self._table)
        )

    # ------------------------------------------------------------------ outgoing

    def _emit(self, message: Message, st: _Stream | None = None) -> None:
        """Queue a frame that keeps its place among the payload frames."""
        self._out += encode_message(message, self._peer_max_frame_size)
        if st is not None:
            st.queued = self._generation

    def _emit_control(self, message: Message) -> None:
        """Queue a frame that may overtake queued payload."""
        self._control += encode_message(message, self._peer_max_frame_size)

    def _reply(self, message: Message) -> None:
        frame = encode_message(message, self._peer_max_frame_size)
        self._control += frame
        self._replies += len(frame)

    def _emit_reset(self, st: _Stream, code: int, message: str) -> None:
        reset = Reset(st.id, code, truncate_text(message))
        if st.queued == self._generation:
            # the stream's Open (or Accept, Data...) is still queued: the peer must see it first
            self._emit(reset)
        else:
            self._emit_control(reset)

    def data_to_send(self) -> bytes | bytearray:
        """Take every queued frame (coalesced into one buffer) for one transport write, the
        control frames first."""
        self._replies = 0
        out, data = self._control, self._out
        if data:
            self._generation += 1
            self._out = bytearray()
            if not out:
                return data
            out += data
        self._control = bytearray()
        return out

    @property
    def bytes_to_send(self) -> int:
        return len(self._control) + len(self._out)

    def _forget(self, stream_id: int, *, unread: bool = False) -> None:
        """Stop tracking the stream and give its credit back. ``unread``: the application
        still has the bytes it was delivered (the stream ended cleanly), which stay counted
        until it reads or drops them; otherwise it has dropped them (a reset)."""
        st = self._streams.pop(stream_id)
        self._lingering.pop(stream_id, None)
        self._charge(st.recv_window + st.held, 0, not st.read)
        if unread and st.held:
            self._unread[stream_id] = st.held
            self._charge(0, st.held)
        else:
            self._held -= st.held

    def _enter(self, st: _Stream, state: StreamState, *, unread: bool = False) -> None:
        """Move ``st`` to ``state`` (from :func:`.streams.next_state`); CLOSED forgets it
        (``unread``: as :meth:`_forget`)."""
        if state is StreamState.CLOSED:
            self._forget(st.id, unread=unread)
        else:
            st.state = state

    def _drop_unread(self, stream_id: int) -> bool:
        """The application dropped what it had not read of an ended stream; ``True`` if
        there was any (its slot is free now)."""
        held = self._unread.pop(stream_id, None)
        if held is None:
            return False
        self._held -= held
        self._charge(held, 0)
        return True

    def _get(self, stream_id: int) -> _Stream:
        st = self._streams.get(stream_id)
        if st is None:
            if self._error is not None:
                violation = self._error.message
                raise caused_by(
                    LocalProtocolError(
                        f"the multiplexer stopped after a protocol violation: {violation}",
                        code=self._error.code,
                    ),
                    self._error,
                )
            raise LocalProtocolError(
                f"stream {stream_id} is not open", code=ErrorCode.STREAM_STATE_ERROR
            )
        return st

    def open_stream(
        self, host: str = "", port: int = 0, tag: int = 0, *, datagrams: bool = False
    ) -> int:
        """Queue an Open for a new stream and return its id.

        ``datagrams`` makes it a datagram stream (a UDP association): the only kind that may
        carry datagrams, in either direction.
        """
        if self.goaway_sent or self.goaway_received or self._error is not None:
            raise caused_by(
                LocalProtocolError("session is going away", code=ErrorCode.GOING_AWAY), self._error
            )
        if self.open_streams >= self.max_streams:
            raise StreamLimitError(f"already {self.open_streams} streams open")
        stream_id = self._next_id
        if stream_id > 2**32 - 1:
            raise LocalProtocolError("stream ids exhausted", code=ErrorCode.STREAM_STATE_ERROR)
        window = self._initial_window()
        # a byte stream may carry early data (version 2); a datagram stream waits for Accept
        early = 0 if datagrams else self.peer_early_window
        st = _Stream(stream_id, StreamState.OPENING, early, window, datagrams)
        self._emit(Open(stream_id, window, host, port, tag, datagrams), st)
        self._next_id += 2
        self._streams[stream_id] = st
        return stream_id

    def accept_stream(self, stream_id: int) -> None:
        """Accept a stream the peer opened."""
        st = self._get(stream_id)
        self._enter(st, next_state(st.state, StreamEvent.SEND_ACCEPT, stream_id))
        # The credit is granted only now: a stream refused never took more than its early
        # window, which is within its floor. The Accept's window counts from the start of
        # the stream: the early bytes received so far are part of it.
        early = 0 if st.datagrams else self.early_window
        received = early - st.recv_window
        credit = st.recv_window + st.held
        limit = self._credit_limit(credit, first=True)
        window = min(MAX_WINDOW, received + limit - st.held)
        st.recv_window = window - received
        self._charge(credit, st.recv_window + st.held, unproven=True)
        self._emit(Accept(stream_id, window), st)

    def refuse_stream(self, stream_id: int, code: int, message: str = "") -> None:
        """Refuse a stream the peer opened; ``code`` says why (an ``ErrorCode``)."""
        st = self._get(stream_id)
        self._enter(st, next_state(st.state, StreamEvent.SEND_REFUSE, stream_id))
        # an answer to the peer's Open: bounded like the automatic ones
        self._reply(Refuse(stream_id, code, truncate_text(message)))

    def send_data(self, stream_id: int, data: bytes | bytearray | memoryview) -> None:
        """Queue ``data``; it must fit the send window (see :meth:`send_window`)."""
        st = self._get(stream_id)
        # data never changes the state
        next_state(st.state, StreamEvent.SEND_DATA, stream_id, self._table)
        if st.fin_pending:
            raise LocalProtocolError(
                f"stream {stream_id} was finished", code=ErrorCode.STREAM_STATE_ERROR
            )
        size = len(data)
        if size > st.send_window:
            raise LocalProtocolError(
                f"{size} bytes exceed the send window of {st.send_window}",
                code=ErrorCode.FLOW_CONTROL_ERROR,
            )
        st.send_window -= size
        st.queued = self._generation
        chunk = self.max_data_chunk
        if size <= chunk:
            append_data_frame(self._out, stream_id, data, self._peer_max_frame_size)
            return
        with memoryview(data) as view:
            for start in range(0, size, chunk):
                with view[start : start + chunk] as piece:
                    append_data_frame(self._out, stream_id, piece, self._peer_max_frame_size)

    def _datagram_stream(self, stream_id: int) -> _Stream:
        """The open datagram stream ``stream_id``, which may send (a datagram never changes
        the state); else ``LocalProtocolError``."""
        st = self._get(stream_id)
        next_state(st.state, StreamEvent.SEND_DATAGRAM, stream_id)
        if not st.datagrams:
            raise LocalProtocolError(
                f"stream {stream_id} is a byte stream, not a datagram stream",
                code=ErrorCode.STREAM_STATE_ERROR,
            )
        return st

    def send_datagram(self, stream_id: int, data: bytes | bytearray | memoryview) -> None:
        """Queue one datagram on an open stream (no window: callers bound their own queues)."""
        st = self._datagram_stream(stream_id)
        if len(data) > MAX_DATAGRAM:
            raise LocalProtocolError(f"datagram of {len(data)} bytes exceeds {MAX_DATAGRAM}")
        self._emit(Datagram(stream_id, bytes(data)), st)

    def send_datagrams(self, stream_id: int, payloads: list[bytes]) -> None:
        """Queue several datagrams on an open stream, in order, in as few frames as fit.

        With ``datagram_batches`` they share ``Datagrams`` frames, each within the peer's
        frame limit and ``MAX_DATAGRAM_BATCH``; otherwise (a version 1 peer) each is its own
        ``Datagram``. Every payload must fit one frame on its own (``Datagram``'s limit); a
        payload too large raises ``LocalProtocolError`` before anything is queued.
        """
        st = self._datagram_stream(stream_id)
        for data in payloads:
            if len(data) > MAX_DATAGRAM:
                raise LocalProtocolError(f"datagram of {len(data)} bytes exceeds {MAX_DATAGRAM}")
        if not self.datagram_batches or len(payloads) < 2:
            for data in payloads:
                self._emit(Datagram(stream_id, bytes(data)), st)
            return
        # greedy: as many datagrams per frame as the peer's limit and the batch cap take
        room = self._peer_max_frame_size - DATAGRAMS_ENVELOPE
        batch: list[bytes] = []
        used = 0
        for data in payloads:
            entry = datagram_entry_size(len(data))
            if batch and (used + entry > room or len(batch) == MAX_DATAGRAM_BATCH):
                self._emit_datagrams(st, batch)
                batch, used = [], 0
            batch.append(data)
            used += entry
        self._emit_datagrams(st, batch)

    def _emit_datagrams(self, st: _Stream, batch: list[bytes]) -> None:
        if len(batch) == 1:
            self._emit(Datagram(st.id, bytes(batch[0])), st)
            return
        append_datagrams_frame(self._out, st.id, batch, self._peer_max_frame_size)
        st.queued = self._generation

    def send_fin(self, stream_id: int) -> None:
        """Half-close: we will send no more data. Idempotent."""
        st = self._get(stream_id)
        if st.state is StreamState.OPENING and allows(st.state, StreamEvent.SEND_DATA, self._table):
            st.fin_pending = True  # early data: the Fin follows the Accept (module docstring)
            return
        state = next_state(st.state, StreamEvent.SEND_FIN, stream_id)
        if st.state is StreamState.LOCAL_FIN:
            return
        self._emit(Fin(stream_id), st)
        self._enter(st, state, unread=True)

    def reset_stream(
        self, stream_id: int, code: int = ErrorCode.CANCELLED, message: str = ""
    ) -> None:
        """Abort the stream both ways. A no-op for a stream that is already gone."""
        st = self._streams.get(stream_id)
        if st is None:
            self._drop_unread(stream_id)
            return
        self._enter(st, next_state(st.state, StreamEvent.SEND_RESET, stream_id))
        self._emit_reset(st, code, message)

    def close_stream(self, stream_id: int, now: float = 0.0) -> None:
        """The application is done with the stream and has read everything it was sent.

        TCP's rule: if the peer has finished too, this is a clean close (Fin); otherwise we send
        our Fin and answer any further data with Reset, so a peer still writing learns it is
        talking to nobody instead of filling a window that will never be read. A stream left
        waiting for the peer's Fin lingers from ``now`` (any clock the caller keeps) until
        :meth:`expire_lingering` resets it, so a silent peer cannot keep its slot for ever.
        """
        st = self._streams.get(stream_id)
        if st is None:
            self._drop_unread(stream_id)
            return
        if st.state in (StreamState.OPENING, StreamState.PENDING):
            self.reset_stream(stream_id, ErrorCode.CANCELLED, "closed before the stream opened")
            return
        if st.held:  # the caller says it read everything: nothing it was given is kept
            self._charge(st.recv_window + st.held, st.recv_window, not st.read)
            self._held -= st.held
            st.held = 0
        st.local_closed = True
        # A stream finished both ways is already gone (the last Fin, sent or received, forgets
        # it), so one still here has not sent its Fin or waits for the peer's.
        if st.state is not StreamState.LOCAL_FIN:
            self.send_fin(stream_id)  # removes the stream if the peer had finished
        if stream_id in self._streams:
            self._lingering.setdefault(stream_id, now)  # keeps the dict in closing order

    def expire_lingering(self, closed_before: float) -> int:
        """Reset every closed stream that has waited for the peer's Fin since ``closed_before``
        or earlier (same clock as :meth:`close_stream`); return how many."""
        expired = 0
        for stream_id, closed_at in list(self._lingering.items()):
            if closed_at > closed_before:
                break
            self.reset_stream(stream_id, ErrorCode.CANCELLED, "the peer did not finish in time")
            expired += 1
        return expired

    def consumed(self, stream_id: int, size: int) -> bool:
        """The application consumed ``size`` received bytes; grant window back when due.

        Due once the stream's credit is at most half of what it may have now (with the pool
        free, half a window consumed: h2's rule), and always once it is down to nothing, so
        a stream that was granted only its floor still moves. Returns ``True`` when this
        consumed the last unread byte of a stream that has ended, whose slot is free now.
        """
        if size <= 0:
            return False
        st = self._streams.get(stream_id)
        if st is None:
            held = self._unread.get(stream_id)
            if held is None:
                return False
            left = held - min(size, held)
            self._held -= held - left
            self._charge(held, left)
            if left:
                self._unread[stream_id] = left
                return False
            del self._unread[stream_id]
            return True
        size = min(size, st.held)
        if not size:
            return False
        before = st.recv_window + st.held
        st.held -= size
        self._held -= size
        credit = before - size
        floor = self.window_floor
        if not st.read:  # its credit moves from the unproven half to the rest of the pool
            st.read = True
            self._unproven -= before - floor if before > floor else 0
        if before > floor:
            if credit > floor:  # still a holder: only the amount changes
                self._extra -= size
            else:
                self._charge(before, credit)
        # no grant can be due above half a window (the common case: most reads end here);
        # none before our Accept either (early data): the opener takes no window update then
        state = st.state
        if credit > self._no_grant_above or state is _REMOTE_FIN or state is _PENDING:
            return False
        limit = self._credit_limit(credit)
        delta = limit - credit
        if delta > 0 and delta >= limit // 2:
            st.recv_window += delta
            self._charge(credit, limit)
            self._emit_control(WindowUpdate(stream_id, delta))
        return False

    def ping(self, opaque: int) -> None:
        """Queue a Ping; after a protocol violation nothing is queued (the session is ending,
        and its end is what answers the caller's wait)."""
        if self._error is None:
            self._emit_control(Ping(opaque))

    def go_away(self, code: int = ErrorCode.NORMAL, message: str = "") -> None:
        """Announce the end of the session. Only the first call sends anything."""
        if self.goaway_sent:
            return
        self.goaway_sent = True
        # ordered: GoAway promises "no more streams from me", so it must not pass an Open (or
        # the Data and Fin the peer should still receive) that was queued before it
        self._emit(GoAway(code, truncate_text(message)))

    # ------------------------------------------------------------------ incoming

    @property
    def error(self) -> RemoteProtocolError | None:
        """The peer's protocol violation that stopped the multiplexer, or ``None``.

        Once set it is sticky: every later :meth:`feed`, :meth:`receive_data` and
        :meth:`next_events` raises it again, every call that needs a stream raises a
        :class:`LocalProtocolError` with its code, and no stream is tracked any more. Only
        :meth:`go_away` still queues a frame: telling the peer why is all that is left to do.
        """
        return self._error

    def _fail(self, error: RemoteProtocolError) -> RemoteProtocolError:
        """Enter ERROR: nothing the peer sends after a violation is processed, and the
        streams are dead (the session ends), so none is kept."""
        self._error = error
        self._streams.clear()
        self._lingering.clear()
        self._unread.clear()
        self._extra = self._held = self._holders = self._unproven = 0
        return error

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Feed transport bytes (``b""`` at end of stream); return the resulting events."""
        self.feed(data)
        return self.next_events()

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Feed transport bytes (``b""`` at end of stream) without decoding them yet."""
        if self._error is not None:
            raise self._error
        self._decoder.receive_data(data)

    def next_events(self, max_frames: int | None = None) -> list[Event]:
        """Decode up to ``max_frames`` frames (all, if ``None``) of the bytes received so far,
        including any the handshake left in the decoder, and return their events.

        A caller that takes a large burst in bounded batches can yield between them, so one
        peer's backlog never monopolises the event loop; :attr:`frames_pending` says whether
        the limit stopped it. (Frames without an event count too, and a ``Datagrams`` frame
        counts once per datagram, so the receivers of datagrams get to run, and empty their
        bounded queues, as often as when each datagram had its own frame.)
        """
        if self._error is not None:
            raise self._error
        decoder = self._decoder
        events: list[Event] = []
        sink = self.data_sink
        remaining = -1 if max_frames is None else max_frames
        try:
            while remaining and (frame := decoder.next_frame()) is not None:
                remaining -= 1
                event: Event | None
                if frame is DATA_FRAME:
                    event = self._take_data(
                        decoder.data_stream, decoder.data_payload, sink, not events
                    )
                elif type(frame) is Data:  # a Data frame in a non-canonical encoding
                    event = self._take_data(frame.stream, frame.data, sink, not events)
                else:
                    event = self._handle(cast(SessionMessage, frame))
                if self._replies > self.max_control_queue:
                    raise _error(
                        ErrorCode.FLOOD,
                        f"the peer sends requests without reading the replies "
                        f"({self._replies} bytes of replies queued)",
                    )
                if event is not None:
                    events.append(event)
                    if remaining > 0 and type(event) is DatagramsReceived:
                        remaining = max(0, remaining - len(event.data) + 1)
        except RemoteProtocolError as exc:
            raise caused_by(self._fail(exc), None) from None
        self.frames_pending = remaining == 0
        return events

    def _live(self, stream_id: int, event: StreamEvent) -> tuple[_Stream, StreamState] | None:
        """The stream a received frame is about and the state the frame moves it to, or
        ``None`` for a stream that existed once (the frame crossed our Reset: dropped)."""
        st = self._streams.get(stream_id)
        if st is None:
            self._check_known_id(stream_id)
            return None
        return st, next_state(st.state, event, stream_id, self._table)

    def _takes_datagrams(self, stream_id: int, what: str) -> bool:
        """Whether a Datagram or Datagrams frame (``what``, for the error) on ``stream_id`` is
        delivered: not on a stream gone or closed here; a byte stream is a protocol error."""
        if (live := self._live(stream_id, StreamEvent.RECV_DATAGRAM)) is None:
            return False
        st, _ = live  # a datagram never changes the state
        if not st.datagrams:
            raise _error(
                ErrorCode.STREAM_STATE_ERROR,
                f"{what} on stream {st.id}, which is a byte stream",
            )
        return not st.local_closed

    def _handle(self, msg: SessionMessage) -> Event | None:
        match msg:
            case Datagram(stream_id, data):
                if not self._takes_datagrams(stream_id, "datagram"):
                    return None
                return DatagramReceived(stream_id, data)
            case Datagrams(stream_id, batch):
                if not self.datagram_batches:
                    raise _error(
                        ErrorCode.UNEXPECTED_MESSAGE,
                        "Datagrams frame, which needs protocol version 2, in a version 1 session",
                    )
                if not self._takes_datagrams(stream_id, "datagrams"):
                    return None
                return DatagramsReceived(stream_id, batch)
            case WindowUpdate(stream_id, delta):
                if (live := self._live(stream_id, StreamEvent.RECV_WINDOW)) is None:
                    return None
                st, _ = live
                st.send_window += delta
                if st.send_window > MAX_WINDOW:
                    raise _error(ErrorCode.FLOW_CONTROL_ERROR, f"window of {st.id} overflowed")
                return WindowOpened(st.id)
            case Open():
                return self._on_open(msg)
            case Accept(stream_id, window):
                # None: we may have reset it while it was opening
                if (live := self._live(stream_id, StreamEvent.RECV_ACCEPT)) is None:
                    return None
                st, state = live
                self._enter(st, state)
                # counted from the start of the stream: minus what we sent before it came
                early = 0 if st.datagrams else self.peer_early_window
                st.send_window = window - (early - st.send_window)
                if st.send_window < 0:
                    raise _error(
                        ErrorCode.FLOW_CONTROL_ERROR,
                        f"stream {st.id}: Accept window {window} is below the early data sent",
                    )
                if st.fin_pending:
                    st.fin_pending = False
                    self.send_fin(st.id)
                return StreamAccepted(st.id)
            case Refuse(stream_id, code, message):
                if (live := self._live(stream_id, StreamEvent.RECV_REFUSE)) is None:
                    return None
                self._enter(*live)
                return StreamRefused(stream_id, code, message)
            case Fin(stream_id):
                if (live := self._live(stream_id, StreamEvent.RECV_FIN)) is None:
                    return None
                self._enter(*live, unread=True)
                return StreamEnded(stream_id)
            case Reset(stream_id, code, message):
                if (live := self._live(stream_id, StreamEvent.RECV_RESET)) is None:
                    return None
                self._enter(*live)
                return StreamReset(stream_id, code, message)
            case Ping(opaque):
                self._reply(Pong(opaque))
                return PingReceived(opaque)
            case Pong(opaque):
                return PongReceived(opaque)
            case GoAway(code, message):
                self.goaway_received = True
                return GoAwayReceived(code, message)
            case Data():  # pragma: no cover - next_events reads Data frames itself
                raise AssertionError("a Data frame reached _handle")

    def _is_peer_id(self, stream_id: int) -> bool:
        return stream_id % 2 == self._peer_parity

    def _check_known_id(self, stream_id: int) -> None:
        """A frame for a stream we no longer track is fine if the stream ever existed.

        Frames cross on the wire (we reset while the peer was still sending), so such frames are
        dropped silently; a frame for a stream id that was never opened is a violation.
        """
        if self._is_peer_id(stream_id):
            existed = stream_id <= self._last_peer_id
        else:
            existed = stream_id < self._next_id
        if not existed:
            raise _error(ErrorCode.STREAM_STATE_ERROR, f"frame for unknown stream {stream_id}")

    def _on_open(self, msg: Open) -> Event | None:
        sid = msg.stream
        if not self._is_peer_id(sid):
            raise _error(ErrorCode.STREAM_STATE_ERROR, f"peer used our stream id parity: {sid}")
        if sid <= self._last_peer_id:
            raise _error(ErrorCode.STREAM_STATE_ERROR, f"stream id {sid} reused or not increasing")
        self._last_peer_id = sid
        if self.goaway_sent or self.goaway_received:
            # an Open after the peer's own GoAway is refused like one crossing ours
            self._reply(Refuse(sid, ErrorCode.GOING_AWAY, "session is going away"))
            return None
        if self.open_streams >= self.max_streams:
            self._reply(Refuse(sid, ErrorCode.STREAM_LIMIT, f"limit of {self.max_streams} streams"))
            return None
        # no credit until accept_stream grants it, but the early window (version 2; 0 before):
        # within the stream's floor, so no pool credit is taken for a stream not answered yet
        early = 0 if msg.datagrams else self.early_window
        self._streams[sid] = _Stream(sid, StreamState.PENDING, msg.window, early, msg.datagrams)
        return StreamOpened(sid, msg.host, msg.port, msg.tag, msg.datagrams)

    def _take_data(
        self,
        stream_id: int,
        data: bytes,
        sink: Callable[[int, bytes], None] | None,
        first: bool,
    ) -> DataReceived | None:
        """A received Data frame, booked: its event, or ``None`` when the payload went to
        ``sink`` (allowed while no other event came ``first`` in this call) or nowhere."""
        if not self._on_data(stream_id, data):
            return None
        if sink is not None and first:
            sink(stream_id, data)
            return None
        return DataReceived(stream_id, data)

    def _on_data(self, stream_id: int, data: bytes) -> bool:
        """Book a received Data frame; ``True`` when its payload goes to the application."""
        if (live := self._live(stream_id, StreamEvent.RECV_DATA)) is None:
            return False
        st, _ = live  # data never changes the state
        size = len(data)
        if size > st.recv_window:
            raise _error(
                ErrorCode.FLOW_CONTROL_ERROR,
                f"stream {st.id}: {size} bytes exceed the window of {st.recv_window}",
            )
        # window becomes held bytes: the stream's credit does not change
        st.recv_window -= size
        st.held += size
        self._held += size
        if st.local_closed:  # forgetting the stream drops (and uncounts) the bytes
            self._enter(st, next_state(st.state, StreamEvent.SEND_RESET, st.id))
            before = self.bytes_to_send
            self._emit_reset(st, ErrorCode.CANCELLED, "stream closed by the receiver")
            self._replies += self.bytes_to_send - before
            return False
        return size > 0
