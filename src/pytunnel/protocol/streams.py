"""The rules of one stream's life, as a single transition table (sans-IO).

Every frame the peer sends about a stream and every call our side makes on one is an
:class:`StreamEvent`; :data:`TRANSITIONS` says, for each :class:`StreamState`, which events
are allowed and what state follows. A pair missing from the table is a violation: a
:class:`~pytunnel.errors.RemoteProtocolError` when the peer caused it, a
:class:`~pytunnel.errors.LocalProtocolError` when our caller did, with the code and text of
:data:`VIOLATIONS`. This is h11's ``_state.py`` model: the rules live in one place that can be
read (and tested) as a whole, instead of in a condition per handler.

Version 2 of the protocol adds *early data*: the opener may send ``Data`` right after its
``Open``, before the peer's ``Accept``, and the acceptor receives it while it has not answered.
:data:`V2_TRANSITIONS` is :data:`TRANSITIONS` with those two pairs; :func:`table_for` gives a
session the table of the version its handshake chose, so a version 1 peer that sends data
before ``Accept`` is a ``STREAM_STATE_ERROR`` exactly as before.

This module knows stream states only: not frames, flow control, windows or stream ids, which
stay in :mod:`.mux` (a window overflow is not a state rule).
"""

from __future__ import annotations

import enum

from ..errors import ErrorCode, LocalProtocolError, ProtocolError, RemoteProtocolError

__all__ = [
    "TRANSITIONS",
    "V2_TRANSITIONS",
    "VIOLATIONS",
    "StreamEvent",
    "StreamState",
    "allows",
    "next_state",
    "table_for",
]


class StreamState(enum.Enum):
    """Where one stream is, seen from our end."""

    #: We sent ``Open``; waiting for the peer's ``Accept`` or ``Refuse``.
    OPENING = "opening"
    #: The peer sent ``Open``; our application has not answered yet.
    PENDING = "pending"
    #: Open in both directions.
    OPEN = "open"
    #: We sent ``Fin``; the peer may still send data.
    LOCAL_FIN = "local fin"
    #: The peer sent ``Fin``; we may still send data.
    REMOTE_FIN = "remote fin"
    #: Refused, reset, or finished both ways: the multiplexer forgets the stream.
    CLOSED = "closed"

    # Every frame and every send looks a (state, event) pair up in the transition table, and
    # Enum's own __hash__ is Python code (hash of the name): members are singletons compared
    # by identity, so the identity hash is as correct and costs no Python call.
    __hash__ = object.__hash__


class StreamEvent(enum.Enum):
    """Something that happens to a stream: a frame received (``RECV_``) or a call (``SEND_``)."""

    RECV_ACCEPT = "recv accept"
    RECV_REFUSE = "recv refuse"
    RECV_DATA = "recv data"
    RECV_DATAGRAM = "recv datagram"
    RECV_WINDOW = "recv window update"
    RECV_FIN = "recv fin"
    RECV_RESET = "recv reset"
    SEND_ACCEPT = "send accept"
    SEND_REFUSE = "send refuse"
    SEND_DATA = "send data"
    SEND_DATAGRAM = "send datagram"
    SEND_FIN = "send fin"
    SEND_RESET = "send reset"

    __hash__ = object.__hash__  # as StreamState's: looked up on every frame

    @property
    def from_peer(self) -> bool:
        return self.name.startswith("RECV_")


_S = StreamState
_E = StreamEvent

#: (state, event) -> the state after it. Datagrams ignore ``Fin`` (it ends the byte
#: direction only); a second ``Fin`` of ours is allowed and sends nothing.
TRANSITIONS: dict[tuple[StreamState, StreamEvent], StreamState] = {
    (_S.OPENING, _E.RECV_ACCEPT): _S.OPEN,
    (_S.OPENING, _E.RECV_REFUSE): _S.CLOSED,
    (_S.PENDING, _E.SEND_ACCEPT): _S.OPEN,
    (_S.PENDING, _E.SEND_REFUSE): _S.CLOSED,
    (_S.OPEN, _E.RECV_DATA): _S.OPEN,
    (_S.OPEN, _E.RECV_DATAGRAM): _S.OPEN,
    (_S.OPEN, _E.RECV_WINDOW): _S.OPEN,
    (_S.OPEN, _E.RECV_FIN): _S.REMOTE_FIN,
    (_S.OPEN, _E.SEND_DATA): _S.OPEN,
    (_S.OPEN, _E.SEND_DATAGRAM): _S.OPEN,
    (_S.OPEN, _E.SEND_FIN): _S.LOCAL_FIN,
    (_S.LOCAL_FIN, _E.RECV_DATA): _S.LOCAL_FIN,
    (_S.LOCAL_FIN, _E.RECV_DATAGRAM): _S.LOCAL_FIN,
    (_S.LOCAL_FIN, _E.RECV_WINDOW): _S.LOCAL_FIN,
    (_S.LOCAL_FIN, _E.RECV_FIN): _S.CLOSED,
    (_S.LOCAL_FIN, _E.SEND_DATAGRAM): _S.LOCAL_FIN,
    (_S.LOCAL_FIN, _E.SEND_FIN): _S.LOCAL_FIN,
    (_S.REMOTE_FIN, _E.RECV_DATAGRAM): _S.REMOTE_FIN,
    (_S.REMOTE_FIN, _E.RECV_WINDOW): _S.REMOTE_FIN,
    (_S.REMOTE_FIN, _E.SEND_DATA): _S.REMOTE_FIN,
    (_S.REMOTE_FIN, _E.SEND_DATAGRAM): _S.REMOTE_FIN,
    (_S.REMOTE_FIN, _E.SEND_FIN): _S.CLOSED,
    # a Reset, from either side, ends a live stream in any state
    **{
        (state, event): _S.CLOSED
        for state in (_S.OPENING, _S.PENDING, _S.OPEN, _S.LOCAL_FIN, _S.REMOTE_FIN)
        for event in (_E.RECV_RESET, _E.SEND_RESET)
    },
}

#: Version 2: data may follow ``Open`` before the ``Accept`` (within the early window the
#: acceptor announced in its handshake; a window is not a state rule, :mod:`.mux` checks it).
#: The state does not change: the stream opens when the ``Accept`` comes.
V2_TRANSITIONS: dict[tuple[StreamState, StreamEvent], StreamState] = {
    **TRANSITIONS,
    (_S.OPENING, _E.SEND_DATA): _S.OPENING,
    (_S.PENDING, _E.RECV_DATA): _S.PENDING,
}

#: The error for an event the stream's state does not allow (``{id}``: the stream id).
VIOLATIONS: dict[StreamEvent, tuple[ErrorCode, str]] = {
    _E.RECV_ACCEPT: (ErrorCode.STREAM_STATE_ERROR, "stream {id} was not opening"),
    _E.RECV_REFUSE: (ErrorCode.STREAM_STATE_ERROR, "stream {id} was not opening"),
    _E.RECV_DATA: (ErrorCode.STREAM_STATE_ERROR, "data on stream {id} in wrong state"),
    _E.RECV_DATAGRAM: (ErrorCode.STREAM_STATE_ERROR, "datagram on stream {id} before accept"),
    _E.RECV_WINDOW: (ErrorCode.STREAM_STATE_ERROR, "window update on {id} too early"),
    _E.RECV_FIN: (ErrorCode.STREAM_STATE_ERROR, "unexpected Fin on stream {id}"),
    _E.SEND_ACCEPT: (ErrorCode.PROTOCOL_ERROR, "stream {id} is not awaiting an answer"),
    _E.SEND_REFUSE: (ErrorCode.PROTOCOL_ERROR, "stream {id} is not awaiting an answer"),
    _E.SEND_DATA: (ErrorCode.STREAM_STATE_ERROR, "stream {id} is not open for sending"),
    _E.SEND_DATAGRAM: (ErrorCode.STREAM_STATE_ERROR, "stream {id} is not open"),
    _E.SEND_FIN: (ErrorCode.PROTOCOL_ERROR, "stream {id} is not open"),
}


Table = dict[tuple[StreamState, StreamEvent], StreamState]


def table_for(version: int) -> Table:
    """The transition table of protocol ``version`` (1, or 2 and later)."""
    return TRANSITIONS if version < 2 else V2_TRANSITIONS


def allows(state: StreamState, event: StreamEvent, table: Table = TRANSITIONS) -> bool:
    """Whether ``event`` may happen to a stream in ``state`` (by ``table``)."""
    return (state, event) in table


def next_state(
    state: StreamState, event: StreamEvent, stream_id: int, table: Table = TRANSITIONS
) -> StreamState:
    """The state after ``event`` by ``table``, or the violation it is.

    Raises:
      RemoteProtocolError: ``event`` is a frame from the peer that ``state`` forbids.
      LocalProtocolError: ``event`` is a call of ours that ``state`` forbids.
    """
    new = table.get((state, event))
    if new is not None:
        return new
    code, text = VIOLATIONS[event]
    cls: type[ProtocolError] = RemoteProtocolError if event.from_peer else LocalProtocolError
    raise cls(text.format(id=stream_id), code=code)
