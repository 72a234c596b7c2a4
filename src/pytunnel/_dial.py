"""Dialling targets, with every failure sorted into NODE_TIMEOUT or NODE_UNSTABLE.

Whichever side dials uses this, logs one English line tagged with the category, and reports
the outcome back over the protocol (``Refuse`` with the code), so the side that asked raises the
same typed exception. A failed dial leaves nothing behind: ``open_tcp_stream`` closes its
half-made sockets itself and there is no task here to outlive the call.
"""

from __future__ import annotations

import errno
import logging
import os
import socket

import trio

from .errors import DialError, NodeTimeoutError, NodeUnstableError

__all__ = ["DEFAULT_CONNECT_TIMEOUT", "describe_os_error", "dial", "format_target"]

log = logging.getLogger("pytunnel.dial")

#: Seconds a dial may take before it counts as NODE_TIMEOUT.
DEFAULT_CONNECT_TIMEOUT = 5.0

_TIMEOUT_ERRNOS = {errno.ETIMEDOUT}


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


async def dial(
    host: str,
    port: int,
    *,
    timeout: float = DEFAULT_CONNECT_TIMEOUT,
    logger: logging.Logger = log,
    level: int = logging.WARNING,
) -> trio.SocketStream:
    """Connect to ``host:port`` or raise ``NodeTimeoutError`` / ``NodeUnstableError``.

    DNS resolution happens here, at the dialling side, through trio's resolver (in a thread),
    inside the same deadline as the connect.
    """
    target = format_target(host, port)
    error: DialError
    try:
        with trio.fail_after(timeout):
            return await trio.open_tcp_stream(host, port)
    except trio.TooSlowError:
        error = NodeTimeoutError(f"dial {target} timed out after {timeout:g} s", target=target)
    except (UnicodeError, ValueError) as exc:
        # not a name that can be looked up at all (IDNA: empty or over-long labels)
        error = NodeUnstableError(f"dial {target} failed: invalid host name ({exc})", target=target)
    except OSError as exc:
        reason = describe_os_error(exc)
        if _errnos(exc) & _TIMEOUT_ERRNOS:
            error = NodeTimeoutError(f"dial {target} failed: {reason}", target=target)
        else:
            error = NodeUnstableError(f"dial {target} failed: {reason}", target=target)
    logger.log(level, "[%s] %s", error.category, error.message)
    raise error
