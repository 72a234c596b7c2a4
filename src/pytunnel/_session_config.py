"""The tunables of one multiplexed session (``pytunnel.session.SessionConfig``).

A module of its own, and pure Python in every build, because the compiled session
(``pytunnel._session``) reads it and mypyc does not compile attrs classes: the session copies
the values it reads per message into attributes of its own when it starts.
"""

from __future__ import annotations

import attrs

from .protocol.frames import DEFAULT_MAX_FRAME_SIZE
from .protocol.messages import MAX_WINDOW, MIN_MAX_FRAME_SIZE
from .protocol.mux import (
    DEFAULT_MAX_CONTROL_QUEUE,
    DEFAULT_MAX_DATA_CHUNK,
    DEFAULT_MAX_STREAMS,
    DEFAULT_RECEIVE_BUDGET,
    DEFAULT_WINDOW,
    window_floor,
)

__all__ = ["SessionConfig"]

_positive = attrs.validators.ge(1)


@attrs.frozen(kw_only=True)
class SessionConfig:
    """Tunables of one multiplexed session. The defaults are measured; see performance.md.

    Invalid values raise ``ValueError`` here, not in the middle of a handshake.
    """

    #: Receive window announced for every stream (bytes buffered per stream at most).
    window: int = attrs.field(
        default=DEFAULT_WINDOW, validator=[_positive, attrs.validators.le(MAX_WINDOW)]
    )
    #: Largest frame body accepted from the peer (at least 4096, the protocol's minimum).
    max_frame_size: int = attrs.field(
        default=DEFAULT_MAX_FRAME_SIZE,
        validator=[attrs.validators.ge(MIN_MAX_FRAME_SIZE), attrs.validators.le(2**32 - 1)],
    )
    #: Largest payload per Data frame we send.
    max_data_chunk: int = attrs.field(default=DEFAULT_MAX_DATA_CHUNK, validator=_positive)
    #: Concurrently open streams (both directions); further opens are refused.
    max_streams: int = attrs.field(default=DEFAULT_MAX_STREAMS, validator=_positive)
    #: Bytes the peer may make this session buffer, all streams together: received and not
    #: read yet, plus the windows still granted. Each stream gets at least
    #: ``receive_budget / (2 * max_streams)`` (capped at ``window``), so a reader that stopped
    #: never blocks the others; the rest is shared up to ``window`` per stream.
    receive_budget: int = attrs.field(default=DEFAULT_RECEIVE_BUDGET, validator=_positive)
    #: Senders park once this many bytes are queued for the transport.
    write_buffer_high: int = attrs.field(default=256 * 1024, validator=attrs.validators.ge(0))
    #: ``max_bytes`` for each transport read: twice ``max_data_chunk``, so that a read of a
    #: busy transport holds whole frames, not one cut in two at every read.
    receive_size: int = attrs.field(default=512 * 1024, validator=_positive)
    #: How long a graceful close waits to flush ``GoAway`` before dropping the transport.
    close_timeout: float = attrs.field(default=1.0, validator=attrs.validators.ge(0))
    #: Bytes of replies (Pong, Refuse, Reset) queued for a peer that does not read them before
    #: the session ends with ``FLOOD``.
    max_control_queue: int = attrs.field(default=DEFAULT_MAX_CONTROL_QUEUE, validator=_positive)
    #: Seconds a stream we closed waits for the peer's Fin before it is reset and its slot
    #: freed (TCP's FIN_WAIT_2 timeout, for the same reason: a silent peer).
    close_linger: float = attrs.field(default=30.0, validator=attrs.validators.gt(0))

    @property
    def early_window(self) -> int:
        """What a version 2 peer may send on a stream before we accept it, announced in the
        handshake: each stream slot's floor of the receive budget (8 KiB by default), so what
        peers park on unanswered streams stays inside the budget."""
        return window_floor(self.window, self.receive_budget, self.max_streams)
