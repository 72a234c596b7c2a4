"""Former home of the session classes, kept importable while callers move to
:mod:`pytunnel.session` (the public namespace of the multiplexer) and :mod:`pytunnel.errors`."""

from .errors import StreamResetError
from .session import (
    IncomingStream,
    MuxStream,
    Session,
    SessionConfig,
    StreamSlot,
    open_session,
    wait_stream_end,
)

__all__ = [
    "IncomingStream",
    "MuxStream",
    "Session",
    "SessionConfig",
    "StreamResetError",
    "StreamSlot",
    "open_session",
    "wait_stream_end",
]
