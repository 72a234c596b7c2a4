"""Node links: public traffic that reached a node whose client is on another node.

In a cluster a public port or name belongs to one client on one node, but a balancer (or DNS)
may send its public connections to any node. Every node therefore watches who holds each
port and name (the registry's ``tcp/``, ``udp/``, ``http/`` and ``https/`` keys): for a port
held on another node it listens on the same port too (the same policy: its ``public_host``, its
``allow_ports``), and on its shared listeners a name held elsewhere is not a 404. Each such
connection is relayed to the owner node as one stream of a *node link*: a pytunnel session
from this node to the owner's ``--node-address`` (its control listener), authenticated by
the cluster secret with the node proofs of the handshake, so a node link is never a client.
When the nodes' control listeners are TLS, so are the links (``ServerConfig.cluster_tls``
verifies the peer node).

One link per peer node, opened on first need, opened again on the next need after a loss,
closed when the peer's ``nodes/`` key goes. The streams carry the multiplexer's flow
control, so a slow public peer or client slows its own stream only. Losing a link resets
every connection relayed over it (RST to the public peer): a cut relay never looks like a
complete one.

The owner node serves the link's streams in :func:`serve_node_link`: each is handed to its
client exactly as a connection accepted on the owner's own listener (stream slot, stats,
PROXY protocol and ``X-Forwarded-For`` naming the real public peer).
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import logging
import math
import ssl
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

import attrs
import trio

from ._client_config import DEFAULT_BACKOFF_MAX
from ._dial import dial, format_target
from ._egress import refuse_wrong_kind
from ._handshake import client_handshake
from ._listen import accept, bind, bind_udp
from ._proxied import public_peer
from ._relay import RelayStats, abort, relay
from ._tls import client_tls_context, tls_connect
from ._udp import pump_datagrams, serve_associations
from ._util import Episodes
from ._vhost import NameRoutes, ReplayStream, route_connection, route_name
from .cluster._ownership import (
    clear_quietly,
    is_group,
    member_online,
    node_of,
    parse_member_key,
)
from .cluster._registry import Change, Registry
from .errors import (
    ConnectError,
    ErrorCode,
    ForwardError,
    HandshakeTimeoutError,
    SessionClosedError,
    StreamResetError,
    TunnelError,
    printable,
)
from .forwards._group import NO_MEMBER_HERE, RELAYED_IN
from .protocol import routes
from .protocol.mux import Role
from .session import IncomingStream, MuxStream, Session, SessionConfig

if TYPE_CHECKING:
    from ._server_session import _ClientSession
    from .server import ServerConfig, TunnelServer

__all__ = [
    "NodeLinkStats",
    "NodeLinks",
    "link_session_config",
    "Take",
    "TakeAssociation",
    "relayed_peer",
    "serve_node_link",
    "take_relayed_association",
]

log = logging.getLogger("pytunnel.cluster")

#: Longest pause between the pings of a node link: a peer that vanished without a word (its
#: machine lost, a partition) is found by the clock on both sides rather than by TCP. A
#: shorter ``heartbeat_timeout`` pings at a third of it (see :func:`link_ping_interval`).
LINK_PING_INTERVAL = 5.0


def link_ping_interval(heartbeat_timeout: float) -> float:
    """Seconds between a link's pings: well within the answering node's silence check
    (``heartbeat_timeout``), so an idle link is never taken for a dead one."""
    return min(LINK_PING_INTERVAL, heartbeat_timeout / 3)


#: What a port's node-side handler takes: the stream and the public peer; false: refused.
Take = Callable[[trio.abc.HalfCloseableStream, tuple[str, int]], bool]
#: The same for a UDP forward: one association (a datagram stream) and its public source.
TakeAssociation = Callable[[MuxStream, tuple[str, int]], bool]


@attrs.define
class NodeLinkStats:
    """Traffic between this node and the others (for metrics): streams this node relayed out
    to owner nodes and streams it served for other nodes, with their bytes."""

    links_opened: int = 0
    streams_out: int = 0
    streams_in: int = 0
    relayed: RelayStats = attrs.field(factory=RelayStats)
    #: The UDP associations this node relayed to other nodes.
    relayed_udp: RelayStats = attrs.field(factory=RelayStats)


#: Binds of a mirrored port before it is given up (logged), and the pause between them.
_MIRROR_BIND_ATTEMPTS = 5
_MIRROR_BIND_RETRY = 0.5
_B = TypeVar("_B")

#: The registry prefixes a node with node links follows.
_WATCHED = ("nodes/", "tcp/", "udp/", "http/", "https/", "groups/")


def _registry_port(text: str) -> int:
    """The port of a ``tcp/<port>`` or ``udp/<port>`` key; 0 unless it is ASCII digits of
    1-65535 (``str.isdigit`` also takes "²", which ``int`` refuses)."""
    if not text.isascii() or not text.isdigit() or len(text) > 5:
        return 0
    port = int(text)
    return port if 1 <= port <= 65535 else 0


#: The pause after a failed link attempt to one node, doubled by each failure in a row up
#: to the client's reconnect cap: a node being restarted (or with another secret) is not
#: dialled, and authenticated against, once per public connection.
_LINK_BACKOFF_INITIAL = 1.0
_LINK_BACKOFF_MAX = DEFAULT_BACKOFF_MAX


@attrs.define
class _Backoff:
    """The failures in a row of the links to one node and when the next attempt may be."""

    failures: int
    retry_at: float
    error: TunnelError


class _Peer:
    """The link to one other node: its session once up, or why it could not be opened."""

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self.session: Session | None = None
        self.ready = trio.Event()
        self.scope = trio.CancelScope()
        self.error: TunnelError | None = None
        #: Set once the link is out of use (it can open no more streams).
        self.retired = trio.Event()


class _Mirror:
    """One port listened on for another node's client: its scope and its sockets."""

    def __init__(self) -> None:
        self.scope = trio.CancelScope()
        self.listeners: list[trio.SocketListener] = []
        self.udp: trio.socket.SocketType | None = None

    def close(self) -> None:
        self.scope.cancel()
        listeners, self.listeners = self.listeners, []
        for listener in listeners:
            listener.socket.close()
        if self.udp is not None:
            self.udp.close()


class NodeLinks:
    """This node's side of the cluster's relaying: the mirrors of ports held elsewhere, the
    name fallback of the shared listeners and the links to the other nodes.

    ``run`` (started in the server's nursery) holds the watches, the mirror listeners, the
    links and every relayed connection, so stopping the server ends them all.
    """

    def __init__(self, server: TunnelServer, registry: Registry, secret: str | bytes) -> None:
        self.server = server
        self.registry = registry
        self._secret = secret
        #: Registry keys held by other nodes' clients: key -> owner (``<node>/<session>``).
        self.elsewhere: dict[str, str] = {}
        #: The other nodes and their addresses, from their ``nodes/`` keys.
        self.nodes: dict[str, str] = {}
        self._peers: dict[str, _Peer] = {}
        #: Nodes whose last link attempt failed: no new attempt before ``retry_at``.
        self._backoff: dict[str, _Backoff] = {}
        #: Failed link attempts per node: the first one of a run is logged, the count at the end.
        self._failures: Episodes[str] = Episodes()
        #: Ports this node listens on for another node's client, by ``(kind, port)``.
        self._mirrors: dict[tuple[str, int], _Mirror] = {}
        self.stats = NodeLinkStats()
        self._nursery: trio.Nursery | None = None
        #: The client context of the links, when the nodes' listeners are TLS.
        self._tls: ssl.SSLContext | None = None
        #: The members of load-balanced groups on other nodes: key -> node -> member id ->
        #: whether it is online (offline ones still hold the group's key, but serve nothing).
        self._group_members: dict[str, dict[str, dict[str, bool]]] = {}
        #: The turn of each group's round robin over the other nodes' members.
        self._group_turns: dict[str, int] = {}

    @property
    def mirrored_ports(self) -> list[int]:
        """The TCP ports this node listens on for clients of other nodes: only once their
        sockets are bound, so a port listed here accepts connections (a mirror is made as
        soon as the engine names the port, and binds in a task of its own)."""
        return sorted(
            port for (kind, port), m in self._mirrors.items() if kind == "tcp" and m.listeners
        )

    @property
    def mirrored_udp_ports(self) -> list[int]:
        """The UDP ports this node listens on for clients of other nodes, once bound."""
        return sorted(
            port for (kind, port), m in self._mirrors.items() if kind == "udp" and m.udp is not None
        )

    @property
    def linked_nodes(self) -> list[str]:
        """The nodes a link is up to now."""
        return sorted(n for n, p in self._peers.items() if p.session is not None)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        config = self.server.config
        if config.tls is not None:  # the nodes' listeners are TLS: so are the links to them
            self._tls = config.cluster_tls or await client_tls_context()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            seen: set[str] = set()

            def changed(change: Change) -> None:
                if change.key.startswith(_WATCHED):
                    seen.add(change.key)
                    self._apply(change)

            # one watch of the whole registry (one stream to the engine), filtered here
            await nursery.start(functools.partial(self.registry.watch, "", changed))
            # what was there before the watches started; a key a watch already reported is
            # newer than this snapshot
            for key, value in (await self.registry.entries("")).items():
                if key not in seen and key.startswith(_WATCHED):
                    self._apply(Change(key, value))
            self._clear_abandoned_groups()  # their last members' node died unseen
            task_status.started()
            await trio.sleep_forever()

    # ---------------------------------------------------------------- the registry's view

    def _apply(self, change: Change) -> None:
        kind, _, rest = change.key.partition("/")
        own = self.registry.node_id
        if kind == "groups":
            self._apply_member(change)
            return
        if kind == "nodes":
            if change.value is None:
                self.nodes.pop(rest, None)
                self._forget_failures(rest)
                self._drop_peer(rest, "its node left the cluster")
                # its members' keys went with it (just before, in the same revision)
                self._clear_abandoned_groups()
            elif rest != own:
                if self.nodes.get(rest) != change.value:
                    self._forget_failures(rest)  # (re)started elsewhere: worth a try at once
                self.nodes[rest] = change.value
            return
        port = 0
        if kind in ("tcp", "udp"):
            port = _registry_port(rest)
            if not port:
                # any etcd writer (another version, a hand) may have put it there: it names
                # no port this node could listen on, and must never stop the node
                log.warning("registry key %s ignored: not a port", printable(change.key[:200]))
                return
        if change.value is None or node_of(change.value) == own:
            self.elsewhere.pop(change.key, None)
        else:
            self.elsewhere[change.key] = change.value
        if port:
            if change.key in self.elsewhere:
                self._mirror(port, kind)
            else:
                self.stop_mirror(port, kind=kind)

    def owner_node(self, key: str) -> str | None:
        """The other node whose client holds ``key``, ``None`` if none does; for a
        load-balanced group, the next other node with members (weighted by their number)."""
        owner = self.elsewhere.get(key)
        if owner is None:
            return None
        if not is_group(owner):
            return node_of(owner)
        counts = self.group_nodes(key)
        if not counts:
            return None
        slot = self._group_turns.get(key, 0) % sum(counts.values())
        self._group_turns[key] = slot + 1
        for node in sorted(counts):
            if slot < counts[node]:
                return node
            slot -= counts[node]
        return None  # pragma: no cover - the slots add up

    # ---------------------------------------------------------------- groups

    def _apply_member(self, change: Change) -> None:
        """A member of a group joined, left, or went offline or online on some node (its key
        expires with its node's lease): other nodes' online members take their share of
        this node's connections."""
        parsed = parse_member_key(change.key)
        if parsed is None:
            log.warning("registry key %s ignored: not a group member", printable(change.key[:200]))
            return
        key, node, member = parsed
        if node == self.registry.node_id:
            return  # this node's own members are its group's
        nodes = self._group_members.setdefault(key, {})
        if change.value is not None:
            nodes.setdefault(node, {})[member] = member_online(change.value)
            return
        members = nodes.get(node)
        if members is None:
            return
        members.pop(member, None)
        if not members:
            del nodes[node]
        if not nodes:
            del self._group_members[key]
            self._group_turns.pop(key, None)
            if node not in self.nodes:  # not a member leaving: its node is gone
                self._clear_abandoned_groups()

    def _local_group(self, key: str) -> bool:
        """Whether the group holding ``key`` has members on this node."""
        kind, _, what = key.partition("/")
        return (kind, what) in self.server.groups

    def _clear_abandoned_groups(self) -> None:
        """Give back the hold of every group with no member left anywhere (their last
        members' node died, so nobody left to do it). A member that leaves gives it back
        itself; this is for a node that cannot. One node does it, the live node first by
        id (the engine's guarded delete makes a second one harmless, and a claim of the
        key clears it too), so a node's death costs the engine one request per such group,
        not one per node."""
        if self._nursery is None or min([self.registry.node_id, *self.nodes]) != (
            self.registry.node_id
        ):
            return
        for key, owner in list(self.elsewhere.items()):
            if is_group(owner) and not self._group_members.get(key) and not self._local_group(key):
                self._nursery.start_soon(clear_quietly, self.registry, key, owner)

    def group_nodes(self, key: str) -> dict[str, int]:
        """The other nodes with online members of the group holding ``key``, and how many
        each: a node whose members are all offline (their health probes) gets no turn, so
        its share goes to members that can serve. A node no link could be opened to lately
        is left out too until its next attempt is due, so its share goes to the members
        that can be reached instead of being reset (a node just killed is left out from its
        first failed link, not its lease's end)."""
        nodes = self._group_members.get(key, {})
        now = trio.current_time()
        counts = {
            node: sum(members.values())
            for node, members in nodes.items()
            if node in self.nodes and not self._backing_off(node, now)
        }
        return {node: count for node, count in counts.items() if count}

    def _backing_off(self, node: str, now: float) -> bool:
        backoff = self._backoff.get(node)
        return backoff is not None and now < backoff.retry_at

    def group_elsewhere(self, key: str) -> _GroupElsewhere:
        """What a group formed on this node asks about its members on other nodes."""
        return _GroupElsewhere(self, key)

    def refresh(self, key: str) -> None:
        """This node's own group of ``key`` ended: serve the port for the members left on
        other nodes (a name needs nothing: the shared listeners ask :meth:`relay_name`)."""
        kind, _, rest = key.partition("/")
        if kind == "tcp" and key in self.elsewhere:
            port = _registry_port(rest)
            if port:
                self._mirror(port, kind)

    def relay_to(
        self, node: str, conn: trio.abc.HalfCloseableStream, key: str, peer: tuple[str, int]
    ) -> bool:
        """Carry ``conn`` for ``key`` to ``node`` (one of its group's member nodes), in the
        links' nursery; false without one (never blocks)."""
        if self._nursery is None:
            return False
        kind, _, rest = key.partition("/")
        tag = {
            "tcp": routes.RELAY_TCP | (_registry_port(rest) if kind == "tcp" else 0),
            "http": routes.RELAY_HTTP,
            "https": routes.RELAY_HTTPS,
        }.get(kind)
        if tag is None:
            return False
        try:
            self._nursery.start_soon(self._relay_out, conn, key, tag, peer, node)
        except RuntimeError:  # the node is stopping
            return False
        return True

    # ---------------------------------------------------------------- mirrored ports

    def _mirror(self, port: int, kind: str) -> None:
        if (kind, port) in self._mirrors or self._nursery is None:
            return
        config = self.server.config
        if not config.port_allowed(port):
            log.info(
                "%s port %d is held on another node but not allowed here; not served", kind, port
            )
            return
        if kind == "tcp" and port in self._own_ports():
            log.info("tcp port %d is held on another node but this node listens on it", port)
            return
        if kind == "tcp" and ("tcp", str(port)) in self.server.groups:
            return  # a group with members here too: its own listener serves the port
        mirror = self._mirrors[kind, port] = _Mirror()
        serve = self._serve_mirror if kind == "tcp" else self._serve_udp_mirror
        self._nursery.start_soon(serve, port, mirror)

    def _own_ports(self) -> set[int]:
        """The TCP ports of this node's own listeners (control, shared HTTP and HTTPS)."""
        server = self.server
        found = {a[1] for a in (server.http_address, server.https_address) if a is not None}
        with contextlib.suppress(RuntimeError):  # serving listeners it was given, none its own
            found.add(server.address[1])
        return found

    def stop_mirror(self, port: int, *, kind: str = "tcp") -> None:
        """Stop listening on ``port`` for another node (it is gone there, or a client of
        this node is about to bind it): synchronously, so the port is free on return."""
        mirror = self._mirrors.pop((kind, port), None)
        if mirror is not None:
            mirror.close()

    def _bind_failed(self, kind: str, port: int, mirror: _Mirror, exc: ForwardError) -> None:
        # never fatal: this node just cannot serve the port
        log.warning("%s port %d of another node's client not served here: %s", kind, port, exc)
        if self._mirrors.get((kind, port)) is mirror:
            del self._mirrors[kind, port]

    async def _bind_mirror(
        self, kind: str, port: int, mirror: _Mirror, binder: Callable[[str, int], Awaitable[_B]]
    ) -> _B | None:
        """Bind a mirror, trying a few times: the port may still be closing here (a client
        of this node that just moved to another node); ``None`` if it stays taken."""
        host = self.server.config.public_host
        for attempt in range(_MIRROR_BIND_ATTEMPTS):
            try:
                return await binder(host, port)
            except ForwardError as exc:
                if attempt == _MIRROR_BIND_ATTEMPTS - 1:
                    self._bind_failed(kind, port, mirror, exc)
                    return None
            await trio.sleep(_MIRROR_BIND_RETRY)
        return None  # pragma: no cover - the loop returns

    async def _serve_udp_mirror(self, port: int, mirror: _Mirror) -> None:
        """A UDP port held on another node: each public source's association is one
        datagram stream of the link to that node."""
        config = self.server.config
        host = config.public_host
        key = f"udp/{port}"
        with mirror.scope:
            sock = mirror.udp = await self._bind_mirror("udp", port, mirror, bind_udp)
            if sock is None:
                return
            if mirror.scope.cancel_called:  # stopped while binding
                mirror.close()
                return
            log.info("listening on udp %s for a client of another node", format_target(host, port))

            async def open_association(source: tuple[str, int]) -> MuxStream:
                node = self.owner_node(key)
                if node is None:
                    raise ForwardError(f"{key} is not held on another node any more")
                stream = await self.open_stream(node, routes.RELAY_UDP | port, source, True)
                self.stats.streams_out += 1
                return stream

            server = self.server

            def admit() -> bool:
                if server.active_streams >= config.max_streams:
                    server.count_limit("streams")
                    return False
                server.active_streams += 1
                server.total_streams += 1
                return True

            def release() -> None:
                server.active_streams -= 1

            try:
                await serve_associations(
                    sock,
                    open_association,
                    idle_timeout=config.udp_idle_timeout,
                    max_associations=max(
                        1, min(config.max_udp_associations, config.max_streams // 4)
                    ),
                    admit=admit,
                    release=release,
                    stats=self.stats.relayed_udp,
                    name=f"udp {format_target(host, port)} for another node",
                )
            finally:
                sock.close()
        log.info("no longer listening on udp %s for another node", format_target(host, port))

    async def _serve_mirror(self, port: int, mirror: _Mirror) -> None:
        host = self.server.config.public_host
        with mirror.scope:
            listeners = await self._bind_mirror("tcp", port, mirror, bind)
            if listeners is None:
                return
            # kept on the mirror, so that stop_mirror closes the sockets synchronously
            mirror.listeners = listeners
            if mirror.scope.cancel_called:  # stopped while binding
                mirror.close()
                return
            log.info("listening on %s for a client of another node", format_target(host, port))
            try:
                async with trio.open_nursery() as accepting:
                    for listener in listeners:
                        accepting.start_soon(self._accept_mirrored, listener, port)
            finally:
                for listener in listeners:
                    listener.socket.close()
        log.info("no longer listening on %s for another node", format_target(host, port))

    async def _accept_mirrored(self, listener: trio.SocketListener, port: int) -> None:
        assert self._nursery is not None
        while True:
            try:
                conn = await accept(listener)
            except (trio.ClosedResourceError, OSError):
                return
            # relays run in the links' nursery, not the mirror's: a port that moves stops
            # accepting, and the connections already relayed finish on their own
            self._nursery.start_soon(self._relay_mirrored, conn, port)

    async def _relay_mirrored(self, conn: trio.SocketStream, port: int) -> None:
        peer = await public_peer(conn, self.server.config.trusted_proxies, f"port {port}")
        if peer is None:  # gone already, or a trusted proxy without its header
            await trio.aclose_forcefully(conn)
            return
        await self._relay_out(conn, f"tcp/{port}", routes.RELAY_TCP | port, peer)

    # ---------------------------------------------------------------- names

    async def relay_name(
        self, tls: bool, name: str, conn: trio.abc.HalfCloseableStream, peer: tuple[str, int]
    ) -> bool:
        """The shared listener's fallback for a name no local route holds: relay it to the
        node whose client holds it (true), or leave it to the 404 (false)."""
        routed = route_name(name)
        key = f"{'https' if tls else 'http'}/{routed}"
        if routed is None or self.owner_node(key) is None:
            return False
        await self._relay_out(conn, key, routes.RELAY_HTTPS if tls else routes.RELAY_HTTP, peer)
        return True

    # ---------------------------------------------------------------- relaying out

    async def _relay_out(
        self,
        conn: trio.abc.HalfCloseableStream,
        key: str,
        tag: int,
        peer: tuple[str, int],
        node: str | None = None,
    ) -> None:
        """Carry one public connection to the node holding ``key`` over the link to it; a
        connection that cannot be carried is reset, never left hanging. It takes one of the
        server's stream slots, like a public connection of a local client."""
        server = self.server
        if server.active_streams >= server.config.max_streams:
            server.count_limit("streams")
            abort(conn, ErrorCode.STREAM_LIMIT, "server stream limit reached")
            await trio.aclose_forcefully(conn)
            return
        server.active_streams += 1
        server.total_streams += 1
        try:
            await self._relay_counted(conn, key, tag, peer, node)
        finally:
            server.active_streams -= 1

    async def _relay_counted(
        self,
        conn: trio.abc.HalfCloseableStream,
        key: str,
        tag: int,
        peer: tuple[str, int],
        node: str | None,
    ) -> None:
        if node is None:
            node = self.owner_node(key)
        tried: set[str] = set()
        # a group's name: the request head (or ClientHello) the shared listener read is
        # kept here until the owner answers, so that an owner whose members cannot take it
        # (it resets the stream at once) is replaced by another member
        head = b""
        if (
            tag in (routes.RELAY_HTTP, routes.RELAY_HTTPS)
            and isinstance(conn, ReplayStream)
            and is_group(self.elsewhere.get(key, ""))
        ):
            head = bytes(await conn.receive_some())  # the head put back in front: no I/O
        answered = _FirstAnswer(b"", b"")
        while True:
            try:
                if node is None:
                    raise ForwardError(f"{printable(key)} is not held on another node any more")
                stream = await self.open_stream(node, tag, peer)
                if head:
                    self.stats.streams_out += 1
                    answered = await self._first_answer(conn, stream, head)
                break
            except (TunnelError, OSError) as exc:
                if isinstance(exc, _Bounced):
                    head = exc.held
                    log.info(
                        "node %s could not take a request for %s (%s); another member takes it",
                        printable(node or "?"),
                        printable(key),
                        printable(exc.message),
                    )
                if node is not None:
                    # a group's member node that cannot be reached now (killed, its link
                    # refused, its members offline): the connection goes to another member,
                    # not to a reset
                    tried.add(node)
                    node = self._other_member_node(key, tried)
                    if node is not None:
                        continue
                    if self._take_here(key, ReplayStream(conn, head) if head else conn, peer):
                        return
                log.info(
                    "public connection from %s for %s not relayed: %s",
                    printable(format_target(*peer)),
                    printable(key),
                    printable(str(exc)),
                )
                abort(conn, ErrorCode.FORWARD_FAILED, "not relayed")
                await trio.aclose_forcefully(conn)
                return
        if not head:
            self.stats.streams_out += 1
        try:
            if answered.to_owner:
                await stream.send_all(answered.to_owner)
            if answered.to_public:
                await conn.send_all(answered.to_public)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            abort(conn, ErrorCode.FORWARD_FAILED, "relay broken")
            await trio.aclose_forcefully(conn)
            await trio.aclose_forcefully(stream)
            return
        await relay(
            conn,
            stream,
            idle_timeout=self.server.config.idle_timeout,
            name=f"public->node {printable(node)}",
            stats=self.stats.relayed,
        )

    async def _first_answer(
        self, conn: trio.abc.HalfCloseableStream, stream: MuxStream, head: bytes
    ) -> _FirstAnswer:
        """Send ``head`` to the owner and wait for the first of its answer (handed back, to
        go to the public peer) or more from the public peer (handed back, to go on to the
        owner: the request is the owner's from then on). An owner that resets the stream
        with :data:`NO_MEMBER_HERE` first raises :class:`_Bounced`, holding everything the
        public peer sent, for another member. The public peer's EOF is passed on and
        waited past: it stays EOF for whoever reads next (another member's stream, the
        relay)."""
        try:
            await stream.send_all(head)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            _raise_if_bounced(exc, head)
            return _FirstAnswer(b"", b"")  # the relay finds it broken and resets
        answer: bytes | None = None
        broken: BaseException | None = None
        more: bytes | None = None

        async def from_owner() -> None:
            nonlocal answer, broken
            try:
                answer = bytes(await stream.receive_some())
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                broken = exc
            race.cancel_scope.cancel()

        async def from_public() -> None:
            nonlocal more
            try:
                data = bytes(await conn.receive_some())
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            else:
                if not data:
                    # EOF: the request is complete, passed on, and the owner's answer
                    # decides (it stays EOF, for another member's stream too)
                    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                        await stream.send_eof()
                    await trio.sleep_forever()
            more = data
            race.cancel_scope.cancel()

        # bounded like a relay that sees nothing: the relay then times out by itself
        with trio.move_on_after(self.server.config.idle_timeout or math.inf):
            async with trio.open_nursery() as race:
                race.start_soon(from_owner)
                race.start_soon(from_public)
        if broken is not None:
            _raise_if_bounced(broken, head + (more or b""))
        return _FirstAnswer(more or b"", answer or b"")

    def _other_member_node(self, key: str, tried: set[str]) -> str | None:
        """Another node with online members of the group holding ``key``, none of
        ``tried``; ``None`` if there is none (or ``key`` is not a group's)."""
        owner = self.elsewhere.get(key)
        if owner is None or not is_group(owner):
            return None
        left = sorted(set(self.group_nodes(key)) - tried)
        return left[0] if left else None

    def _take_here(
        self, key: str, conn: trio.abc.HalfCloseableStream, peer: tuple[str, int]
    ) -> bool:
        """Hand ``conn`` to an online member of this node's own group of ``key``, if any (the
        group counted it when it handed it to another node)."""
        kind, _, what = key.partition("/")
        group = self.server.groups.get((kind, what))
        return group is not None and group.take_local(conn, peer, counted=True)

    async def open_stream(
        self,
        node: str,
        tag: int,
        peer: tuple[str, int],
        datagrams: bool = False,
        *,
        retried: bool = False,
    ) -> MuxStream:
        """A stream to ``node`` over the link to it (opened now if there is none), naming
        the route ``tag`` and the public ``peer`` (a datagram stream with ``datagrams``).
        Raises ``ConnectError`` when no link can be opened, or the node's refusal."""
        link = self._peers.get(node)
        if link is None:
            backoff = self._backoff.get(node)
            if backoff is not None and trio.current_time() < backoff.retry_at:
                raise ConnectError(
                    f"no link to node {printable(node)} (next attempt in "
                    f"{backoff.retry_at - trio.current_time():.1f} s): "
                    f"{printable(backoff.error.message)}",
                    code=backoff.error.code,
                )
            link = self._peers[node] = _Peer(node)
            assert self._nursery is not None
            self._nursery.start_soon(self._run_link, link)
        config = self.server.config
        # the dial (connect_timeout), then TLS and the handshake (handshake_timeout together)
        with trio.move_on_after(config.connect_timeout + config.handshake_timeout):
            await link.ready.wait()
        session = link.session
        if session is None:
            raise link.error or ConnectError(f"no link to node {printable(node)} in time")
        try:
            # a node that stopped answering (a partition its pings have not found yet) must
            # not hold the public connection: bounded like a dial
            with trio.move_on_after(config.connect_timeout):
                return await session.open_stream(peer[0], peer[1], tag=tag, datagrams=datagrams)
        except SessionClosedError:
            # the link opens no more streams (ended, going away, its stream ids used up):
            # the next connection, this one included, gets a new link
            if self._peers.get(node) is not link or retried:
                raise
            self._retire(link)
            return await self.open_stream(node, tag, peer, datagrams, retried=True)
        raise ConnectError(
            f"node {printable(node)} did not answer within {config.connect_timeout:g} s"
        )

    def _retire(self, link: _Peer) -> None:
        """Take ``link`` out of use: new connections get a new link, and it closes once
        the relays still on it are done."""
        if self._peers.get(link.node_id) is link:
            del self._peers[link.node_id]
        link.retired.set()

    async def _run_link(self, link: _Peer) -> None:
        node = link.node_id
        with link.scope:
            try:
                await self._open_link(link)
            except (TunnelError, OSError, ValueError) as exc:
                # ValueError: what this node would send cannot be sent (its own id, say);
                # never the end of the node, only of this link attempt
                link.error = (
                    exc
                    if isinstance(exc, TunnelError)
                    else ConnectError(f"link to node {printable(node)}: {printable(str(exc))}")
                )
                self._link_failed(node, link.error)
            finally:
                link.session = None
                link.ready.set()
                if self._peers.get(node) is link:
                    del self._peers[node]

    async def _open_link(self, link: _Peer) -> None:
        node = link.node_id
        address = self.nodes.get(node)
        if not address:
            raise ConnectError(f"node {printable(node)} has no known address")
        host, _, port_text = address.rpartition(":")
        if not host or not port_text.isdigit():
            raise ConnectError(f"node {printable(node)} gave no usable address")
        config = self.server.config
        stream: trio.abc.Stream = await dial(
            host.strip("[]"), int(port_text), timeout=config.connect_timeout, logger=log
        )
        handshaken = False
        try:
            # TLS and the handshake share one deadline, so the link-ready wait bounds them
            with trio.move_on_after(config.handshake_timeout):
                if self._tls is not None:
                    stream = await tls_connect(
                        stream,
                        self._tls,
                        server_hostname=host.strip("[]"),
                        timeout=config.handshake_timeout,
                    )
                result = await client_handshake(
                    stream,
                    self._secret,
                    timeout=config.handshake_timeout,
                    max_frame_size=config.session.max_frame_size,
                    client_id=self.registry.node_id,
                    node=True,
                    early_window=link_session_config(config).early_window,
                )
                handshaken = True
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        if not handshaken:
            await trio.aclose_forcefully(stream)
            raise HandshakeTimeoutError(
                f"node {printable(node)}: no handshake within {config.handshake_timeout:g} s"
            )
        name = f"node-link<{node}>"
        try:
            link_config = link_session_config(config)
            async with result.open_session(stream, Role.CLIENT, link_config, name=name) as s:
                link.session = s
                self.stats.links_opened += 1
                self._link_up(node)
                link.ready.set()
                log.info("link to node %s at %s up", printable(node), printable(address))
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_ping_loop, s, node, config.heartbeat_timeout)
                    nursery.start_soon(_close_when_retired, link, s)
                    await s.wait_closed()
                    nursery.cancel_scope.cancel()
                log.warning(
                    "link to node %s lost: %s", printable(node), printable(str(s.close_reason))
                )
        finally:
            await trio.aclose_forcefully(stream)

    def _link_failed(self, node: str, error: TunnelError) -> None:
        previous = self._backoff.get(node)
        failures = 1 if previous is None else previous.failures + 1
        delay = min(_LINK_BACKOFF_MAX, _LINK_BACKOFF_INITIAL * 2 ** (failures - 1))
        self._backoff[node] = _Backoff(failures, trio.current_time() + delay, error)
        if self._failures.refuse(node):
            # the error may carry the peer's own words (its GoAway)
            log.warning(
                "no link to node %s: %s (retried with backoff; further failures counted)",
                printable(node),
                printable(str(error)),
            )

    def _link_up(self, node: str) -> None:
        self._backoff.pop(node, None)
        failed = self._failures.end(node)
        if failed > 1:
            log.info("link to node %s up after %d failed attempts", printable(node), failed)

    def _forget_failures(self, node: str) -> None:
        self._backoff.pop(node, None)
        failed = self._failures.end(node)
        if failed > 1:
            log.info("%d failed link attempts to node %s", failed, printable(node))

    def _drop_peer(self, node: str, why: str) -> None:
        link = self._peers.pop(node, None)
        if link is not None:
            log.info("closing the link to node %s: %s", printable(node), why)
            link.scope.cancel()


@attrs.frozen
class _FirstAnswer:
    """What :meth:`NodeLinks._first_answer` read before the relay takes over."""

    to_owner: bytes
    to_public: bytes


class _Bounced(ConnectError):
    """The owner node reset a relayed request before answering it, as none of its members
    can take it (:data:`NO_MEMBER_HERE`); ``held`` is all the public peer sent so far."""

    def __init__(self, message: str, held: bytes) -> None:
        super().__init__(message, code=ErrorCode.FORWARD_FAILED)
        self.held = held


def _raise_if_bounced(exc: BaseException, held: bytes) -> None:
    cause = exc.__cause__
    if isinstance(cause, StreamResetError) and cause.message == NO_MEMBER_HERE:
        raise _Bounced(cause.message, held) from None


#: Seconds between looks at a retired link's streams, until the last relay on it is done.
_RETIRED_CHECK_INTERVAL = 1.0


async def _close_when_retired(link: _Peer, session: Session) -> None:
    await link.retired.wait()
    log.info("link to node %s opens no more streams; replaced", printable(link.node_id))
    # the session tells no one when its last stream ends; a slow look is enough here
    while session.open_streams:  # noqa: ASYNC110
        await trio.sleep(_RETIRED_CHECK_INTERVAL)
    await session.aclose(ErrorCode.GOING_AWAY, "replaced by a new link")


async def _ping_loop(session: Session, node: str, timeout: float) -> None:
    """Ping the link; one ping unanswered for ``timeout`` (the answering node's silence
    check) ends it, so its relays are reset and the next connection makes a new link."""
    while True:
        await trio.sleep(link_ping_interval(timeout))
        with trio.move_on_after(timeout):
            try:
                await session.ping()
            except TunnelError:
                return
            continue
        log.warning(
            "link to node %s: no answer to a ping within %g s; closing it", printable(node), timeout
        )
        await session.abort(
            SessionClosedError(
                f"no ping answer within {timeout:g} s", code=ErrorCode.HEARTBEAT_TIMEOUT
            )
        )
        return


def link_session_config(config: ServerConfig) -> SessionConfig:
    """The session config of a node link, on both sides: one link carries every connection
    between two nodes, so its stream limit is the server's (``max_streams``), not that of
    one client's session."""
    return attrs.evolve(config.session, max_streams=config.max_streams)


async def serve_node_link(server: TunnelServer, session: Session, node: str) -> None:
    """Serve the streams another node relays to this one until its link ends: each goes to
    the local route it names, as if it had arrived on this node's own listener."""
    stats = server.node_link_stats
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_watch_silence, server, session, node)
        while True:
            try:
                incoming = await session.accept_stream()
            except TunnelError:
                break
            kind = incoming.tag & routes.RELAY_KIND_MASK
            peer = relayed_peer(incoming.host, incoming.port)
            if peer is None:
                # it reaches the client as the public peer (PROXY protocol, X-Forwarded-For):
                # only what getpeername() could have said is passed on
                log.warning(
                    "stream from node %s refused: public peer %s:%d is not an IP address",
                    printable(node),
                    printable(incoming.host[:100]),
                    incoming.port,
                )
                incoming.refuse(ErrorCode.PROTOCOL_ERROR, "the public peer is not an IP address")
                continue
            if refuse_wrong_kind(incoming, kind == routes.RELAY_UDP):
                continue
            if kind in (routes.RELAY_UDP, routes.RELAY_TCP):
                # a UDP association or a TCP connection: handed to the forward holding the port
                port = incoming.tag & routes.RELAY_PORT_MASK
                take = (
                    server.udp_targets.get(port)
                    if kind == routes.RELAY_UDP
                    else server.port_target(port)
                )
                if take is None:
                    incoming.refuse(ErrorCode.FORWARD_FAILED, "no client of this node holds it")
                    continue
                group = server.groups.get(("tcp", str(port))) if kind == routes.RELAY_TCP else None
                if group is not None and not any(m.online for m in group.members):
                    # refused before it is accepted, so the sending node hands the connection
                    # to a member elsewhere (it may not know yet that ours are offline)
                    incoming.refuse(ErrorCode.FORWARD_FAILED, "no member of its group online here")
                    continue
                stream = _accept(incoming)
                if stream is None:
                    continue
                if stats is not None:
                    stats.streams_in += 1
                if not take(stream, peer):
                    stream.reset(ErrorCode.FORWARD_FAILED, "the forward cannot take it now")
                    await trio.aclose_forcefully(stream)
            elif kind in (routes.RELAY_HTTP, routes.RELAY_HTTPS):
                tls = kind == routes.RELAY_HTTPS
                name_routes: NameRoutes | None = server.https_routes if tls else server.http_routes
                if name_routes is None:
                    incoming.refuse(ErrorCode.FORWARD_FAILED, "no shared listener here")
                    continue
                stream = _accept(incoming)
                if stream is None:
                    continue
                if stats is not None:
                    stats.streams_in += 1
                nursery.start_soon(
                    functools.partial(
                        _route_relayed,
                        stream,
                        peer,
                        name_routes,
                        tls=tls,
                        max_head=server.config.max_name_head,
                        head_timeout=server.config.name_head_timeout,
                    )
                )
            else:
                incoming.refuse(ErrorCode.PROTOCOL_ERROR, f"unknown node link route {incoming.tag}")
        nursery.cancel_scope.cancel()


async def _route_relayed(
    conn: trio.abc.HalfCloseableStream,
    peer: tuple[str, int],
    name_routes: NameRoutes,
    *,
    tls: bool,
    max_head: int,
    head_timeout: float,
) -> None:
    """Route a name another node relayed here to a local route, a group's local members
    included (never a second hop)."""
    RELAYED_IN.set(True)  # this task's own context: it serves this connection only
    await route_connection(
        conn, peer, name_routes, tls=tls, max_head=max_head, head_timeout=head_timeout
    )


class _GroupElsewhere:
    """A group's members on other nodes, for the group's own round robin."""

    def __init__(self, links: NodeLinks, key: str) -> None:
        self._links = links
        self._key = key

    def nodes(self) -> dict[str, int]:
        return self._links.group_nodes(self._key)

    def relay(self, node: str, conn: trio.abc.HalfCloseableStream, peer: tuple[str, int]) -> bool:
        return self._links.relay_to(node, conn, self._key, peer)


def relayed_peer(host: str, port: int) -> tuple[str, int] | None:
    """The public peer another node names for a relayed stream, normalised; ``None`` unless
    it is an IP literal (no IPv6 zone, whose text is free) and a port."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None:
        return None
    if not 0 <= port <= 65535:
        return None
    return str(address), port


def take_relayed_association(
    client: _ClientSession,
    nursery: trio.Nursery,
    open_association: Callable[[tuple[str, int]], Awaitable[MuxStream]],
    stats: RelayStats,
    link_stream: MuxStream,
    source: tuple[str, int],
) -> bool:
    """Carry one association another node relays (``link_stream``, a datagram stream) to
    ``client`` as one of its UDP forward's own: in that forward's ``nursery``, within the
    same stream budget, opened by the forward's ``open_association`` and counted in its
    ``stats``. False at the stream limit or while the forward ends; never blocks."""
    if not client.reserve_stream(None):
        return False
    try:
        nursery.start_soon(_carry_association, client, open_association, stats, link_stream, source)
    except RuntimeError:  # the forward is ending
        client.release_stream()
        return False
    return True


async def _carry_association(
    client: _ClientSession,
    open_association: Callable[[tuple[str, int]], Awaitable[MuxStream]],
    stats: RelayStats,
    link_stream: MuxStream,
    source: tuple[str, int],
) -> None:
    try:
        try:
            client_stream = await open_association(source)
        except TunnelError as exc:
            log.info(
                "relayed udp association from %s not opened: %s",
                printable(format_target(*source)),
                printable(str(exc)),
            )
            return
        await pump_datagrams(
            link_stream, client_stream, idle_timeout=client.config.udp_idle_timeout, stats=stats
        )
    finally:
        client.release_stream()
        await trio.aclose_forcefully(link_stream)


def _accept(incoming: IncomingStream) -> MuxStream | None:
    try:
        return incoming.accept()
    except TunnelError:
        return None


async def _watch_silence(server: TunnelServer, session: Session, node: str) -> None:
    """End a link whose node sent nothing (not even its pings) for the heartbeat timeout."""
    timeout = server.config.heartbeat_timeout
    while True:
        await trio.sleep(server.config.heartbeat_check_interval)
        if trio.current_time() - session.last_received > timeout:
            log.warning("link from node %s silent; closing it", printable(node))
            await session.aclose(ErrorCode.HEARTBEAT_TIMEOUT, "no traffic")
            return
