"""The real address of a connection that reaches the server through a trusted proxy.

Behind a TCP load balancer (HAProxy, nginx ``stream``, a cloud balancer) every connection
comes from the balancer's address, so the per-address limits would count all clients as one
and every log line and forwarded header would name the balancer. Such a proxy can prepend a
PROXY protocol header (v1 or v2) naming the real source. The server reads it only from the
addresses it is told to trust (``trusted_proxies``): a header from anyone else is not looked
for (it is just bytes, and fails as whatever protocol was expected), so it cannot be forged
from outside; a trusted proxy that sends no valid header is a misconfiguration, and its
connection is closed rather than served under the proxy's address.

The header is consumed exactly (peeked, then read to its last byte), so the connection stays
the plain ``trio.SocketStream`` it was and what follows is left in the kernel for the protocol
that reads next.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Iterable

import trio

from ._dial import format_target
from .protocol.proxy import V2_SIGNATURE, ProxyHeader, ProxyHeaderError, ProxyHeaderReader

__all__ = [
    "Network",
    "ProxyHeaderError",
    "is_trusted",
    "public_peer",
    "read_proxy_header",
    "real_peer",
    "trusted_networks",
]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

log = logging.getLogger("pytunnel.server")

#: The longest version 2 header read (its fixed part and addresses plus TLVs); version 1
#: headers are at most 107 bytes.
MAX_HEADER = len(V2_SIGNATURE) + 4 + 2048
#: Seconds between two looks at a header that arrived in pieces (rare: proxies write the
#: header in one segment).
_RETRY = 0.005


def trusted_networks(values: Iterable[str | Network]) -> tuple[Network, ...]:
    """``values`` (addresses or CIDR networks: ``10.0.0.0/8``, ``127.0.0.1``, ``::1``) as
    networks; a value that is neither raises ``ValueError`` naming it."""
    networks: list[Network] = []
    for value in values:
        if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
            networks.append(value)
            continue
        text = str(value).strip()
        try:
            networks.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise ValueError(
                f"trusted proxy {text!r} is not an IP address or network (e.g. 10.0.0.0/8)"
            ) from None
    return tuple(networks)


def is_trusted(host: str, networks: tuple[Network, ...]) -> bool:
    """Whether ``host`` (as ``getpeername`` gives it) is in ``networks``; an IPv4-mapped IPv6
    address counts as its IPv4 address, as a dual-stack listener reports IPv4 peers that way."""
    if not networks:
        return False
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)


async def read_proxy_header(stream: trio.SocketStream, timeout: float) -> ProxyHeader:
    """Read the PROXY header at the start of ``stream`` and nothing after it.

    Raises:
      ProxyHeaderError: the connection does not start with a valid header, closed before
        one was complete, or took longer than ``timeout`` seconds to send it.
    """
    sock = stream.socket
    seen = 0
    try:
        with trio.fail_after(timeout):
            while True:
                data = await sock.recv(MAX_HEADER, socket.MSG_PEEK)
                if not data:
                    raise ProxyHeaderError("the connection closed before its PROXY header")
                if len(data) == seen:
                    # nothing new since the last look: the rest of the header is on its way
                    await trio.sleep(_RETRY)
                    continue
                seen = len(data)
                reader = ProxyHeaderReader(max_v2_length=MAX_HEADER - len(V2_SIGNATURE) - 4)
                header = reader.feed(data)
                if header is None:
                    if seen >= MAX_HEADER:
                        raise ProxyHeaderError(f"no PROXY header within {MAX_HEADER} bytes")
                    continue
                await _discard(sock, len(data) - len(reader.rest))
                return header
    except trio.TooSlowError:
        raise ProxyHeaderError(f"no complete PROXY header within {timeout:g} s") from None
    except OSError as exc:
        raise ProxyHeaderError(f"the connection failed before its PROXY header: {exc}") from None


async def _discard(sock: trio.socket.SocketType, count: int) -> None:
    """Read exactly ``count`` bytes that a peek has shown to be there."""
    while count > 0:
        got = await sock.recv(count)
        if not got:
            raise ProxyHeaderError("the connection closed inside its PROXY header")
        count -= len(got)


async def real_peer(
    stream: trio.SocketStream,
    peer: tuple[str, int],
    networks: tuple[Network, ...],
    timeout: float,
) -> tuple[tuple[str, int], tuple[str, int] | None]:
    """The address ``stream`` really comes from, and the trusted proxy it came through.

    For a peer outside ``networks``: ``(peer, None)``, nothing read. For a trusted proxy: its
    header is read; its source is the real peer (``(source, peer)``), or ``peer`` itself for
    a header that names no source (a ``LOCAL`` health check, ``UNKNOWN``).

    Raises:
      ProxyHeaderError: a trusted proxy sent no valid header (see :func:`read_proxy_header`).
    """
    if not is_trusted(peer[0], networks):
        return peer, None
    header = await read_proxy_header(stream, timeout)
    if header.source is None:
        return peer, peer
    return (header.source[0], int(header.source[1])), peer


#: Seconds a trusted proxy has to send its header on a public listener (proxies write it
#: with the connection, before any client byte).
HEADER_TIMEOUT = 5.0


async def public_peer(
    conn: trio.SocketStream, networks: tuple[Network, ...], what: str
) -> tuple[str, int] | None:
    """The address a public connection (to a port, a shared listener) really comes from;
    ``None`` when it is gone already or came from a trusted proxy without a valid header
    (logged; the caller closes it). ``what`` names the listener in that log line."""
    try:
        host, port = conn.socket.getpeername()[:2]
    except OSError:
        return None
    peer = (str(host), int(port))
    if not networks:
        return peer
    try:
        real, _ = await real_peer(conn, peer, networks, HEADER_TIMEOUT)
    except ProxyHeaderError as exc:
        log.warning(
            "closing a connection to %s from trusted proxy %s: %s",
            what,
            format_target(*peer),
            exc,
        )
        return None
    return real
