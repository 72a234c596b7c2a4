"""The tunnel server: ``serve()`` accepts control connections, one session nursery each.

Everything a client causes on the server (its remote-forward listeners, the relays of its
public connections, the relays of its local-forward dials) runs inside that client's session
nursery. When the session ends for any reason, the nursery is cancelled: the listeners close at
once (so the same port can be bound again immediately) and every relay is torn down.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import random
from collections.abc import Iterable

import attrs
import trio

from ._dial import DEFAULT_CONNECT_TIMEOUT, dial, format_target
from ._handshake import DEFAULT_HANDSHAKE_TIMEOUT, open_server_session
from ._listen import bind, bound_port
from ._policy import PermitOpen, PortRange, parse_port_ranges
from ._relay import DEFAULT_IDLE_TIMEOUT, relay
from ._session import IncomingStream, MuxStream, Session, SessionConfig
from ._util import aclose_all
from .errors import (
    DialError,
    ErrorCode,
    ForwardError,
    PortNotAllowedError,
    SessionClosedError,
    StreamRefusedError,
    TunnelError,
)
from .protocol import routes
from .protocol.frames import encode_message
from .protocol.messages import Bound

__all__ = ["ServerConfig", "TunnelServer", "serve"]

log = logging.getLogger("pytunnel.server")

_ACCEPT_RESOURCE_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
_PORT_0_ATTEMPTS = 64


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

    def port_allowed(self, port: int) -> bool:
        return self.allow_ports is None or any(port in r for r in self.allow_ports)


class TunnelServer:
    """A running server, as handed back by ``await nursery.start(serve, ...)``."""

    def __init__(self, listeners: list[trio.SocketListener], config: ServerConfig) -> None:
        self.listeners = listeners
        self.config = config
        self._sessions: set[_ClientSession] = set()
        self._cancel_scope = trio.CancelScope()
        self._done = trio.Event()
        host, port = listeners[0].socket.getsockname()[:2]
        self._address = (str(host), int(port))

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` of the control listener (the real port when 0 was asked for)."""
        return self._address

    @property
    def port(self) -> int:
        return self.address[1]

    @property
    def session_count(self) -> int:
        """Authenticated clients connected right now."""
        return len(self._sessions)

    async def aclose(self) -> None:
        """Stop serving: close the control listener and end every client session."""
        self._cancel_scope.cancel()
        await self._done.wait()

    async def serve_forever(
        self, *, task_status: trio.TaskStatus[TunnelServer] = trio.TASK_STATUS_IGNORED
    ) -> None:
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
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno not in _ACCEPT_RESOURCE_ERRNOS:
                    raise
                log.error("accept failed (%s); pausing 100 ms", exc.strerror)
                await trio.sleep(0.1)
                continue
            nursery.start_soon(self._handle_socket, stream)

    async def _handle_socket(self, stream: trio.SocketStream) -> None:
        try:
            host, port = stream.socket.getpeername()[:2]
            peer = format_target(str(host), int(port))
        except OSError:  # the peer is already gone
            await trio.aclose_forcefully(stream)
            return
        await self.handle_stream(stream, peer=peer)

    async def handle_stream(self, stream: trio.abc.Stream, *, peer: str = "?") -> None:
        """Serve one control connection over any trio stream (a memory stream in tests).

        Returns when the client's session has ended; never raises for the client's failures.
        """
        try:
            async with open_server_session(
                stream,
                self.config.token,
                self.config.session,
                handshake_timeout=self.config.handshake_timeout,
                peer=peer,
            ) as session:
                client = _ClientSession(self, session, peer)
                self._sessions.add(client)
                log.info("client %s connected", peer)
                try:
                    await client.run()
                finally:
                    self._sessions.discard(client)
                    log.info("client %s disconnected", peer)
        except TunnelError as exc:
            log.debug("control connection from %s ended: %s", peer, exc)
        finally:
            await trio.aclose_forcefully(stream)


class _ClientSession:
    """One authenticated client: dispatches the streams it opens."""

    def __init__(self, server: TunnelServer, session: Session, peer: str) -> None:
        self.server = server
        self.config = server.config
        self.session = session
        self.peer = peer

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:  # the session nursery
            while True:
                try:
                    incoming = await self.session.accept_stream()
                except SessionClosedError:
                    break
                if incoming.tag == routes.CONNECT:
                    nursery.start_soon(self._serve_connect, incoming)
                elif incoming.tag == routes.LISTEN:
                    nursery.start_soon(self._serve_listen, incoming)
                else:
                    incoming.refuse(ErrorCode.PROTOCOL_ERROR, f"unknown route {incoming.tag}")
            nursery.cancel_scope.cancel()

    # ---------------------------------------------------------------- local forwards

    async def _serve_connect(self, incoming: IncomingStream) -> None:
        host, port = incoming.host, incoming.port
        target = format_target(host, port)
        if not host or not 1 <= port <= 65535:
            incoming.refuse(ErrorCode.TARGET_FORBIDDEN, f"invalid target {target!r}")
            return
        if not self.config.permit_open.allows(host, port):
            log.warning("[TARGET_FORBIDDEN] client %s may not open %s", self.peer, target)
            incoming.refuse(ErrorCode.TARGET_FORBIDDEN, f"{target} is not permitted by the server")
            return
        try:
            sock = await dial(host, port, timeout=self.config.connect_timeout, logger=log)
        except DialError as exc:
            incoming.refuse_with(exc)
            return
        try:
            stream = incoming.accept()
        except SessionClosedError:
            await trio.aclose_forcefully(sock)
            return
        await relay(
            stream, sock, idle_timeout=self.config.idle_timeout, name=f"{self.peer}->{target}"
        )

    # ---------------------------------------------------------------- remote forwards

    async def _bind(self, host: str, port: int) -> list[trio.SocketListener]:
        address = format_target(host, port)
        if host not in ("", self.config.public_host):
            raise PortNotAllowedError(
                f"server only listens on {self.config.public_host}, not {host}", address=address
            )
        host = self.config.public_host
        if port and not self.config.port_allowed(port):
            raise PortNotAllowedError(f"port {port} is outside the allowed range", address=address)
        if port or self.config.allow_ports is None:
            return await bind(host, port)
        # port 0 with a range: pick free ports inside it
        candidates = [p for r in self.config.allow_ports for p in range(r.low, r.high + 1)]
        for candidate in random.sample(candidates, min(len(candidates), _PORT_0_ATTEMPTS)):
            try:
                return await bind(host, candidate)
            except ForwardError:
                continue
        raise PortNotAllowedError("no free port in the allowed range", address=address)

    async def _serve_listen(self, incoming: IncomingStream) -> None:
        requested = format_target(incoming.host or self.config.public_host, incoming.port)
        try:
            listeners = await self._bind(incoming.host, incoming.port)
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
        address = format_target(host, port)
        try:
            await control.send_all(encode_message(Bound(host, port)))
            log.info("client %s: remote forward listening on %s", self.peer, address)
            async with trio.open_nursery() as nursery:
                for listener in listeners:
                    nursery.start_soon(self._accept_public, listener, control, nursery)
                await _wait_closed(control)
                nursery.cancel_scope.cancel()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await aclose_all(*listeners, control)
            log.info("client %s: remote forward on %s closed", self.peer, address)

    async def _accept_public(
        self, listener: trio.SocketListener, control: MuxStream, nursery: trio.Nursery
    ) -> None:
        while True:
            try:
                conn = await listener.accept()
            except OSError as exc:
                if exc.errno not in _ACCEPT_RESOURCE_ERRNOS:
                    raise
                log.error("accept failed (%s); pausing 100 ms", exc.strerror)
                await trio.sleep(0.1)
                continue
            nursery.start_soon(self._relay_public, conn, control.stream_id)

    async def _relay_public(self, conn: trio.SocketStream, forward_id: int) -> None:
        try:
            host, port = conn.socket.getpeername()[:2]
            stream = await self.session.open_stream(str(host), int(port), tag=forward_id)
        except DialError as exc:
            log.warning(
                "[%s] client %s could not reach its target: %s",
                exc.category,
                self.peer,
                exc.message,
            )
            await trio.aclose_forcefully(conn)
            return
        except (StreamRefusedError, SessionClosedError, OSError) as exc:
            log.info("client %s: public connection dropped: %s", self.peer, exc)
            await trio.aclose_forcefully(conn)
            return
        await relay(
            conn, stream, idle_timeout=self.config.idle_timeout, name=f"public->{self.peer}"
        )


def _answer(incoming: IncomingStream, exc: TunnelError) -> None:
    """Refuse with the error's code, unless the session is already gone."""
    with contextlib.suppress(SessionClosedError):
        incoming.refuse(exc.code, exc.message)


async def _wait_closed(stream: MuxStream) -> None:
    """Until the peer closes (or breaks) the stream; anything it sends is ignored."""
    try:
        while await stream.receive_some():
            pass
    except trio.BrokenResourceError:
        pass


async def serve(
    token: str | bytes,
    port: int = 7000,
    *,
    host: str = "127.0.0.1",
    public_host: str = "127.0.0.1",
    allow_ports: str | Iterable[PortRange] | None = None,
    permit_open: PermitOpen | Iterable[str] | str | None = None,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
    session_config: SessionConfig | None = None,
    task_status: trio.TaskStatus[TunnelServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a tunnel server on ``host:port`` until cancelled (or ``TunnelServer.aclose``).

    In the style of ``trio.serve_tcp``: ``server = await nursery.start(serve, token, 0)`` hands
    back the :class:`TunnelServer` once it is listening (port 0 picks a free port; use
    ``functools.partial`` for the keyword options).
    """
    config = ServerConfig(
        token=token,
        public_host=public_host,
        allow_ports=allow_ports,
        permit_open=permit_open,
        connect_timeout=connect_timeout,
        idle_timeout=idle_timeout,
        handshake_timeout=handshake_timeout,
        session=session_config or SessionConfig(),
    )
    listeners = await trio.open_tcp_listeners(port, host=host)
    server = TunnelServer(listeners, config)
    log.info("listening for tunnel clients on %s", format_target(*server.address))
    await server.serve_forever(task_status=task_status)
