"""The client's connection lifecycle: connect, run a session, watch it, back off, reconnect.

Task tree of one tunnel::

    tunnel nursery                      (Supervisor.run; lives until the tunnel is closed)
    ├── supervisor: connect, run one session, back off, reconnect
    │   └── session nursery             (one per connection; dies with the link)
    │       ├── session reader/writer, heartbeat, accept loop
    │       └── per remote forward: control stream, health probe, relays of its connections
    └── per local forward: listener, one task per connection -> relay

The supervisor sets the session on the tunnel's :class:`~pytunnel._link.Link` and tells each
forward when the link comes and goes (``on_link_up`` / ``on_link_down`` / ``end``); it knows
nothing of what a forward does with that. Incoming streams (connections to remote forwards)
are handed to the forward whose control stream they name.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Awaitable, Callable

import trio

from ._egress import refuse_wrong_kind
from ._events import EventKind, TunnelEvent
from ._handshake import HandshakeResult, client_handshake
from ._link import Link
from ._tls import client_tls_context, tls_connect
from .errors import (
    AuthenticationError,
    ConnectError,
    ErrorCode,
    RateLimitedError,
    SessionClosedError,
    TunnelError,
    VersionMismatchError,
)
from .protocol import routes
from .protocol.mux import Role
from .session import Session

__all__ = ["Connector", "Supervisor"]

log = logging.getLogger("pytunnel.client")

#: The longest wait a server's RATE_LIMITED refusal can impose on a reconnecting client.
_MAX_RETRY_AFTER = 300.0

#: Opens a new transport to the server (for every reconnection).
Connector = Callable[[], Awaitable[trio.abc.Stream]]


def _describe_reason(reason: BaseException | None) -> str:
    if reason is None:
        return "unknown reason"
    return str(reason) or type(reason).__name__


class Supervisor:
    """Keeps one tunnel connected (see the module docstring).

    ``connector`` opens a new transport for each (re)connection; ``None`` (a tunnel over a
    given stream) means the first loss is final.
    """

    def __init__(
        self,
        link: Link,
        connector: Connector | None,
        first_stream: trio.abc.Stream | None,
        *,
        client_id: str,
        server_host: str | Callable[[], str] | None,
        connector_tls: bool = False,
        on_refused: Callable[[], bool] | None = None,
    ) -> None:
        self._link = link
        #: Told when a connection the connector made failed its TLS or handshake; true if
        #: another server should be tried at once.
        self._on_refused = on_refused
        #: The connector's stream already is the TLS layer the config describes (wss://).
        self._connector_tls = connector_tls
        self._config = link.config
        self._connector = connector
        self._first_stream = first_stream
        self._client_id = client_id
        self._server_host = server_host
        #: Round-trip time of the last heartbeat, in seconds.
        self.rtt: float | None = None
        #: Successful reconnections so far.
        self.reconnects = 0
        #: Why the tunnel ended by itself, if it did.
        self.failure: TunnelError | None = None
        self._cancel_scope = trio.CancelScope()
        self._done = trio.Event()
        #: The TLS context of every connection of this tunnel, built (off the event loop)
        #: for the first one and reused for each reconnection.
        self._tls_context: ssl.SSLContext | None = self._config.tls

    def _current_host(self) -> str | None:
        """The host the connector reached (several servers: the one that answered)."""
        host = self._server_host
        return host() if callable(host) else host

    @property
    def done(self) -> bool:
        return self._done.is_set()

    async def wait_done(self) -> None:
        await self._done.wait()

    async def stop(self) -> None:
        """End the tunnel: every forward, the session, this supervisor. Bounded; idempotent."""
        self._link.closing = True
        self._cancel_scope.cancel()
        await self._done.wait()

    async def run(self, started: Callable[[], None]) -> None:
        """Connect, call ``started``, and keep the tunnel up until stopped or giving up.

        The first connection happens before any nursery exists, so its failure reaches the
        caller as the typed exception itself, not inside an ``ExceptionGroup``.
        """
        link = self._link
        first = await self._establish(self._first_stream)
        try:
            with self._cancel_scope:
                async with trio.open_nursery() as nursery:
                    link.nursery = nursery
                    await self._supervise(first, started)
                    self._end_forwards()  # before the cancellation below ends them as stopped
                    nursery.cancel_scope.cancel()
        finally:
            link.closing = True
            link.nursery = None
            self._end_forwards()
            link.events.close()
            self._done.set()

    def _end_forwards(self) -> None:
        for forward in self._link.forwards:
            forward.end(self.failure)

    async def _establish(
        self, stream: trio.abc.Stream | None
    ) -> tuple[trio.abc.Stream, HandshakeResult]:
        """Open a connection (unless given one) and authenticate; close it on failure."""
        config = self._config
        use_tls = not self._connector_tls and (
            config.tls is not None or config.tls_fingerprint is not None
        )
        if use_tls and self._tls_context is None:
            self._tls_context = await client_tls_context(pinned=True)
        while True:
            connected = stream is None
            try:
                return await self._establish_once(stream)
            except TunnelError:
                # a server that took the connection but not the tunnel (stalled, busy, a bad
                # certificate): with several servers, another one is tried at once
                if not (connected and self._on_refused is not None and self._on_refused()):
                    raise

    async def _establish_once(
        self, stream: trio.abc.Stream | None
    ) -> tuple[trio.abc.Stream, HandshakeResult]:
        config = self._config
        use_tls = not self._connector_tls and (
            config.tls is not None or config.tls_fingerprint is not None
        )
        if stream is None:
            if self._connector is None:
                raise SessionClosedError("nothing to reconnect to")
            stream = await self._connector()
        if use_tls and self._tls_context is not None:
            stream = await tls_connect(
                stream,
                self._tls_context,
                server_hostname=config.tls_server_hostname or self._current_host(),
                fingerprint=config.tls_fingerprint,
                timeout=config.handshake_timeout,
            )
        try:
            result = await client_handshake(
                stream,
                config.token,
                timeout=config.handshake_timeout,
                max_frame_size=config.session.max_frame_size,
                client_id=self._client_id,
                early_window=config.session.early_window,
            )
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        return stream, result

    async def _supervise(
        self, first: tuple[trio.abc.Stream, HandshakeResult], started: Callable[[], None]
    ) -> None:
        """Run a session until it ends, back off, reconnect; until told to stop or giving up.

        Never reconnects after an authentication or version failure: retrying cannot fix it.
        """
        config = self._config
        await self._run_session(*first, started)
        attempt = 0
        #: The server's own word on when to come back (a RATE_LIMITED refusal's retry time):
        #: an attempt before it would only be refused again.
        not_before = 0.0
        while not self._link.closing:
            if not config.reconnect or self._connector is None:
                self.failure = SessionClosedError("the connection to the server was lost")
                return
            attempt += 1
            if config.max_attempts is not None and attempt > config.max_attempts:
                self.failure = ConnectError(
                    f"gave up after {config.max_attempts} reconnection attempts"
                )
                log.error("%s", self.failure)
                return
            delay = max(config.backoff(attempt), not_before - trio.current_time())
            log.info("reconnecting in %.1f s (attempt %d)", delay, attempt)
            self._link.emit(
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
                self._link.emit(TunnelEvent(EventKind.RECONNECT_FAILED, str(exc)))
                if isinstance(exc, RateLimitedError) and exc.retry_after is not None:
                    # capped: the refusal comes before authentication, so anything that answers
                    # the connection could name years; beyond the cap the backoff rules again
                    wait = min(exc.retry_after, max(config.backoff_max, _MAX_RETRY_AFTER))
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
        started: Callable[[], None] | None,
    ) -> None:
        link = self._link
        session: Session | None = None
        try:
            async with (
                result.open_session(
                    stream, Role.CLIENT, self._config.session, name="client"
                ) as session,
                trio.open_nursery() as nursery,
            ):
                link.link_up(session, nursery)
                nursery.start_soon(self._heartbeat, session)
                nursery.start_soon(_announce, session)
                for forward in link.forwards:
                    forward.on_link_up(session, nursery)
                link.emit(TunnelEvent(EventKind.CONNECTED, "link up"))
                if started is not None:
                    started()
                await self._accept_loop(session)
                nursery.cancel_scope.cancel()
        finally:
            reason = session.close_reason if session is not None else None
            link.link_down()
            await trio.aclose_forcefully(stream)
            if not link.closing:
                log.warning("tunnel connection lost: %s", _describe_reason(reason))
                link.emit(TunnelEvent(EventKind.DISCONNECTED, _describe_reason(reason)))
                for forward in link.forwards:
                    forward.on_link_down()

    async def _heartbeat(self, session: Session) -> None:
        """Ping every ``heartbeat_interval``; a pong missing for ``heartbeat_timeout`` means a
        dead link, found by the clock rather than by the kernel's retransmission timeout."""
        config = self._config
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
            self._link.emit(
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
        """Hand each stream the server opens to the remote forward it is tagged with."""
        while True:
            try:
                incoming = await session.accept_stream()
            except SessionClosedError:
                return
            forward = self._link.remote_forward(incoming.tag)
            if forward is None:
                incoming.refuse(ErrorCode.FORWARD_FAILED, f"no forward with id {incoming.tag}")
            elif not refuse_wrong_kind(incoming, forward.kind.udp, what="forward"):
                forward.dispatch(incoming)


async def _announce(session: Session) -> None:
    """Tell the server our software and version (its admin API shows them). The server
    refuses the stream (``NORMAL`` from one that records it, ``PROTOCOL_ERROR`` from one that
    predates the route): either way there is nothing more to do."""
    from . import __version__  # the package's, set once its modules are imported

    try:
        await session.open_stream(f"pytunnel/{__version__}", 0, tag=routes.CLIENT_INFO)
    except TunnelError:  # the refusal, or the session ending first
        return
