"""The remote-forward control-stream protocol, sans-IO: who may say what, and in which order.

A remote forward (``LISTEN``/``UDP_LISTEN``) keeps its stream open as the forward's control
stream. Inside it, framed like session frames but decoded as the control layer only::

    server -> client   Bound(host, port)          exactly once, first: where it listens
    client -> server   ForwardState(online, why)  any number, only after Bound

A member of a load-balanced group (routes ``LISTEN_GROUP``, ``NAME_GROUP``; the protocol is
made ``grouped``) says which group first, before the server binds anything::

    client -> server   Join(group, proof)         exactly once, before anything else
    server -> client   Bound(host, port)          only after Join
    client -> server   ForwardState(online, why)  any number, only after Bound

Nothing else ever travels on it: the server sends nothing after ``Bound`` and the client
nothing but ``Join`` (grouped, first) and ``ForwardState``. Closing the stream (either side)
ends the forward, so the end of the stream is the protocol's end, not an error, except before
``Bound``: the server closing then means it never confirmed the forward (a group member's is
reset with the refusal's code instead).

One :class:`ControlProtocol` per end and role checks both directions; it knows nothing of
streams or trio (``_control.py`` runs it over a stream).
"""

from __future__ import annotations

import enum

from ..errors import ErrorCode, ForwardError, LocalProtocolError, RemoteProtocolError
from .frames import FrameDecoder, encode_message
from .messages import CONTROL, MIN_MAX_FRAME_SIZE, Bound, ControlMessage, ForwardState, Join

__all__ = [
    "CONTROL_MAX_FRAME_SIZE",
    "ControlProtocol",
    "ControlRole",
]

#: The largest control frame accepted. The largest control message, a ``ForwardState`` with
#: its 1024-byte reason (or a ``Bound`` with a 255-byte host), encodes to well under 1.1 KiB,
#: so 4096 (the smallest ``max_frame_size`` any peer may announce, the same bound as before
#: authentication) fits every valid one while a peer can make a control stream buffer no more
#: than one small frame.
CONTROL_MAX_FRAME_SIZE = MIN_MAX_FRAME_SIZE


class ControlRole(enum.Enum):
    """Which end of the control stream we are."""

    #: The end that asked for the forward: receives ``Bound``, sends ``ForwardState``.
    CLIENT = "client"
    #: The end that listens: sends ``Bound``, receives ``ForwardState``.
    SERVER = "server"


class ControlProtocol:
    """One end of a control stream: encodes what we send and decodes what we receive,
    refusing anything out of order.

    Errors:
      LocalProtocolError: we tried to send what our role or the order forbids (a second
        ``Bound``, a ``ForwardState`` before ``Bound`` was received, ``Join`` where there is
        no group, a message of the other role). Nothing is encoded.
      RemoteProtocolError: the peer did (``UNEXPECTED_MESSAGE``), or sent a bad frame (the
        decoder's codes).
      ForwardError: (client) the server ended the stream before sending ``Bound``.

    A receiving error is sticky: every later :meth:`next_message` raises it again.
    """

    def __init__(self, role: ControlRole, *, grouped: bool = False) -> None:
        self.role = role
        #: Whether this control stream is a group member's (``Join`` first).
        self.grouped = grouped
        #: Whether ``Join`` has crossed the stream (grouped only).
        self.joined = False
        #: Whether ``Bound`` has crossed the stream (sent by the server, read by the client).
        self.bound = False
        #: Whether the peer has ended its side and every message it sent was taken.
        self.eof = False
        self._decoder = FrameDecoder(CONTROL_MAX_FRAME_SIZE, layer=CONTROL)
        self._peer_done = False
        self._error: RemoteProtocolError | ForwardError | None = None

    # ------------------------------------------------------------------ sending

    def send(self, message: ControlMessage) -> bytes:
        """The frame to write for ``message``, if our role and the order allow it."""
        if self.role is ControlRole.SERVER:
            if not isinstance(message, Bound):
                raise LocalProtocolError("the server sends nothing but Bound on a control stream")
            if self.bound:
                raise LocalProtocolError("Bound was already sent on this control stream")
            if self.grouped and not self.joined:
                raise LocalProtocolError("Bound before the client's Join")
            self.bound = True
        elif isinstance(message, Join):
            if not self.grouped:
                raise LocalProtocolError("Join on the control stream of a forward with no group")
            if self.joined:
                raise LocalProtocolError("Join was already sent on this control stream")
            self.joined = True
        else:
            if not isinstance(message, ForwardState):
                raise LocalProtocolError(
                    "the client sends nothing but ForwardState (and a group's Join, first) on a "
                    "control stream"
                )
            if not self.bound:
                raise LocalProtocolError("ForwardState before the server's Bound")
        return encode_message(message, CONTROL_MAX_FRAME_SIZE)

    # ------------------------------------------------------------------ receiving

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes read from the stream; ``b""`` when the peer ended it."""
        self._decoder.receive_data(data)
        if not data:
            self._peer_done = True

    def next_message(self) -> ControlMessage | None:
        """The next complete message from the peer, or ``None`` if more bytes are needed (or
        the stream ended: see :attr:`eof`)."""
        if self._error is not None:
            raise self._error
        try:
            return self._next()
        except (RemoteProtocolError, ForwardError) as exc:
            self._error = exc
            raise

    def _next(self) -> ControlMessage | None:
        message = self._decoder.next_message()  # TRUNCATED_FRAME at EOF inside a frame
        if message is None:
            if self._peer_done:
                self.eof = True
                if self.role is ControlRole.CLIENT and not self.bound:
                    raise ForwardError("the server closed the forward before confirming it")
            return None
        assert isinstance(message, (Bound, Join, ForwardState))  # the decoder's layer: CONTROL
        if self.role is ControlRole.CLIENT:
            if self.bound or not isinstance(message, Bound):
                raise _unexpected(message, "after Bound" if self.bound else "before Bound")
            self.bound = True
        elif isinstance(message, Join):
            if not self.grouped or self.joined:
                raise _unexpected(message, "again" if self.joined else "on a forward with no group")
            self.joined = True
        elif not isinstance(message, ForwardState):
            raise _unexpected(message, "from the client")
        elif self.grouped and not self.joined:
            raise _unexpected(message, "before Join")
        elif not self.bound:
            raise _unexpected(message, "before Bound")
        return message


def _unexpected(message: ControlMessage, when: str) -> RemoteProtocolError:
    return RemoteProtocolError(
        f"unexpected {type(message).__name__} on a forward's control stream ({when})",
        code=ErrorCode.UNEXPECTED_MESSAGE,
    )
