"""The session's answers to its peer and to its own listeners: :class:`IncomingStream` (a stream
the peer asked to open, accepted or refused once) and :class:`StreamSlot` (a stream slot
reserved before a listener accepts a connection).

Neither knows about frames or the transport; they act through the session that made them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

import trio

from ._stream import MuxStream
from .errors import DialError, LocalProtocolError, SessionClosedError, TunnelError, refusal_code

if TYPE_CHECKING:
    from .session import Session

__all__ = ["IncomingStream", "StreamSlot"]

_T = TypeVar("_T")


class IncomingStream:
    """A stream the peer asked to open; answer with :meth:`accept` or :meth:`refuse`.

    The session that made it passes the two answers in (``on_accept``, ``on_refuse``), and
    cancels :attr:`cancel_scope` when the opener gives up; nothing else crosses between them.
    """

    def __init__(
        self,
        session: Session,
        stream: MuxStream,
        *,
        on_accept: Callable[[MuxStream], None],
        on_refuse: Callable[[MuxStream, int, str], None],
    ) -> None:
        self._session = session
        self._stream = stream
        self._on_accept = on_accept
        self._on_refuse = on_refuse
        self._answered = False
        self._cancel_scope = trio.CancelScope()

    @property
    def cancel_scope(self) -> trio.CancelScope:
        """Cancelled when the opener resets the stream, or the session ends, before it is
        answered. Whatever prepares the answer (a dial) runs inside it: an opener that gives up
        at once ("rapid reset") must not keep a dial, a socket and a server slot busy until the
        dial's own timeout. Enter it at most once."""
        return self._cancel_scope

    @property
    def abandoned(self) -> bool:
        """True once the opener reset the stream (or the session ended) before an answer."""
        return self._cancel_scope.cancel_called

    async def dial(
        self,
        connect: Callable[[], Awaitable[_T]],
        on_failure: Callable[[DialError], None] | None = None,
    ) -> _T | None:
        """Make the connection this stream asks for, while the opener still wants it.

        ``connect`` runs inside :attr:`cancel_scope`, so an opener that gives up (Reset), or a
        session that ends, cancels the dial. A failed dial refuses the stream with its typed
        error, after ``on_failure`` (the caller's counters and log lines). Returns ``None``
        unless connected: the stream is then refused or abandoned already.
        """
        with self._cancel_scope:
            try:
                return await connect()
            except DialError as exc:
                if on_failure is not None:
                    on_failure(exc)
                self.refuse_with(exc)
        return None

    @property
    def stream_id(self) -> int:
        return self._stream.stream_id

    @property
    def host(self) -> str:
        return self._stream.host

    @property
    def port(self) -> int:
        return self._stream.port

    @property
    def tag(self) -> int:
        return self._stream.tag

    @property
    def datagrams(self) -> bool:
        """Whether the opener made it a datagram stream (check it against the route)."""
        return self._stream.datagrams

    @property
    def answered(self) -> bool:
        """Whether :meth:`accept` or :meth:`refuse` was called."""
        return self._answered

    def accept(self) -> MuxStream:
        """Open the stream and return it (no I/O wait: the Accept is queued)."""
        self._answer()
        self._on_accept(self._stream)
        return self._stream

    def refuse(self, code: int, message: str = "") -> None:
        """Refuse the stream; ``code`` (an ``ErrorCode``) becomes the opener's exception.

        A no-op once the session has ended: the opener learns of that from the session.
        """
        if self._answered:
            raise LocalProtocolError("this stream was already answered")
        self._answered = True
        self._on_refuse(self._stream, code, message)

    def refuse_with(self, error: TunnelError) -> None:
        """Refuse with ``error``'s code and message; a no-op if the session has already ended
        (the opener then learns of it from the session's end instead)."""
        if not self._session.closed:
            self.refuse(refusal_code(error), error.message)

    def _answer(self) -> None:
        if self._answered:
            raise LocalProtocolError("this stream was already answered")
        self._answered = True
        if self._session.closed:
            raise SessionClosedError("session is closed") from self._session.close_reason


class StreamSlot:
    """One of a session's stream slots, reserved by :meth:`Session.wait_stream_slot`.

    A listener reserves before it accepts, so it never takes a connection it has no stream
    for: at the cap it simply stops accepting and the kernel's backlog holds the rest. The
    reservation is used by ``open_stream(..., slot=)`` or given back with :meth:`release`
    (idempotent; a slot of a session that has ended is worth nothing and releasing it is a
    no-op).
    """

    __slots__ = ("_held", "_on_release", "session")

    def __init__(self, session: Session, on_release: Callable[[], None]) -> None:
        self.session = session
        self._on_release = on_release
        self._held = True

    @property
    def held(self) -> bool:
        return self._held

    def release(self) -> None:
        if self._held:
            self._held = False
            self._on_release()
