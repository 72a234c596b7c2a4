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
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

import trio

from ._control import ControlChannel
from ._dial import dial_permitted, format_target
from ._egress import refuse_wrong_kind, serve_egress
from ._ingress import carry_over_stream
from ._listen import bind, bind_udp, bound_port
from ._relay import RelayStats, relay
from ._udp import (
    relay_association,
    serve_associations,
    udp_connect,
)
from ._util import Episodes, aclose_all
from .errors import (
    DialError,
    ErrorCode,
    ForwardError,
    PortNotAllowedError,
    RemoteProtocolError,
    SessionClosedError,
    TargetForbiddenError,
    TunnelError,
    printable,
)
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
_Bound = TypeVar("_Bound")
_T = TypeVar("_T")


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
        #: Streams refused at the server's limit since the last one admitted.
        self._refused_streams: Episodes[None] = Episodes()
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
                if refuse_wrong_kind(incoming, incoming.tag == routes.UDP_CONNECT):
                    pass
                elif incoming.tag in (routes.CONNECT, routes.UDP_CONNECT):
                    if self.reserve_stream(incoming):
                        handler = (
                            self._serve_connect
                            if incoming.tag == routes.CONNECT
                            else self._serve_udp_connect
                        )
                        nursery.start_soon(self._counted, handler, incoming)
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

    def reserve_stream(self, incoming: IncomingStream | None = None) -> bool:
        """Take one of the server's stream slots at admission (before any dial), so a burst
        cannot overshoot the limit; released by :meth:`_counted` when the stream's task ends."""
        if self.server.active_streams < self.config.max_streams:
            self.server.active_streams += 1
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
            forbidden,
        )
        if not carried and incoming.abandoned:
            log.debug("client %s: open of %s cancelled during the dial", self.peer, target)

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
        await serve_egress(
            incoming,
            functools.partial(udp_connect, host, port),
            functools.partial(relay_association, idle_timeout=self.config.udp_idle_timeout),
        )

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
            return self.reserve_stream(None)

        def release_association() -> None:
            self.release_stream()

        try:
            await ControlChannel(control, ControlRole.SERVER).send(Bound(host, port))
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
            await aclose_all(*forward.listeners, control)
            log.info("client %s: remote forward on %s closed", self.peer, forward.address)

    async def relay_public(self, conn: trio.SocketStream, forward_id: int) -> None:
        """Open a stream of forward ``forward_id`` to the client and relay ``conn`` over it;
        a client that does not answer within ``connect_timeout`` loses the connection."""
        timeout = self.config.connect_timeout

        async def open_to_client() -> MuxStream | None:
            host, port = conn.socket.getpeername()[:2]
            # bounded: a client that never answers must not pin the connection and its slot
            with trio.move_on_after(timeout):
                return await self.session.open_stream(str(host), int(port), tag=forward_id)
            log.warning(
                "[NODE_TIMEOUT] client %s did not answer a public connection within %g s",
                self.peer,
                timeout,
            )
            return None

        def failed(exc: TunnelError | OSError) -> None:
            if isinstance(exc, DialError):
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
            functools.partial(self._relay, name=f"public->{self.peer}"),
            failed,
        )
