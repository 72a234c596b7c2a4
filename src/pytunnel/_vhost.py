"""Sharing one public port by name: HTTP routed on ``Host``, TLS routed on SNI, untouched.

A shared listener reads just enough of each new connection to learn the name it is for: the
request head (parsed by h11, bounded in size and time) for HTTP, the ClientHello
(:mod:`pytunnel.protocol.tls_hello`) for TLS. It looks the name up in :class:`NameRoutes`
and hands the connection to that route with every byte read so far put back in front
(:class:`ReplayStream`), so the route sees the connection exactly as the client sent it: a
WebSocket upgrade, later requests on a kept-alive connection and the whole TLS session pass
as bytes. The TLS is never terminated here; the service behind the route holds the
certificate. A name nobody registered gets a small 404 page (HTTP, written by h11) or an
``unrecognized_name`` alert (TLS), and a log line.

Names: a route registers either a label under the server's ``domain`` (``app`` ->
``app.tunnel.example.com``) or a full name that one of the ``allow_domains`` patterns admits
(``shop.example.org``, ``*.example.org``). Names are DNS host names, compared in lower case;
one name belongs to one route at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence

import h11
import trio

from ._listen import accept
from ._proxied import Network, public_peer
from ._relay import abort
from ._util import Episodes
from .errors import NameInUseError, NameNotAllowedError, printable
from .protocol.tls_hello import (
    ALERT_INTERNAL_ERROR,
    ALERT_UNRECOGNIZED_NAME,
    ClientHelloError,
    ClientHelloReader,
    alert,
    valid_host_name,
)

__all__ = [
    "Elsewhere",
    "NameRoutes",
    "ReplayStream",
    "RouteTarget",
    "answer_and_close",
    "route_connection",
    "route_name",
    "serve_name_routing",
    "unavailable_reply",
]

log = logging.getLogger("pytunnel.vhost")

#: What a route does with a connection routed to it: the stream (with the bytes read so far
#: put back) and the peer's address.
RouteTarget = Callable[[trio.abc.HalfCloseableStream, tuple[str, int]], Awaitable[None]]
#: Asked for a name no local route holds: ``(name, stream, peer)``, the stream with the bytes
#: read so far put back; true if it took the connection (a node of a cluster relays it to
#: the node whose client holds the name), false for the 404 as usual.
Elsewhere = Callable[[str, trio.abc.HalfCloseableStream, tuple[str, int]], Awaitable[bool]]

DEFAULT_MAX_HEAD = 16 * 1024
DEFAULT_HEAD_TIMEOUT = 10.0
#: Connections one shared listener lets read their head at once.
DEFAULT_MAX_PENDING = 1024


def _pattern_admits(pattern: str, name: str) -> bool:
    if pattern.startswith("*."):
        suffix = pattern[1:]  # ".example.org": one or more labels before it
        return name.endswith(suffix) and len(name) > len(suffix)
    return name == pattern


class NameRoutes:
    """Which route holds which name."""

    def __init__(
        self, *, domain: str | None = None, allow_domains: Sequence[str] = (), port: int = 0
    ) -> None:
        #: The real port of the shared listener these routes are served on (told to clients).
        self.port = port
        self.domain = _normal(domain) if domain else None
        self.allow_domains = tuple(
            "*." + _normal(p[2:]) if p.startswith("*.") else _normal(p) for p in allow_domains
        )
        self._routes: dict[str, RouteTarget] = {}

    def full_name(self, name: str) -> str:
        """The name a route asking for ``name`` gets: a single label goes under ``domain``;
        a name with dots is taken as it is and must be allowed. ``NameNotAllowedError`` if
        not."""
        name = _normal(name)
        if "." not in name:
            if self.domain is None:
                raise NameNotAllowedError(
                    f"{name!r} is a single label and this server has no --domain to put it under"
                )
            return f"{name}.{self.domain}"
        if (
            self.domain is not None
            and name.endswith("." + self.domain)
            and name.count(".") == self.domain.count(".") + 1  # one label under the domain
        ):
            return name
        if any(_pattern_admits(pattern, name) for pattern in self.allow_domains):
            return name
        raise NameNotAllowedError(f"{name!r} is not a name this server routes")

    def register(self, name: str, target: RouteTarget) -> str:
        """Route ``name`` to ``target``; returns the full name. ``NameInUseError`` if another
        route holds it."""
        full = self.full_name(name)
        if full in self._routes:
            raise NameInUseError(f"{full} is already routed to another client", address=full)
        self._routes[full] = target
        return full

    def unregister(self, full_name: str, target: RouteTarget) -> None:
        """Give ``full_name`` back, if ``target`` still holds it."""
        if self._routes.get(full_name) is target:
            del self._routes[full_name]

    def lookup(self, host: str) -> RouteTarget | None:
        """The route for a ``Host`` header or SNI name (a port and a trailing dot ignored)."""
        name = route_name(host)
        return None if name is None else self._routes.get(name)

    def __len__(self) -> int:
        return len(self._routes)


def route_name(host: str) -> str | None:
    """The name a ``Host`` header or SNI name is routed by (lower case, no port, no trailing
    dot); ``None`` for an IPv6 literal, which is never a routed name."""
    name = host.strip().lower()
    if name.startswith("["):
        return None
    name = name.rpartition(":")[0] if ":" in name else name
    return name.rstrip(".")


def _normal(name: str) -> str:
    name = name.strip().lower().rstrip(".")
    if not valid_host_name(name):
        raise NameNotAllowedError(f"{printable(name[:80])!r} is not a valid host name")
    return name


class ReplayStream(trio.abc.HalfCloseableStream):
    """``stream`` with ``prefix`` put back in front of what it receives next."""

    def __init__(self, stream: trio.abc.HalfCloseableStream, prefix: bytes) -> None:
        self.stream = stream
        self._prefix = prefix

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._prefix:
            size = len(self._prefix) if max_bytes is None else max_bytes
            out, self._prefix = self._prefix[:size], self._prefix[size:]
            await trio.lowlevel.checkpoint()
            return out
        return await self.stream.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.stream.send_eof()

    def reset(self, code: int, message: str) -> None:
        """A relay cut short resets the connection (RST), as it would without the replay."""
        abort(self.stream, code, message)

    async def aclose(self) -> None:
        await self.stream.aclose()


class _Refused(Exception):
    """The connection is answered here (``reply``) and closed instead of routed."""

    def __init__(self, reason: str, reply: bytes) -> None:
        super().__init__(reason)
        self.reply = reply


def _http_error(status: int, reason: bytes, text: str) -> bytes:
    """A complete, small error answer, written by h11."""
    body = f"{status} {reason.decode()}: {text}\n".encode()
    conn = h11.Connection(h11.SERVER)
    # h11 answers only after it saw a request; a minimal one stands in for what could not be
    # parsed, so the answer is the same whatever the client sent
    conn.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    conn.next_event()
    headers = [
        ("content-type", "text/plain; charset=utf-8"),
        ("content-length", str(len(body))),
        ("connection", "close"),
    ]
    out = conn.send(h11.Response(status_code=status, headers=headers, reason=reason)) or b""
    return out + (conn.send(h11.Data(data=body)) or b"") + (conn.send(h11.EndOfMessage()) or b"")


async def _read_http_name(stream: trio.abc.ReceiveStream, max_head: int) -> tuple[str, bytes]:
    """The ``Host`` of the first request on ``stream`` and every byte read to learn it."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=max_head)
    buffered = bytearray()
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            if len(buffered) > max_head:
                raise _Refused(
                    f"request head over {max_head} bytes",
                    _http_error(431, b"Request Header Fields Too Large", "request head too large"),
                ) from None
            raise _Refused(
                f"not an HTTP request ({exc})", _http_error(400, b"Bad Request", "bad request")
            ) from None
        if event is h11.NEED_DATA:
            data = await stream.receive_some(64 * 1024)
            if not data:
                raise _Refused("closed before the request head ended", b"")
            buffered += data
            conn.receive_data(bytes(data))
            continue
        if isinstance(event, h11.Request):
            # h11 bounds a head that arrives in pieces; one that came whole is measured here
            if len(buffered) - len(conn.trailing_data[0]) > max_head:
                raise _Refused(
                    f"request head over {max_head} bytes",
                    _http_error(431, b"Request Header Fields Too Large", "request head too large"),
                )
            hosts = [value for name, value in event.headers if name == b"host"]
            if len(hosts) != 1:
                raise _Refused(
                    "a request without exactly one Host header",
                    _http_error(400, b"Bad Request", "exactly one Host header is needed"),
                )
            return hosts[0].decode("ascii", "replace"), bytes(buffered)
        raise _Refused("not an HTTP request", _http_error(400, b"Bad Request", "bad request"))


async def _read_tls_name(stream: trio.abc.ReceiveStream, max_head: int) -> tuple[str, bytes]:
    """The SNI name of the ClientHello on ``stream`` and every byte read to learn it."""
    reader = ClientHelloReader(max_size=max(max_head, 16 * 1024 + 5))
    while True:
        data = await stream.receive_some(64 * 1024)
        if not data:
            raise _Refused("closed before the ClientHello ended", b"")
        try:
            hello = reader.feed(bytes(data))
        except ClientHelloError as exc:
            raise _Refused(f"not a TLS ClientHello ({exc})", b"") from None
        if hello is not None:
            if hello.server_name is None:
                raise _Refused(
                    "a ClientHello without a server name", alert(ALERT_UNRECOGNIZED_NAME)
                )
            return hello.server_name, bytes(reader.data)


async def _route_one(
    conn: trio.SocketStream,
    routes: NameRoutes,
    tls: bool,
    max_head: int,
    head_timeout: float,
    pending: list[int],
    elsewhere: Elsewhere | None,
    trusted_proxies: tuple[Network, ...] = (),
) -> None:
    """Read the name of ``conn``, hand it to its route or answer and close it; ``pending``
    (connections still in their head) is decremented once the head phase is over."""
    counted = [True]

    def head_done() -> None:
        if counted[0]:
            counted[0] = False
            pending[0] -= 1

    try:
        # within the head phase: a trusted proxy's header counts as part of the head
        peer = await public_peer(
            conn, trusted_proxies, f"the shared {'HTTPS' if tls else 'HTTP'} port"
        )
        if peer is None:
            await trio.aclose_forcefully(conn)
            return
        await _read_and_route(conn, peer, routes, tls, max_head, head_timeout, head_done, elsewhere)
    finally:
        head_done()


async def route_connection(
    conn: trio.abc.HalfCloseableStream,
    peer: tuple[str, int],
    routes: NameRoutes,
    *,
    tls: bool,
    max_head: int = DEFAULT_MAX_HEAD,
    head_timeout: float = DEFAULT_HEAD_TIMEOUT,
) -> None:
    """Route one connection whose public peer is ``peer`` as the shared listener would, to a
    local route only: a node link's stream, relayed by the node the connection reached, is
    served here exactly as if it had arrived on this node's own listener (and a name not
    served here any more gets the 404, never a relay back)."""
    await _read_and_route(conn, peer, routes, tls, max_head, head_timeout, lambda: None, None)


async def _read_and_route(
    conn: trio.abc.HalfCloseableStream,
    peer: tuple[str, int],
    routes: NameRoutes,
    tls: bool,
    max_head: int,
    head_timeout: float,
    head_done: Callable[[], None],
    elsewhere: Elsewhere | None,
) -> None:
    what = "TLS" if tls else "HTTP"
    target: RouteTarget | None = None
    try:
        try:
            with trio.fail_after(head_timeout):
                if tls:
                    name, buffered = await _read_tls_name(conn, max_head)
                else:
                    name, buffered = await _read_http_name(conn, max_head)
        except trio.TooSlowError:
            raise _Refused(f"no complete {what} head within {head_timeout:g} s", b"") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise _Refused("the connection broke during the head", b"") from None
        target = routes.lookup(name)
        if target is None and elsewhere is not None:
            head_done()
            if await elsewhere(name, ReplayStream(conn, buffered), peer):
                return
        if target is None:
            reply = (
                alert(ALERT_UNRECOGNIZED_NAME)
                if tls
                else _http_error(404, b"Not Found", f"no tunnel is serving {printable(name[:200])}")
            )
            raise _Refused(f"no route for {name!r}", reply)
    except _Refused as refused:
        log.info(
            "%s connection from %s refused: %s",
            what,
            printable(f"{peer[0]}:{peer[1]}"),
            printable(str(refused)),
        )
        await answer_and_close(conn, refused.reply)
        return
    head_done()
    await target(ReplayStream(conn, buffered), peer)


def unavailable_reply(tls: bool, name: str, reason: str) -> bytes:
    """What a connection for a route that cannot take it now gets: a 502 page (HTTP) or an
    ``internal_error`` alert (TLS)."""
    if tls:
        return alert(ALERT_INTERNAL_ERROR)
    text = f"the tunnel serving {printable(name[:200])} cannot take it: {printable(reason)}"
    return _http_error(502, b"Bad Gateway", text)


async def answer_and_close(conn: trio.abc.HalfCloseableStream, reply: bytes) -> None:
    """Send ``reply`` (if any; at most one second, even under cancellation) and close."""
    if reply:
        with trio.move_on_after(1), trio.CancelScope(shield=True):
            try:
                await conn.send_all(reply)
                await conn.send_eof()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
    await trio.aclose_forcefully(conn)


async def serve_name_routing(
    listeners: list[trio.SocketListener],
    routes: NameRoutes,
    *,
    tls: bool,
    max_head: int = DEFAULT_MAX_HEAD,
    head_timeout: float = DEFAULT_HEAD_TIMEOUT,
    max_pending: int = DEFAULT_MAX_PENDING,
    elsewhere: Elsewhere | None = None,
    trusted_proxies: tuple[Network, ...] = (),
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept on ``listeners`` forever; route each connection by its HTTP ``Host`` (or, with
    ``tls``, its SNI name) to the route that holds the name. Each connection runs in its own
    task of this call's nursery, so cancelling this call ends them all.

    At most ``max_pending`` connections may be reading their head at once (each holds a
    descriptor for up to ``head_timeout``); more are closed as they arrive, so slow heads
    cannot spend the process's descriptors. A routed connection no longer counts. A name no
    local route holds is offered to ``elsewhere`` (if given) before it gets the 404. A
    connection from one of ``trusted_proxies`` starts with a PROXY header naming its real
    source (``pytunnel._proxied``)."""
    pending = [0]
    refused: Episodes[None] = Episodes()
    what = "TLS" if tls else "HTTP"

    async with trio.open_nursery() as nursery:

        async def accept_loop(listener: trio.SocketListener) -> None:
            while True:
                conn = await accept(listener)
                if pending[0] >= max_pending:
                    if refused.refuse(None):
                        log.warning(
                            "shared %s port: %d connections still sending their head; closing "
                            "new ones until fewer are",
                            what,
                            max_pending,
                        )
                    await trio.aclose_forcefully(conn)
                    continue
                count = refused.end(None)
                if count:
                    log.info("shared %s port: accepting again after %d closed", what, count)
                pending[0] += 1
                nursery.start_soon(
                    _route_one,
                    conn,
                    routes,
                    tls,
                    max_head,
                    head_timeout,
                    pending,
                    elsewhere,
                    trusted_proxies,
                )

        for listener in listeners:
            nursery.start_soon(accept_loop, listener)
        task_status.started()
