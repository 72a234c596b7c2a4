"""The tunnel client: ``open_tunnel()`` and the :class:`Tunnel` its forwards are declared on.

Three tiers, as in trio-websocket: ``async with open_tunnel(...)`` owns its nursery;
``connect_tunnel(nursery, ...)`` runs in the caller's; ``wrap_tunnel(nursery, stream, ...)``
runs over any trio stream (memory streams in tests; no reconnection, as there is nothing to
reconnect to).

Forwards are declared on the tunnel, not on a connection: a local forward keeps its listening
socket through an outage, a remote forward is registered again (asking for the port it had)
after each reconnect. What a forward does lives in ``forwards/``; keeping the link up
(reconnection, heartbeats) in ``_supervisor.py``; what they share in ``_link.py``. This module
is the facade over them.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import attrs
import trio

from ._client_config import ClientConfig, ClientOptions
from ._dial import dial, format_target
from ._events import EventKind, TunnelEvent
from ._http_rewrite import HttpRouteOptions
from ._link import Link
from ._spec import check_target
from ._supervisor import Connector, Supervisor
from ._util import unwrap_cancelled
from .errors import ConnectError, DialError, TunnelError
from .forwards import (
    DynamicForward,
    Forward,
    ForwardKind,
    ForwardStatus,
    LocalForward,
    NameForward,
    RemoteForward,
    UdpLocalForward,
    UdpRemoteForward,
)
from .forwards.remote import StreamHandler
from .protocol import routes
from .protocol.messages import MAX_GROUP
from .protocol.proxy import ProxyVersion
from .transports._connector import Address, servers_transport

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from .session import MuxStream, Session

__all__ = [
    "ClientConfig",
    "ClientOptions",
    "Connector",
    "DynamicForward",
    "EventKind",
    "Forward",
    "ForwardKind",
    "ForwardStatus",
    "LocalForward",
    "RemoteForward",
    "Tunnel",
    "TunnelEvent",
    "UdpLocalForward",
    "UdpRemoteForward",
    "connect_tunnel",
    "open_tunnel",
    "tcp_connector",
    "wrap_tunnel",
]

_LOCAL_KINDS: dict[str, type[LocalForward]] = {"tcp": LocalForward, "udp": UdpLocalForward}
_REMOTE_KINDS: dict[str, type[RemoteForward]] = {"tcp": RemoteForward, "udp": UdpRemoteForward}


def _check_limit(limit: float | None, kind: str) -> None:
    """A bandwidth limit is bytes per second of a TCP forward (datagrams are not paced)."""
    if limit is None:
        return
    if kind != "tcp":
        raise ValueError("a bandwidth limit applies to TCP forwards only (this forward is UDP)")
    if not (limit > 0 and math.isfinite(limit)):
        raise ValueError(f"a limit must be a positive number of bytes per second, not {limit!r}")


def _group(group: str | None, key: str | bytes | None, kind: str) -> tuple[str, bytes] | None:
    """``(name, secret)`` of a load-balanced group membership, checked; ``None`` without."""
    if group is None and key is None:
        return None
    if not group or not key:
        raise ValueError("a load-balanced group needs both a group name and a group key")
    if kind != "tcp":
        raise ValueError("load-balanced groups are for TCP forwards")
    if len(group.encode()) > MAX_GROUP or not group.isprintable():
        raise ValueError(f"group name {group[:80]!r} is not printable text of 1-{MAX_GROUP} bytes")
    return group, key.encode() if isinstance(key, str) else bytes(key)


def _addresses(address: Address | Sequence[Address]) -> list[Address]:
    """One server (``"host:port"``, ``(host, port)``, a URL) or a list of them."""
    if isinstance(address, str):
        return [address]
    if isinstance(address, tuple) and len(address) == 2 and isinstance(address[1], int):
        return [(str(address[0]), address[1])]
    return list(address)


def _protocol(protocol: str) -> str:
    if protocol not in ("tcp", "udp"):
        raise ValueError(f"protocol must be 'tcp' or 'udp', not {protocol!r}")
    return protocol


class Tunnel:
    """A tunnel client. Set up forwards on it; close it to tear everything down.

    While the link is down (``connected`` false) the tunnel reconnects with exponential
    backoff; ``failure`` is set if it gives up (authentication failure, attempts exhausted).
    Made by :func:`open_tunnel`, :func:`connect_tunnel` or :func:`wrap_tunnel`.
    """

    def __init__(
        self,
        config: ClientConfig,
        connector: Connector | None,
        stream: trio.abc.Stream | None = None,
        *,
        server_host: str | Callable[[], str] | None = None,
        connector_tls: bool = False,
        server: Callable[[], str] | None = None,
        on_refused: Callable[[], bool] | None = None,
    ) -> None:
        self.config = config
        self._server = server
        #: This client's identity at the server, the same for every connection of the tunnel.
        self.client_id = config.client_id or secrets.token_hex(16)
        self._link = Link(config)
        self._supervisor = Supervisor(
            self._link,
            connector,
            stream,
            client_id=self.client_id,
            server_host=server_host,
            connector_tls=connector_tls,
            on_refused=on_refused,
        )

    # ------------------------------------------------------------------ state

    @property
    def server(self) -> str | None:
        """The server the current (or last) connection reached, as it was given: with
        several server addresses, the one that answered. ``None`` over a given stream."""
        return None if self._server is None else self._server()

    @property
    def session(self) -> Session | None:
        """The current session, ``None`` while disconnected."""
        return self._link.session

    @property
    def rtt(self) -> float | None:
        """Round-trip time of the last heartbeat, in seconds."""
        return self._supervisor.rtt

    @property
    def reconnects(self) -> int:
        """Successful reconnections so far."""
        return self._supervisor.reconnects

    @property
    def failure(self) -> TunnelError | None:
        """Why the tunnel ended by itself, if it did."""
        return self._supervisor.failure

    @property
    def forwards(self) -> list[Forward]:
        """The forwards currently declared (any status but stopped/error)."""
        return self._link.forwards

    @property
    def connected(self) -> bool:
        return self._link.connected

    @property
    def closed(self) -> bool:
        return self._supervisor.done

    async def wait_closed(self) -> None:
        """Until the tunnel has ended: closed by us, or it gave up (see ``failure``)."""
        await self._supervisor.wait_done()

    async def wait_connected(self, timeout: float = math.inf) -> bool:
        """Until the link is up (True) or ``timeout`` passed (False)."""
        return await self._link.wait_connected(timeout)

    # ------------------------------------------------------------------ events

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
        return self._link.events.subscribe(buffer)

    @property
    def max_subscribers(self) -> int:
        """Event subscribers kept at once (see :meth:`events`)."""
        return self._link.events.max_subscribers

    @max_subscribers.setter
    def max_subscribers(self, value: int) -> None:
        self._link.events.max_subscribers = value

    @property
    def subscriber_count(self) -> int:
        """Event subscribers kept right now."""
        return self._link.events.subscriber_count

    @property
    def dropped_events(self) -> int:
        """Events not delivered because a subscriber's buffer was full."""
        return self._link.events.dropped_events

    @property
    def dropped_subscribers(self) -> int:
        """Subscribers unsubscribed because there were more than ``max_subscribers``."""
        return self._link.events.dropped_subscribers

    # ------------------------------------------------------------------ user API

    async def open_stream(self, host: str, port: int) -> MuxStream:
        """A stream to ``host:port`` that exits at the server (it dials there).

        Waits up to ``outage_wait`` for the link if it is down. Raises ``NodeTimeoutError`` /
        ``NodeUnstableError`` if the server's dial fails, ``TargetForbiddenError`` if its
        policy refuses, ``SessionClosedError`` if there is no link.
        """
        return await self._link.open(host, port, routes.CONNECT)

    async def forward_local(
        self,
        target_host: str,
        target_port: int,
        *,
        local_port: int = 0,
        local_host: str = "127.0.0.1",
        protocol: str = "tcp",
        limit: float | None = None,
    ) -> LocalForward:
        """Listen on ``local_host:local_port`` here; relay each connection to the target,
        dialled by the server. Raises ``AddressInUseError`` / ``PermissionDeniedError``, or
        ``InvalidTargetError`` for a target no connection could ever reach.

        ``limit``: bytes per second in each direction, all connections together (TCP only;
        :meth:`Forward.set_limit` changes it later)."""
        check_target(target_host, target_port)
        kind = _protocol(protocol)
        _check_limit(limit, kind)
        forward = _LOCAL_KINDS[kind](self._link, target_host, target_port)
        forward.set_limit(limit)
        await forward.start(local_host, local_port)
        return forward

    async def forward_dynamic(
        self,
        *,
        local_port: int = 0,
        local_host: str = "127.0.0.1",
        auth: tuple[str, str] | None = None,
        negotiation_timeout: float = 10.0,
        limit: float | None = None,
    ) -> DynamicForward:
        """A SOCKS proxy on ``local_host:local_port`` whose connections exit at the server
        (``ssh -D``). ``auth``: require RFC 1929 username/password (SOCKS5 only then).
        ``limit``: as for :meth:`forward_local`."""
        _check_limit(limit, "tcp")
        forward = DynamicForward(self._link, auth, negotiation_timeout)
        forward.set_limit(limit)
        await forward.start(local_host, local_port)
        return forward

    async def forward_remote(
        self,
        target_host: str | None = None,
        target_port: int | None = None,
        *,
        remote_port: int = 0,
        remote_host: str = "",
        connect_timeout: float | None = None,
        protocol: str = "tcp",
        proxy_protocol: ProxyVersion | None = None,
        limit: float | None = None,
        group: str | None = None,
        group_key: str | bytes | None = None,
        handler: StreamHandler | None = None,
    ) -> RemoteForward:
        """Ask the server to listen on ``remote_port`` (0: any); relay each connection there
        to the target, dialled here. Raises ``AddressInUseError``, ``PermissionDeniedError``,
        ``PortNotAllowedError`` or ``ForwardLimitError`` and leaves nothing bound;
        ``InvalidTargetError`` for a target (or remote host) no request can carry.

        ``proxy_protocol`` (``"v1"`` or ``"v2"``, TCP only) starts every connection to the
        target with a PROXY protocol header naming the public peer's address, for services
        (nginx ``listen ... proxy_protocol``, HAProxy, Postfix) that then see who connected.
        ``limit``: as for :meth:`forward_local`.

        ``group`` and ``group_key`` (TCP, a fixed ``remote_port``): join the load-balanced
        group of that name serving the port, or form it; the server spreads the public
        connections across the group's live members, and refuses a member with another
        name or key (``GroupMismatchError``).

        ``handler`` instead of a target: each public connection's stream is handed to
        ``handler(stream)`` here, with no local port and no dial (an HTTP server's
        ``handle_stream``, say); TCP only."""
        if handler is not None:
            return await self._forward_to_handler(
                handler,
                target_host,
                target_port,
                remote_host,
                remote_port,
                protocol,
                proxy_protocol,
                limit,
                connect_timeout,
                _group(group, group_key, _protocol(protocol)),
            )
        if target_host is None or target_port is None:
            raise TypeError("forward_remote needs a target (host and port) or a handler")
        check_target(target_host, target_port)
        check_target(remote_host, remote_port, allow_port_zero=True)
        kind = _protocol(protocol)
        _check_limit(limit, kind)
        membership = _group(group, group_key, kind)
        if membership is not None and not remote_port:
            raise ValueError("a load-balanced group needs a fixed remote_port, not 0")
        if proxy_protocol is not None and (kind != "tcp" or proxy_protocol not in ("v1", "v2")):
            raise ValueError(
                f"proxy_protocol must be 'v1' or 'v2' on a TCP forward, not {proxy_protocol!r}"
                + ("" if kind == "tcp" else " (this forward is UDP)")
            )
        timeout = self.config.connect_timeout if connect_timeout is None else connect_timeout
        args = (self._link, target_host, target_port, remote_host, remote_port, timeout)
        if proxy_protocol is None and membership is None:
            forward = _REMOTE_KINDS[kind](*args)
        else:
            forward = RemoteForward(*args, proxy_protocol=proxy_protocol, group=membership)
        forward.set_limit(limit)
        await forward.start()
        return forward

    async def forward_name(
        self,
        name: str,
        target_host: str,
        target_port: int,
        *,
        tls: bool = False,
        connect_timeout: float | None = None,
        proxy_protocol: ProxyVersion | None = None,
        limit: float | None = None,
        forwarded_headers: bool = False,
        rewrite_host: str | None = None,
        basic_auth: tuple[str, str] | None = None,
        group: str | None = None,
        group_key: str | bytes | None = None,
    ) -> NameForward:
        """Route the host name ``name`` on the server's shared HTTP listener (with ``tls``,
        its shared HTTPS listener) to the target, dialled here.

        ``name`` is a single label (``app``, which the server puts under its ``--domain``) or
        a full name its ``--allow-domains`` admit. HTTP is routed by the request's ``Host``,
        TLS by the ClientHello's server name and passed through untouched: the target holds
        the certificate. ``forward.url`` says where the public reaches it. Raises
        ``NameInUseError`` (another client holds the name), ``NameNotAllowedError`` or
        ``ForwardLimitError``; ``proxy_protocol`` and ``limit`` as for
        :meth:`forward_remote`.

        HTTP routes only, applied here to every request of each connection:
        ``forwarded_headers`` adds ``X-Forwarded-For``/``-Proto``/``-Host`` and
        ``Forwarded`` naming the public peer; ``rewrite_host`` replaces ``Host``;
        ``basic_auth=(user, password)`` answers 401 to requests without them.

        ``group`` and ``group_key``: as for :meth:`forward_remote`, for the name."""
        check_target(target_host, target_port)
        _check_limit(limit, "tcp")
        if proxy_protocol is not None and proxy_protocol not in ("v1", "v2"):
            raise ValueError(f"proxy_protocol must be 'v1' or 'v2', not {proxy_protocol!r}")
        if not name or len(name.encode()) > 253:
            raise ValueError(f"not a host name: {name[:80]!r}")
        http = HttpRouteOptions(forwarded_headers, rewrite_host, basic_auth)
        if tls and http.active:
            raise ValueError(
                "forwarded_headers, rewrite_host and basic_auth need an HTTP route: a TLS "
                "route is passed through encrypted"
            )
        timeout = self.config.connect_timeout if connect_timeout is None else connect_timeout
        forward = NameForward(
            self._link,
            target_host,
            target_port,
            name,
            timeout,
            tls=tls,
            proxy_protocol=proxy_protocol,
            http=http,
            group=_group(group, group_key, "tcp"),
        )
        forward.set_limit(limit)
        await forward.start()
        return forward

    async def _forward_to_handler(
        self,
        handler: StreamHandler,
        target_host: str | None,
        target_port: int | None,
        remote_host: str,
        remote_port: int,
        protocol: str,
        proxy_protocol: ProxyVersion | None,
        limit: float | None,
        connect_timeout: float | None,
        membership: tuple[str, bytes] | None,
    ) -> RemoteForward:
        if target_host is not None or target_port is not None:
            raise TypeError("forward_remote takes a target or a handler, not both")
        if _protocol(protocol) != "tcp" or proxy_protocol is not None or limit is not None:
            raise ValueError("a handler serves TCP streams, with no PROXY header and no limit")
        check_target(remote_host, remote_port, allow_port_zero=True)
        if membership is not None and not remote_port:
            raise ValueError("a load-balanced group needs a fixed remote_port, not 0")
        timeout = self.config.connect_timeout if connect_timeout is None else connect_timeout
        name = getattr(handler, "__qualname__", type(handler).__name__)
        forward = RemoteForward(
            self._link,
            f"<{name}>",
            0,
            remote_host,
            remote_port,
            timeout,
            handler=handler,
            group=membership,
        )
        await forward.start()
        return forward

    async def aclose(self) -> None:
        """Close every forward and the connection. Bounded in time; idempotent."""
        await self._supervisor.stop()

    async def _run(
        self, *, task_status: trio.TaskStatus[Tunnel] = trio.TASK_STATUS_IGNORED
    ) -> None:
        await self._supervisor.run(lambda: task_status.started(self))


def tcp_connector(host: str, port: int, timeout: float) -> Connector:
    """A connector that opens a TCP connection to the server, or raises ``ConnectError``
    (the dial's own timeout and failure categories, said as "cannot reach the server")."""

    async def connect_tcp() -> trio.abc.Stream:
        try:
            return await dial(host, port, timeout=timeout, level=logging.DEBUG)
        except DialError as exc:
            raise ConnectError(
                f"cannot reach tunnel server {format_target(host, port)}: {exc.reason}"
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
    address: Address | Sequence[Address],
    *,
    token: str | bytes | None = None,
    config: ClientConfig | None = None,
    **options: Unpack[ClientOptions],
) -> Tunnel:
    """Connect to a server at ``address`` (``"host:port"``, a tuple, or a ``ws://`` /
    ``wss://`` URL, or a list of them) in the caller's nursery.

    For code that already runs a nursery whose lifetime should bound the tunnel; otherwise
    :func:`open_tunnel` is simpler. Same arguments as :func:`open_tunnel`, plus ``nursery``.
    The first connection's failure is raised: ``ConnectError`` (1001) if the server cannot be
    reached, or the handshake's errors. Later losses are handled by reconnecting (unless
    ``reconnect=False``); ``Tunnel.failure`` says why a tunnel ended.
    """
    client_config = _config(token, config, options)
    transport = servers_transport(_addresses(address), client_config, direct=tcp_connector)
    tunnel = Tunnel(
        client_config,
        transport.connector,
        server_host=transport.server_host,
        connector_tls=transport.carries_tls,
        server=transport.current,
        on_refused=transport.passed_over,
    )
    started: Tunnel = await nursery.start(tunnel._run)
    return started


@asynccontextmanager
async def open_tunnel(
    address: Address | Sequence[Address],
    *,
    token: str | bytes | None = None,
    config: ClientConfig | None = None,
    **options: Unpack[ClientOptions],
) -> AsyncIterator[Tunnel]:
    """``async with pytunnel.open_tunnel("host:7000", token=...) as tunnel:``

    The tier most code wants: the tunnel owns its nursery, and leaving the block closes every
    forward and the connection; no task outlives it.

    Args:
      address: the server, ``"host:port"`` or ``(host, port)``; or a WebSocket endpoint,
        ``ws://host[:port]/path`` or ``wss://...`` (see ``docs/transports.md``: then the TLS
        options describe the ``wss://`` layer, and ``ws_headers`` / ``ws_host`` /
        ``ws_ping_interval`` apply). ``proxy=`` reaches either through a proxy. A list of
        servers: each connection (the first and every reconnection) goes to the first that
        answers, tried in order 250 ms apart (happy eyeballs across servers); forwards are
        restored on whichever it reaches. ``Tunnel.server`` says which.
      token: the shared secret (or give it in ``config``, not both).
      config: every option in one object; ``options`` override its fields.
      **options: :class:`ClientConfig` fields (``reconnect=False``, ``heartbeat_interval``,
        ...; see :class:`ClientOptions`).

    Raises:
      ConnectError: the server cannot be reached (1001), or the handshake's errors
        (``AuthenticationError``, ...); ``ProxyError`` (1020) for a proxy that fails,
        ``WebSocketError`` (1021) for a refused upgrade. Errors are raised as themselves,
        not wrapped in an ``ExceptionGroup``.
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
