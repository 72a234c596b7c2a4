"""The server side of SOCKS 4, 4a and 5 (RFC 1928, RFC 1929), sans-IO, CONNECT only.

This is what a local SOCKS proxy speaks to browsers and ``curl`` when its connections exit at a
tunnel server, as with ``ssh -D``: the client names a target, the proxy opens a tunnel stream to
it, and only then answers. The exchanges, client bytes on the left::

    SOCKS5  05 NMETHODS METHODS...          -> 05 METHOD          (00 none, 02 password, FF no)
            01 ULEN UNAME PLEN PASSWD       -> 01 STATUS          (only if METHOD was 02)
            05 CMD 00 ATYP DST.ADDR DST.PORT -> 05 REP 00 ATYP BND.ADDR BND.PORT
    SOCKS4  04 CMD DSTPORT DSTIP USERID 00 [DOMAIN 00]   -> 00 5A|5B DSTPORT DSTIP

Domain names are passed on unresolved: DNS happens where the connection exits (the tunnel
server), which is both what the user expects of a remote proxy and the only place whose view of
names is right for the target network.

Bytes go in with :meth:`SocksServerConnection.receive_data`, negotiation bytes come out of
:meth:`~SocksServerConnection.data_to_send`, and the one event is :class:`ConnectRequest`. Every
way a peer can get the protocol wrong ends in :class:`SocksError`, whose ``reply`` holds the exact
bytes to write before closing: the client always gets an answer it understands (never a hang
waiting for one), and the caller needs no SOCKS knowledge to produce it. A client cannot make the
parser buffer more than :data:`MAX_MESSAGE_SIZE` bytes: every field is either length-prefixed
with a one-byte length or, in SOCKS4, NUL-terminated and capped at 255 bytes.

Over 500 lines because three protocol versions share one state machine and one buffer: split,
each part would need the others' states to decide what a first byte means.
"""

from __future__ import annotations

import enum
import hmac
import ipaddress
from collections.abc import Callable
from typing import Literal

import attrs

from ..errors import DialError, DialFailure, LocalProtocolError, TunnelError

__all__ = [
    "MAX_MESSAGE_SIZE",
    "AddressType",
    "Command",
    "ConnectRequest",
    "CredentialCheck",
    "ReplyCode",
    "SocksError",
    "SocksEvent",
    "SocksServerConnection",
    "SocksState",
    "reply_code_for",
]


class ReplyCode(enum.IntEnum):
    """The ``REP`` field of a SOCKS5 reply (RFC 1928, section 6)."""

    SUCCEEDED = 0x00
    GENERAL_FAILURE = 0x01
    NOT_ALLOWED = 0x02
    NETWORK_UNREACHABLE = 0x03
    HOST_UNREACHABLE = 0x04
    CONNECTION_REFUSED = 0x05
    TTL_EXPIRED = 0x06
    COMMAND_NOT_SUPPORTED = 0x07
    ADDRESS_TYPE_NOT_SUPPORTED = 0x08


class AddressType(enum.IntEnum):
    """The ``ATYP`` field. SOCKS4 requests are reported as ``IPV4``, SOCKS4a ones as ``DOMAIN``."""

    IPV4 = 0x01
    DOMAIN = 0x03
    IPV6 = 0x04


class Command(enum.IntEnum):
    """The ``CMD`` field, the same numbers in SOCKS4 and SOCKS5. Only ``CONNECT`` is served."""

    CONNECT = 0x01
    BIND = 0x02
    UDP_ASSOCIATE = 0x03


class SocksState(enum.Enum):
    """Where a :class:`SocksServerConnection` is in the exchange."""

    #: Nothing parsed yet; the first byte will say which SOCKS version this is.
    GREETING = "greeting"
    #: SOCKS5 chose username/password; waiting for the RFC 1929 sub-negotiation.
    AUTH = "auth"
    #: SOCKS5 negotiated; waiting for the request.
    REQUEST = "request"
    #: A :class:`ConnectRequest` was returned; the caller owes :meth:`accept` or :meth:`reject`.
    REPLY = "reply"
    #: Accepted: from here on the connection carries the client's data, nothing SOCKS.
    ESTABLISHED = "established"
    #: Rejected or failed: the caller sends the last reply and closes.
    CLOSED = "closed"


_SOCKS4 = 0x04
_SOCKS5 = 0x05
_AUTH_VERSION = 0x01  # RFC 1929's own version byte
_METHOD_NONE = 0x00
_METHOD_PASSWORD = 0x02
_METHOD_UNACCEPTABLE = 0xFF
_SOCKS4_GRANTED = 0x5A
_SOCKS4_REJECTED = 0x5B
#: SOCKS4 USERID and SOCKS4a domain are NUL-terminated: cap them as SOCKS5 caps its fields.
_MAX_FIELD = 255

#: The largest message a client may send in one step: a SOCKS4a request with a 255-byte USERID
#: and a 255-byte domain (8 + 256 + 256). The SOCKS5 ones are smaller (greeting 257, password
#: 513, request 262). The parser never holds more than this many bytes of an unfinished message.
MAX_MESSAGE_SIZE = 8 + (_MAX_FIELD + 1) * 2

_METHOD_REPLY_NONE = bytes([_SOCKS5, _METHOD_NONE])
_METHOD_REPLY_PASSWORD = bytes([_SOCKS5, _METHOD_PASSWORD])
_METHOD_REPLY_UNACCEPTABLE = bytes([_SOCKS5, _METHOD_UNACCEPTABLE])
_AUTH_SUCCESS = bytes([_AUTH_VERSION, 0x00])
_AUTH_FAILURE = bytes([_AUTH_VERSION, 0x01])

#: ``check(username, password) -> bool``; called with the UTF-8 decoded RFC 1929 fields.
CredentialCheck = Callable[[str, str], bool]


def _socks5_reply(code: int) -> bytes:
    # A failure reply still carries an address; RFC 1928 gives it no meaning, so 0.0.0.0:0.
    return bytes([_SOCKS5, code, 0x00, AddressType.IPV4, 0, 0, 0, 0, 0, 0])


def _socks4_reply(code: int, port: int = 0, ip: bytes = b"\0\0\0\0") -> bytes:
    return bytes([0x00, code]) + port.to_bytes(2, "big") + ip


class SocksError(ValueError):
    """The client broke the SOCKS protocol, failed authentication, or asked for what is not served.

    ``reply`` is everything still owed to the client, ending with the SOCKS answer that explains
    the failure (a method reply ``05 FF``, an auth status ``01 01``, a SOCKS5 reply with the
    fitting ``REP``, or a SOCKS4 ``5B``). It includes any negotiation bytes not yet collected with
    :meth:`SocksServerConnection.data_to_send`, so the caller writes ``reply`` and closes, nothing
    more. It is ``b""`` only when the client never said which SOCKS version it speaks.

    ``reason`` is an English sentence for the log; ``version`` is 4, 5, or ``None`` if unknown.
    """

    def __init__(self, reason: str, reply: bytes = b"", version: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.reply = reply
        self.version = version

    def __repr__(self) -> str:
        return f"SocksError({self.reason!r}, reply={self.reply!r}, version={self.version!r})"


@attrs.frozen
class ConnectRequest:
    """The client asks for a TCP connection to ``host:port``; answer with accept or reject.

    ``host`` is an IPv4 or IPv6 address in its canonical text form, or a domain name as the client
    sent it, unresolved. ``username`` is the RFC 1929 user that authenticated (SOCKS5), or the
    SOCKS4 USERID, which nothing verifies (decoded leniently: it is for logs only); ``None`` when
    there is none.
    """

    host: str
    port: int
    version: Literal[4, 5]
    atyp: AddressType
    username: str | None = None


#: Every event :meth:`SocksServerConnection.receive_data` can return (one kind, for now).
SocksEvent = ConnectRequest


class SocksServerConnection:
    """One client connection to a SOCKS proxy, from its first byte to the reply to its request.

    ``auth`` ``None`` serves anyone (SOCKS5 method 00, and SOCKS4). A ``(username, password)``
    pair, or a check callable, demands RFC 1929 username/password; SOCKS4 has no way to carry a
    password, so a proxy that requires one refuses SOCKS4 clients (``5B``). The fixed pair is
    compared in constant time; a callable is responsible for its own comparison (use
    :func:`hmac.compare_digest`), and exceptions it raises propagate unchanged. ``allow_socks4``
    false refuses SOCKS4 and 4a as well.

    Use::

        events = conn.receive_data(chunk)   # raises SocksError: send err.reply, then close
        send(conn.data_to_send())           # method / auth replies, after every receive_data
        # on ConnectRequest: open the target, then send conn.accept() or conn.reject(code),
        # and forward conn.leftover (bytes the client sent after its request) to the target.
    """

    def __init__(
        self,
        auth: tuple[str, str] | CredentialCheck | None = None,
        *,
        allow_socks4: bool = True,
    ) -> None:
        self._check: CredentialCheck | None
        if isinstance(auth, tuple):
            self._check = _fixed_credentials(*auth)
        else:
            self._check = auth
        self._allow_socks4 = allow_socks4
        self._state = SocksState.GREETING
        self._version: Literal[4, 5] | None = None
        self._buf = bytearray()
        self._out = bytearray()
        self._eof = False
        self._username: str | None = None
        self._request: ConnectRequest | None = None
        self._leftover = b""

    # ------------------------------------------------------------------ public state

    @property
    def state(self) -> SocksState:
        return self._state

    @property
    def version(self) -> Literal[4, 5] | None:
        """4 or 5 once the first byte arrived (4 also for 4a), else ``None``."""
        return self._version

    @property
    def auth_required(self) -> bool:
        return self._check is not None

    @property
    def request(self) -> ConnectRequest | None:
        """The request once parsed (also returned as the event)."""
        return self._request

    @property
    def buffered(self) -> int:
        """Bytes of an unfinished message held; never more than :data:`MAX_MESSAGE_SIZE`."""
        return len(self._buf)

    @property
    def leftover(self) -> bytes:
        """Bytes the client sent after its request, in the same reads (optimistic data).

        They belong to the target: send them into the tunnel stream before relaying, or drop
        them on reject. Set when the :class:`ConnectRequest` is returned; ``b""`` before.
        """
        return self._leftover

    # ------------------------------------------------------------------ input

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[SocksEvent]:
        """Take bytes from the client; ``b""`` means end of stream.

        Returns ``[ConnectRequest]`` once the request is complete, else ``[]`` (more bytes
        needed). Raises :class:`SocksError` for anything the client got wrong, including closing
        mid-negotiation; after that the connection is ``CLOSED``. Calling it again once the
        request was returned, or after a failure, is a bug in the caller
        (:class:`~pytunnel.errors.LocalProtocolError`): from then on the client's bytes are the
        relay's business.
        """
        if self._state is SocksState.CLOSED:
            raise LocalProtocolError("the SOCKS connection already failed or was rejected")
        if self._state in (SocksState.REPLY, SocksState.ESTABLISHED):
            raise LocalProtocolError("the SOCKS request is complete: relay further bytes directly")
        if data:
            self._buf += data
        else:
            self._eof = True
        request = self._parse()
        if request is not None:
            self._request = request
            self._leftover = bytes(self._buf)
            self._buf.clear()
            self._state = SocksState.REPLY
            return [request]
        if self._eof:
            raise self._truncated()
        return []

    def data_to_send(self) -> bytes:
        """The negotiation replies produced so far (method selection, auth status), once."""
        out = bytes(self._out)
        self._out.clear()
        return out

    # ------------------------------------------------------------------ the answer

    def accept(self, bound_host: str = "0.0.0.0", bound_port: int = 0) -> bytes:
        """The success reply to send, after the target connection is open.

        ``bound_host``/``bound_port`` are the BND.ADDR/BND.PORT of RFC 1928: the address the
        proxy connects from. Through a tunnel it is not known here and clients ignore it for
        CONNECT, so the default 0.0.0.0:0 is what to send. SOCKS4 replies carry IPv4 only (an
        IPv6 or name is sent as 0.0.0.0). Any negotiation bytes not yet collected come first.
        """
        request = self._expect_reply_state("accept")
        if not 0 <= bound_port <= 0xFFFF:
            raise ValueError(f"bound_port must be in 0..65535, got {bound_port}")
        try:
            ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None
            ip = ipaddress.ip_address(bound_host)
        except ValueError:
            ip = None
        if request.version == 4:
            packed = ip.packed if isinstance(ip, ipaddress.IPv4Address) else b"\0\0\0\0"
            reply = _socks4_reply(_SOCKS4_GRANTED, bound_port, packed)
        else:
            if isinstance(ip, ipaddress.IPv4Address):
                address = bytes([AddressType.IPV4]) + ip.packed
            elif isinstance(ip, ipaddress.IPv6Address):
                address = bytes([AddressType.IPV6]) + ip.packed
            else:
                name = bound_host.encode()
                if not 1 <= len(name) <= _MAX_FIELD:
                    raise ValueError(f"bound_host must be 1..255 bytes, got {len(name)}")
                address = bytes([AddressType.DOMAIN, len(name)]) + name
            reply = bytes([_SOCKS5, ReplyCode.SUCCEEDED, 0x00]) + address
            reply += bound_port.to_bytes(2, "big")
        self._state = SocksState.ESTABLISHED
        return self.data_to_send() + reply

    def reject(self, reply_code: int = ReplyCode.GENERAL_FAILURE) -> bytes:
        """The failure reply to send before closing; ``reply_code`` is a SOCKS5 ``REP``.

        SOCKS4 has a single failure code, so every ``reply_code`` becomes ``5B`` there. See
        :func:`reply_code_for` to turn a pytunnel error into the fitting code.
        """
        request = self._expect_reply_state("reject")
        if not 0x01 <= reply_code <= 0xFF:
            raise ValueError(f"reply_code must be a SOCKS5 failure code 1..255, got {reply_code}")
        if request.version == 4:
            reply = _socks4_reply(_SOCKS4_REJECTED)
        else:
            reply = _socks5_reply(reply_code)
        self._state = SocksState.CLOSED
        return self.data_to_send() + reply

    def _expect_reply_state(self, what: str) -> ConnectRequest:
        if self._state is not SocksState.REPLY or self._request is None:
            raise LocalProtocolError(
                f"{what}() needs a pending ConnectRequest (state {self._state.value})"
            )
        return self._request

    # ------------------------------------------------------------------ parsing

    def _fail(self, reason: str, reply: bytes) -> SocksError:
        """Close and build the error; the caller raises it."""
        error = SocksError(reason, self.data_to_send() + reply, self._version)
        self._state = SocksState.CLOSED
        self._buf.clear()
        return error

    def _truncated(self) -> SocksError:
        what = f"with {len(self._buf)} bytes of an unfinished message" if self._buf else "early"
        reason = f"client closed the connection during SOCKS negotiation ({what})"
        if self._state is SocksState.AUTH:
            return self._fail(reason, _AUTH_FAILURE)
        if self._state is SocksState.REQUEST:
            return self._fail(reason, _socks5_reply(ReplyCode.GENERAL_FAILURE))
        if self._version == 5:
            return self._fail(reason, _METHOD_REPLY_UNACCEPTABLE)
        if self._version == 4:
            return self._fail(reason, _socks4_reply(_SOCKS4_REJECTED))
        return self._fail("client closed the connection before sending anything", b"")

    def _parse(self) -> ConnectRequest | None:
        """Consume every complete message in the buffer; the request if it is among them."""
        while self._buf:
            state = self._state
            if state is SocksState.GREETING:
                first = self._buf[0]
                if first == _SOCKS5:
                    self._version = 5
                    if not self._parse_greeting():
                        return None
                elif first == _SOCKS4:
                    self._version = 4
                    return self._parse_socks4()
                else:
                    raise self._fail(_not_socks(self._buf), b"")
            elif state is SocksState.AUTH:
                if not self._parse_auth():
                    return None
            else:
                return self._parse_request()
        return None

    def _parse_greeting(self) -> bool:
        buf = self._buf
        if len(buf) < 2:
            return False
        count = buf[1]
        if count == 0:
            raise self._fail("SOCKS5 greeting offers no methods", _METHOD_REPLY_UNACCEPTABLE)
        if len(buf) < 2 + count:
            return False
        methods = set(buf[2 : 2 + count])
        del buf[: 2 + count]
        if self._check is not None:
            if _METHOD_PASSWORD not in methods:
                raise self._fail(
                    "SOCKS5 client does not offer username/password authentication, "
                    f"which this proxy requires (offered {_hex(methods)})",
                    _METHOD_REPLY_UNACCEPTABLE,
                )
            self._out += _METHOD_REPLY_PASSWORD
            self._state = SocksState.AUTH
        else:
            if _METHOD_NONE not in methods:
                raise self._fail(
                    "SOCKS5 client does not offer 'no authentication', the only method this "
                    f"proxy has (offered {_hex(methods)})",
                    _METHOD_REPLY_UNACCEPTABLE,
                )
            self._out += _METHOD_REPLY_NONE
            self._state = SocksState.REQUEST
        return True

    def _parse_auth(self) -> bool:
        buf = self._buf
        if buf[0] != _AUTH_VERSION:
            raise self._fail(
                f"username/password sub-negotiation has version {buf[0]:#04x}, expected 0x01",
                _AUTH_FAILURE,
            )
        if len(buf) < 2:
            return False
        ulen = buf[1]
        if len(buf) < 3 + ulen:
            return False
        plen = buf[2 + ulen]
        end = 3 + ulen + plen
        if len(buf) < end:
            return False
        user, password = bytes(buf[2 : 2 + ulen]), bytes(buf[3 + ulen : end])
        del buf[:end]
        try:
            name, secret = user.decode(), password.decode()
        except UnicodeDecodeError:
            ok = False
        else:
            ok = self._check is not None and self._check(name, secret)
        if not ok:
            shown = user.decode(errors="replace")[:64]
            raise self._fail(f"SOCKS5 authentication failed for user {shown!r}", _AUTH_FAILURE)
        self._out += _AUTH_SUCCESS
        self._username = name
        self._state = SocksState.REQUEST
        return True

    def _parse_request(self) -> ConnectRequest | None:
        buf = self._buf
        if buf[0] != _SOCKS5:
            raise self._fail(
                f"SOCKS5 request has version {buf[0]:#04x}, expected 0x05",
                _socks5_reply(ReplyCode.GENERAL_FAILURE),
            )
        if len(buf) < 4:
            return None
        atyp = buf[3]
        if atyp == AddressType.IPV4:
            start, size = 4, 4
        elif atyp == AddressType.IPV6:
            start, size = 4, 16
        elif atyp == AddressType.DOMAIN:
            if len(buf) < 5:
                return None
            start, size = 5, buf[4]
            if size == 0:
                raise self._fail(
                    "SOCKS5 request has an empty domain name",
                    _socks5_reply(ReplyCode.GENERAL_FAILURE),
                )
        else:
            # Without a known address type the request's length is unknown: answer at once.
            raise self._fail(
                f"SOCKS5 request has unknown address type {atyp:#04x}",
                _socks5_reply(ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED),
            )
        end = start + size + 2
        if len(buf) < end:
            return None
        command = buf[1]
        raw = bytes(buf[start : start + size])
        port = int.from_bytes(buf[end - 2 : end], "big")
        del buf[:end]
        if command != Command.CONNECT:
            raise self._fail(
                f"SOCKS5 {_command_name(command)} is not supported, only CONNECT",
                _socks5_reply(ReplyCode.COMMAND_NOT_SUPPORTED),
            )
        if atyp == AddressType.IPV4:
            host = str(ipaddress.IPv4Address(raw))
        elif atyp == AddressType.IPV6:
            host = ipaddress.IPv6Address(raw).compressed
        else:
            decoded = _domain(raw)
            if decoded is None:
                raise self._fail(
                    f"SOCKS5 request has an invalid domain name {raw[:64]!r}",
                    _socks5_reply(ReplyCode.GENERAL_FAILURE),
                )
            host = decoded
        if port == 0:
            raise self._fail("SOCKS5 CONNECT to port 0", _socks5_reply(ReplyCode.GENERAL_FAILURE))
        return ConnectRequest(host, port, 5, AddressType(atyp), self._username)

    def _parse_socks4(self) -> ConnectRequest | None:
        # The whole request is read before judging it, so that a refused client has sent
        # everything it meant to and reads the 5B instead of a reset.
        buf = self._buf
        if len(buf) < 9:
            return None
        user_end = _find_nul(buf, 8)
        if user_end is None:
            self._check_field_length(8, "USERID")
            return None
        dstip = bytes(buf[4:8])
        is_4a = dstip[:3] == b"\0\0\0" and dstip[3] != 0
        end = user_end + 1
        if is_4a:
            name_end = _find_nul(buf, end)
            if name_end is None:
                self._check_field_length(end, "domain name")
                return None
            name = bytes(buf[end:name_end])
            end = name_end + 1
        command = buf[1]
        port = int.from_bytes(buf[2:4], "big")
        userid = bytes(buf[8:user_end]).decode(errors="replace") or None
        del buf[:end]
        rejected = _socks4_reply(_SOCKS4_REJECTED)
        if command != Command.CONNECT:
            raise self._fail(
                f"SOCKS4 {_command_name(command)} is not supported, only CONNECT", rejected
            )
        if self._check is not None:
            raise self._fail(
                "SOCKS4 client refused: this proxy requires username/password "
                "authentication, which only SOCKS5 can carry",
                rejected,
            )
        if not self._allow_socks4:
            raise self._fail("SOCKS4 client refused: this proxy serves SOCKS5 only", rejected)
        if port == 0:
            raise self._fail("SOCKS4 CONNECT to port 0", rejected)
        if is_4a:
            host = _domain(name)
            if host is None:
                raise self._fail(
                    f"SOCKS4a request has an invalid domain name {name[:64]!r}", rejected
                )
            return ConnectRequest(host, port, 4, AddressType.DOMAIN, userid)
        return ConnectRequest(str(ipaddress.IPv4Address(dstip)), port, 4, AddressType.IPV4, userid)

    def _check_field_length(self, start: int, what: str) -> None:
        """Fail if the unterminated SOCKS4 field at ``start`` is already too long to be one."""
        if len(self._buf) - start > _MAX_FIELD:
            raise self._fail(
                f"SOCKS4 {what} longer than {_MAX_FIELD} bytes", _socks4_reply(_SOCKS4_REJECTED)
            )


def _fixed_credentials(username: str, password: str) -> CredentialCheck:
    want_user, want_password = username.encode(), password.encode()

    def check(user: str, secret: str) -> bool:
        # Both comparisons always run (no short circuit), each in constant time; on bytes,
        # because compare_digest refuses non-ASCII str.
        user_ok = hmac.compare_digest(user.encode(), want_user)
        password_ok = hmac.compare_digest(secret.encode(), want_password)
        return user_ok & password_ok

    return check


def _find_nul(buf: bytearray, start: int) -> int | None:
    """Index of the NUL ending a field at ``start`` (at most 255 bytes long), or ``None``."""
    index = buf.find(0, start, start + _MAX_FIELD + 1)
    return None if index < 0 else index


def _domain(raw: bytes) -> str | None:
    """The domain as text, or ``None`` if it cannot be a host name (empty, not UTF-8, or
    containing spaces or control characters, which would only ever reach a log line)."""
    if not raw or any(b <= 0x20 or b == 0x7F for b in raw):
        return None
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return None


def _command_name(command: int) -> str:
    try:
        return Command(command).name.replace("_", " ")
    except ValueError:
        return f"command {command:#04x}"


def _hex(values: set[int]) -> str:
    return " ".join(f"{v:02x}" for v in sorted(values))


def _not_socks(buf: bytearray) -> str:
    head = bytes(buf[:16])
    if head[:1].isalpha() and head.split(b" ", 1)[0].isupper():
        return f"not a SOCKS client (looks like HTTP: {head!r}); this port speaks SOCKS 4/5"
    return f"not a SOCKS client: first byte {buf[0]:#04x}, expected 0x04 or 0x05"


# --------------------------------------------------------------------------- error mapping

#: The reply for each reason a dial failed (RFC 1928 has no "timed out": Tor and Dante answer
#: connect timeouts with 0x06 TTL expired, and curl and python-socks report it as such, whereas
#: 0x04 would claim the host has no route, which a timeout does not show; a name that does not
#: resolve is 0x04, Tor's choice).
_REPLY_FOR_FAILURE: dict[DialFailure, ReplyCode] = {
    DialFailure.TIMEOUT: ReplyCode.TTL_EXPIRED,
    DialFailure.REFUSED: ReplyCode.CONNECTION_REFUSED,
    DialFailure.RESET: ReplyCode.CONNECTION_REFUSED,
    DialFailure.NETWORK_UNREACHABLE: ReplyCode.NETWORK_UNREACHABLE,
    DialFailure.HOST_UNREACHABLE: ReplyCode.HOST_UNREACHABLE,
    DialFailure.DNS: ReplyCode.HOST_UNREACHABLE,
    DialFailure.NOT_PERMITTED: ReplyCode.NOT_ALLOWED,
}


def reply_code_for(error: TunnelError) -> ReplyCode:
    """The SOCKS5 ``REP`` that tells a client best why its target could not be reached,
    decided from ``error``'s structure: its code, and for a dial error its ``failure``.

    A dial error maps by its reason (``DialFailure``): timeout -> ``0x06``, refused or reset ->
    ``0x05``, network unreachable -> ``0x03``, host unreachable or DNS -> ``0x04``, forbidden
    by the server's ``--permit-open`` -> ``0x02``, unknown -> ``0x01``. Anything else (the
    session failed, a stream limit...) is ``0x01 general failure``: the target was never tried,
    so no target-specific code would be true.
    """
    if not isinstance(error, DialError):
        return ReplyCode.GENERAL_FAILURE
    return _REPLY_FOR_FAILURE.get(error.failure, ReplyCode.GENERAL_FAILURE)
