"""The WebSocket transport: the tunnel's byte stream carried in WebSocket binary messages.

For networks where only HTTP(S) leaves, and for servers behind a reverse proxy or a CDN that
forwards WebSocket upgrades. wsproto does the protocol (its h11-based upgrade handshake, the
framing, masking, close and ping/pong); this module only adapts it to a ``trio.abc.Stream``, so
the session above it runs unchanged: ``send_all`` sends one binary message, ``receive_some``
hands out the payload bytes of binary messages as they arrive, whatever their boundaries (a
peer or a proxy may split or join messages; the tunnel's own framing does not care), and a
WebSocket close (or the transport's end) is the stream's EOF.

Keepalive: a proxy that drops an idle WebSocket (nginx's ``proxy_read_timeout``, a CDN's idle
timeout) must never see one idle, including when the tunnel's heartbeat interval is longer than
the proxy's timeout. With ``ping_interval`` set, a WebSocket ping is sent whenever nothing has
been received for that long; the peer's pong (and anything else it sends) restarts the clock.
The timer runs inside ``receive_some``, which the session's reader is always parked in, so
there is no task of its own: the stream stays a plain resource that its owner closes.

Control frames never wait behind the receive path: a pong (or close) owed to the peer while
the session's writer is in the middle of a send is queued and written right after that send,
and a keepalive ping is skipped while a send is under way (the link is not idle then). So the
reader never blocks on the writer, and two peers whose writers are both stuck on full
windows cannot deadlock through their pongs.
"""

from __future__ import annotations

import contextlib
import logging
import math
import operator
import urllib.parse
from collections import deque
from collections.abc import Awaitable, Callable
from typing import NoReturn

import attrs
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError as WsLocalProtocolError
from wsproto.utilities import RemoteProtocolError as WsRemoteProtocolError

from ..errors import HandshakeTimeoutError, WebSocketError, printable
from ._prefixed import PrefixedStream

__all__ = [
    "DEFAULT_PING_INTERVAL",
    "WebSocketStream",
    "WebSocketURL",
    "accept_tunnel_transport",
    "accept_websocket",
    "accept_websocket_or_raw",
    "check_ping_interval",
    "connect_websocket",
    "looks_like_http",
    "parse_websocket_url",
]

log = logging.getLogger("pytunnel.websocket")

#: Seconds without receiving anything before a keepalive ping: below the 30-60 s idle timeouts
#: common at proxies and load balancers, and chisel's 25 s.
DEFAULT_PING_INTERVAL = 25.0
#: Bytes asked of the transport per read.
_RECEIVE_SIZE = 256 * 1024
#: How long ``aclose`` tries to send the close frame before closing the transport anyway.
_CLOSE_TIMEOUT = 1.0
#: Body bytes of a refused upgrade kept for the error message.
_REJECT_BODY_KEPT = 200


@attrs.frozen
class WebSocketURL:
    """A ``ws://`` or ``wss://`` endpoint, split the way the connection needs it."""

    secure: bool
    host: str
    port: int
    #: The request target: path and query, at least ``/``.
    resource: str

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.secure else 80
        port = "" if self.port == default else f":{self.port}"
        return f"{'wss' if self.secure else 'ws'}://{host}{port}{self.resource}"

    @property
    def host_header(self) -> str:
        """The ``Host`` header a browser would send: the port only when not the default."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == (443 if self.secure else 80) else f"{host}:{self.port}"


def parse_websocket_url(text: str) -> WebSocketURL:
    """``ws://host[:port]/path`` or ``wss://...``; ``ValueError`` with the reason otherwise."""
    try:
        parts = urllib.parse.urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"bad WebSocket URL {text!r}: {exc}") from None
    if parts.scheme not in ("ws", "wss"):
        raise ValueError(f"bad WebSocket URL {text!r}: the scheme must be ws:// or wss://")
    if not parts.hostname:
        raise ValueError(f"bad WebSocket URL {text!r}: no host")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"bad WebSocket URL {text!r}: credentials go in --header, not the URL")
    if parts.fragment:
        raise ValueError(f"bad WebSocket URL {text!r}: a fragment means nothing here")
    secure = parts.scheme == "wss"
    resource = parts.path or "/"
    if parts.query:
        resource += "?" + parts.query
    return WebSocketURL(
        secure=secure,
        host=parts.hostname,
        port=port if port is not None else (443 if secure else 80),
        resource=resource,
    )


def check_ping_interval(_inst: object, _attribute: object, value: float | None) -> None:
    """The attrs validator of the configs' ``ws_ping_interval``: positive, or ``None``."""
    if value is not None and not (value > 0 and math.isfinite(value)):
        raise ValueError(f"ws_ping_interval must be positive (or None: off), not {value!r}")


def looks_like_http(first: bytes | bytearray) -> bool:
    """Whether a connection that starts with ``first`` is an HTTP request, not a tunnel
    handshake. A tunnel frame starts with its 4-byte big-endian length, and every handshake
    frame is under 4 KiB, so its first byte is 0; an HTTP method starts with a capital
    letter (as a length, that would be a frame of over a gigabyte)."""
    return bool(first) and 0x41 <= first[0] <= 0x5A


def _as_bytes(data: bytes | bytearray) -> bytes:
    # trio's socket streams already return bytes: no copy on the data path
    return data if isinstance(data, bytes) else bytes(data)


class WebSocketStream(trio.abc.Stream):
    """An open WebSocket as a trio byte stream (see the module docstring).

    Made by :func:`connect_websocket` and :func:`accept_websocket`; owns ``transport``.
    ``close_code`` / ``close_reason`` say how the peer closed it, once it has.
    """

    def __init__(
        self,
        transport: trio.abc.Stream,
        ws: WSConnection,
        *,
        ping_interval: float | None,
        name: str,
    ) -> None:
        if ping_interval is not None and not (ping_interval > 0 and math.isfinite(ping_interval)):
            raise ValueError(f"ping_interval must be a positive number, not {ping_interval!r}")
        self.transport = transport
        self.name = name
        self._ws = ws
        self._ping_interval = ping_interval
        self._chunks: deque[bytes] = deque()
        self._eof = False
        self._closed = False
        self._send_lock = trio.Lock()
        #: Control frames owed to the peer, written by whoever holds the send lock next.
        self._owed = bytearray()
        #: The pong owed for the latest ping (RFC 6455 5.5.3 lets earlier ones go
        #: unanswered), so a peer that pings while we cannot write holds 125 bytes, not more.
        self._owed_pong = b""
        self._sending = False
        self._receiving = False
        #: How the peer closed the WebSocket (1006: the transport ended without a close).
        self.close_code: int | None = None
        self.close_reason: str | None = None
        #: Keepalive pings sent so far.
        self.pings_sent = 0

    # ------------------------------------------------------------------ sending

    async def _write(self, data: bytes | bytearray) -> None:
        """Write ``data`` and then whatever control frames became owed meanwhile; the
        caller holds the send lock."""
        await self.transport.send_all(data)
        while self._owed or self._owed_pong:
            owed = self._owed_pong + bytes(self._owed)
            self._owed_pong = b""
            self._owed.clear()
            await self.transport.send_all(owed)

    def _encode(self, event: BytesMessage | Ping | CloseConnection) -> bytes:
        try:
            return self._ws.send(event)
        except WsLocalProtocolError:
            # the peer closed the WebSocket: like writing to a socket whose peer is gone
            raise trio.BrokenResourceError(
                f"the WebSocket {self.name} is closed by the peer"
            ) from None

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the WebSocket stream was closed")
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        self._sending = True
        try:
            if not data:
                await trio.lowlevel.checkpoint()
                return
            async with self._send_lock:
                await self._write(self._encode(BytesMessage(data=bytes(data))))
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport.wait_send_all_might_not_block()

    async def _send_control(self, frame: bytes, *, pong: bool = False) -> None:
        """Send a control frame without ever waiting for the writer: while it holds the lock
        the frame is owed, written right after its send (a ``pong`` replaces any pong owed
        before it)."""
        if self._send_lock.locked():
            if pong:
                self._owed_pong = frame
            else:
                self._owed += frame
            await trio.lowlevel.checkpoint()
            return
        # best effort: a peer that is gone cannot take its pong or close reply, and what it
        # sent before going must still be read; the next send_all reports the break
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            async with self._send_lock:
                await self._write(frame)

    # ------------------------------------------------------------------ receiving

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._closed:
            raise trio.ClosedResourceError("the WebSocket stream was closed")
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving on this stream")
        if max_bytes is not None:
            max_bytes = operator.index(max_bytes)  # TypeError for 1.5, as trio's streams
            if max_bytes < 1:
                raise ValueError("max_bytes must be at least 1")
        self._receiving = True
        try:
            while True:
                await self._handle_events()
                if self._chunks:
                    await trio.lowlevel.checkpoint()
                    return self._take(max_bytes)
                if self._eof:
                    await trio.lowlevel.checkpoint()
                    return b""
                data = await self._receive_transport()
                self._ws.receive_data(_as_bytes(data) if data else None)
        finally:
            self._receiving = False

    def _take(self, max_bytes: int | None) -> bytes:
        chunk = self._chunks.popleft()
        if max_bytes is not None and len(chunk) > max_bytes:
            self._chunks.appendleft(chunk[max_bytes:])
            chunk = chunk[:max_bytes]
        return chunk

    async def _receive_transport(self) -> bytes | bytearray:
        """The next bytes of the transport; a keepalive ping each ``ping_interval`` spent
        waiting for them. (Cancelling a read that has not returned loses nothing: trio's
        socket and TLS streams only hand over bytes when the call returns.)"""
        if self._ping_interval is None:
            return await self.transport.receive_some(_RECEIVE_SIZE)
        while True:
            with trio.move_on_after(self._ping_interval):
                return await self.transport.receive_some(_RECEIVE_SIZE)
            # skipped while a send is under way: the link is not idle then
            if self._ws.state is ConnectionState.OPEN and not self._send_lock.locked():
                self.pings_sent += 1
                await self._send_control(self._encode(Ping(payload=b"pytunnel")))

    async def _handle_events(self) -> None:
        for event in self._ws.events():
            if isinstance(event, BytesMessage):
                if event.data:
                    self._chunks.append(bytes(event.data))
            elif isinstance(event, Ping):
                await self._send_control(self._ws.send(event.response()), pong=True)
            elif isinstance(event, CloseConnection):
                self._eof = True
                self.close_code = event.code
                self.close_reason = event.reason
                if self._ws.state is ConnectionState.OPEN:
                    # not a close frame: wsproto found a framing violation (unmasked client
                    # frames, a bad opcode...) and says so as a close it wants sent
                    await self._send_control(self._ws.send(event))
                    reason = printable(event.reason or "")
                    raise trio.BrokenResourceError(
                        f"the WebSocket {self.name} broke the protocol"
                    ) from WebSocketError(f"{self.name}: {reason} ({event.code})", url=self.name)
                log.debug(
                    "WebSocket %s closed by the peer (%s %s)",
                    self.name,
                    event.code,
                    printable(event.reason or ""),
                )
                if self._ws.state is ConnectionState.REMOTE_CLOSING:
                    await self._send_control(self._ws.send(event.response()))
            elif isinstance(event, TextMessage):
                # the tunnel never sends text: a peer that does is not a tunnel endpoint
                reason = "text message on a binary tunnel"
                self._eof = True
                if self._ws.state is ConnectionState.OPEN:
                    await self._send_control(
                        self._ws.send(CloseConnection(code=1003, reason=reason))
                    )
                raise trio.BrokenResourceError(
                    f"the WebSocket {self.name} broke the protocol"
                ) from WebSocketError(f"{self.name}: {reason}", url=self.name)
            # Pong: nothing to do, it already restarted the keepalive clock by arriving

    # ------------------------------------------------------------------ closing

    async def aclose(self) -> None:
        """Send a close frame (best effort, bounded) and close the transport."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        try:
            if self._ws.state in (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING):
                frame = self._ws.send(CloseConnection(code=1000))
                with trio.move_on_after(_CLOSE_TIMEOUT):
                    async with self._send_lock:
                        await self.transport.send_all(frame)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await self.transport.aclose()


# --------------------------------------------------------------------------- handshakes


def _encode_headers(headers: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    encoded = []
    for name, value in headers:
        try:
            encoded.append((name.encode("ascii"), value.encode("latin-1")))
        except UnicodeEncodeError:
            raise ValueError(f"header {name!r} cannot be sent in HTTP/1.1") from None
    return encoded


async def connect_websocket(
    transport: trio.abc.Stream,
    url: WebSocketURL,
    *,
    host_header: str | None = None,
    headers: list[tuple[str, str]] | tuple[tuple[str, str], ...] = (),
    timeout: float,
    ping_interval: float | None = DEFAULT_PING_INTERVAL,
) -> WebSocketStream:
    """Run the client side of the upgrade over ``transport`` (TLS already done for wss).

    ``host_header`` replaces the ``Host`` header (for gateways routing on a name other than
    the one connected to); ``headers`` are sent as well (``Authorization`` for a gateway).

    Raises:
      WebSocketError: the upgrade was refused (``status``: 403, 404, 502...), not answered
        within ``timeout``, or answered with something that is not a WebSocket upgrade.
        ``transport`` is closed then.
      ValueError: a header that HTTP/1.1 cannot carry (nothing was sent).
    """
    name = str(url)
    extra = _encode_headers(list(headers))
    ws = WSConnection(ConnectionType.CLIENT)
    request = Request(host=host_header or url.host_header, target=url.resource, extra_headers=extra)
    try:
        with trio.fail_after(timeout):
            await transport.send_all(ws.send(request))
            while True:
                accepted = await _client_step(transport, ws, name)
                if accepted:
                    break
    except trio.TooSlowError:
        await trio.aclose_forcefully(transport)
        raise WebSocketError(
            f"{name}: no answer to the WebSocket upgrade within {timeout:g} s", url=name
        ) from None
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        await trio.aclose_forcefully(transport)
        raise WebSocketError(
            f"{name}: the connection broke during the WebSocket upgrade ({exc})", url=name
        ) from None
    except BaseException:
        await trio.aclose_forcefully(transport)
        raise
    return WebSocketStream(transport, ws, ping_interval=ping_interval, name=name)


async def _client_step(transport: trio.abc.Stream, ws: WSConnection, name: str) -> bool:
    """Read once and handle the answer's events: True once accepted; raises if refused."""
    data = _as_bytes(await transport.receive_some(_RECEIVE_SIZE))
    if not data:
        raise WebSocketError(
            f"{name}: the server closed the connection instead of answering the WebSocket upgrade",
            url=name,
        )
    try:
        ws.receive_data(data)
        # stop at the acceptance: messages that came with it are the stream's to read
        for event in ws.events():
            if isinstance(event, AcceptConnection):
                return True
            if isinstance(event, RejectConnection):
                refused = event
                break
        else:
            return False
    except WsRemoteProtocolError as exc:
        raise WebSocketError(f"{name}: not a WebSocket upgrade answer ({exc})", url=name) from None
    await _refused(transport, ws, refused, name)


async def _refused(
    transport: trio.abc.Stream, ws: WSConnection, event: RejectConnection, name: str
) -> NoReturn:
    """Raise the refusal, with the start of the answer's body when it comes promptly."""
    body = bytearray()
    if event.has_body:
        with trio.move_on_after(1):
            finished = False
            while not finished and len(body) < _REJECT_BODY_KEPT:
                for more in ws.events():
                    if isinstance(more, RejectData):
                        body += more.data
                        finished = more.body_finished
                if finished:
                    break
                data = _as_bytes(await transport.receive_some(_RECEIVE_SIZE))
                if not data:
                    break
                try:
                    ws.receive_data(data)
                except WsRemoteProtocolError:
                    break
    text = " ".join(body[:_REJECT_BODY_KEPT].decode("utf-8", "replace").split())
    detail = f": {printable(text)}" if text else ""
    raise WebSocketError(
        f"{name}: the WebSocket upgrade was refused with HTTP {event.status_code}{detail}",
        url=name,
        status=event.status_code,
    )


async def _reject(transport: trio.abc.Stream, ws: WSConnection, status: int, text: str) -> None:
    """Answer a request we do not upgrade with a short plain-text page (best effort)."""
    body = (text + "\n").encode()
    headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
    try:
        data = ws.send(RejectConnection(status_code=status, headers=headers, has_body=True))
        data += ws.send(RejectData(data=body, body_finished=True))
    except WsLocalProtocolError:  # the request was not even HTTP: nothing can be answered
        return
    with (
        trio.move_on_after(1),
        contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
    ):
        await transport.send_all(data)


async def accept_websocket(
    transport: trio.abc.Stream,
    first: bytes | bytearray,
    *,
    path: str,
    timeout: float,
    ping_interval: float | None = DEFAULT_PING_INTERVAL,
    peer: str = "?",
) -> WebSocketStream:
    """Run the server side of the upgrade: ``first`` is what was already read of the request.

    A request for another path is answered 404, anything that is not a WebSocket upgrade
    400 (with wsproto's reason), and an upgrade not complete within ``timeout`` is dropped.
    Raises :class:`WebSocketError` for each (``transport`` is closed then).

    The client must wait for the answer before it sends frames (RFC 6455 4.1; ours does):
    wsproto's server side drops bytes that came with the request, so a client that does not
    wait loses its first frames and fails on the next ones (a framing error, or the
    heartbeat timeout).
    """
    ws = WSConnection(ConnectionType.SERVER)
    data = bytes(first)
    try:
        with trio.fail_after(timeout):
            while True:
                if not data:
                    raise WebSocketError(
                        f"{peer} closed the connection during the WebSocket upgrade", url=path
                    )
                try:
                    ws.receive_data(data)
                    request = next((e for e in ws.events() if isinstance(e, Request)), None)
                except WsRemoteProtocolError as exc:
                    await _reject(transport, ws, 400, f"not a WebSocket upgrade: {exc}")
                    raise WebSocketError(
                        f"{peer} sent something that is not a WebSocket upgrade ({exc})",
                        url=path,
                        status=400,
                    ) from None
                if request is not None:
                    break
                data = _as_bytes(await transport.receive_some(_RECEIVE_SIZE))
            asked = urllib.parse.urlsplit(request.target).path
            if asked != path:
                await _reject(transport, ws, 404, "no WebSocket endpoint here")
                raise WebSocketError(
                    f"{peer} asked for the WebSocket path {printable(asked)!r}, not {path!r}",
                    url=path,
                    status=404,
                )
            await transport.send_all(ws.send(AcceptConnection()))
    except trio.TooSlowError:
        await trio.aclose_forcefully(transport)
        raise WebSocketError(
            f"{peer} did not complete the WebSocket upgrade within {timeout:g} s", url=path
        ) from None
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        await trio.aclose_forcefully(transport)
        raise WebSocketError(
            f"the connection from {peer} broke during the WebSocket upgrade ({exc})", url=path
        ) from None
    except BaseException:
        await trio.aclose_forcefully(transport)
        raise
    return WebSocketStream(transport, ws, ping_interval=ping_interval, name=f"{peer}{path}")


async def accept_websocket_or_raw(
    transport: trio.abc.Stream,
    *,
    path: str,
    timeout: float,
    ping_interval: float | None = DEFAULT_PING_INTERVAL,
    peer: str = "?",
) -> trio.abc.Stream:
    """Tell a WebSocket upgrade from a tunnel handshake by the first bytes (see
    :func:`looks_like_http`): the upgraded WebSocket, or ``transport`` with those bytes
    given back. Raises :class:`WebSocketError` as :func:`accept_websocket` does, and
    ``HandshakeTimeoutError`` if not even a first byte came within ``timeout``."""
    deadline = trio.current_time() + timeout
    try:
        with trio.fail_at(deadline):
            first = await transport.receive_some(_RECEIVE_SIZE)
    except trio.TooSlowError:
        await trio.aclose_forcefully(transport)
        raise HandshakeTimeoutError(f"{peer} sent nothing within {timeout:g} s") from None
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        await trio.aclose_forcefully(transport)
        raise WebSocketError(f"the connection from {peer} broke at once ({exc})") from None
    except BaseException:
        await trio.aclose_forcefully(transport)
        raise
    if looks_like_http(first):
        return await accept_websocket(
            transport,
            first,
            path=path,
            timeout=max(0.0, deadline - trio.current_time()),
            ping_interval=ping_interval,
            peer=peer,
        )
    return PrefixedStream(first, transport)


#: The server's TLS handshake over a stream, within a timeout (``_tls.tls_accept`` bound to
#: the server's context and the peer's name).
TLSAccept = Callable[[trio.abc.Stream, float], Awaitable[trio.abc.Stream]]


async def accept_tunnel_transport(
    transport: trio.abc.Stream,
    *,
    path: str,
    tls: TLSAccept | None,
    timeout: float,
    ping_interval: float | None = DEFAULT_PING_INTERVAL,
    peer: str = "?",
) -> trio.abc.Stream:
    """What a server with a WebSocket path accepts, all within ``timeout``: a tunnel
    handshake, or a WebSocket upgrade; with ``tls``, each has TLS, either outside
    (TLS first: raw, or ``wss://`` straight to this server) or inside (a WebSocket upgrade,
    then TLS end to end through a proxy that terminated its own TLS in front). The first
    byte decides (:func:`looks_like_http`); the stream the session runs on is returned.
    Raises as :func:`accept_websocket_or_raw` does, and ``TLSError``."""
    deadline = trio.current_time() + timeout

    def left() -> float:
        return max(0.0, deadline - trio.current_time())

    stream = await accept_websocket_or_raw(
        transport, path=path, timeout=timeout, ping_interval=ping_interval, peer=peer
    )
    if tls is None:
        return stream
    if isinstance(stream, WebSocketStream):
        return await tls(stream, left())
    secured = await tls(stream, left())
    try:
        return await accept_websocket_or_raw(
            secured, path=path, timeout=left(), ping_interval=ping_interval, peer=peer
        )
    except BaseException:
        await trio.aclose_forcefully(secured)
        raise
