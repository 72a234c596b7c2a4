"""The server side of one name route, and of one member of a load-balanced group.

The shared listener (``_vhost.serve_name_routing``) reads each connection's name and hands
the connection to the route holding it; a port group's accept loop hands its connections to
a member the same way. Either way the connection is carried to the client in the client's
own session nursery (``relays``), never in the listener's, so that the session ending ends
every relay it carries, as it does for a port's. Like a public port it knows its client only
through :class:`PortOwner`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from .._control import ControlChannel
from .._relay import RelayStats, abort
from .._vhost import NameRoutes, RouteTarget, answer_and_close, unavailable_reply
from ..errors import ErrorCode, printable
from ._group import NO_MEMBER_HERE, RELAYED_IN, Group
from ._public_port import PortOwner

log = logging.getLogger("pytunnel.server")

#: Seconds a connection routed to a name whose forward is being set up waits for it.
_ATTACH_WAIT = 5.0


class _Endpoint:
    """Where one forward's public connections go at the server: into its client's nursery.

    Used as it is for a member of a port group; :class:`_PublicName` adds the name. While the
    client reports its target offline (``ForwardState``), ``online`` is false; a member of a
    group in a cluster also tells the registry (``report_state``), so that other nodes stop
    handing it their connections.
    """

    def __init__(self, client: PortOwner, forward_id: int, what: str) -> None:
        self.client = client
        #: The stream id of the forward's control stream, which its connections carry as tag.
        self.forward_id = forward_id
        #: What the forward serves, for logs.
        self.what = what
        #: Where the relays run: the client session's nursery for this forward (set by the
        #: owner before any connection can reach it).
        self.relays: trio.Nursery | None = None
        #: Set once ``relays`` is (the forward runs), or once it stops without ever running.
        self.attached = trio.Event()
        self.online = True
        #: The load-balanced group the forward is a member of, if any.
        self.group: Group | None = None
        #: Tells the cluster's registry each change of ``online`` (a group member in a
        #: cluster); awaited in order, so the engine ends with the last state.
        self.report_state: Callable[[bool], Awaitable[None]] | None = None
        #: Its public connections and their bytes (the admin API's, the metrics').
        self.stats = RelayStats()
        self._stopped = False

    @property
    def peer(self) -> str:
        return self.client.peer

    def attach(self, nursery: trio.Nursery) -> None:
        """Connections go into ``nursery`` (the forward's, inside its client's session) now."""
        self.relays = nursery
        self.attached.set()

    def stop_listening(self) -> None:
        """No connection reaches the forward from now on (it is ending)."""
        self._stopped = True
        self.attached.set()  # nobody waits for a nursery that will never come
        if self.group is not None:
            self.group.remove(self)

    def take(self, conn: trio.abc.HalfCloseableStream, peer: tuple[str, int]) -> bool:
        """Carry ``conn`` in the client's nursery; false if the forward is ending or the
        server is at its stream limit (the client session logs that)."""
        if self._stopped or self.relays is None:
            return False
        if not self.client.reserve_stream():
            return False
        try:
            self.relays.start_soon(self._carry, conn, peer)
        except RuntimeError:  # the nursery closed since the check above: ending
            self.client.release_stream()
            return False
        return True

    def start_soon(self, task: Callable[[], Awaitable[object]]) -> bool:
        """Run ``task`` in the forward's nursery (a group's accept loop); false without one."""
        if self._stopped or self.relays is None:
            return False
        try:
            self.relays.start_soon(task)
        except RuntimeError:
            return False
        return True

    async def _carry(self, conn: trio.abc.HalfCloseableStream, peer: tuple[str, int]) -> None:
        try:
            await self.client.relay_public(conn, peer, self.forward_id, self.stats)
        finally:
            self.client.release_stream()
            await trio.aclose_forcefully(conn)

    async def follow_control_stream(self, channel: ControlChannel) -> None:
        """Apply the client's ForwardState messages until it closes the control stream."""
        async for message in channel.forward_states():
            if message.online != self.online:
                self.online = message.online
                if message.online:
                    log.info("client %s: %s back online", self.client.peer, self.what)
                else:
                    log.warning(
                        "client %s: %s offline: %s",
                        self.client.peer,
                        self.what,
                        printable(message.reason),
                    )
                if self.report_state is not None:
                    await self.report_state(message.online)


class _PublicName(_Endpoint):
    """One host name routed to one client's forward (or, with ``group``, to a member of the
    group holding the name) on the shared listener of ``routes``.

    A route of its own is registered in ``routes`` from creation until
    :meth:`stop_listening`. While the client reports its target offline the name stays the
    client's, and its connections get a 502 page (or an alert, for TLS) instead of being
    carried into a black hole.
    """

    def __init__(
        self,
        client: PortOwner,
        forward_id: int,
        routes: NameRoutes,
        name: str,
        *,
        tls: bool,
        group: Group | None = None,
    ) -> None:
        full = routes.full_name(name)
        super().__init__(client, forward_id, f"name {full}")
        self.routes = routes
        self.tls = tls
        self.group = group
        # one bound method, registered and unregistered by identity
        self._target: RouteTarget = self._route
        #: The full name (``app`` under the server's domain becomes ``app.<domain>``).
        self.name = full if group is not None else routes.register(name, self._target)

    def stop_listening(self) -> None:
        """Give the name back now, synchronously (a group's once its last member leaves):
        later connections for it get the router's 404 (or alert) while the relays already
        running are torn down by the owner."""
        super().stop_listening()
        if self.group is None:
            self.routes.unregister(self.name, self._target)

    async def _route(self, conn: trio.abc.HalfCloseableStream, peer: tuple[str, int]) -> None:
        """Take one routed connection: into the client's nursery, or answered and closed."""
        if self.relays is None and not self._stopped:
            # registered a moment before its nursery runs (a name restored after a reconnect):
            # a connection arriving then waits for it rather than being turned away
            with trio.move_on_after(_ATTACH_WAIT):
                await self.attached.wait()
        if not self.online:
            # the client's reason names its own target: it goes to the log, not to the public
            reason = "its service is offline"
        elif self.take(conn, peer):
            return
        else:
            reason = "it cannot take the connection now"
        await answer_and_close(conn, unavailable_reply(self.tls, self.name, reason))


def group_route(group: Group, *, tls: bool, name: str) -> RouteTarget:
    """The route a name group registers: the next live member takes each connection."""

    async def route(conn: trio.abc.HalfCloseableStream, peer: tuple[str, int]) -> None:
        if group.take(conn, peer):
            return
        if RELAYED_IN.get():
            # reset before any answer: the sending node still holds the request and gives it
            # to another member (it may not know yet that ours are offline)
            abort(conn, ErrorCode.FORWARD_FAILED, NO_MEMBER_HERE)
            await trio.aclose_forcefully(conn)
            return
        reason = "no member of its group can take the connection now"
        await answer_and_close(conn, unavailable_reply(tls, name, reason))

    return route
