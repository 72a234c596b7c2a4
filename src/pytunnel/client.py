"""The tunnel client: ``open_tunnel()``, reconnection, and the forwards it keeps alive.

Three tiers, as in trio-websocket: ``async with open_tunnel(...)`` owns its nursery;
``connect_tunnel(nursery, ...)`` runs in the caller's; ``wrap_tunnel(nursery, stream, ...)``
runs over any trio stream (memory streams in tests; no reconnection, as there is nothing to
reconnect to).

Task tree::

    tunnel nursery                      (Tunnel._run; lives until the tunnel is closed)
    ├── supervisor: connect, run one session, back off, reconnect
    │   └── session nursery             (one per connection; dies with the link)
    │       ├── session reader/writer, heartbeat, accept loop
    │       └── per remote forward: control stream, health probe, relays of its connections
    └── per local forward: listener, one task per connection -> relay

Forwards are declared on the tunnel, not on a connection: a local forward keeps its listening
socket through an outage, a remote forward is registered again (asking for the port it had)
after each reconnect. Their status says where they are.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import logging
import math
import random
import secrets
import ssl
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, TypedDict

import attrs
import trio

from ._dial import DEFAULT_CONNECT_TIMEOUT, describe_os_error, dial, format_target
from ._faults import Faults
from ._handshake import DEFAULT_HANDSHAKE_TIMEOUT, HandshakeResult, client_handshake
from ._listen import accept, bind, bind_udp, bound_port
from ._relay import DEFAULT_IDLE_TIMEOUT, RelayStats, relay
from ._session import (
    IncomingStream,
    MuxStream,
    Session,
    SessionConfig,
    StreamResetError,
    StreamSlot,
    open_session,
    wait_stream_end,
)
from ._spec import check_target
from ._tls import client_tls_context, parse_fingerprint, tls_connect
from ._udp import (
    DEFAULT_MAX_ASSOCIATIONS,
    DEFAULT_UDP_IDLE_TIMEOUT,
    relay_association,
    serve_associations,
    udp_connect,
)
from ._util import aclose_all, owned, unwrap_cancelled
from .errors import (
    AddressInUseError,
    AuthenticationError,
    ConnectError,
    DialError,
    ErrorCode,
    ForwardError,
    RateLimitedError,
    RemoteProtocolError,
    SessionClosedError,
    StreamRefusedError,
    TunnelError,
    VersionMismatchError,
)
from .protocol import routes
from .protocol.frames import FrameDecoder, encode_message
from .protocol.messages import Bound, ForwardState, truncate_text, valid_client_id
from .protocol.mux import Role

if TYPE_CHECKING:
    from typing_extensions import Unpack

from .protocol.socks import (
    MAX_MESSAGE_SIZE,
    ConnectRequest,
    SocksError,
    SocksServerConnection,
    reply_code_for_error,
)

__all__ = [
    "ClientConfig",
    "DynamicForward",
    "Forward",
    "EventKind",
    "TunnelEvent",
    "ForwardStatus",
    "LocalForward",
    "RemoteForward",
    "UdpLocalForward",
    "UdpRemoteForward",
    "Tunnel",
    "ClientOptions",
    "ForwardKind",
    "open_tunnel",
    "connect_tunnel",
    "wrap_tunnel",
]

log = logging.getLogger("pytunnel.client")

#: The longest wait a server's RATE_LIMITED refusal can impose on a reconnecting client.
_MAX_RETRY_AFTER = 300.0

Connector = Callable[[], Awaitable[trio.abc.Stream]]


def _check_client_id(
    _inst: object, _attribute: attrs.Attribute[str | None], value: str | None
) -> None:
    if value is not None and (not value or not valid_client_id(value)):
        raise ValueError(
            f"client_id must be 1-64 characters of letters, digits and ._:- (got {value!r})"
        )


def _valid_fingerprint(_inst: object, _attribute: object, value: str | None) -> None:
    """A malformed pin is the caller's error, said when the config is made (``ValueError``),
    not a surprise after the first TLS handshake."""
    if value is not None:
        parse_fingerprint(value)


@attrs.frozen(kw_only=True)
class ClientConfig:
    """How a client connects, watches its link, reconnects and probes its targets."""

    #: Shared secret; never logged, never sent.
    token: str | bytes = attrs.field(repr=False)
    #: This client's identity for the life of its tunnel; ``None``: a random one per tunnel.
    #: A new session with the identity of a live one replaces it at the server (its public
    #: ports are freed for the newcomer), so two clients must never share one.
    client_id: str | None = attrs.field(default=None, validator=_check_client_id)
    session: SessionConfig = attrs.field(factory=SessionConfig)
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    #: Seconds to reach the server, and for dials of remote-forward targets here.
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    #: A ping every this many seconds ...
    heartbeat_interval: float = 10.0
    #: ... and the link is dead if its pong has not come back within this many.
    heartbeat_timeout: float = 30.0
    #: Reconnect when the connection is lost (never after an authentication failure).
    reconnect: bool = True
    #: Backoff: ``initial * factor**(n-1)`` seconds, at most ``max``, times 1 +- ``jitter``.
    backoff_initial: float = 1.0
    backoff_factor: float = 2.0
    backoff_max: float = 16.0
    backoff_jitter: float = 0.2
    #: Consecutive failed reconnection attempts before giving up; ``None``: never give up.
    max_attempts: int | None = None
    #: How long a connection to a local forward waits for the link during an outage.
    outage_wait: float = 10.0
    #: Health probe of each remote forward's target every this many seconds (0: off) ...
    probe_interval: float = 30.0
    #: ... and this many consecutive failures take the forward offline at the server.
    probe_failures: int = 3
    #: UDP associations idle for this long are closed.
    udp_idle_timeout: float = DEFAULT_UDP_IDLE_TIMEOUT
    #: Associations one local UDP forward keeps at once.
    max_udp_associations: int = DEFAULT_MAX_ASSOCIATIONS
    #: TLS for the control connection (see ``pytunnel.client_tls_context``); ``None``: plain
    #: unless ``tls_fingerprint`` is set.
    tls: ssl.SSLContext | None = None
    #: Name the server certificate must carry; default: the host connected to.
    tls_server_hostname: str | None = None
    #: Pin the server certificate (``SHA256:...``, as printed by ``pytunnel serve``) instead of
    #: (or on top of) verifying its chain: for self-signed servers.
    tls_fingerprint: str | None = attrs.field(default=None, validator=_valid_fingerprint)

    def backoff(self, attempt: int) -> float:
        """Delay before reconnection attempt ``attempt`` (1-based), jitter included."""
        base = min(self.backoff_initial * self.backoff_factor ** (attempt - 1), self.backoff_max)
        return max(0.0, base * (1 + random.uniform(-self.backoff_jitter, self.backoff_jitter)))


class ClientOptions(TypedDict, total=False):
    """The :class:`ClientConfig` fields as keyword arguments of ``open_tunnel`` and its
    tiers, so type checkers and editors see each one (the token is its own argument).
    ``tests/test_tunnel.py`` checks that the two lists stay the same."""

    client_id: str | None
    session: SessionConfig
    handshake_timeout: float
    idle_timeout: float
    connect_timeout: float
    heartbeat_interval: float
    heartbeat_timeout: float
    reconnect: bool
    backoff_initial: float
    backoff_factor: float
    backoff_max: float
    backoff_jitter: float
    max_attempts: int | None
    outage_wait: float
    probe_interval: float
    probe_failures: int
    udp_idle_timeout: float
    max_udp_associations: int
    tls: ssl.SSLContext | None
    tls_server_hostname: str | None
    tls_fingerprint: str | None


class ForwardStatus(str, enum.Enum):
    """Where a forward is in its life. See docs/resilience.md for the transitions.

    A ``str`` enum: a status compares equal to its value (``"active"``) and prints as it, so
    logs, JSON and the sync API carry the same value as the enum.
    """

    STARTING = "starting"  #: being set up
    ACTIVE = "active"  #: listening and relaying
    SUSPENDED = "suspended"  #: the tunnel connection is down; restored on reconnect
    OFFLINE = "offline"  #: health probes find the target down; the public port refuses
    STOPPED = "stopped"  #: closed by the user, or the tunnel was closed
    ERROR = "error"  #: ended by a failure; ``Forward.error`` says which

    def __str__(self) -> str:
        return self.value


class ForwardKind(str, enum.Enum):
    """What a forward does; the value is the phrase logs and the CLI print."""

    LOCAL = "local forward"  #: ``-L``: listens here, dials at the server
    DYNAMIC = "dynamic forward"  #: ``-D``: a SOCKS server here, dials at the server
    REMOTE = "remote forward"  #: ``-R``: listens at the server, dials here
    LOCAL_UDP = "local udp forward"  #: ``-L`` for UDP datagrams
    REMOTE_UDP = "remote udp forward"  #: ``-R`` for UDP datagrams

    def __str__(self) -> str:
        return self.value

    @property
    def udp(self) -> bool:
        """Whether it carries datagrams rather than a byte stream."""
        return self in (ForwardKind.LOCAL_UDP, ForwardKind.REMOTE_UDP)

    @property
    def remote(self) -> bool:
        """Whether it listens at the server (``-R``)."""
        return self in (ForwardKind.REMOTE, ForwardKind.REMOTE_UDP)


_FINAL = (ForwardStatus.STOPPED, ForwardStatus.ERROR)


class EventKind(enum.Enum):
    """What a :class:`TunnelEvent` reports."""

    STATUS = "status"  #: a forward changed status (``forward``, ``old``, ``new``)
    CONNECTED = "connected"  #: the link is up (first connection or reconnection)
    DISCONNECTED = "disconnected"  #: the link was lost
    RECONNECT_ATTEMPT = "reconnect_attempt"  #: waiting before reconnection attempt N
    RECONNECT_FAILED = "reconnect_failed"  #: an attempt failed (``message`` says why)
    HEARTBEAT_LOST = "heartbeat_lost"  #: a ping went unanswered: the link is dead
    PROBE_FAILED = "probe_failed"  #: a health probe of ``forward``'s target failed
    PROBE_OK = "probe_ok"  #: a health probe succeeded after failures


@attrs.frozen
class TunnelEvent:
    """Something happened to the tunnel or one of its forwards. ``time`` is wall-clock."""

    kind: EventKind
    message: str
    time: float = attrs.field(factory=time.time)
    forward: Forward | None = None
    old: ForwardStatus | None = None
    new: ForwardStatus | None = None


class Forward:
    """A forward declared on a tunnel: where it listens, where it leads, how it is doing."""

    kind: ForwardKind

    def __init__(self, tunnel: Tunnel, target_host: str, target_port: int) -> None:
        self._tunnel = tunnel
        #: Where connections are relayed to.
        self.target_host = target_host
        self.target_port = target_port
        #: Where it listens (the real port when 0 was asked for).
        self.listen_host = ""
        self.listen_port = 0
        self.status = ForwardStatus.STARTING
        #: Why the status last changed (an English sentence).
        self.reason = ""
        #: The failure that ended the forward, when ``status`` is ``ERROR`` (an exception, as
        #: ``Tunnel.failure`` is; ``reason`` has the sentence).
        self.error: BaseException | None = None
        #: Wall-clock time of the last status change.
        self.changed_at = time.time()
        #: Live counters: bytes each way, active and total connections, errors by category.
        self.stats = RelayStats()
        #: Fault injection for tests (latency, bandwidth, blackhole, resets...), per direction.
        self.faults = Faults()
        self._cancel_scope = trio.CancelScope()
        self._done = trio.Event()
        self._changed = trio.lowlevel.ParkingLot()
        #: Set once none of the forward's tasks runs any more.
        self._finished = trio.Event()
        self._finished.set()

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} {format_target(*self.address)} -> {self.target} "
            f"{self.status.value}>"
        )

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` it listens on."""
        return self.listen_host, self.listen_port

    @property
    def target(self) -> str:
        return format_target(self.target_host, self.target_port)

    async def aclose(self) -> None:
        """Stop this forward: stop listening and end its relayed connections."""
        self._set_status(ForwardStatus.STOPPED, "closed by the user")
        await self._finished.wait()

    async def wait_closed(self) -> None:
        """Until the forward has stopped or failed for good."""
        await self._done.wait()

    async def wait_status(self, *statuses: ForwardStatus) -> ForwardStatus:
        """Until the forward is in one of ``statuses`` (returned at once if it already is)."""
        while self.status not in statuses:
            await self._changed.park()
        await trio.lowlevel.checkpoint()
        return self.status

    def _fail(self, error: BaseException, reason: str) -> None:
        """End the forward for good because of ``error``."""
        self._set_status(ForwardStatus.ERROR, reason, error)

    def _set_status(
        self, new: ForwardStatus, reason: str, error: BaseException | None = None
    ) -> None:
        old = self.status
        if old == new or old in _FINAL:
            return
        self.status = new
        self.reason = reason
        self.changed_at = time.time()
        if new is ForwardStatus.ERROR:
            self.error = error if error is not None else ForwardError(reason)
        level = (
            logging.WARNING
            if new in (ForwardStatus.ERROR, ForwardStatus.OFFLINE)
            else (logging.INFO)
        )
        log.log(
            level,
            "%s %s -> %s: %s -> %s (%s)",
            self.kind,
            format_target(*self.address),
            self.target,
            old.value,
            new.value,
            reason,
        )
        self._tunnel._emit(TunnelEvent(EventKind.STATUS, reason, self.changed_at, self, old, new))
        self._changed.unpark_all()
        if new in _FINAL:
            self._tunnel._forwards.discard(self)
            self._cancel()
            self._done.set()

    def _cancel(self) -> None:
        self._cancel_scope.cancel()

    async def _relay(
        self, accepted: trio.abc.HalfCloseableStream, toward_target: trio.abc.HalfCloseableStream
    ) -> None:
        """Relay one connection of this forward, counted in its stats."""
        await relay(
            accepted,
            toward_target,
            idle_timeout=self._tunnel.config.idle_timeout,
            stats=self.stats,
            name=f"{self.kind} {self.listen_port}->{self.target}",
            faults=self.faults,
        )

    def _count_failure(self, exc: BaseException) -> None:
        if isinstance(exc, DialError) and exc.category in ("NODE_TIMEOUT", "NODE_UNSTABLE"):
            self.stats.count_error(exc.category)
        elif isinstance(exc, SessionClosedError):
            self.stats.count_error("LINK_DOWN")
        else:
            self.stats.count_error("REFUSED")


class LocalForward(Forward):
    """``-L``: the client listens; each connection is relayed to the target via the server.

    The listening socket stays open through an outage; a connection made then waits up to
    ``outage_wait`` for the link and is closed cleanly if it does not come back.
    """

    kind = ForwardKind.LOCAL
    #: True while the listener waits for a stream slot (one log line per episode).
    _at_stream_cap = False

    async def _run(
        self, host: str, port: int, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """The forward's life: listen (``_listen``), report the status, end as stopped."""
        self._finished = trio.Event()
        try:
            with self._cancel_scope:
                await self._listen(host, port, task_status)
        except OSError as exc:
            self._fail(exc, f"listener failed: {exc}")
        finally:
            self._set_status(ForwardStatus.STOPPED, "forward ended")
            self._finished.set()

    def _listening(self, host: str, port: int, task_status: trio.TaskStatus[None]) -> None:
        self.listen_host, self.listen_port = host, port
        if self._tunnel.connected:
            self._set_status(ForwardStatus.ACTIVE, "listening")
        else:
            self._set_status(ForwardStatus.SUSPENDED, "listening; link down")
        task_status.started()

    async def _listen(self, host: str, port: int, task_status: trio.TaskStatus[None]) -> None:
        listeners = await bind(host, port)
        try:
            async with trio.open_nursery() as nursery:
                for listener in listeners:
                    nursery.start_soon(self._accept_loop, listener, nursery)
                self._listening(host, bound_port(listeners), task_status)
        finally:
            await aclose_all(*listeners)

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        while True:
            # a connection waiting first, then a stream slot: at the session's cap the listener
            # stops accepting and the kernel's backlog holds the rest, rather than accepting
            # connections to reset them; an idle listener holds no slot
            await trio.lowlevel.wait_readable(listener.socket)
            slot = await self._reserve_slot()
            try:
                conn = await accept(listener)
            except BaseException:
                if slot is not None:
                    slot.release()
                raise
            nursery.start_soon(owned, conn, functools.partial(self._serve_reserved, slot=slot))

    async def _reserve_slot(self) -> StreamSlot | None:
        """A slot of the current session, waiting while it is at its stream cap; ``None``
        while there is no link (connections then wait for one, as before).

        Said once per episode: the episode ends when half the slots are free again, so a
        listener working through its backlog at the cap does not log once per connection.
        """
        session = self._tunnel.session
        if session is None or session.closed:
            return None
        free, cap = session.free_stream_slots, session.config.max_streams
        if free <= 0 and not self._at_stream_cap:
            self._at_stream_cap = True
            log.warning(
                "%s %s: the session's limit of %d streams is reached; "
                "not accepting connections until some close",
                self.kind,
                self.listen_port,
                cap,
            )
        elif self._at_stream_cap and free >= max(1, cap // 2):
            self._at_stream_cap = False
            log.info("%s %s: below the stream limit again", self.kind, self.listen_port)
        try:
            return await session.wait_stream_slot()
        except SessionClosedError:
            return None

    async def _serve_reserved(self, conn: trio.SocketStream, slot: StreamSlot | None) -> None:
        try:
            await self._handle(conn, slot)
        finally:
            if slot is not None:
                slot.release()

    async def _handle(self, conn: trio.SocketStream, slot: StreamSlot | None = None) -> None:
        try:
            stream = await self._tunnel._open(
                self.target_host, self.target_port, routes.CONNECT, slot=slot
            )
        except DialError as exc:
            self._count_failure(exc)
            log.warning(
                "[%s] local forward %s: the server could not reach the target: %s",
                exc.category,
                self.listen_port,
                exc.message,
            )
            await trio.aclose_forcefully(conn)
            return
        except (StreamRefusedError, SessionClosedError) as exc:
            self._count_failure(exc)
            log.warning("local forward %s: connection dropped: %s", self.listen_port, exc)
            await trio.aclose_forcefully(conn)
            return
        await self._relay(conn, stream)


class DynamicForward(LocalForward):
    """``-D``: a local SOCKS proxy (SOCKS5, SOCKS4 and 4a) whose connections exit at the server.

    Domain names are resolved by the server, so DNS does not leak on the client side; the
    server's target policy (``permit_open``) applies to every destination. A failed dial is
    answered with the SOCKS reply that matches it (timeout, refused, unreachable, forbidden).
    """

    kind = ForwardKind.DYNAMIC

    def __init__(
        self, tunnel: Tunnel, auth: tuple[str, str] | None, negotiation_timeout: float
    ) -> None:
        super().__init__(tunnel, "socks", 0)
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
            stream = await self._tunnel._open(request.host, request.port, routes.CONNECT, slot=slot)
        except (StreamRefusedError, SessionClosedError) as exc:
            self._count_failure(exc)
            target = format_target(request.host, request.port)
            log.warning("dynamic forward %s: %s unreachable: %s", self.listen_port, target, exc)
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await conn.send_all(socks.reject(reply_code_for_error(exc.code, exc.message)))
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


class RemoteForward(Forward):
    """``-R``: the server listens; each connection there is relayed to the target here.

    Registered again after every reconnect, asking for the port it had, and health-probed:
    when its target stops answering, the server is told to refuse connections instead of
    accepting them into a black hole.
    """

    kind = ForwardKind.REMOTE
    _listen_route = routes.LISTEN

    def __init__(
        self,
        tunnel: Tunnel,
        target_host: str,
        target_port: int,
        remote_host: str,
        remote_port: int,
        connect_timeout: float,
    ) -> None:
        super().__init__(tunnel, target_host, target_port)
        self.connect_timeout = connect_timeout
        self._remote_host = remote_host
        self._remote_port = remote_port
        #: Where incoming streams go while registered; ``None`` (or closed): they are refused.
        self._incoming: trio.MemorySendChannel[IncomingStream] | None = None
        self._control: MuxStream | None = None
        #: Scope of the current registration; a new one per session.
        self._attach_scope = trio.CancelScope()
        #: Why health probes took the forward offline (kept across reconnections).
        self._offline_reason: str | None = None

    def _cancel(self) -> None:
        self._attach_scope.cancel()

    async def _attach(
        self, session: Session, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Register on ``session`` and serve until the forward or the session ends."""
        if self.status in _FINAL:
            return
        self._attach_scope = trio.CancelScope()
        self._finished = trio.Event()
        try:
            await self._serve_attached(session, task_status)
        finally:
            self._finished.set()

    async def _serve_attached(self, session: Session, task_status: trio.TaskStatus[None]) -> None:
        with self._attach_scope:
            control = await session.open_stream(
                self._remote_host, self._remote_port, tag=self._listen_route
            )
            tunnel = self._tunnel
            try:
                bound = await _receive_bound(control)
                self.listen_host, self.listen_port = bound.host, bound.port
                self._remote_port = bound.port  # after a reconnect, ask for the same port
                self._control = control
                # unbounded, as the session's stream limit already bounds incoming streams
                send, receive = trio.open_memory_channel[IncomingStream](math.inf)
                async with trio.open_nursery() as nursery:
                    self._incoming = send
                    tunnel._remote[control.stream_id] = self
                    nursery.start_soon(self._start_handlers, receive, nursery)
                    if self._offline_reason is not None:
                        # still down when we lost the link: keep the public port refusing
                        # rather than accepting into a black hole until a probe succeeds
                        await _tell(control, ForwardState(False, self._offline_reason))
                        self._set_status(ForwardStatus.OFFLINE, self._offline_reason)
                    else:
                        self._set_status(ForwardStatus.ACTIVE, "registered at the server")
                    task_status.started()
                    if tunnel.config.probe_interval > 0 and self._listen_route == routes.LISTEN:
                        nursery.start_soon(self._probe_loop, control)
                    # errors are handled here, inside the nursery, so they are not wrapped
                    self._follow_server(await wait_stream_end(control), session)
                    nursery.cancel_scope.cancel()
            finally:
                self._incoming = None
                self._control = None
                tunnel._remote.pop(control.stream_id, None)
                await trio.aclose_forcefully(control)

    def _follow_server(self, end: BaseException | None, session: Session) -> None:
        """Why the control stream ended decides what the forward becomes."""
        cause = end.__cause__ if end is not None else None
        if isinstance(cause, StreamResetError) and cause.code != ErrorCode.GOING_AWAY:
            self._fail(cause, f"the server ended the forward: {cause}")
        elif end is None and not session.closed:
            self._fail(
                ForwardError("the server closed the forward"), "the server closed the forward"
            )
        else:  # the session ended, or the server is shutting down
            self._set_status(ForwardStatus.SUSPENDED, "tunnel connection lost")

    async def _reattach(self, session: Session) -> None:
        """After a reconnect: register again, asking for the port the forward had.

        A port in use by another owner may be released (a client that has not yet been
        dropped, a program that exits), so the forward stays suspended, says why, and asks
        again with the reconnect backoff for as long as this session lives. Any other refusal
        (the port is not allowed, the forward limit) cannot be fixed by waiting: it is final.
        """
        attempt = 0
        while True:
            try:
                await self._attach(session)
                return
            except SessionClosedError:
                return  # lost the link again; stays suspended
            except AddressInUseError as exc:
                attempt += 1
                delay = self._tunnel.config.backoff(attempt)
                self._explain(f"could not be restored: {exc}; retrying in {delay:.1f} s")
            except TunnelError as exc:
                self._fail(exc, f"could not be restored: {exc}")
                return
            if self.status in _FINAL:
                return
            self._attach_scope = trio.CancelScope()  # aclose() cancels the wait
            with self._attach_scope:
                await trio.sleep(delay)

    def _explain(self, reason: str) -> None:
        """A new reason for the current status (which does not change)."""
        self.reason = reason
        log.warning("%s %s -> %s: %s", self.kind, format_target(*self.address), self.target, reason)

    def _dispatch(self, incoming: IncomingStream) -> None:
        """Hand an incoming stream to the forward, or refuse it if the forward is closing.

        The stream goes through a channel that the forward's own task drains, so a handler is
        only ever started in the forward's nursery by a task of that nursery (which is
        therefore still open), whatever state the forward is in.
        """
        try:
            if self._incoming is None:
                raise trio.ClosedResourceError
            self._incoming.send_nowait(incoming)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.WouldBlock):
            incoming.refuse(ErrorCode.FORWARD_FAILED, "forward is closing")

    async def _start_handlers(
        self, receive: trio.MemoryReceiveChannel[IncomingStream], nursery: trio.Nursery
    ) -> None:
        try:
            async for incoming in receive:
                nursery.start_soon(self._answer, incoming)
        finally:
            # refuse what is queued and close, with no checkpoint in between: from now on
            # _dispatch finds the channel broken and refuses by itself
            while True:
                try:
                    incoming = receive.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
                incoming.refuse(ErrorCode.FORWARD_FAILED, "forward is closing")
            receive.close()

    async def _answer(self, incoming: IncomingStream) -> None:
        """Run the handler; a stream it had not answered when cancelled is refused."""
        try:
            await self._handle(incoming)
        finally:
            if not incoming.answered:
                incoming.refuse(ErrorCode.FORWARD_FAILED, "forward is closing")

    async def _handle(self, incoming: IncomingStream) -> None:
        # the server may give up on the public connection, cancelling the dial
        sock = await incoming.dial(
            functools.partial(
                dial, self.target_host, self.target_port, timeout=self.connect_timeout
            ),
            self._count_failure,
        )
        if sock is None:
            return
        try:
            stream = incoming.accept()
        except SessionClosedError:
            await trio.aclose_forcefully(sock)
            return
        await self._relay(stream, sock)

    async def _probe_loop(self, control: MuxStream) -> None:
        """TCP-connect the target every ``probe_interval``; after ``probe_failures`` failures
        in a row take the forward offline, and bring it back at the first success."""
        config = self._tunnel.config
        failures = config.probe_failures if self._offline_reason is not None else 0
        while True:
            await trio.sleep(config.probe_interval)
            try:
                sock = await dial(
                    self.target_host,
                    self.target_port,
                    timeout=self.connect_timeout,
                    logger=log,
                    level=logging.DEBUG,
                )
            except DialError as exc:
                failures += 1
                self._tunnel._emit(TunnelEvent(EventKind.PROBE_FAILED, exc.message, forward=self))
                if failures >= config.probe_failures and self._offline_reason is None:
                    reason = truncate_text(f"{failures} health probes failed: {exc.message}")
                    self._offline_reason = reason
                    if not await _tell(control, ForwardState(False, reason)):
                        return
                    self._set_status(ForwardStatus.OFFLINE, reason)
                continue
            await trio.aclose_forcefully(sock)
            if failures:
                self._tunnel._emit(
                    TunnelEvent(
                        EventKind.PROBE_OK,
                        f"target reachable after {failures} failures",
                        forward=self,
                    )
                )
            failures = 0
            if self._offline_reason is not None:
                self._offline_reason = None
                if not await _tell(control, ForwardState(True, "target reachable")):
                    return
                self._set_status(ForwardStatus.ACTIVE, "target reachable again")


class UdpLocalForward(LocalForward):
    """``-L port:host:hostport/udp``: datagrams to the local UDP port reach the target from
    the server; replies come back to each source. One association per source address."""

    kind = ForwardKind.LOCAL_UDP

    async def _listen(self, host: str, port: int, task_status: trio.TaskStatus[None]) -> None:
        with await bind_udp(host, port) as sock:
            self._listening(host, int(sock.getsockname()[1]), task_status)
            await serve_associations(
                sock,
                self._open_association,
                idle_timeout=self._tunnel.config.udp_idle_timeout,
                max_associations=self._tunnel.config.max_udp_associations,
                stats=self.stats,
                name=f"{self.kind} {self.listen_port}",
            )

    async def _open_association(self, source: tuple[str, int]) -> MuxStream:
        # a refusal is counted (by category) where associations are run: _udp._run_association
        return await self._tunnel._open(self.target_host, self.target_port, routes.UDP_CONNECT)


class UdpRemoteForward(RemoteForward):
    """``-R port:host:hostport/udp``: the server listens on a UDP port; each source address
    there becomes an association relayed to the target, dialled here."""

    kind = ForwardKind.REMOTE_UDP
    _listen_route = routes.UDP_LISTEN

    async def _handle(self, incoming: IncomingStream) -> None:
        sock = await incoming.dial(
            functools.partial(udp_connect, self.target_host, self.target_port),
            self._count_failure,
        )
        if sock is None:
            return
        try:
            stream = incoming.accept()
        except SessionClosedError:
            sock.close()
            return
        await relay_association(
            stream, sock, idle_timeout=self._tunnel.config.udp_idle_timeout, stats=self.stats
        )


async def _tell(control: MuxStream, message: ForwardState) -> bool:
    """Send on the control stream; False if it is gone (the forward is ending anyway)."""
    try:
        await control.send_all(encode_message(message))
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return False
    return True


async def _receive_bound(control: MuxStream) -> Bound:
    decoder = FrameDecoder(4096)
    while True:
        message = decoder.next_message()
        if message is not None:
            if not isinstance(message, Bound):
                raise RemoteProtocolError(
                    f"expected Bound, got {type(message).__name__}",
                    code=ErrorCode.UNEXPECTED_MESSAGE,
                )
            return message
        try:
            data = await control.receive_some()
        except trio.BrokenResourceError as exc:
            cause = exc.__cause__
            if isinstance(cause, StreamResetError):
                raise ForwardError(f"the server withdrew the forward: {cause}") from None
            raise SessionClosedError("the tunnel connection was lost") from exc
        decoder.receive_data(data)
        if not data:
            decoder.next_message()
            raise ForwardError("the server closed the forward before confirming it")


class Tunnel:
    """A tunnel client. Set up forwards on it; close it to tear everything down.

    While the link is down (``connected`` false) the tunnel reconnects with exponential
    backoff; ``failure`` is set if it gives up (authentication failure, attempts exhausted).
    """

    def __init__(
        self,
        config: ClientConfig,
        connector: Connector | None,
        stream: trio.abc.Stream | None = None,
    ) -> None:
        self.config = config
        self._connector = connector
        self._first_stream = stream
        #: The server's host name, for TLS verification (set by ``connect_tunnel``).
        self.server_host: str | None = None
        #: The current session, ``None`` while disconnected.
        self.session: Session | None = None
        #: Round-trip time of the last heartbeat, in seconds.
        self.rtt: float | None = None
        #: Successful reconnections so far.
        self.reconnects = 0
        #: Why the tunnel ended by itself, if it did.
        self.failure: TunnelError | None = None
        #: This client's identity at the server, the same for every connection of the tunnel.
        self.client_id = config.client_id or secrets.token_hex(16)
        self._forwards: set[Forward] = set()
        self._remote: dict[int, RemoteForward] = {}
        self._nursery: trio.Nursery | None = None
        self._session_nursery: trio.Nursery | None = None
        #: Woken whenever a session starts or ends (see wait_connected).
        self._link_changed = trio.lowlevel.ParkingLot()
        self._cancel_scope = trio.CancelScope()
        self._closing = False
        self._done = trio.Event()
        #: Each subscriber's send side, oldest first, with a weak reference to the receive side
        #: so that one dropped without being closed is noticed and let go.
        self._subscribers: dict[
            trio.MemorySendChannel[TunnelEvent], weakref.ref[trio.MemoryReceiveChannel[TunnelEvent]]
        ] = {}
        #: Events not delivered because a subscriber's buffer was full.
        self.dropped_events = 0
        #: Subscribers unsubscribed because there were more than ``max_subscribers``.
        self.dropped_subscribers = 0
        #: The TLS context of every connection of this tunnel, built (off the event loop)
        #: for the first one and reused for each reconnection.
        self._tls_context: ssl.SSLContext | None = config.tls

    # ------------------------------------------------------------------ state

    @property
    def forwards(self) -> list[Forward]:
        """The forwards currently declared (any status but stopped/error)."""
        return list(self._forwards)

    @property
    def connected(self) -> bool:
        return self.session is not None and not self.session.closed

    @property
    def closed(self) -> bool:
        return self._done.is_set()

    async def wait_closed(self) -> None:
        """Until the tunnel has ended: closed by us, or it gave up (see ``failure``)."""
        await self._done.wait()

    async def wait_connected(self, timeout: float = math.inf) -> bool:
        """Until the link is up (True) or ``timeout`` passed (False)."""
        with trio.move_on_after(timeout):
            while not self.connected:
                await self._link_changed.park()
        return self.connected

    #: Event subscribers kept at once (see :meth:`events`).
    max_subscribers = 1024

    def events(self, buffer: int = 256) -> trio.MemoryReceiveChannel[TunnelEvent]:
        """Subscribe to events: ``async for event in tunnel.events(): ...``.

        Status changes, link up/down, reconnection attempts, heartbeat loss, probe results.
        Buffering is bounded: events beyond ``buffer`` unread are dropped and counted in
        ``dropped_events`` (the current state is always readable on the objects themselves).
        The iterator ends when the tunnel ends.

        Subscribers are bounded: one whose receiver was closed or garbage-collected is
        forgotten, and beyond ``max_subscribers`` the oldest is unsubscribed (its iterator
        ends), so code that subscribes in a loop cannot grow the tunnel without limit.
        """
        send, receive = trio.open_memory_channel[TunnelEvent](buffer)
        if self.closed:
            send.close()  # nothing more will happen: the iterator ends at once
            return receive
        self._forget_abandoned()
        while len(self._subscribers) >= self.max_subscribers:
            oldest = next(iter(self._subscribers))
            del self._subscribers[oldest]
            oldest.close()
            self.dropped_subscribers += 1
            if self.dropped_subscribers == 1:  # once: a leaking caller would flood the log
                log.warning(
                    "more than %d event subscribers: the oldest are being unsubscribed",
                    self.max_subscribers,
                )
        self._subscribers[send] = weakref.ref(receive)
        return receive

    def _forget_abandoned(self) -> None:
        for channel, receiver in list(self._subscribers.items()):
            if receiver() is None or channel.statistics().open_receive_channels == 0:
                del self._subscribers[channel]
                channel.close()

    def _emit(self, event: TunnelEvent) -> None:
        self._forget_abandoned()
        for channel in list(self._subscribers):
            try:
                channel.send_nowait(event)
            except trio.WouldBlock:
                self.dropped_events += 1
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._subscribers.pop(channel, None)

    # ------------------------------------------------------------------ user API

    async def open_stream(self, host: str, port: int) -> MuxStream:
        """A stream to ``host:port`` that exits at the server (it dials there).

        Waits up to ``outage_wait`` for the link if it is down. Raises ``NodeTimeoutError`` /
        ``NodeUnstableError`` if the server's dial fails, ``TargetForbiddenError`` if its
        policy refuses, ``SessionClosedError`` if there is no link.
        """
        return await self._open(host, port, routes.CONNECT)

    async def _open(
        self, host: str, port: int, route: int, *, slot: StreamSlot | None = None
    ) -> MuxStream:
        """Open on the current session; ``slot`` (reserved by a listener) is used if it belongs
        to that session, else given back (the link changed since it was reserved)."""
        session = await self._current_session()
        if slot is not None and (slot.session is not session or not slot.held):
            slot.release()
            slot = None
        return await session.open_stream(
            host, port, tag=route, datagrams=route == routes.UDP_CONNECT, slot=slot
        )

    async def forward_local(
        self,
        target_host: str,
        target_port: int,
        *,
        local_port: int = 0,
        local_host: str = "127.0.0.1",
        protocol: str = "tcp",
    ) -> LocalForward:
        """Listen on ``local_host:local_port`` here; relay each connection to the target,
        dialled by the server. Raises ``AddressInUseError`` / ``PermissionDeniedError``, or
        ``InvalidTargetError`` for a target no connection could ever reach."""
        check_target(target_host, target_port)
        forward = _LOCAL_KINDS[_protocol(protocol)](self, target_host, target_port)
        await self._start_listening(forward, local_host, local_port)
        return forward

    async def _start_listening(self, forward: LocalForward, host: str, port: int) -> None:
        nursery = self._require_nursery()
        self._forwards.add(forward)
        try:
            await nursery.start(forward._run, host, port)
        except BaseException:
            self._forwards.discard(forward)
            raise

    async def forward_dynamic(
        self,
        *,
        local_port: int = 0,
        local_host: str = "127.0.0.1",
        auth: tuple[str, str] | None = None,
        negotiation_timeout: float = 10.0,
    ) -> DynamicForward:
        """A SOCKS proxy on ``local_host:local_port`` whose connections exit at the server
        (``ssh -D``). ``auth``: require RFC 1929 username/password (SOCKS5 only then)."""
        forward = DynamicForward(self, auth, negotiation_timeout)
        await self._start_listening(forward, local_host, local_port)
        return forward

    async def forward_remote(
        self,
        target_host: str,
        target_port: int,
        *,
        remote_port: int = 0,
        remote_host: str = "",
        connect_timeout: float | None = None,
        protocol: str = "tcp",
    ) -> RemoteForward:
        """Ask the server to listen on ``remote_port`` (0: any); relay each connection there
        to the target, dialled here. Raises ``AddressInUseError``, ``PermissionDeniedError``,
        ``PortNotAllowedError`` or ``ForwardLimitError`` and leaves nothing bound;
        ``InvalidTargetError`` for a target (or remote host) no request can carry."""
        check_target(target_host, target_port)
        check_target(remote_host, remote_port, allow_port_zero=True)
        forward = _REMOTE_KINDS[_protocol(protocol)](
            self,
            target_host,
            target_port,
            remote_host,
            remote_port,
            self.config.connect_timeout if connect_timeout is None else connect_timeout,
        )
        session = await self._current_session()
        nursery = self._session_nursery
        if nursery is None:  # pragma: no cover - set whenever a session is current
            raise SessionClosedError("the tunnel is not connected")
        self._forwards.add(forward)
        try:
            await nursery.start(forward._attach, session)
        except BaseException:
            self._forwards.discard(forward)
            raise
        return forward

    async def aclose(self) -> None:
        """Close every forward and the connection. Bounded in time; idempotent."""
        self._closing = True
        self._cancel_scope.cancel()
        await self._done.wait()

    def _require_nursery(self) -> trio.Nursery:
        if self._nursery is None or self._closing:
            raise SessionClosedError("the tunnel is closed")
        return self._nursery

    async def _current_session(self) -> Session:
        self._require_nursery()
        if not self.connected:
            await self.wait_connected(self.config.outage_wait)
        session = self.session
        if session is None or session.closed:
            raise SessionClosedError("the tunnel is not connected")
        return session

    # ------------------------------------------------------------------ running

    async def _run(
        self, *, task_status: trio.TaskStatus[Tunnel] = trio.TASK_STATUS_IGNORED
    ) -> None:
        # The first connection happens before any nursery exists, so its failure reaches the
        # caller of connect() as the typed exception itself, not inside an ExceptionGroup.
        first = await self._establish(self._first_stream)
        try:
            with self._cancel_scope:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    await self._supervise(first, task_status)
                    self._end_forwards()  # before the cancellation below ends them as stopped
                    nursery.cancel_scope.cancel()
        finally:
            self._closing = True
            self._nursery = None
            self._end_forwards()
            for channel in self._subscribers:
                channel.close()
            self._done.set()

    def _end_forwards(self) -> None:
        if self.failure is not None:
            for forward in list(self._forwards):
                forward._fail(self.failure, f"tunnel ended: {self.failure}")
        for forward in list(self._forwards):
            forward._set_status(ForwardStatus.STOPPED, "tunnel closed")

    async def _establish(
        self, stream: trio.abc.Stream | None
    ) -> tuple[trio.abc.Stream, HandshakeResult]:
        """Open a connection (unless given one) and authenticate; close it on failure."""
        config = self.config
        use_tls = config.tls is not None or config.tls_fingerprint is not None
        if use_tls and self._tls_context is None:
            self._tls_context = await client_tls_context(pinned=True)
        if stream is None:
            if self._connector is None:
                raise SessionClosedError("nothing to reconnect to")
            stream = await self._connector()
        if use_tls and self._tls_context is not None:
            stream = await tls_connect(
                stream,
                self._tls_context,
                server_hostname=config.tls_server_hostname or self.server_host,
                fingerprint=config.tls_fingerprint,
                timeout=config.handshake_timeout,
            )
        try:
            result = await client_handshake(
                stream,
                self.config.token,
                timeout=self.config.handshake_timeout,
                max_frame_size=self.config.session.max_frame_size,
                client_id=self.client_id,
            )
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        return stream, result

    async def _supervise(
        self,
        first: tuple[trio.abc.Stream, HandshakeResult],
        task_status: trio.TaskStatus[Tunnel],
    ) -> None:
        """Run a session until it ends, back off, reconnect; until told to stop or giving up.

        Never reconnects after an authentication or version failure: retrying cannot fix it.
        """
        await self._run_session(*first, task_status)
        attempt = 0
        #: The server's own word on when to come back (a RATE_LIMITED refusal's retry time):
        #: an attempt before it would only be refused again.
        not_before = 0.0
        while not self._closing:
            if not self.config.reconnect or self._connector is None:
                self.failure = SessionClosedError("the connection to the server was lost")
                return
            attempt += 1
            if self.config.max_attempts is not None and attempt > self.config.max_attempts:
                self.failure = ConnectError(
                    f"gave up after {self.config.max_attempts} reconnection attempts"
                )
                log.error("%s", self.failure)
                return
            delay = max(self.config.backoff(attempt), not_before - trio.current_time())
            log.info("reconnecting in %.1f s (attempt %d)", delay, attempt)
            self._emit(
                TunnelEvent(EventKind.RECONNECT_ATTEMPT, f"attempt {attempt} in {delay:.1f} s")
            )
            await trio.sleep(delay)
            try:
                stream, result = await self._establish(None)
            except (AuthenticationError, VersionMismatchError) as exc:
                log.error("giving up: %s", exc)
                self.failure = exc
                return
            except TunnelError as exc:
                log.warning("reconnection attempt %d failed: %s", attempt, exc)
                self._emit(TunnelEvent(EventKind.RECONNECT_FAILED, str(exc)))
                if isinstance(exc, RateLimitedError) and exc.retry_after is not None:
                    # capped: the refusal comes before authentication, so anything that answers
                    # the connection could name years; beyond the cap the backoff rules again
                    wait = min(exc.retry_after, max(self.config.backoff_max, _MAX_RETRY_AFTER))
                    not_before = trio.current_time() + wait
                continue
            self.reconnects += 1
            log.info("reconnected after %d attempt(s)", attempt)
            attempt = 0
            await self._run_session(stream, result, None)

    async def _run_session(
        self,
        stream: trio.abc.Stream,
        result: HandshakeResult,
        task_status: trio.TaskStatus[Tunnel] | None,
    ) -> None:
        try:
            async with (
                open_session(
                    stream,
                    Role.CLIENT,
                    self.config.session,
                    decoder=result.decoder,
                    peer_max_frame_size=result.peer_max_frame_size,
                    name="client",
                ) as session,
                trio.open_nursery() as nursery,
            ):
                self.session = session
                self._session_nursery = nursery
                nursery.start_soon(self._heartbeat, session)
                for forward in list(self._forwards):
                    if isinstance(forward, RemoteForward):
                        nursery.start_soon(forward._reattach, session)
                    elif forward.status is ForwardStatus.SUSPENDED:
                        forward._set_status(ForwardStatus.ACTIVE, "link restored")
                self._link_changed.unpark_all()
                self._emit(TunnelEvent(EventKind.CONNECTED, "link up"))
                if task_status is not None:
                    task_status.started(self)
                await self._accept_loop(session)
                nursery.cancel_scope.cancel()
        finally:
            reason = self.session.close_reason if self.session is not None else None
            self.session = None
            self._session_nursery = None
            self._link_changed.unpark_all()
            await trio.aclose_forcefully(stream)
            if not self._closing:
                log.warning("tunnel connection lost: %s", _describe_reason(reason))
                self._emit(TunnelEvent(EventKind.DISCONNECTED, _describe_reason(reason)))
                for forward in list(self._forwards):
                    if forward.status in (ForwardStatus.ACTIVE, ForwardStatus.OFFLINE):
                        forward._set_status(ForwardStatus.SUSPENDED, "tunnel connection lost")

    async def _heartbeat(self, session: Session) -> None:
        """Ping every ``heartbeat_interval``; a pong missing for ``heartbeat_timeout`` means a
        dead link, found by the clock rather than by the kernel's retransmission timeout."""
        config = self.config
        while True:
            await trio.sleep(config.heartbeat_interval)
            with trio.move_on_after(config.heartbeat_timeout):
                try:
                    self.rtt = await session.ping()
                except SessionClosedError:
                    return
                continue
            log.warning(
                "no heartbeat answer within %g s: the link is dead", config.heartbeat_timeout
            )
            self._emit(
                TunnelEvent(
                    EventKind.HEARTBEAT_LOST,
                    f"no answer within {config.heartbeat_timeout:g} s",
                )
            )
            await session.abort(
                SessionClosedError(
                    f"no heartbeat answer within {config.heartbeat_timeout:g} s",
                    code=ErrorCode.HEARTBEAT_TIMEOUT,
                )
            )
            return

    async def _accept_loop(self, session: Session) -> None:
        while True:
            try:
                incoming = await session.accept_stream()
            except SessionClosedError:
                return
            forward = self._remote.get(incoming.tag)
            if forward is None:
                incoming.refuse(ErrorCode.FORWARD_FAILED, f"no forward with id {incoming.tag}")
            elif incoming.datagrams != isinstance(forward, UdpRemoteForward):
                incoming.refuse(
                    ErrorCode.PROTOCOL_ERROR,
                    f"forward {incoming.tag} does not take a "
                    f"{'datagram' if incoming.datagrams else 'byte'} stream",
                )
            else:
                forward._dispatch(incoming)


def _describe_reason(reason: BaseException | None) -> str:
    if reason is None:
        return "unknown reason"
    return str(reason) or type(reason).__name__


_LOCAL_KINDS: dict[str, type[LocalForward]] = {"tcp": LocalForward, "udp": UdpLocalForward}
_REMOTE_KINDS: dict[str, type[RemoteForward]] = {"tcp": RemoteForward, "udp": UdpRemoteForward}


def _protocol(protocol: str) -> str:
    if protocol not in ("tcp", "udp"):
        raise ValueError(f"protocol must be 'tcp' or 'udp', not {protocol!r}")
    return protocol


def _split_address(address: str | tuple[str, int]) -> tuple[str, int]:
    if isinstance(address, tuple):
        return address
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {address!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def tcp_connector(address: str | tuple[str, int], timeout: float) -> Connector:
    """A connector that opens a TCP connection to the server, or raises ``ConnectError``."""
    host, port = _split_address(address)

    async def connect_tcp() -> trio.abc.Stream:
        try:
            with trio.fail_after(timeout):
                return await trio.open_tcp_stream(host, port)
        except trio.TooSlowError:
            raise ConnectError(
                f"cannot reach tunnel server {format_target(host, port)}: timed out"
            ) from None
        except OSError as exc:
            raise ConnectError(
                f"cannot reach tunnel server {format_target(host, port)}: {describe_os_error(exc)}"
            ) from None

    return connect_tcp


def _config(
    token: str | bytes | None, config: ClientConfig | None, options: ClientOptions
) -> ClientConfig:
    """The one configuration of a tunnel: the token comes either from ``token`` or from
    ``config``, never from both (two tokens that could disagree)."""
    if config is None:
        if token is None:
            raise TypeError("a token is needed: pass token=... or config=ClientConfig(token=...)")
        return ClientConfig(token=token, **options)
    if token is not None:
        raise TypeError("the token is given twice: pass it as token=... or in config, not both")
    return attrs.evolve(config, **options)


async def wrap_tunnel(
    nursery: trio.Nursery,
    stream: trio.abc.Stream,
    *,
    token: str | bytes | None = None,
    config: ClientConfig | None = None,
    **options: Unpack[ClientOptions],
) -> Tunnel:
    """Authenticate over an existing trio stream and run the tunnel in ``nursery``.

    Only needed to run a tunnel over a transport pytunnel does not open itself (a memory
    stream in tests, a pipe, a proxy's socket); use :func:`open_tunnel` to reach a server by
    address. There is nothing to reconnect to, so losing the stream ends the tunnel.

    Args:
      nursery: where the tunnel's tasks run; the tunnel ends when it is cancelled.
      stream: the transport, already connected; the tunnel owns and closes it.
      token: the shared secret (or give it in ``config``, not both).
      config: every option in one object; ``options`` override its fields.
      **options: :class:`ClientConfig` fields (see :class:`ClientOptions`).

    Raises:
      AuthenticationError: the server refused the token (1002).
      VersionMismatchError, HandshakeTimeoutError, ConnectError: the handshake failed.
    """
    tunnel = Tunnel(_config(token, config, options), None, stream)
    started: Tunnel = await nursery.start(tunnel._run)
    return started


async def connect_tunnel(
    nursery: trio.Nursery,
    address: str | tuple[str, int],
    *,
    token: str | bytes | None = None,
    config: ClientConfig | None = None,
    **options: Unpack[ClientOptions],
) -> Tunnel:
    """Connect to a server at ``address`` (``"host:port"`` or a tuple) in the caller's nursery.

    For code that already runs a nursery whose lifetime should bound the tunnel; otherwise
    :func:`open_tunnel` is simpler. Same arguments as :func:`open_tunnel`, plus ``nursery``.
    The first connection's failure is raised: ``ConnectError`` (1001) if the server cannot be
    reached, or the handshake's errors. Later losses are handled by reconnecting (unless
    ``reconnect=False``); ``Tunnel.failure`` says why a tunnel ended.
    """
    client_config = _config(token, config, options)
    tunnel = Tunnel(client_config, tcp_connector(address, client_config.connect_timeout))
    tunnel.server_host = _split_address(address)[0]
    started: Tunnel = await nursery.start(tunnel._run)
    return started


@asynccontextmanager
async def open_tunnel(
    address: str | tuple[str, int],
    *,
    token: str | bytes | None = None,
    config: ClientConfig | None = None,
    **options: Unpack[ClientOptions],
) -> AsyncIterator[Tunnel]:
    """``async with pytunnel.open_tunnel("host:7000", token=...) as tunnel:``

    The tier most code wants: the tunnel owns its nursery, and leaving the block closes every
    forward and the connection; no task outlives it.

    Args:
      address: the server, ``"host:port"`` or ``(host, port)``.
      token: the shared secret (or give it in ``config``, not both).
      config: every option in one object; ``options`` override its fields.
      **options: :class:`ClientConfig` fields (``reconnect=False``, ``heartbeat_interval``,
        ...; see :class:`ClientOptions`).

    Raises:
      ConnectError: the server cannot be reached (1001), or the handshake's errors
        (``AuthenticationError``, ...). Errors are raised as themselves, not wrapped in an
        ``ExceptionGroup``.
    """
    error: BaseException | None = None
    with unwrap_cancelled():
        async with trio.open_nursery() as nursery:
            try:
                tunnel = await connect_tunnel(
                    nursery, address, token=token, config=config, **options
                )
            except BaseException as exc:
                error = exc
            else:
                try:
                    yield tunnel
                except BaseException as exc:
                    error = exc
                finally:
                    with trio.CancelScope(shield=True):  # bounded: aclose never waits on the peer
                        await tunnel.aclose()
    if error is not None:
        raise error
