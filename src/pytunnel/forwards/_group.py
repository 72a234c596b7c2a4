"""Load-balanced groups at the server: several clients serving one public port or one name.

Members of one group present the same group name and the same proof of the group's secret
(``Join``). Public connections are handed to the live members in turn (round robin); a member
that is offline (its health probes), at a limit or gone is skipped, and a member leaves the
group synchronously when its forward or its session ends, so the next connection never goes
to it. The port or name is the group's, not any member's: it stays served while one member is
left and is given back when the last leaves.

Each connection is carried in the nursery of the member it is handed to, inside that
member's session nursery, so a session ending still ends every relay it carries. A port
group's accept loop runs in one member's nursery (its owner's) and moves to another member
when the owner leaves; the listening socket stays open meanwhile, so connections waiting in
the kernel's backlog are not lost.

In a cluster a group spans nodes: its members on other nodes are reached over node links
(:class:`Elsewhere`), so a public connection reaching any node is handed to a member
anywhere, local members and each other node weighted by their number of online members
(a node whose members are all offline gets no turn; each member's key in the registry says
whether it is online, so every node learns it from its watch). A
connection another node relayed here is for this node's members only (:func:`take_local`):
never a second hop.
"""

from __future__ import annotations

import contextvars
import functools
import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

import trio

from .._listen import accept
from .._proxied import Network, public_peer
from ..errors import GroupMismatchError, printable

log = logging.getLogger("pytunnel.server")


#: True in a task serving a connection another node relayed here: it goes to a local member.
RELAYED_IN: contextvars.ContextVar[bool] = contextvars.ContextVar("relayed_in", default=False)

#: The reset message of a name another node relayed here for a group none of whose members
#: here can take it (offline, a moment before the sending node hears of it): sent before
#: any byte of an answer, so the sending node, which still holds the request, hands it to
#: another member (``_node_link``) instead of the public peer getting a 502.
NO_MEMBER_HERE = "no member of its group can take it here"


class Elsewhere(Protocol):
    """The group's members on other nodes, as this node's node links see them."""

    def nodes(self) -> dict[str, int]:
        """The other nodes with online members of the group, and how many each has."""
        ...

    def relay(self, node: str, conn: trio.abc.HalfCloseableStream, peer: tuple[str, int]) -> bool:
        """Carry ``conn`` to the group's members on ``node`` (false: it cannot be carried
        now); never blocks."""
        ...


class Member(Protocol):
    """What a group needs of each member (a name route's or a port's server side)."""

    #: False while the member's health probes find its target down.
    online: bool

    @property
    def peer(self) -> str:
        """The member's client, for logs and stats."""
        ...

    def take(self, conn: trio.abc.HalfCloseableStream, peer: tuple[str, int]) -> bool:
        """Carry ``conn`` in the member's nursery (true), or refuse to (false: closing, at
        the stream limit); never blocks."""
        ...

    def start_soon(self, task: Callable[[], Awaitable[object]]) -> bool:
        """Run ``task`` in the member's nursery; false if it has none (not running yet or
        ending)."""
        ...


class Group:
    """The members serving one port or name, in the order they joined."""

    def __init__(
        self,
        name: str,
        proof: bytes,
        what: str,
        on_empty: Callable[[Group], None],
    ) -> None:
        self.name = name
        self._proof = proof
        #: What the group serves, for logs: ``"port 8080"``, ``"app.example.com"``.
        self.what = what
        self.members: list[Member] = []
        self._next = 0
        self._on_empty = on_empty
        #: Gives the group's name back where it was registered (name groups).
        self.on_given_back: Callable[[], None] = lambda: None
        #: Connections handed to members since the group was formed.
        self.connections = 0
        #: The group's owner string in the cluster's registry (``None`` on its own).
        self.owner: str | None = None
        #: Its members on other nodes of the cluster (``None`` on its own, or without
        #: node links: this node's public connections go to its own members only).
        self.elsewhere: Elsewhere | None = None
        #: The turn of the cluster-wide round robin (local members and other nodes).
        self._turn = 0

    def check(self, name: str, proof: bytes) -> None:
        """Raise ``GroupMismatchError`` unless ``name`` and ``proof`` are this group's."""
        if name != self.name or not hmac.compare_digest(proof, self._proof):
            raise GroupMismatchError(
                f"{self.what} is served by a load-balanced group this forward cannot join "
                "(another group name, or another group secret)",
                address=self.what,
            )

    def add(self, member: Member) -> None:
        self.members.append(member)
        log.info(
            "group %s (%s): client %s joined; %d member(s)",
            printable(self.name),
            self.what,
            member.peer,
            len(self.members),
        )

    def ready(self, member: Member) -> None:
        """``member`` can take connections now (its nursery runs)."""

    def remove(self, member: Member) -> None:
        """Take ``member`` out now; the last one out gives the port or name back."""
        if member not in self.members:
            return
        index = self.members.index(member)
        del self.members[index]
        if index < self._next:
            self._next -= 1
        if self._next >= len(self.members):
            self._next = 0
        log.info(
            "group %s (%s): client %s left; %d member(s)",
            printable(self.name),
            self.what,
            member.peer,
            len(self.members),
        )
        if not self.members:
            self._on_empty(self)

    def take(self, conn: trio.abc.HalfCloseableStream, peer: tuple[str, int]) -> bool:
        """Hand a public connection that reached this node to the next online member, here
        or on another node (weighted by their online members), or to any that takes it;
        false if none does. A connection another node relayed here (:data:`RELAYED_IN`)
        stays here."""
        remote = {} if self.elsewhere is None or RELAYED_IN.get() else self.elsewhere.nodes()
        if not remote:
            return self.take_local(conn, peer)
        assert self.elsewhere is not None
        local = sum(1 for member in self.members if member.online)
        nodes = sorted(remote)
        slot = self._turn % (local + sum(remote.values()))
        self._turn += 1
        tried_here = slot < local
        if tried_here:
            if self.take_local(conn, peer):
                return True
            first = 0
        else:
            slot -= local
            first = 0
            for index, node in enumerate(nodes):
                if slot < remote[node]:
                    first = index
                    break
                slot -= remote[node]
        for node in nodes[first:] + nodes[:first]:
            if self.elsewhere.relay(node, conn, peer):
                self.connections += 1
                return True
        return not tried_here and self.take_local(conn, peer)

    def take_local(
        self, conn: trio.abc.HalfCloseableStream, peer: tuple[str, int], *, counted: bool = False
    ) -> bool:
        """Hand ``conn`` to the next live member of this node that takes it; false if none
        does. ``counted``: :attr:`connections` counted it already (when it was handed to
        another node that could not take it)."""
        count = len(self.members)
        for step in range(count):
            member = self.members[(self._next + step) % count]
            if member.online and member.take(conn, peer):
                self._next = (self._next + step + 1) % count
                self.connections += not counted
                return True
        return False


class PortGroup(Group):
    """A group serving one public TCP port: owns its listeners and their accept loop."""

    def __init__(
        self,
        name: str,
        proof: bytes,
        listeners: list[trio.SocketListener],
        address: str,
        on_empty: Callable[[Group], None],
        trusted_proxies: tuple[Network, ...] = (),
    ) -> None:
        super().__init__(name, proof, f"port {address}", on_empty)
        #: Proxies whose PROXY header names a connection's real source.
        self.trusted_proxies = trusted_proxies
        #: ``host:port`` of the group's public port.
        self.address = address
        self.listeners = listeners
        self._owner: Member | None = None
        self._accepting = trio.CancelScope()

    def ready(self, member: Member) -> None:
        self._ensure_accepting()

    def remove(self, member: Member) -> None:
        if member is self._owner:
            self._accepting.cancel()
            self._owner = None
        if len(self.members) == 1 and member in self.members:
            # the last one: the port refuses before that member's relays are torn down
            self.close_listeners()
        super().remove(member)
        if self.members:
            self._ensure_accepting()

    def close_listeners(self) -> None:
        self._accepting.cancel()
        listeners, self.listeners = self.listeners, []
        for listener in listeners:
            listener.socket.close()

    def _ensure_accepting(self) -> None:
        """Run the accept loop in some member's nursery, if it runs nowhere."""
        if self._owner is not None or not self.listeners:
            return
        for member in self.members:
            scope = trio.CancelScope()
            if member.start_soon(functools.partial(self._accept_all, scope)):
                self._owner, self._accepting = member, scope
                return

    async def _accept_all(self, scope: trio.CancelScope) -> None:
        with scope:
            async with trio.open_nursery() as nursery:
                for listener in list(self.listeners):
                    nursery.start_soon(self._accept_loop, listener, nursery)

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        while True:
            try:
                conn = await accept(listener)
            except trio.ClosedResourceError:
                return
            if self.trusted_proxies:
                # a header to read first: in a task of its own, so one slow proxy connection
                # does not hold up the accept loop
                nursery.start_soon(self._take_proxied, conn)
                continue
            try:
                host, port = conn.socket.getpeername()[:2]
            except OSError:
                await trio.aclose_forcefully(conn)
                continue
            if not self.take(conn, (str(host), int(port))):
                await trio.aclose_forcefully(conn)

    async def _take_proxied(self, conn: trio.SocketStream) -> None:
        peer = await public_peer(conn, self.trusted_proxies, self.what)
        if peer is None or not self.take(conn, peer):
            await trio.aclose_forcefully(conn)
