"""The tunnel server: ``serve()`` accepts control connections, one session nursery each.

Everything a client causes on the server (its remote-forward listeners, the relays of its
public connections, the relays of its local-forward dials) runs inside that client's session
nursery. When the session ends for any reason, the nursery is cancelled: the listeners close at
once (so the same port can be bound again immediately) and every relay is torn down.
"""

from __future__ import annotations

import functools
import hmac
import logging
import ssl
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, TypedDict

import attrs
import trio

from ._admission import (
    DEFAULT_MAX_STREAMS,
    Admission,
    _fit_fd_limit,
    raise_fd_limit,
)
from ._dial import DEFAULT_CONNECT_TIMEOUT, format_target
from ._handshake import DEFAULT_HANDSHAKE_TIMEOUT
from ._listen import bind
from ._node_link import (
    NodeLinks,
    NodeLinkStats,
    Take,
    TakeAssociation,
    link_session_config,
    serve_node_link,
)
from ._policy import PermitOpen, PortRange, parse_port_ranges
from ._proxied import Network, ProxyHeaderError, real_peer, trusted_networks
from ._relay import DEFAULT_IDLE_TIMEOUT, RelayStats
from ._server_session import _ClientSession
from ._udp import (
    DEFAULT_MAX_ASSOCIATIONS,
    DEFAULT_UDP_IDLE_TIMEOUT,
    UDP_SOCKET_BUFFER,
)
from ._util import aclose_all, unwrap_cancelled
from ._vhost import (
    DEFAULT_HEAD_TIMEOUT,
    DEFAULT_MAX_HEAD,
    DEFAULT_MAX_PENDING,
    NameRoutes,
    serve_name_routing,
)
from .cluster._ownership import client_key, is_group, release_quietly
from .cluster._registry import Change, Registry, check_node_id
from .errors import (
    ClusterUnavailableError,
    ErrorCode,
    SessionClosedError,
    TunnelError,
    printable,
)
from .forwards._group import Group, PortGroup
from .forwards._public_name import _Endpoint, _PublicName
from .protocol.mux import Role
from .session import (
    SessionConfig,
)
from .transports.websocket import DEFAULT_PING_INTERVAL, check_ping_interval

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = [
    "ClientInfo",
    "PublicPortInfo",
    "ServerConfig",
    "ServerOptions",
    "TunnelServer",
    "UdpPortInfo",
    "open_server",
    "serve",
    "wrap_server_stream",
]

log = logging.getLogger("pytunnel.server")

#: Seconds of silence after which a peer is considered gone (both ends use it).
DEFAULT_HEARTBEAT_TIMEOUT = 30.0


def _ranges(value: str | Iterable[PortRange] | None) -> tuple[PortRange, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return parse_port_ranges(value)
    return tuple(value)


def _domain(value: str | None) -> str | None:
    if not value:
        return None
    NameRoutes(domain=value)  # a domain that is not a host name is an error here, not later
    return value.strip().lower().rstrip(".")


def _patterns(value: str | Iterable[str] | None) -> tuple[str, ...]:
    if not value:
        return ()
    items = value.split(",") if isinstance(value, str) else list(value)
    patterns = tuple(p.strip().lower() for p in items if p.strip())
    NameRoutes(allow_domains=patterns)  # checked here, once
    return patterns


def _permit(value: PermitOpen | Iterable[str] | str | None) -> PermitOpen:
    return value if isinstance(value, PermitOpen) else PermitOpen.parse(value)


def _valid_ws_path(_inst: object, _attribute: object, value: str | None) -> None:
    if value is not None and (not value.startswith("/") or "?" in value or not value.isprintable()):
        raise ValueError(f"ws_path must be a path starting with '/' (no query), not {value!r}")


def _valid_node_id(_inst: object, _attribute: object, value: Registry | None) -> None:
    if value is not None:
        check_node_id(value.node_id)


def _secret_bytes(value: str | bytes) -> bytes:
    return value.encode() if isinstance(value, str) else value


def _not_the_token(inst: ServerConfig, _attribute: object, value: str | bytes | None) -> None:
    # a node link is trusted to name any public peer and reach any client's route: with the
    # token as its secret, every client could make one
    if value is not None and hmac.compare_digest(_secret_bytes(value), _secret_bytes(inst.token)):
        raise ValueError(
            "cluster_secret must not be the client token (every client would be a node)"
        )


@attrs.frozen(kw_only=True)
class ServerConfig:
    """Everything that decides how a server treats its clients."""

    #: Shared secret; never logged, never sent (only HMAC proofs cross the wire).
    token: str | bytes = attrs.field(repr=False)
    #: Address remote forwards listen on. Anything but loopback is an explicit choice.
    public_host: str = "127.0.0.1"
    #: Ports remote forwards may use (``"8000,9000-9100"``); ``None`` allows any.
    allow_ports: tuple[PortRange, ...] | None = attrs.field(default=None, converter=_ranges)
    #: Targets local forwards may open (OpenSSH ``PermitOpen`` patterns); default any.
    permit_open: PermitOpen = attrs.field(factory=PermitOpen, converter=_permit)
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT
    session: SessionConfig = attrs.field(factory=SessionConfig)
    #: A client silent for this long (no byte, not even a heartbeat) is dropped.
    heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT
    #: How often sessions are checked for silence.
    heartbeat_check_interval: float = 5.0
    #: Remote forwards one client may hold at once.
    max_forwards_per_client: int = 64
    #: Relayed streams across all clients (each session also has ``session.max_streams``).
    #: ``serve()`` lowers it to what the process's file-descriptor limit can carry.
    max_streams: int = DEFAULT_MAX_STREAMS
    #: Connections still in their handshake; more are turned away with SERVER_BUSY.
    max_pending_handshakes: int = 128
    #: UDP associations idle for this long are closed.
    udp_idle_timeout: float = DEFAULT_UDP_IDLE_TIMEOUT
    #: Associations one UDP remote forward keeps at once.
    max_udp_associations: int = DEFAULT_MAX_ASSOCIATIONS
    #: Receive and send buffer asked for on each UDP socket (the kernel grants at most its
    #: ``net.core.rmem_max`` / ``wmem_max``; 0: the kernel's defaults).
    udp_socket_buffer: int = UDP_SOCKET_BUFFER
    #: TLS for the control connection (see ``pytunnel.server_tls_context``); ``None``: plain.
    tls: ssl.SSLContext | None = None
    #: Connections one source address may have in their handshake at once, so a single
    #: address cannot hold the whole ``max_pending_handshakes`` budget.
    max_handshakes_per_address: int = 8
    #: Seconds from accept until the client's first frame (``Hello``, after TLS if any) must
    #: be complete; an idle connection is dropped well before ``handshake_timeout``.
    first_frame_timeout: float = 3.0
    #: Failed authentications per source address, as a token bucket: ``auth_failure_burst``
    #: failures in a row are answered normally; after that the address is refused
    #: (``RATE_LIMITED``, with the time to retry) until the bucket refills, one failure's
    #: worth every ``auth_failure_interval`` seconds.
    auth_failure_burst: int = 10
    auth_failure_interval: float = 6.0
    #: Name routes: a single label a client asks for goes under this domain (``app`` ->
    #: ``app.<domain>``); ``None``: only full names that ``allow_domains`` admits.
    domain: str | None = attrs.field(default=None, converter=_domain)
    #: Full names clients may route besides those under ``domain``: exact names or
    #: ``*.example.org`` patterns (one or more labels before the suffix).
    allow_domains: tuple[str, ...] = attrs.field(default=(), converter=_patterns)
    #: Name routes one client may hold at once.
    max_names_per_client: int = 16
    #: Largest request head (HTTP) or ClientHello (TLS) read to learn a connection's name.
    max_name_head: int = DEFAULT_MAX_HEAD
    #: Seconds a connection on a shared listener has to send that head (slow-loris bound).
    name_head_timeout: float = DEFAULT_HEAD_TIMEOUT
    #: Connections each shared listener lets send their head at once; more are closed as they
    #: arrive (slow heads cannot spend the process's descriptors).
    max_name_pending: int = DEFAULT_MAX_PENDING
    #: Also accept the control connection as a WebSocket upgrade at this path (``/tunnel``),
    #: on the same listener: a connection starting with an HTTP request is upgraded, one
    #: starting with a tunnel handshake is served as before. ``None``: raw connections only.
    ws_path: str | None = attrs.field(default=None, validator=_valid_ws_path)
    #: A WebSocket ping whenever a WebSocket client sent nothing for this long (``None``:
    #: off), so proxies in front of the server never see an idle WebSocket.
    ws_ping_interval: float | None = attrs.field(
        default=DEFAULT_PING_INTERVAL, validator=check_ping_interval
    )
    #: The registry of the cluster this server is a node of (``pytunnel.cluster``): ports,
    #: names and client identities are claimed there before they are bound or registered.
    #: ``None``: a server on its own, whose binds and routes are its only ownership.
    cluster: Registry | None = attrs.field(default=None, validator=_valid_node_id)
    #: The secret the nodes of ``cluster`` share: with it, public traffic that reaches this
    #: node for a port or name another node's client holds is relayed there over a node link
    #: (authenticated by it; never logged). ``None``: no relaying, public traffic must reach
    #: the client's own node.
    cluster_secret: str | bytes | None = attrs.field(
        default=None, repr=False, validator=_not_the_token
    )
    #: The client context of node links when the nodes' control listeners are TLS (``tls``
    #: set): it verifies the peer node's certificate (``pytunnel.client_tls_context(ca_file=
    #: ...)``, with this node's own certificate when the listeners require client
    #: certificates). ``None`` with ``tls`` set: the system's trust store.
    cluster_tls: ssl.SSLContext | None = None
    #: Proxies in front of the server (addresses or networks: HAProxy, nginx ``stream``, a
    #: cloud balancer) that begin each connection with a PROXY protocol header (v1 or v2)
    #: naming its real source. A connection from one of them must start with a valid header
    #: (it is closed otherwise); its source is then the client's address everywhere: logs,
    #: the per-address limits, and what targets are told. Nobody else's header is read.
    trusted_proxies: tuple[Network, ...] = attrs.field(default=(), converter=trusted_networks)

    def port_allowed(self, port: int) -> bool:
        return self.allow_ports is None or any(port in r for r in self.allow_ports)


class ServerOptions(TypedDict, total=False):
    """The :class:`ServerConfig` fields as keyword arguments of ``serve`` and its tiers, so
    type checkers and editors see each one (the token is its own argument).
    ``tests/test_tunnel.py`` checks that the two lists stay the same."""

    public_host: str
    allow_ports: str | Iterable[PortRange] | None
    permit_open: PermitOpen | Iterable[str] | str | None
    connect_timeout: float
    idle_timeout: float
    handshake_timeout: float
    session: SessionConfig
    heartbeat_timeout: float
    heartbeat_check_interval: float
    max_forwards_per_client: int
    max_streams: int
    max_pending_handshakes: int
    udp_idle_timeout: float
    max_udp_associations: int
    udp_socket_buffer: int
    tls: ssl.SSLContext | None
    max_handshakes_per_address: int
    first_frame_timeout: float
    auth_failure_burst: int
    auth_failure_interval: float
    domain: str | None
    allow_domains: str | Iterable[str] | None
    max_names_per_client: int
    max_name_head: int
    name_head_timeout: float
    max_name_pending: int
    ws_path: str | None
    ws_ping_interval: float | None
    cluster: Registry | None
    cluster_secret: str | bytes | None
    cluster_tls: ssl.SSLContext | None
    trusted_proxies: Iterable[str | Network]


def _server_config(
    token: str | bytes | None, config: ServerConfig | None, options: ServerOptions
) -> ServerConfig:
    """The one configuration of a server: the token comes either from ``token`` or from
    ``config``, never from both."""
    if config is None:
        if token is None:
            raise TypeError("a token is needed: pass token=... or config=ServerConfig(token=...)")
        return ServerConfig(token=token, **options)
    if token is not None:
        raise TypeError("the token is given twice: pass it as token=... or in config, not both")
    return attrs.evolve(config, **options)


@attrs.frozen
class PublicPortInfo:
    """One TCP remote forward of a client, at the server."""

    #: ``host:port`` it listens on.
    address: str
    #: ``active``, or ``offline`` while the client reports its target down.
    status: str
    #: Public connections open now, and accepted in all.
    connections: int
    connections_total: int
    #: Bytes from the public peers towards the client's target, and back.
    bytes_out: int
    bytes_in: int
    #: The stream id of the forward's control stream: it stays while the forward lives, and
    #: tells apart forwards of one client that share an address (group memberships).
    forward_id: int = 0


@attrs.frozen
class RouteInfo:
    """One name route of a client, or one membership of a load-balanced port group."""

    #: The full name routed (``app.example.com``), or the group's ``host:port``.
    address: str
    #: ``http`` or ``https`` for a name route, ``tcp`` for a port group's member.
    kind: str
    #: The load-balanced group it is a member of, if any.
    group: str | None
    #: ``active``, or ``offline`` while the client reports its target down.
    status: str
    #: Public connections handed to this client, open now and in all.
    connections: int
    connections_total: int
    #: Bytes from the public peers towards the client's target, and back.
    bytes_out: int
    bytes_in: int
    #: As :attr:`PublicPortInfo.forward_id`.
    forward_id: int = 0


@attrs.frozen
class UdpPortInfo:
    """One UDP remote forward of a client, at the server."""

    #: ``host:port`` it listens on.
    address: str
    #: Associations (one per public source address) open now, and opened in all.
    connections: int
    connections_total: int
    #: Bytes of the datagrams from the public peers towards the client's target, and back.
    bytes_out: int
    bytes_in: int
    #: Datagrams from the public peers dropped at this port (the server's stream budget
    #: spent, a new association's queue full).
    datagrams_dropped: int
    #: As :attr:`PublicPortInfo.forward_id`.
    forward_id: int = 0


@attrs.frozen
class ClientInfo:
    """One connected client as :attr:`TunnelServer.clients` shows it."""

    #: ``host:port`` its control connection comes from.
    peer: str
    #: The identity it authenticated with ("" for none).
    client_id: str
    #: Wall-clock time it was admitted.
    connected_at: float
    #: Remote forwards it holds.
    forwards: int
    #: ``host:port`` of each public TCP port listening for it.
    public_ports: list[str]
    #: Bytes of its control connection each way (frames included).
    bytes_received: int
    bytes_sent: int
    #: Its TCP remote forwards, with their counters.
    ports: list[PublicPortInfo] = attrs.field(factory=list)
    #: Its name routes and port group memberships, with their counters.
    routes: list[RouteInfo] = attrs.field(factory=list)
    #: Its UDP remote forwards, with their counters.
    udp_ports: list[UdpPortInfo] = attrs.field(factory=list)
    #: The software and version it named (``pytunnel/0.1.0``); ``None`` from a client that
    #: predates that message, or before it arrives.
    version: str | None = None
    #: Round-trip time of the server's last ping to it, in seconds (``None`` before one).
    rtt: float | None = None


class _Traffic(TypedDict):
    """The figures of a port or route snapshot that come from its relay counters."""

    connections: int
    connections_total: int
    bytes_out: int
    bytes_in: int


def _traffic(stats: RelayStats) -> _Traffic:
    """One port's or route's counters, as its snapshot (``PublicPortInfo``, ``UdpPortInfo``,
    ``RouteInfo``) names them: one place that maps the one to the other."""
    return _Traffic(
        connections=stats.active_connections,
        connections_total=stats.total_connections,
        bytes_out=stats.bytes_out,
        bytes_in=stats.bytes_in,
    )


def _route_info(endpoint: _Endpoint) -> RouteInfo:
    if isinstance(endpoint, _PublicName):
        address, kind = endpoint.name, "https" if endpoint.tls else "http"
    else:
        group = endpoint.group
        address = group.address if isinstance(group, PortGroup) else endpoint.what
        kind = "tcp"
    return RouteInfo(
        address=address,
        kind=kind,
        group=None if endpoint.group is None else endpoint.group.name,
        status="active" if endpoint.online else "offline",
        forward_id=endpoint.forward_id,
        **_traffic(endpoint.stats),
    )


class TunnelServer:
    """A running server, as handed back by ``await nursery.start(serve, ...)``,
    ``open_server`` and ``wrap_server_stream``.

    ``listeners`` are its control listeners; a server made without any (see
    :func:`wrap_server_stream`) serves only the streams handed to :meth:`handle_stream`.
    """

    def __init__(
        self,
        config: ServerConfig,
        listeners: Sequence[trio.SocketListener] = (),
        *,
        http_listeners: Sequence[trio.SocketListener] = (),
        https_listeners: Sequence[trio.SocketListener] = (),
    ) -> None:
        self.listeners = list(listeners)
        self.config = config
        #: The shared listeners of name routes: HTTP routed by Host, TLS by server name.
        self.http_listeners = list(http_listeners)
        self.https_listeners = list(https_listeners)
        #: The names routed on each shared listener; ``None`` without that listener.
        self.http_routes = self._name_routes(self.http_listeners)
        self.https_routes = self._name_routes(self.https_listeners)
        #: Load-balanced groups by what they serve: ``("tcp", "8080")``, ``("http", name)``,
        #: ``("https", name)``.
        self.groups: dict[tuple[str, str], Group] = {}
        #: Held while a member joins or forms a group (the lookup, the bind, the creation).
        self.group_lock = trio.Lock()
        self._sessions: set[_ClientSession] = set()
        #: The live session of each client identity (clients that sent one).
        self._by_identity: dict[str, _ClientSession] = {}
        self._admission = Admission(config)
        #: Relayed streams open across all clients.
        self.active_streams = 0
        #: Relayed streams admitted since the server started (``active_streams`` counts
        #: those still open).
        self.total_streams = 0
        #: Requests refused at a limit, by limit (``"streams"``, ``"forwards"``).
        self.limits_hit: dict[str, int] = {}
        self._cancel_scope = trio.CancelScope()
        self._done = trio.Event()
        #: Whether ``serve_forever`` runs (so ``aclose`` waits for its listeners to close).
        self._serving = False
        self._closing = False
        #: One cancel scope per control connection being served, wherever its task runs.
        self._handlers: dict[int, trio.CancelScope] = {}
        self._handlers_left = trio.lowlevel.ParkingLot()
        self._address: tuple[str, int] | None = None
        #: The cluster's registry (``None`` on its own); started by ``serve_forever``.
        self.cluster = config.cluster
        #: Where tasks the cluster's callbacks need are started (``serve_forever``'s nursery).
        self.cluster_nursery: trio.Nursery | None = None
        #: The relaying of public traffic between nodes (a cluster with a secret), once joined.
        self.node_links: NodeLinks | None = None
        #: Set once :meth:`run_cluster` has ended (``None``: not started).
        self._cluster_done: trio.Event | None = None
        #: What takes a UDP association another node relays here, by the public UDP port
        #: of the forward holding it on this node.
        self.udp_targets: dict[int, TakeAssociation] = {}
        #: The UDP associations clients open through this server (``-L .../udp``): counts
        #: across all clients, datagrams dropped on this side included.
        self.udp_stats = RelayStats()
        if self.listeners:
            host, port = self.listeners[0].socket.getsockname()[:2]
            self._address = (str(host), int(port))

    def _name_routes(self, listeners: list[trio.SocketListener]) -> NameRoutes | None:
        if not listeners:
            return None
        return NameRoutes(
            domain=self.config.domain,
            allow_domains=self.config.allow_domains,
            port=int(listeners[0].socket.getsockname()[1]),
        )

    @property
    def http_address(self) -> tuple[str, int] | None:
        """``(host, port)`` of the shared HTTP listener, if the server has one."""
        return _address_of(self.http_listeners)

    @property
    def https_address(self) -> tuple[str, int] | None:
        """``(host, port)`` of the shared HTTPS (TLS passthrough) listener, if any."""
        return _address_of(self.https_listeners)

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` of the control listener (the real port when 0 was asked for).

        Raises ``RuntimeError`` for a server without a listener."""
        if self._address is None:
            raise RuntimeError("this server has no control listener (see wrap_server_stream)")
        return self._address

    @property
    def port(self) -> int:
        return self.address[1]

    @property
    def pending_handshakes(self) -> int:
        """Connections accepted but not yet authenticated."""
        return self._admission.pending

    @property
    def session_count(self) -> int:
        """Authenticated clients connected right now."""
        return len(self._sessions)

    @property
    def auth_failures(self) -> int:
        """Failed authentications since the server started."""
        return self._admission.throttle.failures

    @property
    def throttled_addresses(self) -> int:
        """Source addresses refused right now for too many failed authentications."""
        return self._admission.throttle.throttled()

    def count_limit(self, limit: str) -> None:
        """Count one request refused at a limit (``"streams"``, ``"forwards"``)."""
        self.limits_hit[limit] = self.limits_hit.get(limit, 0) + 1

    @property
    def clients(self) -> list[ClientInfo]:
        """The clients connected right now, as snapshots."""
        return [
            ClientInfo(
                peer=c.peer,
                client_id=c.client_id,
                connected_at=c.connected_at,
                forwards=c.forwards,
                public_ports=sorted(p.address for p in c.public_ports),
                bytes_received=c.session.bytes_read,
                bytes_sent=c.session.bytes_written,
                ports=[
                    PublicPortInfo(
                        address=p.address,
                        status="active" if p.online else "offline",
                        forward_id=p.control.stream_id,
                        **_traffic(p.stats),
                    )
                    for p in sorted(c.public_ports, key=lambda p: p.address)
                ],
                routes=[_route_info(r) for r in c.routes()],
                udp_ports=[
                    UdpPortInfo(
                        address=address,
                        datagrams_dropped=stats.datagrams_dropped,
                        forward_id=forward_id,
                        **_traffic(stats),
                    )
                    for address, (forward_id, stats) in sorted(c.udp_ports.items())
                ],
                version=c.software,
                rtt=c.rtt,
            )
            for c in self._sessions
        ]

    def reconfigure(self, config: ServerConfig) -> None:
        """Apply ``config`` to every connection accepted from now on (a reload).

        Clients already connected keep the limits and policy they were admitted under, as a
        client's session is one agreement; failed authentications counted so far stay
        counted. ``max_streams`` is fitted to the file descriptor limit as at start.
        """
        config = _fit_fd_limit(config, raise_fd_limit())
        self.config = config
        self._admission.config = config
        self._admission.throttle.burst = config.auth_failure_burst
        self._admission.throttle.interval = config.auth_failure_interval

    async def aclose(self) -> None:
        """Stop serving: close the control listener and end every client session, including
        those handed to :meth:`handle_stream` from elsewhere. Returns once all have ended."""
        self._closing = True
        self._cancel_scope.cancel()
        for scope in list(self._handlers.values()):
            scope.cancel()
        if self._serving:
            await self._done.wait()
        if self._cluster_done is not None:  # out of the cluster: its lease revoked
            await self._cluster_done.wait()
        while self._handlers:
            await self._handlers_left.park()
        await trio.lowlevel.checkpoint()

    async def serve_forever(
        self, *, task_status: trio.TaskStatus[TunnelServer] = trio.TASK_STATUS_IGNORED
    ) -> None:
        self._serving = True
        join_error: ClusterUnavailableError | None = None
        try:
            with self._cancel_scope:
                async with trio.open_nursery() as nursery:
                    if self.cluster is not None:
                        join_error = await self._join_cluster(nursery, self.cluster)
                    # each control connection is served in this nursery; one that cannot be
                    # accepted for want of descriptors is retried after a pause. Started once
                    # the accept loops run, so a caller that counts tasks or stops the server
                    # right away sees it whole.
                    await nursery.start(
                        functools.partial(
                            trio.serve_listeners,
                            self._handle_socket,
                            list(self.listeners),
                            handler_nursery=nursery,
                        )
                    )
                    for listeners, name_routes, tls in (
                        (self.http_listeners, self.http_routes, False),
                        (self.https_listeners, self.https_routes, True),
                    ):
                        if name_routes is not None:
                            links = self.node_links
                            await nursery.start(
                                functools.partial(
                                    serve_name_routing,
                                    listeners,
                                    name_routes,
                                    tls=tls,
                                    max_head=self.config.max_name_head,
                                    head_timeout=self.config.name_head_timeout,
                                    max_pending=self.config.max_name_pending,
                                    elsewhere=None
                                    if links is None
                                    else functools.partial(links.relay_name, tls),
                                    trusted_proxies=self.config.trusted_proxies,
                                )
                            )
                    task_status.started(self)
            if join_error is not None:
                raise join_error
        finally:
            try:
                await aclose_all(*self.listeners, *self.http_listeners, *self.https_listeners)
            finally:
                self._done.set()

    async def _handle_socket(self, stream: trio.SocketStream) -> None:
        try:
            host, port = stream.socket.getpeername()[:2]
        except OSError:  # the peer is already gone
            await trio.aclose_forcefully(stream)
            return
        source: tuple[str, int] = (str(host), int(port))
        proxy: tuple[str, int] | None = None
        if self.config.trusted_proxies:
            try:
                source, proxy = await real_peer(
                    stream, source, self.config.trusted_proxies, self.config.first_frame_timeout
                )
            except ProxyHeaderError as exc:
                log.warning(
                    "closing a control connection from trusted proxy %s: %s",
                    format_target(*source),
                    exc,
                )
                await trio.aclose_forcefully(stream)
                return
        peer = format_target(*source)
        if proxy is not None and proxy != source:
            peer = f"{peer} via {format_target(*proxy)}"
        await self.handle_stream(stream, peer=peer, peer_host=source[0])

    async def handle_stream(
        self, stream: trio.abc.Stream, *, peer: str = "?", peer_host: str | None = None
    ) -> None:
        """Serve one control connection over any trio stream (a memory stream in tests).

        ``peer_host`` (the source address) is what failed authentications and the
        per-address handshake cap count by.
        Returns when the client's session has ended (or the server is closed); never raises
        for the client's failures.
        """
        scope = trio.CancelScope()
        if self._closing:
            scope.cancel()
        self._handlers[id(scope)] = scope
        try:
            with scope:
                await self._serve_stream(stream, peer, peer_host)
        finally:
            # bookkeeping first: the close checkpoints, and under the server's own
            # cancellation nothing after it would run
            del self._handlers[id(scope)]
            if not self._handlers:
                self._handlers_left.unpark_all()
            await trio.aclose_forcefully(stream)

    async def _serve_stream(
        self, stream: trio.abc.Stream, peer: str, peer_host: str | None
    ) -> None:
        try:
            admitted = await self._admission.authenticate(stream, peer, peer_host)
            if admitted is None:
                return
            stream, result = admitted
            if result.node:
                async with result.open_session(
                    stream, Role.SERVER, link_session_config(self.config), name=f"node-link<{peer}>"
                ) as session:
                    log.info("link from node %s (%s) up", printable(result.client_id), peer)
                    await serve_node_link(self, session, result.client_id)
                    log.info("link from node %s (%s) ended", printable(result.client_id), peer)
                return
            async with result.open_session(
                stream, Role.SERVER, self.config.session, name=f"server<{peer}>"
            ) as session:
                client = _ClientSession(self, session, peer, result.client_id)
                self._sessions.add(client)
                log.info("client %s connected", peer)
                try:
                    await self._take_over(client)
                    await client.run()
                finally:
                    if self._by_identity.get(client.client_id) is client:
                        del self._by_identity[client.client_id]
                    if self.cluster is not None and client.client_id:
                        await release_quietly(
                            self.cluster, client_key(client.client_id), client.owner
                        )
                    client.ended.set()
                    self._sessions.discard(client)
                    log.info("client %s disconnected", peer)
        except TunnelError as exc:
            log.debug("control connection from %s ended: %s", peer, exc)
        finally:
            # the TLS wrapper, if any, owns the transport
            await trio.aclose_forcefully(stream)

    async def _take_over(self, client: _ClientSession) -> None:
        """Make ``client`` the one session of its identity, ending any older one first.

        A client whose own side of the link died (NAT rebinding, a middlebox reset) reconnects
        long before the heartbeat would drop its old session here; that ghost still holds the
        client's public ports. The new session proved it knows the token and claims the same
        identity (bound into its proof), so it is the same client: the old session is ended
        at once and this returns once its public listeners are closed and its relays reset,
        so that the new session's forwards can have the same ports again.
        """
        if not client.client_id:
            return
        if self.cluster is not None:
            await self._take_over_in_cluster(client, self.cluster)
        old = self._by_identity.get(client.client_id)
        self._by_identity[client.client_id] = client
        if old is None:
            return
        log.warning(
            "client %s (id %s) replaces its previous session from %s",
            client.peer,
            client.client_id,
            old.peer,
        )
        await old.session.abort(
            SessionClosedError(
                "replaced by a newer session of the same client", code=ErrorCode.GOING_AWAY
            )
        )
        await old.ended.wait()

    # ------------------------------------------------------------------ cluster

    async def run_cluster(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Be a node of ``config.cluster`` without serving a listener (what
        :func:`wrap_server_stream` starts): join as :meth:`serve_forever` does, the lease,
        the watches and the node links in this task, until cancelled or :meth:`aclose`.
        A node that cannot reach its engine raises ``ClusterUnavailableError`` before it
        is started."""
        if self.cluster is None:
            raise RuntimeError("this server is not configured as a node of a cluster")
        join_error: ClusterUnavailableError | None = None
        done = self._cluster_done = trio.Event()
        try:
            with self._cancel_scope:
                async with trio.open_nursery() as nursery:
                    join_error = await self._join_cluster(nursery, self.cluster)
                    if join_error is None:
                        task_status.started()
        finally:
            done.set()
        if join_error is not None:
            raise join_error

    async def _join_cluster(
        self, nursery: trio.Nursery, cluster: Registry
    ) -> ClusterUnavailableError | None:
        """Join before the first client is accepted: a node that cannot reach its engine at
        start does not serve, rather than own nothing. The error is handed back (and
        ``nursery`` cancelled) so that ``serve`` raises it as itself, not in a group."""
        self.cluster_nursery = nursery
        if not cluster.node_address and self._address is not None:
            cluster.node_address = format_target(*self._address)
        try:
            await nursery.start(cluster.run)
            cluster.on_lost(self._lost_claim)
            await nursery.start(functools.partial(cluster.watch, "clients/", self._client_moved))
            if self.config.cluster_secret is not None:
                links = NodeLinks(self, cluster, self.config.cluster_secret)
                await nursery.start(links.run)
                self.node_links = links
        except ClusterUnavailableError as exc:
            log.error("cannot join the cluster: %s", exc)
            nursery.cancel_scope.cancel()
            return exc
        return None

    async def _take_over_in_cluster(self, client: _ClientSession, cluster: Registry) -> None:
        """Take the client's identity cluster-wide: the node holding its previous session
        sees the key change (its watch) and drops that ghost at once."""
        try:
            previous = await cluster.replace(client_key(client.client_id), client.owner)
        except TunnelError as exc:  # the session is served; what it registers is refused
            log.warning("client %s: identity not registered in the cluster: %s", client.peer, exc)
            return
        if previous is not None and previous != client.owner:
            log.info(
                "client %s (id %s) was last on %s; that session is dropped there",
                client.peer,
                client.client_id,
                printable(previous),
            )

    def _client_moved(self, change: Change) -> None:
        """A client identity changed owner: a local session of it that is not the new
        owner is a ghost (the client is connected elsewhere now) and ends at once."""
        if change.value is None or self.cluster_nursery is None:
            return
        client = self._by_identity.get(change.key.removeprefix("clients/"))
        if client is None or client.owner == change.value:
            return
        log.warning(
            "client %s (id %s) reconnected to another node; dropping its session here",
            client.peer,
            client.client_id,
        )
        self.cluster_nursery.start_soon(
            client.session.abort,
            SessionClosedError(
                "replaced by a newer session of the same client on another node",
                code=ErrorCode.GOING_AWAY,
            ),
        )

    @property
    def node_link_stats(self) -> NodeLinkStats | None:
        """Traffic relayed between this node and the others; ``None`` without relaying."""
        return None if self.node_links is None else self.node_links.stats

    def port_target(self, port: int) -> Take | None:
        """What takes a public connection to TCP ``port`` that another node relayed here:
        the load-balanced group (its members on this node: never a second hop) or the
        client's forward holding it on this node (``None`` while that forward is offline:
        the stream is refused, as its closed port would)."""
        group = self.groups.get(("tcp", str(port)))
        if group is not None:
            return group.take_local
        for client in self._sessions:
            for forward in client.public_ports:
                if forward.port == port and forward.online:
                    return forward.take
        return None

    def stop_mirror(self, port: int, *, kind: str = "tcp") -> None:
        """A client of this node is about to bind ``port`` (``kind`` ``tcp`` or ``udp``):
        stop listening on it for another node first (the registry said it moved here; the
        watch may not have yet)."""
        if self.node_links is not None:
            self.node_links.stop_mirror(port, kind=kind)

    def _lost_claim(self, key: str, owner: str) -> None:
        """A claim expired while the engine was out of reach and another node took it: the
        client holding it here is dropped, so that it reconnects and learns the truth."""
        if is_group(owner):
            self._lost_group(key, owner)
            return
        for client in self._sessions:
            if client.owner == owner:
                self._drop(client, f"{printable(key)} is now held on another node")

    def _lost_group(self, key: str, owner: str) -> None:
        """A group's hold was lost the same way (its members' keys expired with this node's
        lease, and its key was given to another holder before this node joined again):
        its port or name stops taking connections here at once, and the clients of its
        members here are dropped, to reconnect and find the port or name held elsewhere
        (their forwards stay suspended, retrying, while it is)."""
        kind, _, what = key.partition("/")
        group = self.groups.get((kind, what))
        if group is None or group.owner != owner:
            return  # already ended here, or another member of it reported it first
        log.warning(
            "group %s (%s) lost %s in the cluster; dropping its members here",
            printable(group.name),
            group.what,
            printable(key),
        )
        del self.groups[kind, what]
        if isinstance(group, PortGroup):
            group.close_listeners()
        group.on_given_back()
        if self.node_links is not None:
            self.node_links.refresh(key)  # the port's new holder, served from here too
        for client in self._sessions:
            if any(member.group is group for member in client.memberships):
                self._drop(client, f"the group's {printable(key)} is now held on another node")

    def _drop(self, client: _ClientSession, why: str) -> None:
        if self.cluster_nursery is None:
            return
        log.warning("client %s dropped: %s", client.peer, why)
        self.cluster_nursery.start_soon(
            client.session.abort,
            SessionClosedError(why, code=ErrorCode.CLUSTER_UNAVAILABLE),
        )


def _address_of(listeners: list[trio.SocketListener]) -> tuple[str, int] | None:
    if not listeners:
        return None
    host, port = listeners[0].socket.getsockname()[:2]
    return str(host), int(port)


async def serve(
    port: int = 7000,
    *,
    host: str = "127.0.0.1",
    token: str | bytes | None = None,
    config: ServerConfig | None = None,
    http_listen: tuple[str, int] | None = None,
    https_listen: tuple[str, int] | None = None,
    task_status: trio.TaskStatus[TunnelServer] = trio.TASK_STATUS_IGNORED,
    **options: Unpack[ServerOptions],
) -> None:
    """Run a tunnel server on ``host:port``; never returns (cancel it, or ``aclose`` it).

    In the style of ``trio.serve_tcp``:
    ``server = await nursery.start(functools.partial(serve, 0, token=...))`` hands back the
    :class:`TunnelServer` once it is listening (port 0 picks a free port). Use
    :func:`open_server` for a server bounded by an ``async with`` block.

    Args:
      port: the control port clients connect to.
      host: the address to listen on (loopback unless told otherwise).
      token: the shared secret (or give it in ``config``, not both).
      config: every option in one object; ``options`` override its fields.
      http_listen: ``(host, port)`` of a shared HTTP listener: each connection goes to the
        client whose name route holds its ``Host`` (``Tunnel.forward_name``).
      https_listen: the same for TLS, routed by the ClientHello's server name and passed
        through untouched (the client's service holds the certificate).
      **options: :class:`ServerConfig` fields (``public_host``, ``allow_ports``,
        ``permit_open``, ``heartbeat_timeout``, limits...; see :class:`ServerOptions`).

    Raises:
      AddressInUseError, PermissionDeniedError: the control port cannot be bound.
    """
    server_config = _fit_fd_limit(_server_config(token, config, options), raise_fd_limit())
    listeners = await bind(host, port)
    shared: list[list[trio.SocketListener]] = []
    try:
        for address in (http_listen, https_listen):
            shared.append(await bind(*address) if address is not None else [])
    except BaseException:
        await aclose_all(*listeners, *(one for group in shared for one in group))
        raise
    server = TunnelServer(
        server_config, listeners, http_listeners=shared[0], https_listeners=shared[1]
    )
    log.info("listening for tunnel clients on %s", format_target(*server.address))
    for what, address_of in (("HTTP", server.http_address), ("HTTPS", server.https_address)):
        if address_of is not None:
            log.info("routing %s by name on %s", what, format_target(*address_of))
    await server.serve_forever(task_status=task_status)


@asynccontextmanager
async def open_server(
    port: int = 0,
    *,
    host: str = "127.0.0.1",
    token: str | bytes | None = None,
    config: ServerConfig | None = None,
    http_listen: tuple[str, int] | None = None,
    https_listen: tuple[str, int] | None = None,
    **options: Unpack[ServerOptions],
) -> AsyncIterator[TunnelServer]:
    """``async with pytunnel.open_server(token=...) as server:`` a listening server
    (``server.address``) whose clients are all disconnected when the block is left.

    Same arguments as :func:`serve`, except that ``port`` defaults to 0 (a free port), as
    embedded servers in tests and applications want. Errors are raised as themselves.
    """
    error: BaseException | None = None
    with unwrap_cancelled():
        async with trio.open_nursery() as nursery:
            try:
                server: TunnelServer = await nursery.start(
                    functools.partial(
                        serve,
                        port,
                        host=host,
                        token=token,
                        config=config,
                        http_listen=http_listen,
                        https_listen=https_listen,
                        **options,
                    )
                )
            except BaseException as exc:
                error = exc
            else:
                try:
                    yield server
                except BaseException as exc:
                    error = exc
                finally:
                    with trio.CancelScope(shield=True):  # bounded: aclose waits on no peer
                        await server.aclose()
    if error is not None:
        raise error


async def wrap_server_stream(
    nursery: trio.Nursery,
    stream: trio.abc.Stream,
    *,
    token: str | bytes | None = None,
    config: ServerConfig | None = None,
    peer: str = "?",
    **options: Unpack[ServerOptions],
) -> TunnelServer:
    """Serve one client's session over an existing trio stream, in ``nursery``.

    Only needed for transports pytunnel does not listen on itself (memory streams in tests,
    a pipe, a socket accepted elsewhere); use :func:`serve` or :func:`open_server` to listen
    on a port. The returned server has no control listener; more streams can be handed to
    its :meth:`TunnelServer.handle_stream`. The session ends when the stream does, or when
    ``nursery`` is cancelled. Remote forwards of that client still bind public ports.

    With ``cluster=`` the server joins the cluster first, in ``nursery``, as :func:`serve`
    does (raising ``ClusterUnavailableError`` at once if the engine cannot be reached), and
    stays a node until ``nursery`` is cancelled or :meth:`TunnelServer.aclose`; having no
    listener, it is reached by other nodes' links only where its ``node_address`` leads
    to its :meth:`TunnelServer.handle_stream`.
    """
    server = TunnelServer(_server_config(token, config, options))
    if server.cluster is not None:
        await nursery.start(server.run_cluster)
    nursery.start_soon(functools.partial(server.handle_stream, stream, peer=peer))
    await trio.lowlevel.checkpoint()
    return server
