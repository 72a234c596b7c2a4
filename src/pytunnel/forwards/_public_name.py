"""The server side of one name route: a host name on a shared HTTP or HTTPS listener.

The shared listener (``_vhost.serve_name_routing``) reads each connection's name and hands
the connection to the route holding it. The route carries it to its client in the client's
own session nursery (``relays``), never in the listener's, so that the session ending ends
every relay of its routes, as it does for a port's. Like a public port it knows its client
only through :class:`PortOwner`.
"""

from __future__ import annotations

import logging

import trio

from .._control import ControlChannel
from .._vhost import NameRoutes, RouteTarget, answer_and_close, unavailable_reply
from ..errors import printable
from ._public_port import PortOwner

log = logging.getLogger("pytunnel.server")


class _PublicName:
    """One host name routed to one client's forward, on the shared listener of ``routes``.

    Registered in ``routes`` from creation until :meth:`stop_listening`. While the client
    reports its target offline the name stays the client's, and its connections get a 502
    page (or an alert, for TLS) instead of being carried into a black hole.
    """

    def __init__(
        self,
        client: PortOwner,
        forward_id: int,
        routes: NameRoutes,
        name: str,
        *,
        tls: bool,
    ) -> None:
        self.client = client
        #: The stream id of the route's control stream, which its connections carry as tag.
        self.forward_id = forward_id
        self.routes = routes
        self.tls = tls
        #: Where the relays run: the client session's nursery for this route (set by the
        #: owner before any connection can be routed to it).
        self.relays: trio.Nursery | None = None
        self.online = True
        self._stopped = False
        # one bound method, registered and unregistered by identity
        self._target: RouteTarget = self._route
        #: The full name (``app`` under the server's domain becomes ``app.<domain>``).
        self.name = routes.register(name, self._target)

    def stop_listening(self) -> None:
        """Give the name back now, synchronously: later connections for it get the router's
        404 (or alert) while the relays already running are torn down by the owner."""
        self._stopped = True
        self.routes.unregister(self.name, self._target)

    async def _route(self, conn: trio.abc.HalfCloseableStream, peer: tuple[str, int]) -> None:
        """Take one routed connection: into the client's nursery, or answered and closed."""
        if self._stopped or self.relays is None:
            await answer_and_close(conn, unavailable_reply(self.tls, self.name, "it is closing"))
            return
        if not self.online:
            # the client's reason names its own target: it goes to the log, not to the public
            await answer_and_close(
                conn, unavailable_reply(self.tls, self.name, "its service is offline")
            )
            return
        if not self.client.reserve_stream():
            await answer_and_close(
                conn, unavailable_reply(self.tls, self.name, "the server is at its stream limit")
            )
            return
        try:
            self.relays.start_soon(self._carry, conn, peer)
        except RuntimeError:  # the nursery closed since the check above: the route is ending
            self.client.release_stream()
            await answer_and_close(conn, unavailable_reply(self.tls, self.name, "it is closing"))

    async def _carry(self, conn: trio.abc.HalfCloseableStream, peer: tuple[str, int]) -> None:
        try:
            await self.client.relay_public(conn, peer, self.forward_id)
        finally:
            self.client.release_stream()
            await trio.aclose_forcefully(conn)

    async def follow_control_stream(self, channel: ControlChannel) -> None:
        """Apply the client's ForwardState messages until it closes the control stream."""
        async for message in channel.forward_states():
            if message.online != self.online:
                self.online = message.online
                if message.online:
                    log.info("client %s: name %s back online", self.client.peer, self.name)
                else:
                    log.warning(
                        "client %s: name %s offline: %s",
                        self.client.peer,
                        self.name,
                        printable(message.reason),
                    )
