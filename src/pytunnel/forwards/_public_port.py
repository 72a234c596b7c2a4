"""The server side of one TCP remote forward: its public listeners and its control stream.

It knows only the narrow :class:`PortOwner` interface of the client session that owns it
(a stream slot, a way to carry one public connection to the client, a peer name), never the
session's internals.
"""

from __future__ import annotations

import logging
from typing import Protocol

import trio

from .._control import ControlChannel
from .._dial import format_target
from .._ingress import serve_ingress
from .._listen import bind
from .._proxied import Network, public_peer
from .._relay import RelayStats
from .._util import aclose_all
from ..errors import (
    ForwardError,
    printable,
)
from ..session import (
    MuxStream,
)

log = logging.getLogger("pytunnel.server")


class PortOwner(Protocol):
    """What a public port needs of the client session it belongs to, and nothing more."""

    @property
    def peer(self) -> str:
        """The client's name, for logs."""
        ...

    @property
    def trusted_proxies(self) -> tuple[Network, ...]:
        """Proxies whose PROXY header names a public connection's real source."""
        ...

    def reserve_stream(self) -> bool:
        """Take one of the server's stream slots for a public connection; false at the limit
        (the owner logs the refusal)."""
        ...

    def release_stream(self) -> None:
        """Give back a slot :meth:`reserve_stream` took."""
        ...

    async def relay_public(
        self,
        conn: trio.abc.HalfCloseableStream,
        peer: tuple[str, int],
        forward_id: int,
        stats: RelayStats | None = None,
    ) -> None:
        """Open a stream of forward ``forward_id`` to the client, naming ``peer`` (the public
        connection's source), and relay ``conn`` over it, counted in ``stats``."""
        ...


class _PublicPort:
    """The server side of one remote forward: its public listeners and its control stream.

    While the client reports the forward's target offline, the listeners are closed so the
    port refuses connections at once (no accept-then-drop black hole); back online, the same
    port is bound again. Relays already running are not affected either way.
    """

    def __init__(
        self,
        client: PortOwner,
        control: MuxStream,
        host: str,
        port: int,
        listeners: list[trio.SocketListener],
    ) -> None:
        self.client = client
        self.control = control
        self.host = host
        self.port = port
        self.address = format_target(host, port)
        self.listeners = listeners
        #: The public connections of this forward: bytes each way, open and total.
        self.stats = RelayStats()
        self.relays: trio.Nursery | None = None
        self._accepting = trio.CancelScope()
        #: Set for good once the forward stops listening (it is ending).
        self._stopped = False

    def start_accepting(self) -> None:
        assert self.relays is not None
        if self._stopped:
            return
        self._accepting = trio.CancelScope()
        self.relays.start_soon(self._accept_all, self._accepting)

    async def _accept_all(self, scope: trio.CancelScope) -> None:
        with scope:
            async with trio.open_nursery() as nursery:
                for listener in self.listeners:
                    nursery.start_soon(self._accept_loop, listener)

    @property
    def online(self) -> bool:
        """Whether it accepts connections (not while the client reports its target down)."""
        return bool(self.listeners)

    def stop_listening(self) -> None:
        """Close the public listeners now, synchronously, for good.

        The accept loops are cancelled first, so they end quietly rather than with the error
        of a socket closed under them; a connection still in the kernel's backlog is reset.
        """
        self._stopped = True
        self._accepting.cancel()
        listeners, self.listeners = self.listeners, []
        for listener in listeners:
            listener.socket.close()

    async def _accept_loop(self, listener: trio.SocketListener) -> None:
        assert self.relays is not None
        await serve_ingress(listener, self._reserve, self._carry, self._release, self.relays)

    async def _reserve(self) -> bool:
        # at the server's limit the connection is accepted and closed at once: a public
        # port never makes its callers wait in the backlog for a client that may be stuck
        return self.client.reserve_stream()

    async def _carry(self, conn: trio.SocketStream, admitted: bool) -> None:
        if not admitted:
            return
        peer = await public_peer(conn, self.client.trusted_proxies, f"port {self.port}")
        if peer is None:  # gone already, or a trusted proxy without its header
            return
        await self.client.relay_public(conn, peer, self.control.stream_id, self.stats)

    def take(self, conn: trio.abc.HalfCloseableStream, peer: tuple[str, int]) -> bool:
        """Carry a public connection that reached another node of the cluster (``conn`` is
        its node link stream) exactly as one accepted here: a stream slot, the forward's
        stats, the public ``peer`` named to the client. False while the forward is offline,
        ending or at the server's limit; never blocks."""
        if self._stopped or not self.listeners or self.relays is None:
            return False
        if not self.client.reserve_stream():
            return False
        try:
            self.relays.start_soon(self._carry_taken, conn, peer)
        except RuntimeError:  # the nursery closed since the check above: ending
            self.client.release_stream()
            return False
        return True

    async def _carry_taken(self, conn: trio.abc.HalfCloseableStream, peer: tuple[str, int]) -> None:
        try:
            await self.client.relay_public(conn, peer, self.control.stream_id, self.stats)
        finally:
            self.client.release_stream()
            await trio.aclose_forcefully(conn)

    def _release(self, admitted: bool) -> None:
        if admitted:
            self.client.release_stream()

    async def follow_control_stream(self, channel: ControlChannel) -> None:
        """Apply the client's ForwardState messages until it closes the control stream."""
        async for message in channel.forward_states():
            await self._set_online(message.online, message.reason)

    async def _set_online(self, online: bool, reason: str) -> None:
        peer = self.client.peer
        if not online and self.listeners:
            self._accepting.cancel()
            listeners, self.listeners = self.listeners, []
            await aclose_all(*listeners)
            log.warning("client %s: forward %s offline: %s", peer, self.address, printable(reason))
        elif online and not self.listeners and not self._stopped:
            try:
                listeners = await bind(self.host, self.port)
            except ForwardError as exc:
                log.error(
                    "client %s: forward %s cannot come back online: %s", peer, self.address, exc
                )
                raise
            if self._stopped:  # the forward ended while we were binding
                await aclose_all(*listeners)
                return
            self.listeners = listeners
            self.start_accepting()
            log.info("client %s: forward %s back online", peer, self.address)
