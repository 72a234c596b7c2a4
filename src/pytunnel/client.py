"""The tunnel client: ``connect()`` and the forwards it sets up.

Three tiers, as in trio-websocket: ``async with connect(...)`` owns its nursery;
``connect_tunnel(nursery, ...)`` runs in the caller's; ``wrap_tunnel(nursery, stream, ...)``
runs over any trio stream (memory streams in tests). In every tier the tunnel, its forwards and
their relays form one task tree under one cancel scope: ``Tunnel.aclose()`` (or losing the
control connection) tears all of it down.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from ._dial import DEFAULT_CONNECT_TIMEOUT, describe_os_error, dial, format_target
from ._handshake import DEFAULT_HANDSHAKE_TIMEOUT, open_client_session
from ._listen import bind, bound_port
from ._relay import DEFAULT_IDLE_TIMEOUT, RelayStats, relay
from ._session import IncomingStream, MuxStream, Session, SessionConfig
from ._util import aclose_all
from .errors import (
    ConnectError,
    DialError,
    ErrorCode,
    ForwardError,
    RemoteProtocolError,
    SessionClosedError,
    StreamRefusedError,
)
from .protocol import routes
from .protocol.frames import FrameDecoder
from .protocol.messages import Bound

__all__ = [
    "Forward",
    "ForwardStatus",
    "LocalForward",
    "RemoteForward",
    "Tunnel",
    "connect",
    "connect_tunnel",
    "wrap_tunnel",
]

log = logging.getLogger("pytunnel.client")


class ForwardStatus(enum.Enum):
    """Where a forward is in its life."""

    STARTING = "starting"
    ACTIVE = "active"
    STOPPED = "stopped"  #: closed by the user (or the tunnel was closed)
    ERROR = "error"  #: ended by a failure; see ``Forward.error``


class Forward:
    """A forward set up on a tunnel: where it listens, where it leads, how it is doing."""

    kind: str = "forward"

    def __init__(self, tunnel: Tunnel, target_host: str, target_port: int) -> None:
        self._tunnel = tunnel
        #: Where connections are relayed to.
        self.target_host = target_host
        self.target_port = target_port
        #: Where it listens (filled in once bound; the real port when 0 was asked for).
        self.listen_host = ""
        self.listen_port = 0
        self.status = ForwardStatus.STARTING
        #: Why the forward ended, when ``status`` is ``ERROR``.
        self.error: str | None = None
        #: Live counters: bytes each way, active and total connections.
        self.stats = RelayStats()
        self._cancel_scope = trio.CancelScope()
        self._done = trio.Event()

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} {self.listen_host}:{self.listen_port} -> "
            f"{self.target_host}:{self.target_port} {self.status.value}>"
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
        if self.status in (ForwardStatus.STARTING, ForwardStatus.ACTIVE):
            self.status = ForwardStatus.STOPPED
        self._cancel_scope.cancel()
        await self._done.wait()

    async def wait_closed(self) -> None:
        await self._done.wait()

    def _ended(self, error: str | None) -> None:
        if self.status in (ForwardStatus.STARTING, ForwardStatus.ACTIVE):
            if error is None or self._tunnel._closing:
                self.status = ForwardStatus.STOPPED
            else:
                self.status = ForwardStatus.ERROR
                self.error = error
                log.warning("%s %s ended: %s", self.kind, self.target, error)
        self._tunnel._forwards.discard(self)
        self._done.set()


class LocalForward(Forward):
    """``-L``: the client listens; each connection is relayed to the target via the server."""

    kind = "local forward"

    async def _run(
        self, host: str, port: int, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        error: str | None = None
        try:
            with self._cancel_scope:
                listeners = await bind(host, port)
                self.listen_host, self.listen_port = host, bound_port(listeners)
                try:
                    async with trio.open_nursery() as nursery:
                        for listener in listeners:
                            nursery.start_soon(self._accept_loop, listener, nursery)
                        self.status = ForwardStatus.ACTIVE
                        task_status.started()
                finally:
                    await aclose_all(*listeners)
        except OSError as exc:
            error = f"listener failed: {exc}"
        finally:
            self._ended(error)

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        while True:
            conn = await listener.accept()
            nursery.start_soon(self._handle, conn)

    async def _handle(self, conn: trio.SocketStream) -> None:
        try:
            stream = await self._tunnel.open_stream(self.target_host, self.target_port)
        except DialError as exc:
            log.warning(
                "[%s] local forward %s: the server could not reach the target: %s",
                exc.category,
                self.listen_port,
                exc.message,
            )
            await trio.aclose_forcefully(conn)
            return
        except (StreamRefusedError, SessionClosedError) as exc:
            log.warning("local forward %s: connection refused: %s", self.listen_port, exc)
            await trio.aclose_forcefully(conn)
            return
        await relay(
            conn,
            stream,
            idle_timeout=self._tunnel.idle_timeout,
            stats=self.stats,
            name=f"local {self.listen_port}->{self.target}",
        )


class RemoteForward(Forward):
    """``-R``: the server listens; each connection there is relayed to the target here."""

    kind = "remote forward"

    def __init__(
        self, tunnel: Tunnel, target_host: str, target_port: int, connect_timeout: float
    ) -> None:
        super().__init__(tunnel, target_host, target_port)
        self.connect_timeout = connect_timeout
        self._nursery: trio.Nursery | None = None
        self._control: MuxStream | None = None

    @property
    def forward_id(self) -> int:
        assert self._control is not None
        return self._control.stream_id

    async def _run(
        self, host: str, port: int, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        error: str | None = None
        try:
            with self._cancel_scope:
                control = await self._tunnel.session.open_stream(host, port, tag=routes.LISTEN)
                self._control = control
                try:
                    bound = await _receive_bound(control)
                    self.listen_host, self.listen_port = bound.host, bound.port
                    self._tunnel._remote[control.stream_id] = self
                    async with trio.open_nursery() as nursery:
                        self._nursery = nursery
                        self.status = ForwardStatus.ACTIVE
                        task_status.started()
                        while await control.receive_some():
                            pass  # nothing is sent on the control stream after Bound yet
                        error = "the server closed the forward"
                        nursery.cancel_scope.cancel()
                finally:
                    self._nursery = None
                    self._tunnel._remote.pop(control.stream_id, None)
                    await trio.aclose_forcefully(control)
        except trio.BrokenResourceError:
            error = "the tunnel connection was lost"
        finally:
            self._ended(error)

    def _dispatch(self, incoming: IncomingStream) -> None:
        if self._nursery is None:
            incoming.refuse(ErrorCode.FORWARD_FAILED, "forward is closing")
            return
        self._nursery.start_soon(self._handle, incoming)

    async def _handle(self, incoming: IncomingStream) -> None:
        try:
            sock = await dial(self.target_host, self.target_port, timeout=self.connect_timeout)
        except DialError as exc:
            incoming.refuse_with(exc)
            return
        try:
            stream = incoming.accept()
        except SessionClosedError:
            await trio.aclose_forcefully(sock)
            return
        await relay(
            stream,
            sock,
            idle_timeout=self._tunnel.idle_timeout,
            stats=self.stats,
            name=f"remote {self.listen_port}->{self.target}",
        )


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
        data = await control.receive_some()
        decoder.receive_data(data)
        if not data:
            decoder.next_message()
            raise ForwardError("the server closed the forward before confirming it")


class Tunnel:
    """A connected tunnel client. Set up forwards on it; close it to tear everything down."""

    def __init__(self, session: Session, *, idle_timeout: float, connect_timeout: float) -> None:
        self.session = session
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self._forwards: set[Forward] = set()
        self._remote: dict[int, RemoteForward] = {}
        self._nursery: trio.Nursery | None = None
        self._cancel_scope = trio.CancelScope()
        self._closing = False
        self._done = trio.Event()

    @property
    def forwards(self) -> list[Forward]:
        """The forwards currently set up."""
        return list(self._forwards)

    @property
    def closed(self) -> bool:
        return self._done.is_set()

    async def wait_closed(self) -> None:
        """Until the tunnel has ended (closed by us, or the connection was lost)."""
        await self._done.wait()

    async def open_stream(self, host: str, port: int) -> MuxStream:
        """A stream to ``host:port`` that exits at the server (it dials there).

        Raises ``NodeTimeoutError`` / ``NodeUnstableError`` if the server's dial fails,
        ``TargetForbiddenError`` if its policy refuses, ``SessionClosedError`` if the tunnel is
        gone.
        """
        return await self.session.open_stream(host, port, tag=routes.CONNECT)

    async def forward_local(
        self,
        target_host: str,
        target_port: int,
        *,
        local_port: int = 0,
        local_host: str = "127.0.0.1",
    ) -> LocalForward:
        """Listen on ``local_host:local_port`` here; relay each connection to the target,
        dialled by the server. Raises ``AddressInUseError`` / ``PermissionDeniedError``."""
        forward = LocalForward(self, target_host, target_port)
        await self._start(forward, local_host, local_port)
        log.info("local forward %s -> %s", format_target(*forward.address), forward.target)
        return forward

    async def forward_remote(
        self,
        target_host: str,
        target_port: int,
        *,
        remote_port: int = 0,
        remote_host: str = "",
        connect_timeout: float | None = None,
    ) -> RemoteForward:
        """Ask the server to listen on ``remote_port`` (0: any); relay each connection there
        to the target, dialled here. Raises ``AddressInUseError``, ``PermissionDeniedError`` or
        ``PortNotAllowedError`` and leaves nothing bound."""
        forward = RemoteForward(
            self,
            target_host,
            target_port,
            self.connect_timeout if connect_timeout is None else connect_timeout,
        )
        await self._start(forward, remote_host, remote_port)
        log.info("remote forward %s -> %s", format_target(*forward.address), forward.target)
        return forward

    async def _start(self, forward: LocalForward | RemoteForward, host: str, port: int) -> None:
        if self._nursery is None or self.closed:
            raise SessionClosedError("the tunnel is closed")
        self._forwards.add(forward)
        try:
            await self._nursery.start(forward._run, host, port)
        except BaseException:
            self._forwards.discard(forward)
            raise

    async def aclose(self) -> None:
        """Close every forward and the connection. Bounded in time; idempotent."""
        self._closing = True
        self._cancel_scope.cancel()
        await self._done.wait()

    async def _run(
        self, *, task_status: trio.TaskStatus[Tunnel] = trio.TASK_STATUS_IGNORED
    ) -> None:
        try:
            with self._cancel_scope:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    task_status.started(self)
                    await self._accept_loop()
                    nursery.cancel_scope.cancel()
        finally:
            self._nursery = None
            self._closing = True
            self._done.set()

    async def _accept_loop(self) -> None:
        while True:
            try:
                incoming = await self.session.accept_stream()
            except SessionClosedError:
                log.info("tunnel connection ended: %s", self.session.close_reason)
                return
            forward = self._remote.get(incoming.tag)
            if forward is None:
                incoming.refuse(ErrorCode.FORWARD_FAILED, f"no forward with id {incoming.tag}")
            else:
                forward._dispatch(incoming)


async def _serve_tunnel(
    stream: trio.abc.Stream,
    token: str | bytes,
    config: SessionConfig,
    handshake_timeout: float,
    idle_timeout: float,
    connect_timeout: float,
    *,
    task_status: trio.TaskStatus[Tunnel] = trio.TASK_STATUS_IGNORED,
) -> None:
    try:
        async with open_client_session(
            stream, token, config, handshake_timeout=handshake_timeout
        ) as session:
            tunnel = Tunnel(session, idle_timeout=idle_timeout, connect_timeout=connect_timeout)
            await tunnel._run(task_status=task_status)
    finally:
        await trio.aclose_forcefully(stream)


async def wrap_tunnel(
    nursery: trio.Nursery,
    stream: trio.abc.Stream,
    *,
    token: str | bytes,
    session_config: SessionConfig | None = None,
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
) -> Tunnel:
    """Authenticate over an existing trio stream and run the tunnel in ``nursery``.

    Raises ``AuthenticationError`` (1002), ``VersionMismatchError``, ``HandshakeTimeoutError``
    or ``ConnectError``; the stream is closed on failure.
    """
    tunnel: Tunnel = await nursery.start(
        _serve_tunnel,
        stream,
        token,
        session_config or SessionConfig(),
        handshake_timeout,
        idle_timeout,
        connect_timeout,
    )
    return tunnel


def _split_address(address: str | tuple[str, int]) -> tuple[str, int]:
    if isinstance(address, tuple):
        return address
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {address!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


async def connect_tunnel(
    nursery: trio.Nursery,
    address: str | tuple[str, int],
    *,
    token: str | bytes,
    session_config: SessionConfig | None = None,
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
) -> Tunnel:
    """Connect to a server at ``address`` (``"host:port"`` or a tuple) in the caller's nursery.

    Raises ``ConnectError`` (1001) if the server cannot be reached, and the handshake errors of
    :func:`wrap_tunnel`.
    """
    host, port = _split_address(address)
    try:
        with trio.fail_after(connect_timeout):
            stream = await trio.open_tcp_stream(host, port)
    except trio.TooSlowError:
        raise ConnectError(
            f"cannot reach tunnel server {format_target(host, port)}: timed out"
        ) from None
    except OSError as exc:
        raise ConnectError(
            f"cannot reach tunnel server {format_target(host, port)}: {describe_os_error(exc)}"
        ) from None
    return await wrap_tunnel(
        nursery,
        stream,
        token=token,
        session_config=session_config,
        handshake_timeout=handshake_timeout,
        idle_timeout=idle_timeout,
        connect_timeout=connect_timeout,
    )


@asynccontextmanager
async def connect(
    address: str | tuple[str, int],
    *,
    token: str | bytes,
    session_config: SessionConfig | None = None,
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
) -> AsyncIterator[Tunnel]:
    """``async with pytunnel.connect("host:7000", token=...) as tunnel:``

    Leaving the block closes every forward and the connection; no task outlives it. The block's
    own exceptions propagate unwrapped.
    """
    # Errors are caught inside the nursery and re-raised after it, so callers see the typed
    # exception itself rather than an ExceptionGroup wrapping it.
    error: BaseException | None = None
    async with trio.open_nursery() as nursery:
        try:
            tunnel = await connect_tunnel(
                nursery,
                address,
                token=token,
                session_config=session_config,
                handshake_timeout=handshake_timeout,
                idle_timeout=idle_timeout,
                connect_timeout=connect_timeout,
            )
        except BaseException as exc:
            error = exc
        else:
            try:
                yield tunnel
            except BaseException as exc:
                error = exc
            finally:
                await tunnel.aclose()
    if error is not None:
        raise error
