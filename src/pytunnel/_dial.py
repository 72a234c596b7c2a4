"""Dialling targets, with every failure sorted into NODE_TIMEOUT or NODE_UNSTABLE.

Each failure also gets its reason as a :class:`~pytunnel.errors.DialFailure`, decided from the
OS's errno and the exception's type (``failure_of``), never from an error message's text.

Whichever side dials uses this, logs one English line tagged with the category, and reports
the outcome back over the protocol (``Refuse`` with the code), so the side that asked raises the
same typed exception. A failed dial leaves nothing behind: ``open_tcp_stream`` closes its
half-made sockets itself, so does the direct connect to an IP literal, and there is no task
here to outlive the call.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Sequence

import trio

from ._policy import PermitOpen
from .errors import (
    DialError,
    DialFailure,
    NodeTimeoutError,
    NodeUnstableError,
    TargetForbiddenError,
)

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "describe_os_error",
    "dial",
    "failure_of",
    "dial_permitted",
    "format_target",
    "resolve",
]

log = logging.getLogger("pytunnel.dial")

#: Seconds a dial may take before it counts as NODE_TIMEOUT.
DEFAULT_CONNECT_TIMEOUT = 5.0

_TIMEOUT_ERRNOS = {errno.ETIMEDOUT}

#: errno -> reason, in the order a reason wins when several addresses failed differently (the
#: target's own answer first: a refusal says more about it than a route that failed).
_FAILURE_ERRNOS: tuple[tuple[DialFailure, frozenset[int]], ...] = (
    (DialFailure.REFUSED, frozenset({errno.ECONNREFUSED})),
    (DialFailure.RESET, frozenset({errno.ECONNRESET, errno.ECONNABORTED, errno.EPIPE})),
    (DialFailure.NETWORK_UNREACHABLE, frozenset({errno.ENETUNREACH, errno.ENETDOWN})),
    (DialFailure.HOST_UNREACHABLE, frozenset({errno.EHOSTUNREACH, errno.EHOSTDOWN})),
    (DialFailure.TIMEOUT, frozenset(_TIMEOUT_ERRNOS)),
)


def format_target(host: str, port: int) -> str:
    """``host:port``, with brackets around IPv6 literals."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def describe_os_error(exc: BaseException) -> str:
    """The OS-level reason inside what ``open_tcp_stream`` raised ("Connection refused")."""
    codes = _errnos(exc)
    if codes:
        return "; ".join(sorted({os.strerror(code) for code in codes}))
    if isinstance(exc, socket.gaierror):
        return f"name resolution failed: {exc.strerror or exc}"
    return str(exc) or type(exc).__name__


def _errnos(exc: BaseException) -> set[int]:
    found: set[int] = set()
    stack = [exc]
    while stack:
        e = stack.pop()
        if isinstance(e, OSError) and e.errno is not None and not isinstance(e, socket.gaierror):
            found.add(e.errno)
        stack.extend(getattr(e, "exceptions", ()))
        if e.__cause__ is not None:
            stack.append(e.__cause__)
    return found


def failure_of(exc: BaseException) -> DialFailure:
    """The reason of a failed connect, from the errnos and exception types inside ``exc``
    (``open_tcp_stream`` may raise a group of one error per address tried)."""
    if isinstance(exc, (UnicodeError, ValueError)):
        return DialFailure.INVALID_HOST
    codes = _errnos(exc)
    for failure, known in _FAILURE_ERRNOS:
        if codes & known:
            return failure
    if _has_gaierror(exc):
        return DialFailure.DNS
    return DialFailure.UNKNOWN


def _has_gaierror(exc: BaseException) -> bool:
    stack = [exc]
    while stack:
        e = stack.pop()
        if isinstance(e, socket.gaierror):
            return True
        stack.extend(getattr(e, "exceptions", ()))
        if e.__cause__ is not None:
            stack.append(e.__cause__)
    return False


async def resolve(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to for a TCP connection, in the resolver's order
    (an IP literal is its own answer, without DNS)."""
    infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses: list[str] = []
    for *_, sockaddr in infos:
        address = str(sockaddr[0])
        if address not in addresses:
            addresses.append(address)
    return addresses


def _literal_family(host: str) -> int | None:
    """The address family of an IP literal (without an IPv6 zone), ``None`` for a name."""
    if "%" in host:
        return None
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    return socket.AF_INET6 if address.version == 6 else socket.AF_INET


async def _connect_literal(family: int, address: str, port: int) -> trio.SocketStream:
    """One connect to an IP literal: what ``trio.open_tcp_stream`` does for a single address,
    without its lookup, its nursery and its attempt task (a sizeable part of a relayed
    connection's cost at the dialling side). The socket is closed if the connect fails."""
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        await sock.connect((address, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


async def _open_tcp(host: str, port: int) -> trio.SocketStream:
    family = _literal_family(host)
    if family is None:
        return await trio.open_tcp_stream(host, port)
    return await _connect_literal(family, host, port)


async def _open_first(addresses: Sequence[str], port: int) -> trio.SocketStream:
    """Connect to the first of ``addresses`` that answers; IP literals only, so no lookup."""
    last: OSError = OSError(errno.EADDRNOTAVAIL, "no address to connect to")
    for address in addresses:
        try:
            return await _open_tcp(address, port)
        except OSError as exc:
            last = exc
    raise last


async def dial(
    host: str,
    port: int,
    *,
    timeout: float = DEFAULT_CONNECT_TIMEOUT,
    logger: logging.Logger = log,
    level: int = logging.WARNING,
    addresses: Sequence[str] | None = None,
) -> trio.SocketStream:
    """Connect to ``host:port`` or raise ``NodeTimeoutError`` / ``NodeUnstableError``.

    DNS resolution happens here, at the dialling side, through trio's resolver (in a thread),
    inside the same deadline as the connect. With ``addresses`` (already resolved and
    checked), exactly those are dialled and no second lookup can change where the connection
    goes; ``host`` then only names the target in errors.
    """

    async def connect() -> trio.SocketStream:
        if addresses is None:
            return await _open_tcp(host, port)
        return await _open_first(addresses, port)

    return await _guarded(connect, host, port, timeout=timeout, logger=logger, level=level)


async def dial_permitted(
    permit: PermitOpen,
    host: str,
    port: int,
    *,
    timeout: float = DEFAULT_CONNECT_TIMEOUT,
    logger: logging.Logger = log,
    level: int = logging.WARNING,
) -> trio.SocketStream:
    """Dial ``host:port`` if ``permit`` allows it, deciding on what is actually dialled.

    Allowed by name (or ``any``): dialled by name. Otherwise, when an IP pattern covers the
    port, the name is resolved once (inside the dial's deadline), the addresses the policy
    allows are kept, and only those are dialled. Raises ``TargetForbiddenError`` (not logged:
    the caller says who asked) or the dial's ``DialError``.
    """
    target = format_target(host, port)
    if permit.allows_name(host, port):
        return await dial(host, port, timeout=timeout, logger=logger, level=level)
    forbidden = TargetForbiddenError(f"{target} is not permitted by the server", target=target)
    if not permit.needs_address(port):
        raise forbidden

    async def connect() -> trio.SocketStream:
        try:
            resolved = await resolve(host, port)
        except (OSError, UnicodeError, ValueError) as exc:
            # a name with no address cannot be shown to be permitted: that is the answer
            # the client gets, with the reason
            reason = describe_os_error(exc) if isinstance(exc, OSError) else "invalid host name"
            raise TargetForbiddenError(
                f"{target} is not permitted by the server ({reason})", target=target
            ) from None
        allowed = [a for a in resolved if permit.allows_address(a, port)]
        if not allowed:
            raise forbidden
        return await _open_first(allowed, port)

    return await _guarded(connect, host, port, timeout=timeout, logger=logger, level=level)


async def _guarded(
    connect: Callable[[], Awaitable[trio.SocketStream]],
    host: str,
    port: int,
    *,
    timeout: float,
    logger: logging.Logger,
    level: int,
) -> trio.SocketStream:
    """Run ``connect`` within ``timeout`` and sort its failure into one typed, logged error."""
    target = format_target(host, port)
    error: DialError
    try:
        with trio.fail_after(timeout):
            return await connect()
    except trio.TooSlowError:
        reason = f"timed out after {timeout:g} s"
        error = NodeTimeoutError(f"dial {target} {reason}", target=target, reason=reason)
    except (UnicodeError, ValueError) as exc:
        # not a name that can be looked up at all (IDNA: empty or over-long labels)
        reason = f"invalid host name ({exc})"
        error = NodeUnstableError(
            f"dial {target} failed: {reason}",
            target=target,
            failure=DialFailure.INVALID_HOST,
            reason=reason,
        )
    except OSError as exc:
        reason = describe_os_error(exc)
        if _errnos(exc) & _TIMEOUT_ERRNOS:
            error = NodeTimeoutError(
                f"dial {target} failed: {reason}", target=target, reason=reason
            )
        else:
            error = NodeUnstableError(
                f"dial {target} failed: {reason}",
                target=target,
                failure=failure_of(exc),
                reason=reason,
            )
    logger.log(level, "[%s] %s", error.category, error.message)
    raise error
