"""The local admin API's transport: JSON over HTTP on a Unix socket or a loopback port.

What the API answers is the caller's (``pytunnel connect`` manages its forwards through it,
``pytunnel serve`` shows its clients); this module is where it listens and who may ask:

- a **Unix socket** (the default) is made mode 0600 in a directory only its user can enter,
  so the file system is the access check; a socket file left behind by a killed process is
  found (nothing answers on it) and replaced, while one a live process answers on is an
  ``AddressInUseError``;
- a **loopback port** (``--admin HOST:PORT``) needs a token: every request carries
  ``Authorization: Bearer TOKEN``, compared in constant time; a missing or wrong one is a 401
  with a JSON error body, and nothing else is looked at.

Requests are parsed by pytunnel's HTTP stack (h11). :func:`request` is the matching client
(stdlib ``http.client``), used by the ``pytunnel status`` / ``forwards`` / ``reload`` verbs.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import http.client
import ipaddress
import json
import logging
import os
import socket
import stat
import tempfile
from collections.abc import Awaitable, Callable, Collection
from pathlib import Path
from typing import Any, NoReturn

import attrs
import trio

from ._http import HttpLimits, Request, Response, serve_http_stream
from .errors import AddressInUseError, PermissionDeniedError

__all__ = [
    "AdminError",
    "Handler",
    "Request",
    "Response",
    "default_socket_dir",
    "error_response",
    "find_sockets",
    "request",
    "serve_admin_tcp",
    "serve_admin_unix",
]

log = logging.getLogger("pytunnel.admin")

Handler = Callable[[Request], Awaitable[Response]]

#: Requests are small JSON documents; a bigger body is refused (413) before it is read.
_LIMITS = HttpLimits(max_body=64 * 1024, handler_timeout=60.0)


class AdminError(Exception):
    """A request the API refuses: answered with ``status`` and ``{"error": message}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def error_response(status: int, message: str) -> Response:
    """The JSON error body every refusal has: ``{"error": "...", "status": 404}``."""
    return Response.json(status, {"error": message, "status": status})


def _guarded(handler: Handler) -> Handler:
    """``handler`` with :class:`AdminError` turned into its JSON answer."""

    async def guarded(req: Request) -> Response:
        try:
            return await handler(req)
        except AdminError as exc:
            return error_response(exc.status, exc.message)

    return guarded


def default_socket_dir() -> Path:
    """Where admin sockets live: ``$XDG_RUNTIME_DIR/pytunnel``, else a per-user directory in
    the temporary directory."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "pytunnel"
    return Path(tempfile.gettempdir()) / f"pytunnel-{os.getuid()}"


def _private_dir(path: Path) -> None:
    """Make ``path`` (mode 0700) or check that it is ours and closed to others, so no other
    user can swap the socket file for their own."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.stat()
    if info.st_uid != os.getuid() or info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise PermissionDeniedError(
            f"{path} is not a private directory of this user (mode {stat.filemode(info.st_mode)})"
        )


def _alive(path: Path) -> bool:
    """Whether a process answers on the Unix socket at ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(2)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except OSError as exc:
            if exc.errno in (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTSOCK):
                return False
            raise
        return True


def find_sockets(directory: Path | None = None, pattern: str = "*.sock") -> list[Path]:
    """The live admin sockets matching ``pattern`` in ``directory`` (default:
    :func:`default_socket_dir`); stale ones (left by a killed process) are removed on the
    way."""
    directory = directory or default_socket_dir()
    found = []
    for path in sorted(directory.glob(pattern)) if directory.is_dir() else []:
        if _alive(path):
            found.append(path)
        else:
            log.info("removing stale admin socket %s", path)
            path.unlink(missing_ok=True)
    return found


def _bind_unix(path: Path) -> socket.socket:
    """A listening Unix socket at ``path``, mode 0600, replacing a stale file."""
    _private_dir(path.parent)
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise AddressInUseError(f"{path} exists and is not a socket")
        if _alive(path):
            raise AddressInUseError(f"another process serves its admin API on {path}")
        log.warning("replacing stale admin socket %s (its process is gone)", path)
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # Made 0600 between bind and listen: until listen() nobody can connect, so there is no
    # moment when others could. (Not through the umask: that is the whole process's, and
    # this runs in a worker thread while other threads may be creating files.)
    try:
        sock.bind(str(path))
        os.chmod(path, 0o600)
        sock.listen(64)
    except BaseException:
        sock.close()
        raise
    return sock


async def serve_admin_unix(
    handler: Handler,
    path: str | os.PathLike[str],
    *,
    task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Serve ``handler`` on a Unix socket at ``path`` until cancelled, then remove the file.

    ``task_status.started(path)`` once listening. Raises ``AddressInUseError`` if a live
    process serves there, ``PermissionDeniedError`` if its directory is open to others."""
    where = Path(path)
    sock = await trio.to_thread.run_sync(_bind_unix, where)
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    guarded = _guarded(handler)

    async def connection(stream: trio.SocketStream) -> None:
        await serve_http_stream(stream, guarded, limits=_LIMITS, peer=("unix", 0))

    try:
        await trio.serve_listeners(connection, [listener], task_status=_Started(task_status, where))
    finally:
        with trio.CancelScope(shield=True):
            await listener.aclose()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(where)  # one quick call; under cancellation nothing may be awaited
    raise AssertionError("unreachable")  # pragma: no cover - serve_listeners never returns


@attrs.frozen
class _Started:
    """Hands a task status what the caller wants reported, not the listeners."""

    status: trio.TaskStatus[Any]
    value: object

    def started(self, _value: object = None) -> None:
        self.status.started(self.value)


def _check_loopback(host: str) -> None:
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        raise PermissionDeniedError(
            f"the admin API listens on loopback only (127.0.0.1, ::1), not {host}"
        )


_LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")


def _foreign(req: Request) -> str | None:
    """Why a request is refused as coming from another site, or ``None``.

    A browser on this machine may be asked by any page to send requests to a loopback port:
    such a request carries an ``Origin`` (or ``Sec-Fetch-Site: cross-site``) that is not this
    API's, or, through DNS rebinding, a ``Host`` that is not a loopback name."""
    host = req.header("host") or ""
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    if name not in _LOOPBACK_NAMES:
        return f"unexpected Host {host!r}: the admin API answers loopback names only"
    origin = req.header("origin")
    if origin is not None and origin != f"http://{host}":
        return "cross-origin request refused"
    if req.header("sec-fetch-site") == "cross-site":
        return "cross-site request refused"
    return None


def _with_token(handler: Handler, token: str, public_paths: Collection[str]) -> Handler:
    # digests of equal length compared, so the time taken tells nothing of the token's length
    expected = hashlib.sha256(f"Bearer {token}".encode()).digest()

    async def checked(req: Request) -> Response:
        foreign = _foreign(req)
        if foreign is not None:
            return error_response(403, foreign)
        if req.method in ("GET", "HEAD") and req.path in public_paths:
            return await handler(req)
        given = hashlib.sha256((req.header("authorization") or "").encode("latin-1")).digest()
        if not hmac.compare_digest(given, expected):
            return error_response(401, "a valid admin token is needed (Authorization: Bearer)")
        return await handler(req)

    return checked


async def serve_admin_tcp(
    handler: Handler,
    host: str,
    port: int,
    *,
    token: str,
    public_paths: Collection[str] = (),
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Serve ``handler`` on ``host:port`` (loopback only) for requests bearing ``token``.

    ``public_paths`` may be read (GET) without the token: static pages that hold no data
    (the dashboard, which asks for the token itself). Every request must come from this
    machine's own pages: a foreign ``Origin``, ``Sec-Fetch-Site: cross-site`` or a ``Host``
    that is not a loopback name (DNS rebinding) is a 403.

    ``task_status.started((host, port))`` with the real port. Raises
    ``PermissionDeniedError`` for a host that is not loopback, ``ValueError`` for an empty
    token, ``OSError`` if the port cannot be bound."""
    _check_loopback(host)
    if not token:
        raise ValueError("the admin API on a port needs a token")
    guarded = _with_token(_guarded(handler), token, public_paths)
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()

    async def connection(stream: trio.SocketStream) -> None:
        await serve_http_stream(stream, guarded, limits=_LIMITS)

    await trio.serve_listeners(
        connection, listeners, task_status=_Started(task_status, (str(bound[0]), int(bound[1])))
    )
    raise AssertionError("unreachable")  # pragma: no cover


# ------------------------------------------------------------------- the client side


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def request(
    method: str,
    path: str,
    body: object = None,
    *,
    unix_path: str | None = None,
    address: tuple[str, int] | None = None,
    token: str | None = None,
    timeout: float = 30.0,
) -> tuple[int, Any]:
    """One request to an admin API (blocking: for command-line tools); the status and the
    decoded JSON body. Raises ``OSError`` if nothing answers, ``ValueError`` if the answer
    is not JSON."""
    if unix_path is not None:
        conn: http.client.HTTPConnection = _UnixConnection(unix_path, timeout)
    elif address is not None:
        conn = http.client.HTTPConnection(address[0], address[1], timeout=timeout)
    else:
        raise ValueError("give unix_path or address")
    headers = {"accept": "application/json"}
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["content-type"] = "application/json"
    try:
        conn.request(method, path, body=data, headers=headers)
        response = conn.getresponse()
        raw = response.read()
    finally:
        conn.close()
    try:
        return response.status, json.loads(raw) if raw else None
    except json.JSONDecodeError:
        raise ValueError(f"the admin API answered {response.status} with no JSON") from None
