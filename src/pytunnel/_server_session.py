"""One authenticated client on the server: route dispatch, heartbeat watchdog, stream budget
and bind policy.

Everything the client causes runs in its session nursery, so that ending the session ends it
all. It does not know how connections are admitted (see ``_admission``) nor how the server
listens for control connections (``server``).
"""

from __future__ import annotations

import functools
import logging
import random
import secrets
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import trio

from ._control import ControlChannel
from ._dial import dial_permitted, format_target
from ._egress import refuse_wrong_kind, serve_egress
from ._ingress import carry_over_stream
from ._listen import bind, bind_udp, bound_port
from ._node_link import take_relayed_association
from ._proxied import Network
from ._relay import RelayStats, relay
from ._udp import (
    relay_association,
    serve_associations,
    udp_connect,
)
from ._util import Episodes, aclose_all
from ._vhost import NameRoutes
from .cluster._ownership import (
    claim_or_refuse,
    group_owner,
    leave_quietly,
    member_state_quietly,
    name_key,
    port_key,
    refusal,
    release_quietly,
)
from .errors import (
    AddressInUseError,
    DialError,
    ErrorCode,
    ForwardError,
    ForwardLimitError,
    NameInUseError,
    NameNotAllowedError,
    PortNotAllowedError,
    RemoteProtocolError,
    SessionClosedError,
    TargetForbiddenError,
    TunnelError,
    UnansweredError,
    printable,
    refusal_code,
)
from .forwards._group import Group, PortGroup
from .forwards._public_name import _Endpoint, _PublicName, group_route
from .forwards._public_port import _PublicPort
from .protocol import routes
from .protocol.control import ControlRole
from .protocol.messages import Bound
from .session import (
    IncomingStream,
    MuxStream,
    Session,
    wait_stream_end,
)

if TYPE_CHECKING:
    from .server import TunnelServer


log = logging.getLogger("pytunnel.server")

_PORT_0_ATTEMPTS = 64
#: What a remote forward binds: TCP listeners or a UDP socket.
_Closeable = TypeVar("_Closeable", list[trio.SocketListener], trio.socket.SocketType)
_Bound = TypeVar("_Bound")
_T = TypeVar("_T")


class _Membership(NamedTuple):
    """One member's place in a group cluster-wide: the group's key, its owner string, and
    the member's own id (``<node-id>/<id>``), as the registry takes them."""

    key: str
    group: str
    member: str


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
        #: Wall-clock time the client was admitted.
        self.connected_at = time.time()
        #: The software and version the client named (``CLIENT_INFO``); ``None`` until it
        #: does, and for good from a client that predates the route.
        self.software: str | None = None
        #: Round-trip time of the server's last ping to the client, in seconds.
        self.rtt: float | None = None
        #: Name group members admitted and not yet ended (counted with the names).
        self._pending_members = 0
        #: Streams refused at the server's limit since the last one admitted.
        self._refused_streams: Episodes[None] = Episodes()
        #: The client's TCP remote forwards, whose listeners close the moment the session ends.
        self.public_ports: set[_PublicPort] = set()
        #: The client's UDP remote forwards: the ``host:port`` of each public port, with its
        #: control stream's id and its counters (associations, bytes, datagrams dropped).
        self.udp_ports: dict[str, tuple[int, RelayStats]] = {}
        #: The client's name routes, given back the moment the session ends.
        self.public_names: set[_PublicName] = set()
        #: The client's memberships of load-balanced groups, left the moment it ends.
        self.memberships: set[_Endpoint] = set()
        #: Set once nothing of this client runs any more (listeners closed, relays gone).
        self.ended = trio.Event()
        #: Who holds what this session claims in the cluster: ``<node-id>/<session>``.
        node = server.cluster.node_id if server.cluster is not None else "local"
        self.owner = f"{node}/{secrets.token_hex(6)}"

    def routes(self) -> list[_Endpoint]:
        """Its name routes and group memberships, in a stable order (the admin API's)."""
        return sorted([*self.public_names, *self.memberships], key=lambda e: e.what)

    def _stop_listening(self) -> None:
        for forward in list(self.public_ports):
            forward.stop_listening()
        for name in list(self.public_names):
            name.stop_listening()
        for member in list(self.memberships):
            member.stop_listening()

    async def run(self) -> None:
        # Called inside the session's end, before its streams (and so the relays) break.
        self.session.on_terminate(self._stop_listening)
        async with trio.open_nursery() as nursery:  # the session nursery
            nursery.start_soon(self._watch_heartbeat)
            nursery.start_soon(self._measure_rtt)
            while True:
                try:
                    incoming = await self.session.accept_stream()
                except SessionClosedError:
                    break
                if refuse_wrong_kind(incoming, incoming.tag == routes.UDP_CONNECT):
                    pass
                elif incoming.tag == routes.CLIENT_INFO:
                    self._record_software(incoming)
                elif incoming.tag in (routes.CONNECT, routes.UDP_CONNECT):
                    if self.reserve_stream(incoming):
                        handler = (
                            self._serve_connect
                            if incoming.tag == routes.CONNECT
                            else self._serve_udp_connect
                        )
                        nursery.start_soon(self._counted, handler, incoming)
                elif incoming.tag == routes.NAME:
                    route = self._register_name(incoming)
                    if route is not None:
                        nursery.start_soon(self._serve_name, incoming, route)
                elif incoming.tag in (routes.LISTEN_GROUP, routes.NAME_GROUP):
                    if self._admit_group_member(incoming):
                        nursery.start_soon(self._serve_group_member, incoming)
                elif incoming.tag in (routes.LISTEN, routes.UDP_LISTEN):
                    if self.forwards >= self.config.max_forwards_per_client:
                        self.server.count_limit("forwards")
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

    async def _measure_rtt(self) -> None:
        """Ping the client at once and then every ``heartbeat_check_interval``, for the RTT
        the admin API and the metrics show. The client's own pings keep the link alive and
        tell the client its RTT; a server learns nothing from answering them, so it asks
        for itself (a few bytes per client every few seconds). An unanswered ping is
        abandoned after ``heartbeat_timeout``: the watchdog drops such a client."""
        while True:
            with trio.move_on_after(self.config.heartbeat_timeout):
                try:
                    self.rtt = await self.session.ping()
                except SessionClosedError:
                    return
            await trio.sleep(self.config.heartbeat_check_interval)

    def _record_software(self, incoming: IncomingStream) -> None:
        """Keep the first software name the client gives (escaped: it is the peer's text,
        and cut short: it is shown, not parsed); the stream carries nothing."""
        if self.software is None:
            self.software = printable(incoming.host[:64])
            log.info("client %s runs %s", self.peer, self.software)
        incoming.refuse(ErrorCode.NORMAL, "")

    @property
    def trusted_proxies(self) -> tuple[Network, ...]:
        """Proxies whose PROXY header names a public connection's real source (the server's
        configuration as it is now, reloads included)."""
        return self.config.trusted_proxies

    def reserve_stream(self, incoming: IncomingStream | None = None) -> bool:
        """Take one of the server's stream slots at admission (before any dial), so a burst
        cannot overshoot the limit; released by :meth:`_counted` when the stream's task ends."""
        if self.server.active_streams < self.config.max_streams:
            self.server.active_streams += 1
            self.server.total_streams += 1
            refused = self._refused_streams.end(None)
            if refused:
                log.info(
                    "client %s: streams admitted again after %d refused at the server's limit",
                    self.peer,
                    refused,
                )
            return True
        self.server.count_limit("streams")
        if self._refused_streams.refuse(None):
            log.warning(
                "client %s: refusing streams: the server's limit of %d streams is reached",
                self.peer,
                self.config.max_streams,
            )
        if incoming is not None:
            incoming.refuse(ErrorCode.STREAM_LIMIT, "server stream limit reached")
        return False

    def release_stream(self) -> None:
        """Give back a slot taken by :meth:`reserve_stream`."""
        self.server.active_streams -= 1

    async def _counted(self, handler: Callable[[_T], Awaitable[None]], item: _T) -> None:
        try:
            await handler(item)
        finally:
            self.release_stream()

    def _relay(
        self,
        a: trio.abc.HalfCloseableStream,
        b: trio.abc.HalfCloseableStream,
        name: str,
        stats: RelayStats | None = None,
    ) -> Coroutine[Any, Any, None]:
        # the relay's coroutine itself, not one awaiting it: no frame of this wrapper stays
        # parked above each of thousands of idle relays
        return relay(a, b, idle_timeout=self.config.idle_timeout, name=name, stats=stats)

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

        # the client may give up (Reset) while we dial, cancelling it; nothing the dial
        # alone needs is held in this frame, which stays parked above the relay
        carried = await serve_egress(
            incoming,
            functools.partial(
                dial_permitted,
                self.config.permit_open,
                host,
                port,
                timeout=self.config.connect_timeout,
                logger=log,
            ),
            functools.partial(self._relay, name=f"{self.peer}->{target}"),
            functools.partial(self._dial_failed, target),
        )
        if not carried and incoming.abandoned:
            log.debug("client %s: open of %s cancelled during the dial", self.peer, target)

    def _dial_failed(self, target: str, exc: DialError) -> None:
        if isinstance(exc, TargetForbiddenError):
            log.warning("[TARGET_FORBIDDEN] client %s may not open %s", self.peer, target)

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

    def _udp_room(self) -> Session:
        return self.session

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
        await serve_egress(
            incoming,
            functools.partial(udp_connect, host, port, buffer=self.config.udp_socket_buffer),
            functools.partial(
                relay_association,
                idle_timeout=self.config.udp_idle_timeout,
                stats=self.server.udp_stats,
                room=self._udp_room,
            ),
        )

    async def _serve_udp_listen(self, incoming: IncomingStream) -> None:
        try:
            await self._run_udp_forward(incoming)
        finally:
            self.forwards -= 1

    async def _run_udp_forward(self, incoming: IncomingStream) -> None:
        try:
            sock = await self._bind_owned(
                incoming.host,
                incoming.port,
                functools.partial(bind_udp, buffer=self.config.udp_socket_buffer),
                _socket_port,
                kind="udp",
            )
        except ForwardError as exc:
            log.warning("client %s: udp remote forward refused: %s", self.peer, exc)
            incoming.refuse_with(exc)
            return
        try:
            control = incoming.accept()
        except SessionClosedError:
            chosen = _socket_port(sock)
            sock.close()
            await self._release_port(chosen, kind="udp")
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
            return self.reserve_stream(None)

        def release_association() -> None:
            self.release_stream()

        try:
            await ControlChannel(control, ControlRole.SERVER).send(Bound(host, port))
            log.info("client %s: udp remote forward listening on %s", self.peer, address)
            self.udp_ports[address] = (control.stream_id, stats)
            async with trio.open_nursery() as nursery:
                # associations another node of the cluster relays here, in this nursery
                self.server.udp_targets[port] = functools.partial(
                    take_relayed_association, self, nursery, open_association, stats
                )
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
                        room=self._udp_room,
                        stats=stats,
                        name=f"udp {address}",
                    )
                )
                await wait_stream_end(control)
                nursery.cancel_scope.cancel()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self.udp_ports.pop(address, None)
            self.server.udp_targets.pop(port, None)
            sock.close()
            try:
                await trio.aclose_forcefully(control)
            finally:  # under cancellation too: the close re-raises it
                await self._release_port(port, kind="udp")
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
            listeners = await self._bind_owned(incoming.host, incoming.port, bind, bound_port)
        except ForwardError as exc:
            log.warning("client %s: remote forward on %s refused: %s", self.peer, requested, exc)
            incoming.refuse_with(exc)
            return
        host, port = self.config.public_host, bound_port(listeners)  # read while it is open
        try:
            control = incoming.accept()
        except SessionClosedError:
            try:
                await aclose_all(*listeners)
            finally:  # under cancellation too: the close re-raises it
                await self._release_port(port)
            return
        forward = _PublicPort(self, control, host, port, listeners)
        self.public_ports.add(forward)
        if self.session.closed:  # ended while we were binding
            forward.stop_listening()
        # Unless the client ends the forward itself, it learns why by a Reset code: GOING_AWAY
        # (server or session shutting down: the forward is suspended, to be restored) or the
        # failure's own code.
        outcome: TunnelError | None = SessionClosedError("server shutting down")
        try:
            channel = ControlChannel(control, ControlRole.SERVER)
            await channel.send(Bound(host, port))
            log.info("client %s: remote forward listening on %s", self.peer, forward.address)
            async with trio.open_nursery() as nursery:
                forward.relays = nursery
                forward.start_accepting()
                try:
                    await forward.follow_control_stream(channel)
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
            try:
                await aclose_all(*forward.listeners, control)
            finally:  # under cancellation too: the close re-raises it
                await self._release_port(port)
            log.info("client %s: remote forward on %s closed", self.peer, forward.address)

    async def _bind_owned(
        self,
        host: str,
        port: int,
        binder: Callable[[str, int], Awaitable[_Closeable]],
        port_of: Callable[[_Closeable], int],
        *,
        kind: str = "tcp",
    ) -> _Closeable:
        """Bind a remote forward's port; in a cluster, only a port this client holds
        cluster-wide: a fixed port is claimed before the bind (one winner of a race across
        nodes, the loser refused with ADDRESS_IN_USE), port 0 is bound first and its port
        claimed, another one tried if a client elsewhere holds it."""
        cluster = self.server.cluster
        if cluster is None:
            return await self._bind(host, port, binder)
        if port:
            address = printable(format_target(host or self.config.public_host, port))
            self._check_bind(host, port)  # a port the policy refuses is never claimed
            await claim_or_refuse(
                cluster,
                port_key(port, kind=kind),
                self.owner,
                what=f"port {port}" if kind == "tcp" else f"{kind} port {port}",
                address=address,
            )
            self.server.stop_mirror(port, kind=kind)
            try:
                return await self._bind(host, port, binder)
            except BaseException:
                await self._release_port(port, kind=kind)
                raise
        for _ in range(_PORT_0_ATTEMPTS):
            bound = await self._bind(host, 0, binder)
            chosen = port_of(bound)
            try:
                await claim_or_refuse(
                    cluster,
                    port_key(chosen, kind=kind),
                    self.owner,
                    what=f"port {chosen}" if kind == "tcp" else f"{kind} port {chosen}",
                    address="",
                )
            except AddressInUseError:
                await _close(bound)
                continue
            except BaseException:
                await _close(bound)
                raise
            return bound
        raise AddressInUseError("no port free across the cluster", address=format_target(host, 0))

    async def _release_port(self, port: int, *, kind: str = "tcp") -> None:
        if self.server.cluster is not None:
            await release_quietly(self.server.cluster, port_key(port, kind=kind), self.owner)

    async def _claim_name(self, incoming: IncomingStream, route: _PublicName) -> bool:
        """In a cluster, claim the name cluster-wide before the route is served (refused
        with NAME_IN_USE when a client on another node holds it); always true on its own."""
        cluster = self.server.cluster
        if cluster is None:
            return True
        try:
            await claim_or_refuse(
                cluster,
                name_key(route.name, tls=route.tls),
                self.owner,
                what=f"name {route.name}",
                address=route.name,
                error=NameInUseError,
            )
        except ForwardError as exc:
            log.warning("client %s: name route %s refused: %s", self.peer, route.name, exc)
            route.stop_listening()
            self.public_names.discard(route)
            incoming.refuse_with(exc)
            return False
        return True

    async def _release_name(self, route: _PublicName) -> None:
        if self.server.cluster is not None:
            key = name_key(route.name, tls=route.tls)
            await release_quietly(self.server.cluster, key, self.owner)

    # ---------------------------------------------------------------- name routes

    def _register_name(self, incoming: IncomingStream) -> _PublicName | None:
        """Register the name route ``incoming`` asks for, or refuse it (and say why).

        Synchronous, in the session's accept loop, so that two requests of one client are
        counted against its limit one after the other."""
        requested = printable(incoming.host[:255])
        limit = self.config.max_names_per_client
        try:
            name_routes, tls = self._name_routes_for(incoming)
            if len(self.public_names) + self._pending_members >= limit:
                raise ForwardLimitError(f"limit of {limit} names reached", address=requested)
            route = _PublicName(self, incoming.stream_id, name_routes, incoming.host, tls=tls)
        except ForwardError as exc:
            log.warning("client %s: name route %s refused: %s", self.peer, requested, exc)
            incoming.refuse_with(exc)
            return None
        self.public_names.add(route)
        return route

    async def _serve_name(self, incoming: IncomingStream, route: _PublicName) -> None:
        if not await self._claim_name(incoming, route):
            return
        try:
            control = incoming.accept()
        except SessionClosedError:
            route.stop_listening()
            self.public_names.discard(route)
            await self._release_name(route)
            return
        if self.session.closed:  # ended while we were registering
            route.stop_listening()
        port = route.routes.port

        def announce() -> None:
            what = "TLS" if route.tls else "HTTP"
            log.info("client %s: routing %s for %s on port %d", self.peer, what, route.name, port)

        outcome: TunnelError | None = SessionClosedError("server shutting down")
        try:
            channel = ControlChannel(control, ControlRole.SERVER)
            outcome = await self._serve_endpoint(route, channel, Bound(route.name, port), announce)
        finally:
            self.public_names.discard(route)
            route.stop_listening()
            if outcome is not None:
                control.reset(outcome.code, outcome.message)
            try:
                await trio.aclose_forcefully(control)
            finally:  # under cancellation too: the close re-raises it
                await self._release_name(route)
            log.info("client %s: name route %s closed", self.peer, route.name)

    async def _serve_endpoint(
        self,
        endpoint: _Endpoint,
        channel: ControlChannel,
        bound: Bound,
        ready: Callable[[], None],
    ) -> TunnelError | None:
        """Answer a name route or group member with ``bound``, carry its connections in a
        nursery of its own until the client ends the control stream, and stop it taking
        any before that nursery is torn down. Returns what to reset the control stream with
        (``None``: nothing to tell); a cancellation propagates, for the caller to reset with
        ``GOING_AWAY``."""
        try:
            await channel.send(bound)
            async with trio.open_nursery() as nursery:
                endpoint.attach(nursery)
                ready()
                try:
                    await endpoint.follow_control_stream(channel)
                    outcome: TunnelError | None = None
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    outcome = None
                except (RemoteProtocolError, ForwardError) as exc:
                    log.warning("client %s: %s failed: %s", self.peer, endpoint.what, exc)
                    outcome = exc
                finally:
                    # no new connection reaches a forward that is going away
                    endpoint.stop_listening()
                nursery.cancel_scope.cancel()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            outcome = None
        return outcome

    # ---------------------------------------------------------------- groups

    def _admit_group_member(self, incoming: IncomingStream) -> bool:
        """A group member is a forward (port) or a name of this client: the same limits."""
        if incoming.tag == routes.NAME_GROUP:
            limit = self.config.max_names_per_client
            if len(self.public_names) + self._pending_members < limit:
                self._pending_members += 1
                return True
            error: ForwardError = ForwardLimitError(f"limit of {limit} names reached")
        else:
            limit = self.config.max_forwards_per_client
            if self.forwards < limit:
                self.forwards += 1
                return True
            error = ForwardLimitError(f"limit of {limit} forwards reached")
        log.warning("client %s: group member refused: %s", self.peer, error.message)
        incoming.refuse_with(error)
        return False

    async def _serve_group_member(self, incoming: IncomingStream) -> None:
        """A forward that joins (or forms) a load-balanced group: accepted first, then its
        ``Join`` read, then its port or name joined, then served like any other."""
        named = incoming.tag == routes.NAME_GROUP
        try:
            try:
                control = incoming.accept()
            except SessionClosedError:
                return
            try:
                await self._run_group_member(incoming, control, named)
            finally:
                await trio.aclose_forcefully(control)
        finally:
            if named:
                self._pending_members -= 1
            else:
                self.forwards -= 1

    async def _run_group_member(
        self, incoming: IncomingStream, control: MuxStream, named: bool
    ) -> None:
        channel = ControlChannel(control, ControlRole.SERVER, grouped=True)
        requested = printable(format_target(incoming.host, incoming.port))
        try:
            with trio.fail_after(self.config.connect_timeout):
                join = await channel.receive_join()
        except (trio.TooSlowError, RemoteProtocolError) as exc:
            reason = "no Join in time" if isinstance(exc, trio.TooSlowError) else exc.message
            log.warning("client %s: group member %s dropped: %s", self.peer, requested, reason)
            control.reset(ErrorCode.PROTOCOL_ERROR, reason)
            return
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.EndOfChannel):
            return
        try:
            # one group formation at a time, so members joining at once cannot race each
            # other to the bind of the group's port
            async with self.server.group_lock:
                member, group, address, membership = await self._join(
                    incoming, join.group, join.proof, named
                )
        except ForwardError as exc:
            log.warning("client %s: group member %s refused: %s", self.peer, requested, exc)
            control.reset(refusal_code(exc), exc.message)
            return
        if self.session.closed:  # ended while we were joining
            member.stop_listening()
        outcome: TunnelError | None = SessionClosedError("server shutting down")
        try:
            outcome = await self._serve_endpoint(
                member, channel, Bound(*address), functools.partial(group.ready, member)
            )
        finally:
            member.stop_listening()
            self.memberships.discard(member)
            self._leave_later(membership)
            if outcome is not None:
                control.reset(outcome.code, outcome.message)
            log.info("client %s: left group %s (%s)", self.peer, printable(group.name), group.what)

    async def _join(
        self, incoming: IncomingStream, name: str, proof: bytes, named: bool
    ) -> tuple[_Endpoint, Group, tuple[str, int], _Membership | None]:
        """Join the group serving the port or name ``incoming`` asks for, forming it here if
        this node has none (in a cluster, joining or forming its hold cluster-wide first);
        raises the refusal (``GroupMismatchError``, ``AddressInUseError``, ...)."""
        groups = self.server.groups
        if named:
            name_routes, tls = self._name_routes_for(incoming)
            full = name_routes.full_name(incoming.host)
            key = ("https" if tls else "http", full)
            group = groups.get(key)
            if group is not None:
                group.check(name, proof)
            membership = await self._join_in_cluster(
                name_key(full, tls=tls), name, proof, f"name {full}", full, NameInUseError
            )

            async def form_name() -> Group:
                group = Group(name, proof, full, lambda g: self._forget_group(key, g))
                target = group_route(group, tls=tls, name=full)
                name_routes.register(full, target)  # NameInUseError if a route holds it
                group.on_given_back = functools.partial(name_routes.unregister, full, target)
                return group

            group = await self._form_or_check(key, name, proof, membership, form_name)
            member: _Endpoint = _PublicName(
                self, incoming.stream_id, name_routes, full, tls=tls, group=group
            )
            address = (full, name_routes.port)
        else:
            host = self._check_bind(incoming.host, incoming.port)
            if not incoming.port:
                raise PortNotAllowedError(
                    "a load-balanced group needs a fixed port, not 0",
                    address=format_target(host, 0),
                )
            key = ("tcp", str(incoming.port))
            address_text = format_target(host, incoming.port)
            group = groups.get(key)
            if group is not None:
                group.check(name, proof)
            membership = await self._join_in_cluster(
                port_key(incoming.port), name, proof, f"port {incoming.port}", address_text
            )

            async def form_port() -> Group:
                self.server.stop_mirror(incoming.port)
                listeners = await bind(host, incoming.port)
                return PortGroup(
                    name,
                    proof,
                    listeners,
                    address_text,
                    lambda g: self._forget_group(key, g),
                    self.config.trusted_proxies,
                )

            group = await self._form_or_check(key, name, proof, membership, form_port)
            member = _Endpoint(self, incoming.stream_id, group.what)
            address = (host, incoming.port)
        member.group = group
        cluster = self.server.cluster
        if membership is not None and cluster is not None:
            # its health, cluster-wide: other nodes count only the members that can serve
            member.report_state = functools.partial(member_state_quietly, cluster, *membership)
        # a member from now on (taking no connection until its nursery is set), so that
        # whatever ends it, its leaving frees the group's port or name with the last member
        group.add(member)
        self.memberships.add(member)
        return member, group, address, membership

    def _name_routes_for(self, incoming: IncomingStream) -> tuple[NameRoutes, bool]:
        tls = incoming.port == routes.NAME_TLS
        name_routes = self.server.https_routes if tls else self.server.http_routes
        requested = printable(incoming.host[:255])
        if incoming.port not in (routes.NAME_HTTP, routes.NAME_TLS):
            raise NameNotAllowedError(
                f"a name route is for port {routes.NAME_HTTP} (HTTP) or "
                f"{routes.NAME_TLS} (HTTPS), not {incoming.port}",
                address=requested,
            )
        if name_routes is None:
            what = "HTTPS" if tls else "HTTP"
            raise NameNotAllowedError(
                f"this server has no shared {what} listener", address=requested
            )
        return name_routes, tls

    async def _join_in_cluster(
        self,
        cluster_key: str,
        name: str,
        proof: bytes,
        what: str,
        address: str,
        error: type[AddressInUseError] = AddressInUseError,
    ) -> _Membership | None:
        """In a cluster, make this member one of the group's cluster-wide (forming its hold
        on ``cluster_key`` if nobody holds it), or raise ``error`` (a client or another
        group holds it), ``ClusterUnavailableError`` (the engine cannot tell); ``None`` on
        its own. Every member has a key of its own under its node's lease, so the group
        lives on while a member is left on any node."""
        cluster = self.server.cluster
        if cluster is None:
            return None
        membership = _Membership(
            cluster_key, group_owner(name, proof), f"{cluster.node_id}/{secrets.token_hex(6)}"
        )
        try:
            holder = await cluster.join_group(*membership)
        except BaseException:
            # cancelled or timed out mid-request: the engine may have made it all the same
            await leave_quietly(cluster, *membership)
            raise
        if holder != membership.group:
            raise refusal(holder, what=what, address=address, error=error, group=True)
        return membership

    async def _form_or_check(
        self,
        key: tuple[str, str],
        name: str,
        proof: bytes,
        membership: _Membership | None,
        form: Callable[[], Awaitable[Group]],
    ) -> Group:
        """The group at ``key`` once the cluster-wide hold is ours: checked again if one formed
        here while we waited for it, else the one ``form`` builds. Whatever fails gives the
        hold back, so that another node may form the group."""
        try:
            group = self.server.groups.get(key)
            if group is None:
                group = await form()
                self._formed(key, group, membership)
            else:
                group.check(name, proof)
        except BaseException:
            self._leave_later(membership)
            raise
        return group

    def _formed(self, key: tuple[str, str], group: Group, membership: _Membership | None) -> None:
        """``group`` is this node's now; in a cluster with node links its members on other
        nodes take their share of the public connections reaching this one."""
        self.server.groups[key] = group
        if membership is None:
            return
        group.owner = membership.group
        links = self.server.node_links
        if links is not None:
            group.elsewhere = links.group_elsewhere(membership.key)

    def _leave_later(self, membership: _Membership | None) -> None:
        """End a member's membership from synchronous code, in the server's cluster tasks."""
        cluster, nursery = self.server.cluster, self.server.cluster_nursery
        if membership is not None and cluster is not None and nursery is not None:
            nursery.start_soon(leave_quietly, cluster, *membership)

    def _forget_group(self, key: tuple[str, str], group: Group) -> None:
        """The last member here left: this node serves the group's port or name no more
        (its members elsewhere may: another node's, relayed, see ``NodeLinks``)."""
        if self.server.groups.get(key) is group:
            del self.server.groups[key]
        if isinstance(group, PortGroup):
            group.close_listeners()
        group.on_given_back()
        log.info(
            "group %s (%s) ended here: its last member left", printable(group.name), group.what
        )
        links = self.server.node_links
        if links is not None:
            links.refresh(
                port_key(int(key[1]))
                if key[0] == "tcp"
                else name_key(key[1], tls=key[0] == "https")
            )

    async def relay_public(
        self,
        conn: trio.abc.HalfCloseableStream,
        peer: tuple[str, int],
        forward_id: int,
        stats: RelayStats | None = None,
    ) -> None:
        """Open a stream of forward ``forward_id`` to the client and relay ``conn`` over it
        (counted in ``stats``); a client that does not answer within ``connect_timeout``
        loses the connection.

        With a client that takes early data (version 2), the relay starts at once: the public
        peer's first bytes go with the ``Open`` while the client dials, and the session's
        answer timer enforces ``connect_timeout`` instead of a wait here."""
        timeout = self.config.connect_timeout

        def unanswered() -> None:
            log.warning(
                "[NODE_TIMEOUT] client %s did not answer a public connection within %g s",
                self.peer,
                timeout,
            )

        async def open_to_client() -> MuxStream | None:
            # bounded: a client that never answers must not pin the connection and its slot
            with trio.move_on_after(timeout):
                return await self.session.open_stream(
                    peer[0], peer[1], tag=forward_id, early=True, answer_timeout=timeout
                )
            unanswered()
            return None

        def failed(exc: TunnelError | OSError) -> None:
            if isinstance(exc, UnansweredError):
                unanswered()
            elif isinstance(exc, DialError):
                log.warning(
                    "[%s] client %s could not reach its target: %s",
                    exc.category,
                    self.peer,
                    exc.message,
                )
            else:
                log.info("client %s: public connection dropped: %s", self.peer, exc)

        await carry_over_stream(
            conn,
            open_to_client,
            functools.partial(self._relay, name=f"public->{self.peer}", stats=stats),
            failed,
        )


def _socket_port(sock: trio.socket.SocketType) -> int:
    return int(sock.getsockname()[1])


async def _close(bound: list[trio.SocketListener] | trio.socket.SocketType) -> None:
    if isinstance(bound, list):
        await aclose_all(*bound)
    else:
        bound.close()
        await trio.lowlevel.checkpoint()
