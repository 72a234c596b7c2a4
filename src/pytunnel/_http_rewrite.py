"""Per-route HTTP options of a name route: forwarded headers, a rewritten ``Host``, basic auth.

A name route relays bytes; these options need every request head on the connection, not
only the first the server routed on, so the client reads the public side's requests with
h11 (one ``h11.Connection`` per request, seeded with the bytes after the previous one) and
writes each head again with the changes, the body passed in the framing it came in
(``Content-Length`` as it is, chunked re-chunked). Responses are never parsed: they pass as
bytes. After a protocol switch (a WebSocket upgrade, ``CONNECT``) the rest passes untouched,
as does everything if a head cannot be parsed (which ends the connection instead: a stream
that cannot be rewritten is not relayed unchecked).

Done at the client, so the credentials of basic auth never leave it and the server stays a
router that does not look past the first head.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress

import attrs
import h11
import trio

from ._relay import abort
from .protocol.tls_hello import valid_host_name

__all__ = ["HttpRouteOptions", "RequestRewriter"]

_MAX_HEAD = 64 * 1024


@attrs.frozen
class HttpRouteOptions:
    """What a name route changes in each HTTP request before the service sees it."""

    #: Add ``X-Forwarded-For`` (appended to what the request had), ``X-Forwarded-Proto``,
    #: ``X-Forwarded-Host`` and ``Forwarded`` (RFC 7239) naming the public peer.
    forwarded_headers: bool = False
    #: Replace the request's ``Host`` with this (services that only answer to their own):
    #: a host name or address, with an optional ``:port``; checked here, once.
    rewrite_host: str | None = attrs.field(default=None, validator=lambda _i, _a, v: _host(v))
    #: Require HTTP basic auth with this ``(user, password)``; the ``Authorization`` header
    #: is checked here and not passed on. A request without it gets 401.
    basic_auth: tuple[str, str] | None = attrs.field(default=None, repr=False)

    @property
    def active(self) -> bool:
        return self.forwarded_headers or self.rewrite_host is not None or bool(self.basic_auth)


def _host(value: str | None) -> None:
    """``ValueError`` unless ``value`` can be a ``Host`` header (no header injection)."""
    if value is None:
        return
    if value.startswith("["):  # an IPv6 literal, with or without a port
        bare, _, rest = value[1:].partition("]")
        if rest and not rest.startswith(":"):
            raise ValueError(f"rewrite_host {value[:80]!r}: text after the address")
        port = rest[1:]
    elif value.count(":") == 1:
        bare, _, port = value.partition(":")
    else:
        bare, port = value, ""
    if (port or value.endswith(":")) and not (port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"rewrite_host {value[:80]!r}: bad port")
    try:
        ipaddress.ip_address(bare)
    except ValueError:
        if not valid_host_name(bare.lower().rstrip(".")):
            raise ValueError(
                f"rewrite_host {value[:80]!r} is not a host name or address (with an optional "
                ":port)"
            ) from None


def _unauthorized() -> bytes:
    """A 401 answer asking for basic auth, written by h11."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    conn.next_event()
    body = b"401 Unauthorized: this tunnel requires a user name and password\n"
    headers = [
        ("www-authenticate", 'Basic realm="pytunnel", charset="UTF-8"'),
        ("content-type", "text/plain; charset=utf-8"),
        ("content-length", str(len(body))),
        ("connection", "close"),
    ]
    out = conn.send(h11.Response(status_code=401, headers=headers)) or b""
    return out + (conn.send(h11.Data(data=body)) or b"") + (conn.send(h11.EndOfMessage()) or b"")


class RequestRewriter(trio.abc.HalfCloseableStream):
    """The public side of one name-routed HTTP connection, with each request head rewritten
    by ``options``; ``peer`` is the public client's address (what the server saw)."""

    def __init__(
        self,
        stream: trio.abc.HalfCloseableStream,
        options: HttpRouteOptions,
        peer: tuple[str, int],
        *,
        proto: str = "http",
    ) -> None:
        self.stream = stream
        self._options = options
        self._peer = peer
        self._proto = proto
        self._conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_HEAD)
        self._out = bytearray()
        self._chunked = False
        #: Whether the request being read proposes a protocol switch (upgrade, CONNECT).
        self._switching = False
        self._passthrough = False
        self._eof = False
        #: Requests read so far on the connection.
        self._requests = 0
        if options.basic_auth is not None:
            user, password = options.basic_auth
            self._credentials: bytes | None = f"{user}:{password}".encode()
        else:
            self._credentials = None

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        stepped = False
        while not self._out and not self._passthrough and not self._eof:
            await self._step()
            stepped = True
        if self._out:
            size = len(self._out) if max_bytes is None else max_bytes
            data = bytes(self._out[:size])
            del self._out[:size]
            if not stepped:
                await trio.lowlevel.checkpoint()
            return data
        if self._eof:
            await trio.lowlevel.checkpoint()
            return b""
        return await self.stream.receive_some(max_bytes)

    async def _step(self) -> None:
        try:
            event = self._conn.next_event()
        except h11.RemoteProtocolError as exc:
            # bytes that cannot be rewritten are not relayed unrewritten either
            raise trio.BrokenResourceError(f"not an HTTP request: {exc}") from None
        if event is h11.NEED_DATA:
            data = await self.stream.receive_some(64 * 1024)
            self._conn.receive_data(bytes(data))
        elif isinstance(event, h11.Request):
            self._requests += 1
            if not self._authorized(event):
                if self._requests > 1:
                    # answers to earlier requests may still be on their way: a 401 now would
                    # overtake them, so the connection ends instead
                    raise trio.BrokenResourceError("a later request without the credentials")
                with trio.CancelScope(shield=True), trio.move_on_after(1):
                    await self.stream.send_all(_unauthorized())
                self._eof = True
                return
            self._chunked = any(
                name == b"transfer-encoding" and b"chunked" in value.lower()
                for name, value in event.headers
            )
            self._switching = event.method == b"CONNECT" or any(
                name == b"connection" and b"upgrade" in value.lower()
                for name, value in event.headers
            )
            self._out += self._head(event)
        elif isinstance(event, h11.Data):
            if self._chunked:
                self._out += b"%x\r\n" % len(event.data) + event.data + b"\r\n"
            else:
                self._out += event.data
        elif isinstance(event, h11.EndOfMessage):
            if self._chunked:
                self._out += b"0\r\n"
                for name, value in event.headers.raw_items():
                    self._out += name + b": " + value + b"\r\n"
                self._out += b"\r\n"
            self._next_request()
        elif isinstance(event, h11.ConnectionClosed):
            self._eof = True
        elif event is h11.PAUSED:  # pragma: no cover - only after a switch, handled above
            self._switch()

    def _next_request(self) -> None:
        rest, closed = self._conn.trailing_data
        if self._switching:
            # a proposed upgrade or CONNECT: whether or not the service accepts it, what
            # follows is not ours to parse
            self._out += rest
            self._passthrough = True
            return
        # a new parser for the next request, even after HTTP/1.0 or "Connection: close":
        # a client that keeps sending (HTTP/1.0 keep-alive) has its requests rewritten too
        self._conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_HEAD)
        if rest:
            self._conn.receive_data(rest)
        if closed:
            self._conn.receive_data(b"")

    def _switch(self) -> None:
        self._out += self._conn.trailing_data[0]
        self._passthrough = True

    def _authorized(self, request: h11.Request) -> bool:
        if self._credentials is None:
            return True
        for name, value in request.headers:
            if name != b"authorization":
                continue
            scheme, _, encoded = value.partition(b" ")
            if scheme.lower() != b"basic":
                continue
            try:
                given = base64.b64decode(encoded.strip(), validate=True)
            except binascii.Error:
                return False
            return hmac.compare_digest(given, self._credentials)
        return False

    def _head(self, request: h11.Request) -> bytes:
        options = self._options
        host_value = b""
        forwarded_for: list[bytes] = []
        headers: list[tuple[bytes, bytes]] = []
        for name, value in request.headers.raw_items():
            lower = name.lower()
            if lower == b"host":
                host_value = value
                if options.rewrite_host is not None:
                    value = options.rewrite_host.encode("idna")
            elif lower == b"authorization" and self._credentials is not None:
                continue  # the tunnel's credentials, not the service's
            elif options.forwarded_headers and lower == b"x-forwarded-for":
                forwarded_for.append(value)
                continue
            elif options.forwarded_headers and lower in (b"x-forwarded-proto", b"x-forwarded-host"):
                continue  # ours replace what the public may have claimed
            elif lower == b"content-length" and self._chunked:
                # both framings: chunked wins (RFC 9112 6.3) and a proxy drops the length,
                # so no service behind can be made to read the body another way
                continue
            headers.append((name, value))
        if options.forwarded_headers:
            peer = _header_peer(self._peer[0])
            headers.append((b"X-Forwarded-For", b", ".join([*forwarded_for, peer])))
            headers.append((b"X-Forwarded-Proto", self._proto.encode()))
            if host_value:
                headers.append((b"X-Forwarded-Host", host_value))
            node = b'"[' + peer + b']"' if b":" in peer else peer  # "unknown" has none
            forwarded = b"for=" + node + b";proto=" + self._proto.encode()
            if host_value:
                quoted = host_value.replace(b"\\", b"").replace(b'"', b"")
                forwarded += b';host="' + quoted + b'"'
            headers.append((b"Forwarded", forwarded))
        lines = [request.method + b" " + request.target + b" HTTP/" + request.http_version]
        lines += [name + b": " + value for name, value in headers]
        return b"\r\n".join(lines) + b"\r\n\r\n"

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.stream.send_eof()

    def reset(self, code: int, message: str) -> None:
        """A relay cut short resets the public side, as it would without the rewriter."""
        abort(self.stream, code, message)

    async def aclose(self) -> None:
        await self.stream.aclose()


def _header_peer(host: str) -> bytes:
    """The public peer as the forwarded headers name it: an IP literal as it is, anything
    else (a peer address that did not come from a socket) as RFC 7239's ``unknown``, so
    no text of a peer's choosing ever lands in a request head."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return b"unknown"
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None:
        return str(address).partition("%")[0].encode()
    return str(address).encode()
