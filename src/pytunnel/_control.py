"""A remote forward's control stream over any trio stream: ``protocol.control`` with I/O.

:class:`ControlChannel` reads and writes whole control messages; every rule about them (who
sends what, in which order, the frame limit, what the end of the stream means) is the
sans-IO :class:`~pytunnel.protocol.control.ControlProtocol`'s. Failures of the stream itself
(a reset, a lost session) propagate as the stream raises them (``BrokenResourceError`` with
the reason as its cause, ``ClosedResourceError``): what they mean for the forward is the
caller's business. It knows nothing of forwards, sessions or listeners.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import trio

from .protocol.control import ControlProtocol, ControlRole
from .protocol.messages import Bound, ControlMessage, ForwardState, Join

__all__ = ["ControlChannel"]

#: Bytes asked of the stream per read: one control frame at most, so a read never holds more.
_READ_SIZE = 4096


class ControlChannel:
    """Send and receive the messages of one end of a control stream.

    Args:
      stream: the control stream (a ``MuxStream``, or any ``trio.abc.Stream`` in tests).
      role: which end we are.

    ``receive`` raises ``trio.EndOfChannel`` once the peer has ended the stream cleanly (the
    forward is over), and the protocol's typed errors for a bad or out-of-order message;
    ``async for message in channel`` reads until that end.
    """

    def __init__(
        self, stream: trio.abc.Stream, role: ControlRole, *, grouped: bool = False
    ) -> None:
        self.stream = stream
        self.protocol = ControlProtocol(role, grouped=grouped)

    async def send(self, message: ControlMessage) -> None:
        """Send one message (``LocalProtocolError`` if our role or the order forbids it)."""
        await self.stream.send_all(self.protocol.send(message))

    async def receive(self) -> ControlMessage:
        """The peer's next message.

        Raises:
          trio.EndOfChannel: the peer ended the stream (after ``Bound``, for a client).
          ForwardError: (client) the server ended it before ``Bound``.
          RemoteProtocolError: a bad frame or an out-of-order message.
        """
        protocol = self.protocol
        while True:
            message = protocol.next_message()
            if message is not None:
                return message
            if protocol.eof:
                raise trio.EndOfChannel
            protocol.receive_data(await self.stream.receive_some(_READ_SIZE))

    async def receive_bound(self) -> Bound:
        """(Client) wait for the server's ``Bound``: where the forward listens."""
        message = await self.receive()  # the protocol lets nothing but Bound come first
        assert isinstance(message, Bound)
        return message

    async def receive_join(self) -> Join:
        """(Server, grouped) wait for the client's ``Join``: the group it joins."""
        message = await self.receive()  # the protocol lets nothing but Join come first
        assert isinstance(message, Join)
        return message

    async def forward_states(self) -> AsyncIterator[ForwardState]:
        """(Server) the client's ``ForwardState`` updates, until it ends the stream."""
        async for message in self:
            assert isinstance(message, ForwardState)  # all the protocol lets a client send
            yield message

    def __aiter__(self) -> AsyncIterator[ControlMessage]:
        return self._messages()

    async def _messages(self) -> AsyncIterator[ControlMessage]:
        while True:
            try:
                message = await self.receive()
            except trio.EndOfChannel:
                return
            yield message
