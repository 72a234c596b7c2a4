"""The server name of a TLS connection, read from its ClientHello without terminating TLS.

Routing TLS by name (SNI passthrough) means reading the first handshake message a client
sends, finding the ``server_name`` extension, and then relaying every byte, the ClientHello
included, to the service that holds the certificate: the router never has a key and the
traffic stays encrypted end to end. This module is that reading, sans-IO.

:class:`ClientHelloReader` takes bytes as they arrive and returns a :class:`ClientHello` once
the whole message is in; it keeps every byte it was given (``data``) so the caller can send
them on unchanged. What it accepts (RFC 8446 section 4.1.2, RFC 5246 section 7.4.1.2, RFC 6066
section 3, RFC 7301): handshake records (content type 22) of TLS 1.0 or later carrying one
ClientHello, split over as many records as the client likes; the ``server_name`` extension with
one ``host_name``; the ALPN protocol list. Anything else (another content type, an SSL 2
hello, a length that overruns its container, a name that is not a valid DNS host name, two
names, more bytes than ``max_size`` before the message is complete) raises
:class:`ClientHelloError`, one error for each way a hello can be wrong, so a router can answer
with a TLS alert and log why.
"""

from __future__ import annotations

import attrs

__all__ = [
    "ALERT_INTERNAL_ERROR",
    "ALERT_UNRECOGNIZED_NAME",
    "ClientHello",
    "ClientHelloError",
    "ClientHelloReader",
    "alert",
    "valid_host_name",
]

_HANDSHAKE = 22
_CLIENT_HELLO = 1
_EXT_SERVER_NAME = 0
_EXT_ALPN = 16
_NAME_HOST = 0
_RECORD_HEADER = 5
#: The largest record payload a TLS 1.2/1.3 peer may send (2^14), plus what older versions
#: allow for compression and padding: lengths above it are refused, as a TLS stack would.
_MAX_RECORD = 2**14 + 2048
#: RFC 8446 alert descriptions this module's users send.
ALERT_UNRECOGNIZED_NAME = 112
#: ``internal_error``: the name is known but cannot be served now.
ALERT_INTERNAL_ERROR = 80
_ALERT_FATAL = 2
_ALERT_CONTENT_TYPE = 21


class ClientHelloError(ValueError):
    """The bytes are not a well-formed TLS ClientHello (or not one this reader accepts)."""


@attrs.frozen
class ClientHello:
    """What a router needs from a ClientHello."""

    #: The host name the client asked for (lower case, no trailing dot); ``None`` without SNI.
    server_name: str | None
    #: The ALPN protocols offered, in the client's order (``h2``, ``http/1.1``...).
    alpn: tuple[str, ...]
    #: The ``legacy_version`` of the hello (``0x0303`` for TLS 1.2 and 1.3).
    version: int


def alert(description: int) -> bytes:
    """A fatal TLS alert record, for refusing a connection before any key exchange."""
    return bytes([_ALERT_CONTENT_TYPE, 3, 1, 0, 2, _ALERT_FATAL, description])


class ClientHelloReader:
    """Collects the records of a ClientHello until it is complete, then parses it."""

    def __init__(self, *, max_size: int = 64 * 1024) -> None:
        self._max_size = max_size
        #: Every byte fed so far, unchanged: what the caller relays on once routed.
        self.data = bytearray()
        #: The handshake bytes gathered from the records' payloads.
        self._handshake = bytearray()
        self._parsed = 0  # bytes of ``data`` already split into records
        self.hello: ClientHello | None = None

    def feed(self, data: bytes) -> ClientHello | None:
        if self.hello is not None:
            raise RuntimeError("the ClientHello was already read")
        self.data += data
        while True:
            record = self._next_record()
            if record is None:
                break
            self._handshake += record
            hello = self._try_hello()
            if hello is not None:
                self.hello = hello
                return hello
        if len(self.data) > self._max_size:
            raise ClientHelloError(f"no complete ClientHello in the first {self._max_size} bytes")
        return None

    def _next_record(self) -> bytes | None:
        buf = self.data
        at = self._parsed
        if len(buf) - at < 1:
            return None
        if buf[at] != _HANDSHAKE:
            if at == 0 and buf[0] & 0x80:
                raise ClientHelloError("an SSL 2 hello, not TLS")
            raise ClientHelloError(f"a TLS record of content type {buf[at]}, not a handshake")
        if len(buf) - at < _RECORD_HEADER:
            return None
        major, minor = buf[at + 1], buf[at + 2]
        if major != 3 or minor > 4:  # SSL 3.0 is 3.0; TLS 1.0-1.3 records say 3.1-3.3
            raise ClientHelloError(f"a record of version {major}.{minor}, not TLS")
        length = int.from_bytes(buf[at + 3 : at + 5], "big")
        if length == 0:
            raise ClientHelloError("an empty handshake record")
        if length > _MAX_RECORD:
            raise ClientHelloError(f"a record of {length} bytes, over the TLS limit")
        end = at + _RECORD_HEADER + length
        if len(buf) < end:
            return None
        self._parsed = end
        return bytes(buf[at + _RECORD_HEADER : end])

    def _try_hello(self) -> ClientHello | None:
        hs = self._handshake
        if len(hs) < 4:
            return None
        if hs[0] != _CLIENT_HELLO:
            raise ClientHelloError(f"handshake message type {hs[0]}, not a ClientHello")
        length = int.from_bytes(hs[1:4], "big")
        if 4 + length > self._max_size:
            raise ClientHelloError(f"a ClientHello of {length} bytes, over {self._max_size}")
        if len(hs) < 4 + length:
            return None
        if len(hs) > 4 + length:
            # a client sends nothing after its hello until the server answers
            raise ClientHelloError("handshake bytes after the ClientHello")
        return _parse_hello(bytes(hs[4 : 4 + length]))


class _Cursor:
    """Reads length-prefixed fields, each checked against what is left of its container."""

    def __init__(self, data: bytes, what: str) -> None:
        self.data = data
        self.at = 0
        self.what = what

    def take(self, size: int, field: str) -> bytes:
        if len(self.data) - self.at < size:
            raise ClientHelloError(f"{self.what}: {field} runs past its end")
        out = self.data[self.at : self.at + size]
        self.at += size
        return out

    def number(self, size: int, field: str) -> int:
        return int.from_bytes(self.take(size, field), "big")

    def vector(self, length_size: int, field: str) -> bytes:
        return self.take(self.number(length_size, f"{field} length"), field)

    @property
    def done(self) -> bool:
        return self.at == len(self.data)


def _parse_hello(body: bytes) -> ClientHello:
    hello = _Cursor(body, "ClientHello")
    version = hello.number(2, "version")
    if version >> 8 != 3:
        raise ClientHelloError(f"ClientHello version 0x{version:04x}, not TLS")
    hello.take(32, "random")
    session_id = hello.vector(1, "session id")
    if len(session_id) > 32:
        raise ClientHelloError("ClientHello: session id longer than 32 bytes")
    suites = hello.vector(2, "cipher suites")
    if not suites or len(suites) % 2:
        raise ClientHelloError("ClientHello: cipher suites empty or of odd length")
    if not hello.vector(1, "compression methods"):
        raise ClientHelloError("ClientHello: no compression method")
    server_name: str | None = None
    alpn: tuple[str, ...] = ()
    if hello.done:  # no extensions at all (TLS 1.0-era clients): no SNI either
        return ClientHello(None, (), version)
    extensions = _Cursor(hello.vector(2, "extensions"), "ClientHello extensions")
    if not hello.done:
        raise ClientHelloError("ClientHello: bytes after the extensions")
    seen: set[int] = set()
    while not extensions.done:
        kind = extensions.number(2, "extension type")
        data = extensions.vector(2, f"extension {kind}")
        if kind in seen:
            raise ClientHelloError(f"ClientHello: extension {kind} twice")
        seen.add(kind)
        if kind == _EXT_SERVER_NAME:
            server_name = _server_name(data)
        elif kind == _EXT_ALPN:
            alpn = _alpn(data)
    return ClientHello(server_name, alpn, version)


def _server_name(data: bytes) -> str:
    names = _Cursor(_Cursor(data, "server_name").vector(2, "name list"), "server_name list")
    found: str | None = None
    while not names.done:
        kind = names.number(1, "name type")
        name = names.vector(2, "host name")
        if kind != _NAME_HOST:
            continue  # no other type is defined; RFC 6066 has servers ignore unknown ones
        if found is not None:
            raise ClientHelloError("ClientHello: more than one host name")
        found = _host_name(name)
    if found is None:
        raise ClientHelloError("ClientHello: server_name without a host name")
    return found


def valid_host_name(name: str) -> bool:
    """Whether ``name`` is a DNS host name as SNI and ``Host`` carry it: ASCII letters,
    digits, hyphens (not at either end of a label) and underscores, labels of 1-63
    characters, 253 at most in all, no trailing dot."""
    labels = name.split(".")
    return (
        name.isascii()
        and 0 < len(name) <= 253
        and all(0 < len(label) <= 63 for label in labels)
        and not any(label.startswith("-") or label.endswith("-") for label in labels)
        and all(c.isalnum() or c in "-_" for c in name.replace(".", ""))
    )


def _host_name(raw: bytes) -> str:
    """``raw`` as a DNS host name (RFC 6066: ASCII, no trailing dot), lower-cased."""
    try:
        name = raw.decode("ascii")
    except UnicodeDecodeError:
        raise ClientHelloError("ClientHello: server name is not ASCII") from None
    if not valid_host_name(name):
        raise ClientHelloError(f"ClientHello: {name[:80]!r} is not a valid host name")
    return name.lower()


def _alpn(data: bytes) -> tuple[str, ...]:
    names = _Cursor(_Cursor(data, "ALPN").vector(2, "protocol list"), "ALPN list")
    out = []
    while not names.done:
        name = names.vector(1, "protocol")
        if not name:
            raise ClientHelloError("ClientHello: an empty ALPN protocol name")
        out.append(name.decode("ascii", "backslashreplace"))
    return tuple(out)
