"""The tunnel server: ``serve()`` accepts control connections, one session nursery each.

Everything a client causes on the server (its remote-forward listeners, the relays of its
public connections, the relays of its local-forward dials) runs inside that client's session
nursery. When the session ends for any reason, the nursery is cancelled: the listeners close at
once (so the same port can be bound again immediately) and every relay is torn down.
"""

from __future__ import annotations

import functools
import logging
import math
import random
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, TypedDict, TypeVar

import attrs
import trio

from ._dial import DEFAULT_CONNECT_TIMEOUT, dial_permitted, format_target
from ._handshake import DEFAULT_HANDSHAKE_TIMEOUT, send_goaway, server_handshake
from ._listen import accept, bind, bind_udp, bound_port
from ._policy import PermitOpen, PortRange, parse_port_ranges
from ._relay import DEFAULT_IDLE_TIMEOUT, RelayStats, relay
from ._session import (
    IncomingStream,
    MuxStream,
    Session,
    SessionConfig,
    open_session,
    wait_stream_end,
)
from ._tls import tls_accept
from ._udp import (
    DEFAULT_MAX_ASSOCIATIONS,
    DEFAULT_UDP_IDLE_TIMEOUT,
    relay_association,
    serve_associations,
    udp_connect,
)
from ._util import aclose_all, owned, unwrap_cancelled
from .errors import (
    AuthenticationError,
    DialError,
    ErrorCode,
    ForwardError,
    PortNotAllowedError,
    RemoteProtocolError,
    SessionClosedError,
    TargetForbiddenError,
    TLSError,
    TunnelError,
    printable,
)
from .protocol import routes
from .protocol.frames import FrameDecoder, encode_message
from .protocol.messages import Bound, ForwardState
from .protocol.mux import Role

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = [
    "ServerConfig",
    "ServerOptions",
    "TunnelServer",
    "open_server",
    "serve",
    "wrap_server_stream",
]

log = logging.getLogger("pytunnel.server")

#: Seconds of silence after which a peer is considered gone (both ends use it).
DEFAULT_HEARTBEAT_TIMEOUT = 30.0
#: Relayed streams across all clients unless configured (or lowered by the fd limit).
DEFAULT_MAX_STREAMS = 16384
_PORT_0_ATTEMPTS = 64
_Bound = TypeVar("_Bound")
_T = TypeVar("_T")


def _ranges(value: str | Iterable[PortRange] | None) -> tuple[PortRange, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return parse_port_ranges(value)
    return tuple(value)


def _permit(value: PermitOpen | Iterable[str] | str | None) -> PermitOpen:
    return value if isinstance(value, PermitOpen) else PermitOpen.parse(value)


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
    tls: ssl.SSLContext | None
    max_handshakes_per_address: int
    first_frame_timeout: float
    auth_failure_burst: int
    auth_failure_interval: float


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


class AuthThrottle:
    """Failed authentications per source address, as a token bucket.

    Each address has ``burst`` tokens; a failed authentication takes one, and one comes back
    every ``interval`` seconds. While fewer than one is left the address is refused before any
    handshake work (one ``GoAway`` saying when to retry), so a token-guessing storm costs the
    server almost nothing and holds no slot of the pending-handshake limit. Refused attempts
    take nothing: a penalty ends on time however often a stale client retries, and a client
    with the right token behind the same address (NAT) is served as soon as the penalty ends,
    and a stale neighbour can take at most one attempt per ``interval`` from it. A slow
    trickle of failures (no more than one per ``interval``) is never throttled at all.

    The table is bounded: the least recently updated entries are forgotten first (a
    forgotten address starts again with a full bucket).
    """

    #: Slack for float rounding, so a client retrying exactly when told is let in.
    _EPSILON = 1e-6

    def __init__(self, *, burst: int, interval: float, max_entries: int = 10_000) -> None:
        if burst < 1:
            raise ValueError("auth_failure_burst must be at least 1")
        if interval < 0:
            raise ValueError("auth_failure_interval must not be negative")
        self.burst = burst
        self.interval = interval
        self.max_entries = max_entries
        # host -> (tokens left, when that was computed)
        self._buckets: dict[str, tuple[float, float]] = {}

    def _tokens(self, host: str, now: float) -> float:
        entry = self._buckets.get(host)
        if entry is None:
            return float(self.burst)
        tokens, at = entry
        if self.interval == 0:
            return float(self.burst)
        return min(float(self.burst), tokens + (now - at) / self.interval)

    def blocked_for(self, host: str) -> float:
        """Seconds this address is still refused (0: allowed)."""
        tokens = self._tokens(host, trio.current_time())
        if tokens >= 1 - self._EPSILON:
            return 0.0
        return (1 - tokens) * self.interval

    def failure(self, host: str) -> None:
        now = trio.current_time()
        # down to one burst of debt: handshakes admitted together while a token was left each
        # fail on their own account, so concurrency buys no extra guesses (and the debt is
        # bounded, so the penalty still ends)
        tokens = max(-float(self.burst), self._tokens(host, now) - 1)
        self._buckets.pop(host, None)
        self._buckets[host] = (tokens, now)
        if tokens < 1 - self._EPSILON:
            log.warning(
                "%s throttled for %.1f s: more than %d failed authentications in a burst",
                host,
                self.blocked_for(host),
                self.burst,
            )
        while len(self._buckets) > self.max_entries:
            del self._buckets[next(iter(self._buckets))]


class TunnelServer:
    """A running server, as handed back by ``await nursery.start(serve, ...)``,
    ``open_server`` and ``wrap_server_stream``.

    ``listeners`` are its control listeners; a server made without any (see
    :func:`wrap_server_stream`) serves only the streams handed to :meth:`handle_stream`.
    """

    def __init__(self, config: ServerConfig, listeners: Sequence[trio.SocketListener] = ()) -> None:
        self.listeners = list(listeners)
        self.config = config
        self._sessions: set[_ClientSession] = set()
        #: The live session of each client identity (clients that sent one).
        self._by_identity: dict[str, _ClientSession] = {}
        #: Connections accepted but not yet authenticated.
        self.pending_handshakes = 0
        #: Relayed streams open across all clients.
        self.active_streams = 0
        #: Connections in their handshake, per source address.
        self._pending_by_host: dict[str, int] = {}
        #: Addresses being turned away for being at that cap (logged once per episode).
        self._over_cap: set[str] = set()
        self._throttle = AuthThrottle(
            burst=config.auth_failure_burst, interval=config.auth_failure_interval
        )
        self._cancel_scope = trio.CancelScope()
        self._done = trio.Event()
        #: Whether ``serve_forever`` runs (so ``aclose`` waits for its listeners to close).
        self._serving = False
        self._closing = False
        #: One cancel scope per control connection being served, wherever its task runs.
        self._handlers: dict[int, trio.CancelScope] = {}
        self._handlers_left = trio.lowlevel.ParkingLot()
        self._address: tuple[str, int] | None = None
        if self.listeners:
            host, port = self.listeners[0].socket.getsockname()[:2]
            self._address = (str(host), int(port))

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
    def session_count(self) -> int:
        """Authenticated clients connected right now."""
        return len(self._sessions)

    async def aclose(self) -> None:
        """Stop serving: close the control listener and end every client session, including
        those handed to :meth:`handle_stream` from elsewhere. Returns once all have ended."""
        self._closing = True
        self._cancel_scope.cancel()
        for scope in list(self._handlers.values()):
            scope.cancel()
        if self._serving:
            await self._done.wait()
        while self._handlers:
            await self._handlers_left.park()
        await trio.lowlevel.checkpoint()

    async def serve_forever(
        self, *, task_status: trio.TaskStatus[TunnelServer] = trio.TASK_STATUS_IGNORED
    ) -> None:
        self._serving = True
        try:
            with self._cancel_scope:
                async with trio.open_nursery() as nursery:
                    for listener in self.listeners:
                        nursery.start_soon(self._accept_loop, listener, nursery)
                    task_status.started(self)
        finally:
            try:
                await aclose_all(*self.listeners)
            finally:
                self._done.set()

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        while True:
            nursery.start_soon(self._handle_socket, await accept(listener))

    def _release_pending(self, host: str) -> None:
        left = self._pending_by_host.pop(host) - 1
        if left:
            self._pending_by_host[host] = left
        if left < self.config.max_handshakes_per_address:
            self._over_cap.discard(host)

    async def _turn_away(self, stream: trio.abc.Stream, code: int, text: str) -> None:
        """Refuse before any handshake work. A TLS client could not read a plaintext GoAway,
        and answering it would mean a TLS handshake for a refused peer: it is just closed."""
        if self.config.tls is None:
            await send_goaway(stream, code, text)
        else:
            await trio.aclose_forcefully(stream)

    async def _handle_socket(self, stream: trio.SocketStream) -> None:
        try:
            host, port = stream.socket.getpeername()[:2]
            peer = format_target(str(host), int(port))
        except OSError:  # the peer is already gone
            await trio.aclose_forcefully(stream)
            return
        await self.handle_stream(stream, peer=peer, peer_host=str(host))

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
        if peer_host is not None:
            wait = self._throttle.blocked_for(peer_host)
            if wait > 0:
                # rounded up, so a client that retries when told is let in
                retry = math.ceil(wait * 10) / 10
                await self._turn_away(
                    stream,
                    ErrorCode.RATE_LIMITED,
                    f"too many failed authentications; retry in {retry:.1f} s",
                )
                return
        if self.pending_handshakes >= self.config.max_pending_handshakes:
            log.warning(
                "turning away %s: %d connections are already in their handshake",
                peer,
                self.pending_handshakes,
            )
            await self._turn_away(stream, ErrorCode.SERVER_BUSY, "too many pending handshakes")
            return
        # a stream without a source address (in-memory, in tests) is not counted per address
        host_key = peer_host
        pending_here = 0 if host_key is None else self._pending_by_host.get(host_key, 0)
        if host_key is not None and pending_here >= self.config.max_handshakes_per_address:
            if host_key not in self._over_cap:  # once per episode, not per connection
                self._over_cap.add(host_key)
                log.warning(
                    "turning away connections from %s: %d already in their handshake",
                    host_key,
                    pending_here,
                )
            await self._turn_away(
                stream, ErrorCode.SERVER_BUSY, "too many pending handshakes from your address"
            )
            return
        try:
            self.pending_handshakes += 1
            if host_key is not None:
                self._pending_by_host[host_key] = pending_here + 1
            try:
                # one deadline for TLS and authentication together, a shorter one for the
                # first frame: an idle connection gives up its slot early
                now = trio.current_time()
                deadline = now + self.config.handshake_timeout
                first_deadline = min(deadline, now + self.config.first_frame_timeout)
                if self.config.tls is not None:
                    stream = await tls_accept(
                        stream,
                        self.config.tls,
                        timeout=max(0.0, first_deadline - trio.current_time()),
                        peer=peer,
                    )
                result = await server_handshake(
                    stream,
                    self.config.token,
                    timeout=max(0.0, deadline - trio.current_time()),
                    first_frame_timeout=max(0.0, first_deadline - trio.current_time()),
                    max_frame_size=self.config.session.max_frame_size,
                    peer=peer,
                )
            except AuthenticationError:
                if peer_host is not None:
                    self._throttle.failure(peer_host)
                raise
            except TLSError as exc:
                log.warning("%s", exc)
                raise
            finally:
                self.pending_handshakes -= 1
                if host_key is not None:
                    self._release_pending(host_key)
            async with open_session(
                stream,
                Role.SERVER,
                self.config.session,
                decoder=result.decoder,
                peer_max_frame_size=result.peer_max_frame_size,
                name=f"server<{peer}>",
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


class _ClientSession:
    """One authenticated client: dispatches the streams it opens."""

    def __init__(
        self, server: TunnelServer, session: Session, peer: str, client_id: str = ""
    ) -> None:
        self.server = server
        self.config = server.config
        self.session = session
        self.peer = peer
        #: The identity the client authenticated with ("" for none).
        self.client_id = client_id
        self.forwards = 0
        #: Streams refused at the server's limit since the last one admitted (log episodes).
        self._refused_streams = 0
        #: The client's TCP remote forwards, whose listeners close the moment the session ends.
        self.public_ports: set[_PublicPort] = set()
        #: Set once nothing of this client runs any more (listeners closed, relays gone).
        self.ended = trio.Event()

    def _stop_listening(self) -> None:
        for forward in list(self.public_ports):
            forward.stop_listening()

    async def run(self) -> None:
        # Called inside the session's end, before its streams (and so the relays) break.
        self.session.on_terminate(self._stop_listening)
        async with trio.open_nursery() as nursery:  # the session nursery
            nursery.start_soon(self._watch_heartbeat)
            while True:
                try:
                    incoming = await self.session.accept_stream()
                except SessionClosedError:
                    break
                if incoming.datagrams != (incoming.tag == routes.UDP_CONNECT):
                    # the kind is fixed at Open: a byte stream never gets a datagram queue,
                    # and a UDP association never a byte relay
                    incoming.refuse(
                        ErrorCode.PROTOCOL_ERROR,
                        f"route {incoming.tag} does not take a "
                        f"{'datagram' if incoming.datagrams else 'byte'} stream",
                    )
                elif incoming.tag in (routes.CONNECT, routes.UDP_CONNECT):
                    if self._reserve_stream(incoming):
                        handler = (
                            self._serve_connect
                            if incoming.tag == routes.CONNECT
                            else self._serve_udp_connect
                        )
                        nursery.start_soon(self._counted, handler, incoming)
                elif incoming.tag in (routes.LISTEN, routes.UDP_LISTEN):
                    if self.forwards >= self.config.max_forwards_per_client:
                        log.warning(
                            "client %s: remote forward refused: limit of %d forwards reached",
                            self.peer,
                            self.config.max_forwards_per_client,
                        )
                        incoming.refuse(
                            ErrorCode.FORWARD_LIMIT,
                            f"limit of {self.config.max_forwards_per_client} forwards reached",
                        )
                        continue
                    self.forwards += 1
                    if incoming.tag == routes.LISTEN:
                        nursery.start_soon(self._serve_listen, incoming)
                    else:
                        nursery.start_soon(self._serve_udp_listen, incoming)
                else:
                    incoming.refuse(ErrorCode.PROTOCOL_ERROR, f"unknown route {incoming.tag}")
            nursery.cancel_scope.cancel()

    async def _watch_heartbeat(self) -> None:
        """Drop a client that has sent nothing (not even a ping) for ``heartbeat_timeout``:
        a half-open connection is found by the clock, not by waiting for the kernel."""
        timeout = self.config.heartbeat_timeout
        while True:
            await trio.sleep(self.config.heartbeat_check_interval)
            silent = trio.current_time() - self.session.last_received
            if silent > timeout:
                log.warning(
                    "client %s silent for %.0f s (heartbeat timeout %g s); dropping it",
                    self.peer,
                    silent,
                    timeout,
                )
                await self.session.abort(
                    SessionClosedError(
                        f"no traffic for {silent:.0f} s", code=ErrorCode.HEARTBEAT_TIMEOUT
                    )
                )
                return

    def _reserve_stream(self, incoming: IncomingStream | None) -> bool:
        """Take one of the server's stream slots at admission (before any dial), so a burst
        cannot overshoot the limit; released by :meth:`_counted` when the stream's task ends."""
        if self.server.active_streams < self.config.max_streams:
            self.server.active_streams += 1
            if self._refused_streams:
                log.info(
                    "client %s: streams admitted again after %d refused at the server's limit",
                    self.peer,
                    self._refused_streams,
                )
                self._refused_streams = 0
            return True
        if not self._refused_streams:  # once per episode, not once per stream
            log.warning(
                "client %s: refusing streams: the server's limit of %d streams is reached",
                self.peer,
                self.config.max_streams,
            )
        self._refused_streams += 1
        if incoming is not None:
            incoming.refuse(ErrorCode.STREAM_LIMIT, "server stream limit reached")
        return False

    async def _counted(self, handler: Callable[[_T], Awaitable[None]], item: _T) -> None:
        try:
            await handler(item)
        finally:
            self.server.active_streams -= 1

    async def _relay(
        self, a: trio.abc.HalfCloseableStream, b: trio.abc.HalfCloseableStream, name: str
    ) -> None:
        await relay(a, b, idle_timeout=self.config.idle_timeout, name=name)

    # ---------------------------------------------------------------- local forwards

    async def _serve_connect(self, incoming: IncomingStream) -> None:
        host, port = incoming.host, incoming.port
        target = printable(format_target(host, port))  # the client's text, for logs
        if not host or not 1 <= port <= 65535 or not host.isprintable():
            # no name with control characters resolves: refuse before any lookup logs it
            log.warning(
                "[TARGET_FORBIDDEN] client %s asked for invalid target %s", self.peer, target
            )
            incoming.refuse(ErrorCode.TARGET_FORBIDDEN, f"invalid target {target}")
            return

        def forbidden(exc: DialError) -> None:
            if isinstance(exc, TargetForbiddenError):
                log.warning("[TARGET_FORBIDDEN] client %s may not open %s", self.peer, target)

        # the client may give up (Reset) while we dial, cancelling it
        sock = await incoming.dial(
            functools.partial(
                dial_permitted,
                self.config.permit_open,
                host,
                port,
                timeout=self.config.connect_timeout,
                logger=log,
            ),
            forbidden,
        )
        if sock is None:
            if incoming.abandoned:
                log.debug("client %s: open of %s cancelled during the dial", self.peer, target)
            return
        try:
            stream = incoming.accept()
        except SessionClosedError:
            await trio.aclose_forcefully(sock)
            return
        await self._relay(stream, sock, f"{self.peer}->{target}")

    # ---------------------------------------------------------------- remote forwards

    def _check_bind(self, host: str, port: int) -> str:
        """The host to bind, or raise: clients only get the public host and allowed ports."""
        address = printable(format_target(host, port))  # the client's text, for logs
        if host not in ("", self.config.public_host):
            raise PortNotAllowedError(
                f"server only listens on {self.config.public_host}, not {printable(host)}",
                address=address,
            )
        if port and not self.config.port_allowed(port):
            raise PortNotAllowedError(f"port {port} is outside the allowed range", address=address)
        return self.config.public_host

    async def _bind(
        self,
        host: str,
        port: int,
        binder: Callable[[str, int], Awaitable[_Bound]],
    ) -> _Bound:
        """Bind as the policy allows: the public host only, and with port 0 and an allowed
        range, a free port inside the range (never an arbitrary one)."""
        host = self._check_bind(host, port)
        if port or self.config.allow_ports is None:
            return await binder(host, port)
        candidates = [p for r in self.config.allow_ports for p in range(r.low, r.high + 1)]
        for candidate in random.sample(candidates, min(len(candidates), _PORT_0_ATTEMPTS)):
            try:
                return await binder(host, candidate)
            except ForwardError:
                continue
        raise PortNotAllowedError(
            "no free port in the allowed range", address=format_target(host, port)
        )

    # ---------------------------------------------------------------- UDP

    async def _serve_udp_connect(self, incoming: IncomingStream) -> None:
        host, port = incoming.host, incoming.port
        target = printable(format_target(host, port))  # the client's text, for logs
        if (
            not host
            or not 1 <= port <= 65535
            or not host.isprintable()
            or not self.config.permit_open.allows(host, port)
        ):
            log.warning("[TARGET_FORBIDDEN] client %s may not open udp %s", self.peer, target)
            incoming.refuse(ErrorCode.TARGET_FORBIDDEN, f"udp {target} is not permitted")
            return
        # the client may give up (Reset) while we resolve
        sock = await incoming.dial(functools.partial(udp_connect, host, port))
        if sock is None:
            return
        try:
            stream = incoming.accept()
        except SessionClosedError:
            sock.close()
            return
        await relay_association(stream, sock, idle_timeout=self.config.udp_idle_timeout)

    async def _serve_udp_listen(self, incoming: IncomingStream) -> None:
        try:
            await self._run_udp_forward(incoming)
        finally:
            self.forwards -= 1

    async def _run_udp_forward(self, incoming: IncomingStream) -> None:
        try:
            sock = await self._bind(incoming.host, incoming.port, bind_udp)
        except ForwardError as exc:
            log.warning("client %s: udp remote forward refused: %s", self.peer, exc)
            incoming.refuse_with(exc)
            return
        try:
            control = incoming.accept()
        except SessionClosedError:
            sock.close()
            return
        host, port = self.config.public_host, int(sock.getsockname()[1])
        address = format_target(host, port)
        stats = RelayStats()

        async def open_association(source: tuple[str, int]) -> MuxStream:
            return await self.session.open_stream(
                source[0], source[1], tag=control.stream_id, datagrams=True
            )

        def admit_association() -> bool:
            # an association holds a stream like a public TCP connection: same budget
            return self._reserve_stream(None)

        def release_association() -> None:
            self.server.active_streams -= 1

        try:
            await control.send_all(encode_message(Bound(host, port)))
            log.info("client %s: udp remote forward listening on %s", self.peer, address)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    functools.partial(
                        serve_associations,
                        sock,
                        open_association,
                        idle_timeout=self.config.udp_idle_timeout,
                        # one public UDP port may not take more than a quarter of the
                        # server's stream budget, whatever its sources claim to be
                        max_associations=max(
                            1, min(self.config.max_udp_associations, self.config.max_streams // 4)
                        ),
                        admit=admit_association,
                        release=release_association,
                        stats=stats,
                        name=f"udp {address}",
                    )
                )
                await wait_stream_end(control)
                nursery.cancel_scope.cancel()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            sock.close()
            await trio.aclose_forcefully(control)
            log.info("client %s: udp remote forward on %s closed", self.peer, address)

    async def _serve_listen(self, incoming: IncomingStream) -> None:
        try:
            await self._run_remote_forward(incoming)
        finally:
            self.forwards -= 1

    async def _run_remote_forward(self, incoming: IncomingStream) -> None:
        requested = printable(
            format_target(incoming.host or self.config.public_host, incoming.port)
        )
        try:
            listeners = await self._bind(incoming.host, incoming.port, bind)
        except ForwardError as exc:
            log.warning("client %s: remote forward on %s refused: %s", self.peer, requested, exc)
            incoming.refuse_with(exc)
            return
        try:
            control = incoming.accept()
        except SessionClosedError:
            await aclose_all(*listeners)
            return
        host, port = self.config.public_host, bound_port(listeners)
        forward = _PublicPort(self, control, host, port, listeners)
        self.public_ports.add(forward)
        if self.session.closed:  # ended while we were binding
            forward.stop_listening()
        # Unless the client ends the forward itself, it learns why by a Reset code: GOING_AWAY
        # (server or session shutting down: the forward is suspended, to be restored) or the
        # failure's own code.
        outcome: TunnelError | None = SessionClosedError("server shutting down")
        try:
            await control.send_all(encode_message(Bound(host, port)))
            log.info("client %s: remote forward listening on %s", self.peer, forward.address)
            async with trio.open_nursery() as nursery:
                forward.relays = nursery
                forward.start_accepting()
                try:
                    await forward.follow_control_stream()
                    outcome = None
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    outcome = None  # the stream is gone: nobody to tell
                except (RemoteProtocolError, ForwardError) as exc:
                    log.warning("client %s: forward %s failed: %s", self.peer, forward.address, exc)
                    outcome = exc
                finally:
                    # the port refuses before the relays are torn down, never accepting
                    # into a forward that is going away
                    forward.stop_listening()
                nursery.cancel_scope.cancel()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            outcome = None
        finally:
            self.public_ports.discard(forward)
            forward.stop_listening()
            if outcome is not None:
                control.reset(outcome.code, outcome.message)
            await aclose_all(*forward.listeners, control)
            log.info("client %s: remote forward on %s closed", self.peer, forward.address)

    async def _relay_public(self, conn: trio.SocketStream, forward_id: int) -> None:
        timeout = self.config.connect_timeout
        stream: MuxStream | None = None
        try:
            host, port = conn.socket.getpeername()[:2]
            # bounded: a client that never answers must not pin the connection and its slot
            with trio.move_on_after(timeout):
                stream = await self.session.open_stream(str(host), int(port), tag=forward_id)
            if stream is None:
                log.warning(
                    "[NODE_TIMEOUT] client %s did not answer a public connection within %g s",
                    self.peer,
                    timeout,
                )
                await trio.aclose_forcefully(conn)
                return
        except DialError as exc:
            log.warning(
                "[%s] client %s could not reach its target: %s",
                exc.category,
                self.peer,
                exc.message,
            )
            await trio.aclose_forcefully(conn)
            return
        except (TunnelError, OSError) as exc:
            log.info("client %s: public connection dropped: %s", self.peer, exc)
            await trio.aclose_forcefully(conn)
            return
        await self._relay(conn, stream, f"public->{self.peer}")


class _PublicPort:
    """The server side of one remote forward: its public listeners and its control stream.

    While the client reports the forward's target offline, the listeners are closed so the
    port refuses connections at once (no accept-then-drop black hole); back online, the same
    port is bound again. Relays already running are not affected either way.
    """

    def __init__(
        self,
        client: _ClientSession,
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
        while True:
            try:
                conn = await accept(listener)
            except trio.ClosedResourceError:
                return  # stop_listening() closed it
            if not self.client._reserve_stream(None):
                await trio.aclose_forcefully(conn)
                continue
            relay_public = functools.partial(
                self.client._relay_public, forward_id=self.control.stream_id
            )
            self.relays.start_soon(
                self.client._counted, functools.partial(owned, handler=relay_public), conn
            )

    async def follow_control_stream(self) -> None:
        """Apply the client's ForwardState messages until it closes the control stream."""
        decoder = FrameDecoder(4096)
        while True:
            data = await self.control.receive_some()
            decoder.receive_data(data)
            while (message := decoder.next_message()) is not None:
                if not isinstance(message, ForwardState):
                    raise RemoteProtocolError(
                        f"unexpected {type(message).__name__} on a forward's control stream",
                        code=ErrorCode.UNEXPECTED_MESSAGE,
                    )
                await self._set_online(message.online, message.reason)
            if not data:
                return

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


#: File descriptors kept out of the stream budget: listeners, control connections, logs,
#: the resolver's threads, and whatever the embedding program has open.
FD_HEADROOM = 256


def raise_fd_limit() -> int | None:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit; the limit now in force, or ``None``
    when there is none (or the platform has no such notion)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:  # pragma: no cover - e.g. macOS OPEN_MAX
            log.debug("could not raise the file descriptor limit to %s: %s", hard, exc)
    return None if soft == resource.RLIM_INFINITY else int(soft)


def stream_budget(fd_limit: int, config: ServerConfig) -> int:
    """Relayed streams ``fd_limit`` descriptors can carry: each costs the server one socket
    (the dialled target or the public connection), after the pending handshakes and a fixed
    headroom for everything else."""
    return max(1, fd_limit - config.max_pending_handshakes - FD_HEADROOM)


def _fit_fd_limit(config: ServerConfig, fd_limit: int | None) -> ServerConfig:
    """Cap ``max_streams`` so that the limit is what refuses a stream (a clean STREAM_LIMIT),
    never an ``EMFILE`` from accept or dial halfway through."""
    if fd_limit is None:
        log.info("file descriptors: no limit; at most %d relayed streams", config.max_streams)
        return config
    budget = stream_budget(fd_limit, config)
    if config.max_streams > budget:
        level = logging.INFO if config.max_streams == DEFAULT_MAX_STREAMS else logging.WARNING
        log.log(
            level,
            "file descriptors: limit %d; max_streams lowered from %d to %d",
            fd_limit,
            config.max_streams,
            budget,
        )
        return attrs.evolve(config, max_streams=budget)
    log.info("file descriptors: limit %d; at most %d relayed streams", fd_limit, config.max_streams)
    return config


async def serve(
    port: int = 7000,
    *,
    host: str = "127.0.0.1",
    token: str | bytes | None = None,
    config: ServerConfig | None = None,
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
      **options: :class:`ServerConfig` fields (``public_host``, ``allow_ports``,
        ``permit_open``, ``heartbeat_timeout``, limits...; see :class:`ServerOptions`).

    Raises:
      AddressInUseError, PermissionDeniedError: the control port cannot be bound.
    """
    server_config = _fit_fd_limit(_server_config(token, config, options), raise_fd_limit())
    listeners = await bind(host, port)
    server = TunnelServer(server_config, listeners)
    log.info("listening for tunnel clients on %s", format_target(*server.address))
    await server.serve_forever(task_status=task_status)


@asynccontextmanager
async def open_server(
    port: int = 0,
    *,
    host: str = "127.0.0.1",
    token: str | bytes | None = None,
    config: ServerConfig | None = None,
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
                    functools.partial(serve, port, host=host, token=token, config=config, **options)
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
    """
    server = TunnelServer(_server_config(token, config, options))
    nursery.start_soon(functools.partial(server.handle_stream, stream, peer=peer))
    await trio.lowlevel.checkpoint()
    return server
