"""``-D``: a SOCKS proxy here (SOCKS5, 4 and 4a) whose connections exit at the server.

The SOCKS negotiation is the sans-IO :mod:`pytunnel.protocol.socks`; this module only moves
its bytes and maps a failed dial to the SOCKS reply that says what happened.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING

import trio

from .._dial import format_target
from .._util import aclose_all
from ..errors import SessionClosedError, StreamRefusedError
from ..protocol import routes
from ..protocol.socks import (
    MAX_MESSAGE_SIZE,
    ConnectRequest,
    SocksError,
    SocksServerConnection,
    reply_code_for,
)
from ._base import ForwardKind
from .local import LocalForward

if TYPE_CHECKING:
    from .._link import Link
    from ..session import StreamSlot

__all__ = ["DynamicForward"]

log = logging.getLogger("pytunnel.client")


class DynamicForward(LocalForward):
    """``-D``: a local SOCKS proxy (SOCKS5, SOCKS4 and 4a) whose connections exit at the server.

    Domain names are resolved by the server, so DNS does not leak on the client side; the
    server's target policy (``permit_open``) applies to every destination. A failed dial is
    answered with the SOCKS reply that matches it (timeout, refused, unreachable, forbidden).
    """

    kind = ForwardKind.DYNAMIC

    def __init__(
        self, link: Link, auth: tuple[str, str] | None, negotiation_timeout: float
    ) -> None:
        super().__init__(link, "socks", 0)
        self.auth = auth
        self.negotiation_timeout = negotiation_timeout

    @property
    def target(self) -> str:
        return "SOCKS"

    async def _handle(self, conn: trio.SocketStream, slot: StreamSlot | None = None) -> None:
        socks = SocksServerConnection(self.auth)
        request: ConnectRequest | None = None
        try:
            with trio.move_on_after(self.negotiation_timeout):
                while request is None:
                    events = socks.receive_data(await conn.receive_some(MAX_MESSAGE_SIZE))
                    reply = socks.data_to_send()
                    if reply:
                        await conn.send_all(reply)
                    if events:
                        request = events[0]
        except SocksError as exc:
            self.stats.count_error("REFUSED")
            log.info(
                "dynamic forward %s: SOCKS negotiation failed: %s", self.listen_port, exc.reason
            )
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                if exc.reply:
                    await conn.send_all(exc.reply)
            await trio.aclose_forcefully(conn)
            return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            await trio.aclose_forcefully(conn)
            return
        if request is None:  # negotiation deadline passed
            self.stats.count_error("REFUSED")
            await trio.aclose_forcefully(conn)
            return
        try:
            stream = await self._link.open(request.host, request.port, routes.CONNECT, slot=slot)
        except (StreamRefusedError, SessionClosedError) as exc:
            self.stats.count_failure(exc)
            target = format_target(request.host, request.port)
            log.warning("dynamic forward %s: %s unreachable: %s", self.listen_port, target, exc)
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await conn.send_all(socks.reject(reply_code_for(exc)))
            await trio.aclose_forcefully(conn)
            return
        try:
            await conn.send_all(socks.accept())
            if socks.leftover:
                await stream.send_all(socks.leftover)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            await aclose_all(conn, stream)
            return
        await self._relay(conn, stream)
