"""The PROXY protocol (HAProxy, versions 1 and 2), sans-IO: writing a header and reading one.

A remote forward's public connection reaches the local service from the tunnel client's own
socket, so the service sees the client's address, not the public peer's. With the PROXY
protocol the forward writes a short header before the first byte of the connection that names
the public peer (source) and the public listener (destination); nginx (``listen ...
proxy_protocol``), HAProxy, Postfix, Dovecot and most servers of that kind read it.

The format is HAProxy's ``proxy-protocol.txt``:

* version 1, text: ``PROXY TCP4 <src> <dst> <sport> <dport>\\r\\n`` (or ``TCP6``, or
  ``PROXY UNKNOWN ...\\r\\n``), at most 107 bytes;
* version 2, binary: a 12-byte signature, a version/command byte, a family/transport byte, a
  big-endian length, the addresses, then optional TLVs.

:class:`ProxyHeaderReader` is the receiving side, for tests and for services written with
pytunnel: it buffers at most one header (107 bytes for version 1; 16 bytes plus the declared
length, capped by ``max_v2_length``, for version 2) and raises :class:`ProxyHeaderError` for
anything else, so a peer cannot make it hold more.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Literal

import attrs

__all__ = [
    "V1_MAX",
    "V2_SIGNATURE",
    "ProxyHeader",
    "ProxyHeaderError",
    "ProxyHeaderReader",
    "ProxyVersion",
    "encode_header",
    "encode_unknown",
]

ProxyVersion = Literal["v1", "v2"]

#: The longest version 1 header, CRLF included (the specification's bound).
V1_MAX = 107
#: What every version 2 header starts with.
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V1_PREFIX = b"PROXY "
_V2_FIXED = 16  # signature, version/command, family/transport, length
#: Version 2 commands (low nibble of byte 13; the high nibble is the version, 2).
_CMD_LOCAL = 0x0
_CMD_PROXY = 0x1
#: Version 2 family/transport bytes this module writes and reads with addresses.
_TCP4 = 0x11
_TCP6 = 0x21
_UNSPEC = 0x00
_ADDRESS_LENGTH = {_TCP4: 12, _TCP6: 36}

Address = tuple[str, int]


class ProxyHeaderError(ValueError):
    """What arrived is not a valid PROXY protocol header (or is longer than allowed)."""


@attrs.frozen
class ProxyHeader:
    """One decoded header. ``source`` and ``destination`` are ``None`` for a version 1
    ``UNKNOWN`` header and for a version 2 ``LOCAL`` command or unspecified family: the
    connection is then to be taken as it comes, with the socket's own addresses."""

    version: ProxyVersion
    source: Address | None
    destination: Address | None
    #: Version 2 TLVs (type, value), in the order they came; always empty for version 1.
    tlvs: tuple[tuple[int, bytes], ...] = ()


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """``host`` as an IP address; an IPv4-mapped IPv6 address counts as the IPv4 one, as a
    dual-stack listener reports IPv4 peers that way."""
    address = ipaddress.ip_address(host.strip("[]").partition("%")[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _pair(
    source: Address, destination: Address
) -> tuple[
    ipaddress.IPv4Address | ipaddress.IPv6Address, ipaddress.IPv4Address | ipaddress.IPv6Address
]:
    """Both addresses in one family. A header names one family for both, so a destination of
    the other family (a dual-stack or wildcard listener) is given as the unspecified address of
    the source's family, which readers take as "not known"."""
    src, dst = _ip(source[0]), _ip(destination[0])
    if src.version != dst.version:
        dst = ipaddress.IPv4Address(0) if src.version == 4 else ipaddress.IPv6Address(0)
    for _, port in (source, destination):
        if not 0 <= port <= 0xFFFF:
            raise ValueError(f"port {port} out of range")
    return src, dst


def encode_header(version: ProxyVersion, source: Address, destination: Address) -> bytes:
    """The header announcing a TCP connection from ``source`` to ``destination``.

    Both must be IP literals (a name has no place in the header); ``ValueError`` otherwise.
    """
    src, dst = _pair(source, destination)
    sport, dport = source[1], destination[1]
    if version == "v1":
        family = "TCP4" if src.version == 4 else "TCP6"
        return f"PROXY {family} {src} {dst} {sport} {dport}\r\n".encode("ascii")
    if version == "v2":
        family_byte = _TCP4 if src.version == 4 else _TCP6
        body = src.packed + dst.packed + struct.pack("!HH", sport, dport)
        return V2_SIGNATURE + struct.pack("!BBH", 0x20 | _CMD_PROXY, family_byte, len(body)) + body
    raise ValueError(f"PROXY protocol version must be 'v1' or 'v2', not {version!r}")


def encode_unknown(version: ProxyVersion) -> bytes:
    """The header that says the addresses are not known (``PROXY UNKNOWN``; in version 2 a
    proxied connection of unspecified family): the reader uses the socket's own addresses."""
    if version == "v1":
        return b"PROXY UNKNOWN\r\n"
    if version == "v2":
        return V2_SIGNATURE + struct.pack("!BBH", 0x20 | _CMD_PROXY, _UNSPEC, 0)
    raise ValueError(f"PROXY protocol version must be 'v1' or 'v2', not {version!r}")


class ProxyHeaderReader:
    """Reads the PROXY header at the start of a connection, then hands back what follows.

    Feed bytes with :meth:`feed` until it returns a :class:`ProxyHeader`; :attr:`rest` then
    holds the bytes that came after the header (the start of the connection's own data).
    Nothing but a header is accepted first: a connection that does not start with one raises
    :class:`ProxyHeaderError` as soon as its first bytes show it.
    """

    def __init__(self, *, max_v2_length: int = 2048) -> None:
        self._buffer = bytearray()
        self._max_v2_length = max_v2_length
        self.header: ProxyHeader | None = None
        self.rest = b""

    def feed(self, data: bytes) -> ProxyHeader | None:
        if self.header is not None:
            raise RuntimeError("the header was already read")
        self._buffer += data
        buf = self._buffer
        head = bytes(buf[: len(V2_SIGNATURE)])
        if V2_SIGNATURE.startswith(head):
            return self._finish(self._v2()) if len(buf) >= len(V2_SIGNATURE) else None
        if _V1_PREFIX.startswith(head[: len(_V1_PREFIX)]):
            return self._finish(self._v1())
        raise ProxyHeaderError("the connection does not start with a PROXY protocol header")

    def _finish(self, result: tuple[ProxyHeader, int] | None) -> ProxyHeader | None:
        if result is None:
            return None
        self.header, end = result
        self.rest = bytes(self._buffer[end:])
        self._buffer.clear()
        return self.header

    def _v1(self) -> tuple[ProxyHeader, int] | None:
        buf = self._buffer
        end = buf.find(b"\r\n", 0, V1_MAX)
        if end < 0:
            if len(buf) >= V1_MAX:
                raise ProxyHeaderError(f"PROXY v1 header longer than {V1_MAX} bytes")
            if b"\n" in buf or b"\r" in buf[:-1]:
                raise ProxyHeaderError("PROXY v1 header not ended by CRLF")
            return None
        try:
            line = bytes(buf[:end]).decode("ascii")
        except UnicodeDecodeError:
            raise ProxyHeaderError("PROXY v1 header is not ASCII") from None
        parts = line.split(" ")
        if parts[:2] == ["PROXY", "UNKNOWN"]:
            return ProxyHeader("v1", None, None), end + 2
        if len(parts) != 6 or parts[0] != "PROXY" or parts[1] not in ("TCP4", "TCP6"):
            raise ProxyHeaderError(f"malformed PROXY v1 header {line[:60]!r}")
        _, family, src, dst, sport, dport = parts
        version = 4 if family == "TCP4" else 6
        try:
            addresses = [ipaddress.ip_address(src), ipaddress.ip_address(dst)]
        except ValueError:
            raise ProxyHeaderError(f"PROXY v1 header with a bad address: {line[:60]!r}") from None
        if any(address.version != version for address in addresses):
            raise ProxyHeaderError(f"PROXY v1 {family} header with a bad address: {line[:60]!r}")
        ports = []
        for text in (sport, dport):
            # decimal digits without a leading zero, 0 to 65535 (the specification's form)
            if not text.isdigit() or not text.isascii() or (text != "0" and text[0] == "0"):
                raise ProxyHeaderError(f"PROXY v1 header with a bad port: {line[:60]!r}")
            port = int(text)
            if port > 0xFFFF:
                raise ProxyHeaderError(f"PROXY v1 header with a bad port: {line[:60]!r}")
            ports.append(port)
        return ProxyHeader("v1", (src, ports[0]), (dst, ports[1])), end + 2

    def _v2(self) -> tuple[ProxyHeader, int] | None:
        buf = self._buffer
        if len(buf) < _V2_FIXED:
            return None
        version_command, family, length = struct.unpack_from("!BBH", buf, len(V2_SIGNATURE))
        if version_command >> 4 != 2:
            raise ProxyHeaderError(f"PROXY v2 header with version {version_command >> 4}")
        command = version_command & 0x0F
        if command not in (_CMD_LOCAL, _CMD_PROXY):
            raise ProxyHeaderError(f"PROXY v2 header with unknown command {command}")
        if length > self._max_v2_length:
            raise ProxyHeaderError(
                f"PROXY v2 header of {length} bytes, over the limit of {self._max_v2_length}"
            )
        end = _V2_FIXED + length
        if len(buf) < end:
            return None
        body = bytes(buf[_V2_FIXED:end])
        if command == _CMD_LOCAL or family == _UNSPEC:
            # a health check of the proxy itself, or addresses the sender does not know: the
            # specification has the receiver ignore whatever follows
            return ProxyHeader("v2", None, None), end
        if family not in _ADDRESS_LENGTH:
            # UDP and Unix sockets are valid headers, but nothing a TCP connection can carry
            raise ProxyHeaderError(f"PROXY v2 header for unsupported family 0x{family:02x}")
        needed = _ADDRESS_LENGTH[family]
        if len(body) < needed:
            raise ProxyHeaderError(
                f"PROXY v2 header too short for its addresses ({len(body)} < {needed} bytes)"
            )
        size = 4 if family == _TCP4 else 16
        src = ipaddress.ip_address(body[:size])
        dst = ipaddress.ip_address(body[size : 2 * size])
        sport, dport = struct.unpack_from("!HH", body, 2 * size)
        return ProxyHeader("v2", (str(src), sport), (str(dst), dport), _tlvs(body[needed:])), end


def _tlvs(data: bytes) -> tuple[tuple[int, bytes], ...]:
    out = []
    at = 0
    while at < len(data):
        if len(data) - at < 3:
            raise ProxyHeaderError("PROXY v2 header with a truncated TLV")
        kind, size = struct.unpack_from("!BH", data, at)
        at += 3
        if len(data) - at < size:
            raise ProxyHeaderError("PROXY v2 header with a truncated TLV")
        out.append((kind, data[at : at + size]))
        at += size
    return tuple(out)
