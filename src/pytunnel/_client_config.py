"""How a client connects, watches its link, reconnects and probes: :class:`ClientConfig`.

One frozen attrs class holds every client option, with its default and the reason for it;
:class:`ClientOptions` lists the same fields as typed keyword arguments for the entry points,
and the CLI derives its defaults from these fields. Nothing here does I/O.
"""

from __future__ import annotations

import random
import ssl
from typing import TypedDict

import attrs
import h11

from ._dial import DEFAULT_CONNECT_TIMEOUT
from ._handshake import DEFAULT_HANDSHAKE_TIMEOUT
from ._relay import DEFAULT_IDLE_TIMEOUT
from ._tls import parse_fingerprint
from ._udp import DEFAULT_MAX_ASSOCIATIONS, DEFAULT_UDP_IDLE_TIMEOUT, UDP_SOCKET_BUFFER
from .protocol.messages import valid_client_id
from .session import SessionConfig
from .transports.proxy import parse_proxy_url
from .transports.websocket import DEFAULT_PING_INTERVAL, check_ping_interval

#: The longest pause between reconnection attempts (``ClientConfig.backoff_max``); node
#: links back off up to it too.
DEFAULT_BACKOFF_MAX = 16.0

__all__ = ["ClientConfig", "ClientOptions"]


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


def _valid_proxy(_inst: object, _attribute: object, value: str | None) -> None:
    if value is not None:
        parse_proxy_url(value)


def _proxy_repr(value: str | None) -> str:
    # the URL without its password
    return repr(None if value is None else str(parse_proxy_url(value)))


def _headers_repr(value: tuple[tuple[str, str], ...]) -> str:
    return repr(tuple(f"{name}: ..." for name, _ in value))


#: Headers the WebSocket upgrade itself writes (``Host`` has ``ws_host``).
_UPGRADE_HEADERS = ("host", "upgrade", "connection", "sec-websocket-")


def _headers(value: object) -> tuple[tuple[str, str], ...]:
    """Headers as pairs (from pairs or a mapping), each one h11 would send (so no line
    breaks or bad names), none of those the upgrade writes itself."""
    items = value.items() if isinstance(value, dict) else value
    pairs: list[tuple[str, str]] = []
    for pair in items:  # type: ignore[attr-defined]
        name, header_value = pair
        if not (isinstance(name, str) and isinstance(header_value, str)):
            raise ValueError(f"a header is a pair of strings, not {pair!r}")
        if name.lower().startswith(_UPGRADE_HEADERS):
            raise ValueError(f"the header {name!r} is the WebSocket upgrade's own")
        pairs.append((name, header_value))
    try:
        h11.Request(method="GET", target="/", headers=[("Host", "-"), *pairs])
    except h11.LocalProtocolError as exc:
        raise ValueError(f"bad header: {exc}") from None
    return tuple(pairs)


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
    backoff_max: float = DEFAULT_BACKOFF_MAX
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
    #: Receive and send buffer asked for on each UDP socket (the kernel grants at most its
    #: ``net.core.rmem_max`` / ``wmem_max``; 0: the kernel's defaults).
    udp_socket_buffer: int = UDP_SOCKET_BUFFER
    #: TLS for the control connection (see ``pytunnel.client_tls_context``); ``None``: plain
    #: unless ``tls_fingerprint`` is set.
    tls: ssl.SSLContext | None = None
    #: Name the server certificate must carry; default: the host connected to.
    tls_server_hostname: str | None = None
    #: Pin the server certificate (``SHA256:...``, as printed by ``pytunnel serve``) instead of
    #: (or on top of) verifying its chain: for self-signed servers.
    tls_fingerprint: str | None = attrs.field(default=None, validator=_valid_fingerprint)
    #: Reach the server through this proxy: ``http://[user:pass@]host:port`` (HTTP CONNECT,
    #: basic auth) or ``socks5://`` / ``socks5h://``. ``None``: directly (the CLI reads
    #: ``HTTPS_PROXY`` / ``ALL_PROXY`` / ``NO_PROXY`` when ``--proxy`` is not given).
    proxy: str | None = attrs.field(default=None, validator=_valid_proxy, repr=_proxy_repr)
    #: Extra request headers of the WebSocket upgrade (``Authorization`` for a gateway);
    #: their values are never shown (they are often credentials).
    ws_headers: tuple[tuple[str, str], ...] = attrs.field(
        default=(), converter=_headers, repr=_headers_repr
    )
    #: The ``Host`` header of the WebSocket upgrade; default: the URL's host.
    ws_host: str | None = None
    #: A WebSocket ping whenever nothing was received for this long, so that proxies which
    #: drop idle WebSockets never see one idle; ``None``: off (the heartbeat still runs).
    ws_ping_interval: float | None = attrs.field(
        default=DEFAULT_PING_INTERVAL, validator=check_ping_interval
    )

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
    udp_socket_buffer: int
    tls: ssl.SSLContext | None
    tls_server_hostname: str | None
    tls_fingerprint: str | None
    proxy: str | None
    ws_headers: tuple[tuple[str, str], ...]
    ws_host: str | None
    ws_ping_interval: float | None
