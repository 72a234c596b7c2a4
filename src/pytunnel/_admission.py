"""Admission of control connections: what a connection must get past before it is a session.

Holds the failed-authentication throttle, the pending-handshake caps (global and per source
address), the first-frame and handshake deadlines, the turn-away of a refused peer, and the
file-descriptor helpers that size the server's stream budget. It knows nothing of sessions,
routes or forwards: it hands back an authenticated stream or nothing.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import attrs
import trio

from ._handshake import HandshakeResult, send_goaway, server_handshake
from ._tls import tls_accept
from ._util import Episodes
from .errors import AuthenticationError, ErrorCode, TLSError, WebSocketError
from .transports.websocket import TLSAccept, accept_tunnel_transport

if TYPE_CHECKING:
    from .server import ServerConfig


log = logging.getLogger("pytunnel.server")

#: Relayed streams across all clients unless configured (or lowered by the fd limit).
DEFAULT_MAX_STREAMS = 16384


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
        #: Failed authentications counted so far (all addresses, for metrics).
        self.failures = 0
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

    def throttled(self) -> int:
        """Addresses refused right now (fewer than one token left)."""
        now = trio.current_time()
        return sum(1 for host in self._buckets if self._tokens(host, now) < 1 - self._EPSILON)

    def failure(self, host: str) -> None:
        self.failures += 1
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


class Admission:
    """The gate between an accepted connection and an authenticated one.

    It owns the counters that must hold across connections: the handshakes under way (in all
    and per source address) and the failed authentications per address. A refused peer is
    turned away before any handshake work, and an admitted one has two deadlines: a short one
    for its first frame (an idle connection gives up its slot early) and one for TLS and
    authentication together.
    """

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        #: Connections accepted but not yet authenticated.
        self.pending = 0
        #: Connections in their handshake, per source address.
        self._pending_by_host: dict[str, int] = {}
        #: Addresses being turned away for being at that cap.
        self._over_cap: Episodes[str] = Episodes()
        self.throttle = AuthThrottle(
            burst=config.auth_failure_burst, interval=config.auth_failure_interval
        )
        # The early window is announced before we know whether the peer is a client or a
        # node (a node link holds the server's whole stream limit, so its floor is smaller):
        # the smaller of the two fits either session.
        self._early_window = min(
            config.session.early_window,
            attrs.evolve(config.session, max_streams=config.max_streams).early_window,
        )

    def _release_pending(self, host: str) -> None:
        left = self._pending_by_host.pop(host) - 1
        if left:
            self._pending_by_host[host] = left
        if left < self.config.max_handshakes_per_address:
            self._over_cap.end(host)

    async def _turn_away(self, stream: trio.abc.Stream, code: int, text: str) -> None:
        """Refuse before any handshake work. A TLS client could not read a plaintext GoAway,
        and answering it would mean a TLS handshake for a refused peer: it is just closed."""
        if self.config.tls is None:
            await send_goaway(stream, code, text)
        else:
            await trio.aclose_forcefully(stream)

    def _tls_accept(self, peer: str) -> TLSAccept | None:
        context = self.config.tls
        if context is None:
            return None

        async def accept(stream: trio.abc.Stream, timeout: float) -> trio.abc.Stream:
            return await tls_accept(stream, context, timeout=timeout, peer=peer)

        return accept

    async def authenticate(
        self, stream: trio.abc.Stream, peer: str, peer_host: str | None
    ) -> tuple[trio.abc.Stream, HandshakeResult] | None:
        """Admit and authenticate one control connection.

        Args:
          stream: the connection as accepted.
          peer: its name, for logs.
          peer_host: the source address the per-address cap and the throttle count by
            (``None`` for a stream without one, which only the global cap counts).

        Returns:
          The stream to run the session on (the TLS stream over ``stream`` when TLS is on)
          and the handshake's result; ``None`` when the peer was turned away.

        Raises:
          TunnelError: the handshake failed (the TLS stream, if any, is closed already).
        """
        if peer_host is not None:
            wait = self.throttle.blocked_for(peer_host)
            if wait > 0:
                # rounded up, so a client that retries when told is let in
                retry = math.ceil(wait * 10) / 10
                await self._turn_away(
                    stream,
                    ErrorCode.RATE_LIMITED,
                    f"too many failed authentications; retry in {retry:.1f} s",
                )
                return None
        if self.pending >= self.config.max_pending_handshakes:
            log.warning(
                "turning away %s: %d connections are already in their handshake",
                peer,
                self.pending,
            )
            await self._turn_away(stream, ErrorCode.SERVER_BUSY, "too many pending handshakes")
            return None
        # a stream without a source address (in-memory, in tests) is not counted per address
        host_key = peer_host
        pending_here = 0 if host_key is None else self._pending_by_host.get(host_key, 0)
        if host_key is not None and pending_here >= self.config.max_handshakes_per_address:
            if self._over_cap.refuse(host_key):
                log.warning(
                    "turning away connections from %s: %d already in their handshake",
                    host_key,
                    pending_here,
                )
            await self._turn_away(
                stream, ErrorCode.SERVER_BUSY, "too many pending handshakes from your address"
            )
            return None
        self.pending += 1
        if host_key is not None:
            self._pending_by_host[host_key] = pending_here + 1
        transport = stream
        try:
            # one deadline for TLS and authentication together, a shorter one for the
            # first frame: an idle connection gives up its slot early
            now = trio.current_time()
            deadline = now + self.config.handshake_timeout
            first_deadline = min(deadline, now + self.config.first_frame_timeout)
            if self.config.ws_path is not None:
                # a WebSocket upgrade or a tunnel handshake (TLS outside or inside), told
                # apart by the first bytes, within the first-frame deadline
                stream = await accept_tunnel_transport(
                    stream,
                    path=self.config.ws_path,
                    tls=self._tls_accept(peer),
                    timeout=max(0.0, first_deadline - trio.current_time()),
                    ping_interval=self.config.ws_ping_interval,
                    peer=peer,
                )
            elif self.config.tls is not None:
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
                # the other nodes of a cluster connect with its secret (node links)
                node_secret=(
                    self.config.cluster_secret if self.config.cluster is not None else None
                ),
                early_window=self._early_window,
            )
        except BaseException as exc:
            if isinstance(exc, AuthenticationError) and peer_host is not None:
                self.throttle.failure(peer_host)
            elif isinstance(exc, TLSError):
                log.warning("%s", exc)
            elif isinstance(exc, WebSocketError):
                log.info("%s", exc)
            if stream is not transport:  # the TLS wrapper owns the transport
                await trio.aclose_forcefully(stream)
            raise
        finally:
            self.pending -= 1
            if host_key is not None:
                self._release_pending(host_key)
        return stream, result
