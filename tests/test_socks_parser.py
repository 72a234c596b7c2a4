"""The sans-IO SOCKS 4/4a/5 server parser: every reply byte-exact, any chunking, any garbage."""

from __future__ import annotations

import ipaddress
import itertools
import string
from typing import Any

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pytunnel.errors import (
    ConnectError,
    DialError,
    DialFailure,
    InvalidTargetError,
    LocalProtocolError,
    NodeTimeoutError,
    NodeUnstableError,
    StreamLimitError,
    StreamRefusedError,
    TargetForbiddenError,
    TunnelError,
)
from pytunnel.protocol.socks import (
    MAX_MESSAGE_SIZE,
    AddressType,
    ConnectRequest,
    ReplyCode,
    SocksError,
    SocksServerConnection,
    SocksState,
    reply_code_for,
)

ZERO_ADDR = b"\x01\x00\x00\x00\x00\x00\x00"  # BND of a failure: ATYP IPv4, 0.0.0.0, port 0
SOCKS4_REJECT = b"\x00\x5b\x00\x00\x00\x00\x00\x00"
SOCKS4_GRANT = b"\x00\x5a\x00\x00\x00\x00\x00\x00"
METHOD_NONE = b"\x05\x00"
METHOD_PASSWORD = b"\x05\x02"
METHOD_REFUSED = b"\x05\xff"
AUTH_OK = b"\x01\x00"
AUTH_FAILED = b"\x01\x01"
CREDS = ("alice", "s3cret")


def s5_fail(code: int) -> bytes:
    return bytes([5, code, 0]) + ZERO_ADDR


def greeting(*methods: int) -> bytes:
    return bytes([5, len(methods), *methods])


def password(user: bytes, pw: bytes) -> bytes:
    return bytes([1, len(user)]) + user + bytes([len(pw)]) + pw


def s5_request(atyp: int, addr: bytes, port: int, cmd: int = 1) -> bytes:
    if atyp == 3:
        addr = bytes([len(addr)]) + addr
    return bytes([5, cmd, 0, atyp]) + addr + port.to_bytes(2, "big")


def s4_request(ip: bytes, port: int, userid: bytes = b"", domain: bytes | None = None) -> bytes:
    out = bytes([4, 1]) + port.to_bytes(2, "big") + ip + userid + b"\0"
    return out if domain is None else out + domain + b"\0"


def s4_cmd(data: bytes, cmd: int) -> bytes:
    return data[:1] + bytes([cmd]) + data[2:]


def run(conn: SocksServerConnection, chunks: list[bytes]) -> tuple[list[ConnectRequest], bytes]:
    """Feed the chunks in order, collecting events and everything the server sends."""
    events: list[ConnectRequest] = []
    out = b""
    for chunk in chunks:
        events += conn.receive_data(chunk)
        out += conn.data_to_send()
        if events:
            break
    return events, out


def fail(conn: SocksServerConnection, data: bytes) -> SocksError:
    with pytest.raises(SocksError) as info:
        conn.receive_data(data)
    assert conn.state is SocksState.CLOSED
    assert conn.data_to_send() == b""  # everything owed is in the error's reply
    return info.value


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges) if b > a]


@attrs.frozen
class Exchange:
    """A valid client conversation: its messages with the server's answer to each, and the
    failure reply the server gives if the client stops inside (or before) that message."""

    auth: tuple[str, str] | None
    messages: tuple[tuple[bytes, bytes, bytes], ...]
    request: ConnectRequest
    early: bytes = b""

    @property
    def client_bytes(self) -> bytes:
        return b"".join(m for m, _, _ in self.messages) + self.early

    @property
    def server_bytes(self) -> bytes:
        return b"".join(r for _, r, _ in self.messages)

    def conn(self) -> SocksServerConnection:
        return SocksServerConnection(self.auth)


def s5_exchange(
    request_bytes: bytes,
    expected: ConnectRequest,
    auth: tuple[str, str] | None = None,
    early: bytes = b"",
    methods: tuple[int, ...] | None = None,
) -> Exchange:
    failed = s5_fail(1)
    if auth is None:
        first = (greeting(*(methods or (0,))), METHOD_NONE, METHOD_REFUSED)
        return Exchange(auth, (first, (request_bytes, b"", failed)), expected, early)
    first = (greeting(*(methods or (0, 2))), METHOD_PASSWORD, METHOD_REFUSED)
    sub = (password(auth[0].encode(), auth[1].encode()), AUTH_OK, AUTH_FAILED)
    return Exchange(auth, (first, sub, (request_bytes, b"", failed)), expected, early)


def s4_exchange(request_bytes: bytes, expected: ConnectRequest, early: bytes = b"") -> Exchange:
    return Exchange(None, ((request_bytes, b"", SOCKS4_REJECT),), expected, early)


EXCHANGES = {
    "socks5-ipv4": s5_exchange(
        s5_request(1, b"\x7f\x00\x00\x01", 80),
        ConnectRequest("127.0.0.1", 80, 5, AddressType.IPV4),
    ),
    "socks5-ipv6": s5_exchange(
        s5_request(4, bytes.fromhex("20010db8000000000000000000000001"), 443),
        ConnectRequest("2001:db8::1", 443, 5, AddressType.IPV6),
    ),
    "socks5-domain": s5_exchange(
        s5_request(3, b"example.com", 8080),
        ConnectRequest("example.com", 8080, 5, AddressType.DOMAIN),
    ),
    "socks5-password": s5_exchange(
        s5_request(3, b"example.com", 443),
        ConnectRequest("example.com", 443, 5, AddressType.DOMAIN, "alice"),
        auth=CREDS,
    ),
    "socks4": s4_exchange(
        s4_request(b"\x0a\x00\x00\x02", 22, b"bob"),
        ConnectRequest("10.0.0.2", 22, 4, AddressType.IPV4, "bob"),
    ),
    "socks4a": s4_exchange(
        s4_request(b"\x00\x00\x00\x07", 443, b"", b"example.org"),
        ConnectRequest("example.org", 443, 4, AddressType.DOMAIN, None),
    ),
}
EARLY = b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n"


# --------------------------------------------------------------------------- valid exchanges


@pytest.mark.parametrize("name", EXCHANGES)
def test_exchange_in_one_chunk_and_byte_by_byte(name: str) -> None:
    exchange = attrs.evolve(EXCHANGES[name], early=EARLY)
    data = exchange.client_bytes
    for chunks in ([data], [data[i : i + 1] for i in range(len(data))]):
        conn = exchange.conn()
        events, out = run(conn, chunks)
        assert events == [exchange.request]
        assert out == exchange.server_bytes
        assert conn.state is SocksState.REPLY
        assert conn.request == exchange.request
        assert conn.buffered == 0
        if len(chunks) == 1:
            assert conn.leftover == EARLY  # sent together with the request: kept, not lost
        else:
            assert conn.leftover == b""  # byte by byte: the request completes on its last byte


def test_socks5_no_auth_exact_bytes() -> None:
    conn = SocksServerConnection()
    assert conn.state is SocksState.GREETING
    assert conn.version is None
    assert conn.receive_data(b"\x05\x01\x00") == []
    assert conn.data_to_send() == b"\x05\x00"
    assert conn.data_to_send() == b""  # collected once
    assert conn.version == 5
    assert conn.state is SocksState.REQUEST
    events = conn.receive_data(b"\x05\x01\x00\x01\xc0\x00\x02\x01\x00\x50")
    assert events == [ConnectRequest("192.0.2.1", 80, 5, AddressType.IPV4, None)]
    assert conn.accept() == b"\x05\x00\x00\x01\x00\x00\x00\x00\x00\x00"
    assert conn.state is SocksState.ESTABLISHED


def test_socks5_accept_bound_addresses() -> None:
    def ready() -> SocksServerConnection:
        conn = SocksServerConnection()
        run(conn, [greeting(0) + s5_request(1, b"\x01\x02\x03\x04", 1)])
        return conn

    assert ready().accept("10.1.2.3", 1080) == b"\x05\x00\x00\x01\x0a\x01\x02\x03\x04\x38"
    assert ready().accept("::1", 1080) == b"\x05\x00\x00\x04" + b"\0" * 15 + b"\x01\x04\x38"
    assert ready().accept("proxy.lan", 1) == b"\x05\x00\x00\x03\x09proxy.lan\x00\x01"
    with pytest.raises(ValueError, match="bound_port"):
        ready().accept("0.0.0.0", 65536)
    with pytest.raises(ValueError, match="bound_host"):
        ready().accept("x" * 256)


def test_accept_includes_uncollected_negotiation_bytes() -> None:
    conn = SocksServerConnection()
    assert conn.receive_data(greeting(0) + s5_request(3, b"a.b", 9)) != []
    assert conn.accept() == METHOD_NONE + b"\x05\x00\x00\x01\x00\x00\x00\x00\x00\x00"


@pytest.mark.parametrize("code", list(range(1, 9)))
def test_socks5_reject_codes(code: int) -> None:
    conn = SocksServerConnection()
    run(conn, [greeting(0), s5_request(3, b"example.com", 80)])
    assert conn.reject(code) == bytes([5, code, 0, 1, 0, 0, 0, 0, 0, 0])
    assert conn.state is SocksState.CLOSED


def test_reject_default_and_bad_codes() -> None:
    conn = SocksServerConnection()
    run(conn, [greeting(0), s5_request(3, b"example.com", 80)])
    with pytest.raises(ValueError, match="reply_code"):
        conn.reject(0)
    with pytest.raises(ValueError, match="reply_code"):
        conn.reject(256)
    assert conn.state is SocksState.REPLY  # a bad argument changes nothing
    assert conn.reject() == s5_fail(1)


def test_socks5_password_exact_bytes() -> None:
    conn = SocksServerConnection(CREDS)
    assert conn.auth_required
    assert conn.receive_data(b"\x05\x02\x00\x02") == []
    assert conn.data_to_send() == b"\x05\x02"
    assert conn.receive_data(b"\x01\x05alice\x06s3cret") == []
    assert conn.data_to_send() == b"\x01\x00"
    [event] = conn.receive_data(b"\x05\x01\x00\x03\x0bexample.com\x01\xbb")
    assert event == ConnectRequest("example.com", 443, 5, AddressType.DOMAIN, "alice")


@pytest.mark.parametrize(
    ("user", "pw"),
    [(b"alice", b"wrong!"), (b"mallory", b"s3cret"), (b"", b""), (b"alice", b"s3cret\0")],
)
def test_socks5_password_rejected(user: bytes, pw: bytes) -> None:
    conn = SocksServerConnection(CREDS)
    run(conn, [greeting(2)])
    error = fail(conn, password(user, pw))
    assert error.reply == AUTH_FAILED
    assert error.version == 5
    assert "authentication failed" in error.reason
    assert b"wrong" not in error.reason.encode()  # never the password in a log line


def test_pipelined_failure_reply_carries_the_method_reply() -> None:
    conn = SocksServerConnection(CREDS)
    error = fail(conn, greeting(0, 2) + password(b"alice", b"nope") + s5_request(1, b"1234", 1))
    assert error.reply == METHOD_PASSWORD + AUTH_FAILED


def test_non_ascii_credentials_compare_as_utf8() -> None:
    conn = SocksServerConnection(("jürgen", "pässwörd"))
    events, out = run(
        conn,
        [greeting(2) + password("jürgen".encode(), "pässwörd".encode()), s5_request(1, b"1234", 5)],
    )
    assert out == METHOD_PASSWORD + AUTH_OK
    assert events[0].username == "jürgen"


def test_credential_callback() -> None:
    seen: list[tuple[str, str]] = []

    def check(user: str, pw: str) -> bool:
        seen.append((user, pw))
        return pw == "ok"

    conn = SocksServerConnection(check)
    events, out = run(conn, [greeting(2), password(b"u", b"ok"), s5_request(3, b"h", 1)])
    assert out == METHOD_PASSWORD + AUTH_OK
    assert events[0].username == "u"
    assert fail(SocksServerConnection(check), greeting(2) + password(b"u", b"no")).reply == (
        METHOD_PASSWORD + AUTH_FAILED
    )
    # Credentials that are not UTF-8 fail without reaching the callback.
    error = fail(SocksServerConnection(check), greeting(2) + password(b"\xff", b"ok"))
    assert error.reply == METHOD_PASSWORD + AUTH_FAILED
    assert seen == [("u", "ok"), ("u", "no")]


def test_socks4_exact_bytes() -> None:
    conn = SocksServerConnection()
    [event] = conn.receive_data(b"\x04\x01\x00\x50\x7f\x00\x00\x01user\x00")
    assert event == ConnectRequest("127.0.0.1", 80, 4, AddressType.IPV4, "user")
    assert conn.version == 4
    assert conn.data_to_send() == b""
    assert conn.accept() == SOCKS4_GRANT

    conn = SocksServerConnection()
    run(conn, [s4_request(b"\x7f\x00\x00\x01", 80)])
    assert conn.accept("10.0.0.1", 1234) == b"\x00\x5a\x04\xd2\x0a\x00\x00\x01"
    conn = SocksServerConnection()
    run(conn, [s4_request(b"\x7f\x00\x00\x01", 80)])
    assert conn.accept("::1", 1234) == b"\x00\x5a\x04\xd2\x00\x00\x00\x00"  # SOCKS4 is IPv4-only


@pytest.mark.parametrize("code", [1, 2, 5, 6, 255])
def test_socks4_reject_is_always_5b(code: int) -> None:
    conn = SocksServerConnection()
    run(conn, [s4_request(b"\0\0\0\1", 80, b"", b"example.com")])
    assert conn.reject(code) == SOCKS4_REJECT


def test_socks4a_exact_bytes_and_zero_ip_is_plain_socks4() -> None:
    conn = SocksServerConnection()
    [event] = conn.receive_data(b"\x04\x01\x01\xbb\x00\x00\x00\xffid\x00example.net\x00")
    assert event == ConnectRequest("example.net", 443, 4, AddressType.DOMAIN, "id")
    # 0.0.0.0 (x == 0) is not the 4a marker: no domain follows.
    conn = SocksServerConnection()
    [event] = conn.receive_data(b"\x04\x01\x00\x50\x00\x00\x00\x00\x00")
    assert event == ConnectRequest("0.0.0.0", 80, 4, AddressType.IPV4, None)


def test_socks4_field_limits() -> None:
    conn = SocksServerConnection()
    [event] = conn.receive_data(s4_request(b"\1\2\3\4", 1, b"u" * 255))
    assert event.username == "u" * 255
    conn = SocksServerConnection()
    [event] = conn.receive_data(s4_request(b"\0\0\0\1", 1, b"", b"d" * 255))
    assert event.host == "d" * 255

    conn = SocksServerConnection()
    assert conn.receive_data(s4_request(b"\1\2\3\4", 1, b"u" * 255)[:-1]) == []
    error = fail(conn, b"u")  # 256 bytes and still no NUL
    assert error.reply == SOCKS4_REJECT
    assert "USERID" in error.reason
    error = fail(SocksServerConnection(), s4_request(b"\0\0\0\1", 1, b"", b"d" * 256))
    assert error.reply == SOCKS4_REJECT
    assert "domain" in error.reason


def test_socks5_longest_domain() -> None:
    name = b"x" * 255
    events, _ = run(SocksServerConnection(), [greeting(0), s5_request(3, name, 1)])
    assert events[0].host == name.decode()


def test_method_selection_prefers_what_the_proxy_requires() -> None:
    # offered both: no-auth proxy picks 00, password proxy picks 02
    assert run(SocksServerConnection(), [greeting(2, 0, 1)])[1] == METHOD_NONE
    assert run(SocksServerConnection(CREDS), [greeting(0, 1, 2)])[1] == METHOD_PASSWORD


def test_leftover_early_data() -> None:
    for exchange in EXCHANGES.values():
        exchange = attrs.evolve(exchange, early=b"\x00early\xff")
        conn = exchange.conn()
        *negotiation, last = (m for m, _, _ in exchange.messages)
        events, _ = run(conn, [*negotiation, last + exchange.early])
        assert events == [exchange.request]
        assert conn.leftover == b"\x00early\xff"


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("auth", "data", "reply"),
    [
        pytest.param(None, greeting(2), METHOD_REFUSED, id="only-password-offered"),
        pytest.param(None, greeting(1, 0x80, 0xFF), METHOD_REFUSED, id="unknown-methods"),
        pytest.param(CREDS, greeting(0), METHOD_REFUSED, id="password-required"),
        pytest.param(None, b"\x05\x00", METHOD_REFUSED, id="nmethods-0"),
        pytest.param(CREDS, b"\x05\x00", METHOD_REFUSED, id="nmethods-0-auth"),
    ],
)
def test_no_acceptable_method(auth: tuple[str, str] | None, data: bytes, reply: bytes) -> None:
    error = fail(SocksServerConnection(auth), data)
    assert error.reply == reply
    assert error.version == 5


@pytest.mark.parametrize(("cmd", "name"), [(2, "BIND"), (3, "UDP ASSOCIATE"), (9, "0x09")])
def test_socks5_only_connect(cmd: int, name: str) -> None:
    conn = SocksServerConnection()
    error = fail(conn, greeting(0) + s5_request(1, b"\1\2\3\4", 80, cmd=cmd))
    assert error.reply == METHOD_NONE + s5_fail(ReplyCode.COMMAND_NOT_SUPPORTED)
    assert name in error.reason


@pytest.mark.parametrize("cmd", [2, 3, 0])
def test_socks4_only_connect(cmd: int) -> None:
    error = fail(SocksServerConnection(), s4_cmd(s4_request(b"\1\2\3\4", 80, b"u"), cmd))
    assert error.reply == SOCKS4_REJECT
    assert error.version == 4


def test_socks4_refused_when_auth_required_or_disabled() -> None:
    request = s4_request(b"\1\2\3\4", 80, b"alice")
    error = fail(SocksServerConnection(CREDS), request)
    assert error.reply == SOCKS4_REJECT
    assert "SOCKS5" in error.reason
    error = fail(SocksServerConnection(allow_socks4=False), request)
    assert error.reply == SOCKS4_REJECT
    # the whole request is consumed first, in pieces too, so the client reads the 5B
    conn = SocksServerConnection(CREDS)
    assert conn.receive_data(request[:9]) == []
    assert fail(conn, request[9:]).reply == SOCKS4_REJECT


@pytest.mark.parametrize(
    "data",
    [b"GET / HTTP/1.1\r\n\r\n", b"CONNECT example.com:443 HTTP/1.1\r\n", b"\x16\x03\x01", b"\x00"],
)
def test_not_socks(data: bytes) -> None:
    error = fail(SocksServerConnection(), data)
    assert error.reply == b""
    assert error.version is None
    if data.startswith((b"GET", b"CONNECT")):
        assert "HTTP" in error.reason


@pytest.mark.parametrize(
    ("data", "code"),
    [
        pytest.param(s5_request(2, b"", 0)[:4], 8, id="atyp-2"),
        pytest.param(b"\x05\x01\x00\x00", 8, id="atyp-0"),
        pytest.param(b"\x05\x01\x00\xff", 8, id="atyp-ff"),
        pytest.param(b"\x05\x01\x00\x03\x00", 1, id="empty-domain"),
        pytest.param(s5_request(3, b"exa mple.com", 80), 1, id="space-in-domain"),
        pytest.param(s5_request(3, b"evil\nlog", 80), 1, id="newline-in-domain"),
        pytest.param(s5_request(3, b"\xff\xfe", 80), 1, id="domain-not-utf8"),
        pytest.param(s5_request(1, b"\1\2\3\4", 0), 1, id="port-0"),
        pytest.param(b"\x04\x01\x00\x01\x01\x02\x03\x04", 1, id="request-version-4"),
        pytest.param(b"\x00", 1, id="request-version-0"),
    ],
)
def test_bad_socks5_request(data: bytes, code: int) -> None:
    conn = SocksServerConnection()
    run(conn, [greeting(0)])
    assert fail(conn, data).reply == s5_fail(code)


def test_utf8_domain_is_passed_through() -> None:
    events, _ = run(SocksServerConnection(), [greeting(0), s5_request(3, "bücher.de".encode(), 80)])
    assert events[0].host == "bücher.de"


def test_request_reserved_byte_is_ignored() -> None:
    data = bytearray(s5_request(1, b"\1\2\3\4", 80))
    data[2] = 0x7F
    events, _ = run(SocksServerConnection(), [greeting(0), bytes(data)])
    assert events[0].host == "1.2.3.4"


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(s4_request(b"\1\2\3\4", 0), id="socks4-port-0"),
        pytest.param(s4_request(b"\0\0\0\1", 80, b"", b""), id="socks4a-empty-domain"),
        pytest.param(s4_request(b"\0\0\0\1", 80, b"", b"a b"), id="socks4a-space"),
    ],
)
def test_bad_socks4_request(data: bytes) -> None:
    assert fail(SocksServerConnection(), data).reply == SOCKS4_REJECT


def test_bad_auth_version() -> None:
    conn = SocksServerConnection(CREDS)
    run(conn, [greeting(2)])
    error = fail(conn, b"\x05\x05alice\x06s3cret")
    assert error.reply == AUTH_FAILED


# --------------------------------------------------------------------------- end of stream


@pytest.mark.parametrize("name", EXCHANGES)
def test_truncated_at_every_split_point(name: str) -> None:
    exchange = EXCHANGES[name]
    done = b""  # server bytes for the messages completed so far
    offset = 0
    for message, answer, failure in exchange.messages:
        for cut in range(len(message)):
            prefix = exchange.client_bytes[: offset + cut]
            conn = exchange.conn()
            events, out = run(conn, [prefix] if prefix else [])  # b"" would be EOF
            assert events == []  # waits for more
            assert conn.buffered <= MAX_MESSAGE_SIZE
            error = fail(conn, b"")
            if offset + cut == 0:
                assert (out, error.reply, error.version) == (b"", b"", None)
            else:
                assert out + error.reply == done + failure, (offset, cut)
                assert error.version == exchange.request.version
        offset += len(message)
        done += answer


def test_eof_after_the_request_is_the_relays_business() -> None:
    conn = SocksServerConnection()
    run(conn, [greeting(0), s5_request(1, b"\1\2\3\4", 80)])
    with pytest.raises(LocalProtocolError):
        conn.receive_data(b"")
    assert conn.state is SocksState.REPLY  # the caller can still answer


def test_misuse_is_a_local_error() -> None:
    conn = SocksServerConnection()
    with pytest.raises(LocalProtocolError):
        conn.accept()
    with pytest.raises(LocalProtocolError):
        conn.reject(1)
    fail(conn, b"\x01")
    with pytest.raises(LocalProtocolError):
        conn.receive_data(b"\x05")
    conn = SocksServerConnection()
    assert conn.receive_data(b"\x05") == []
    fail(conn, b"")
    with pytest.raises(LocalProtocolError):
        conn.receive_data(b"")
    conn = SocksServerConnection()
    run(conn, [s4_request(b"\1\2\3\4", 80)])
    conn.accept()
    with pytest.raises(LocalProtocolError):
        conn.accept()
    with pytest.raises(LocalProtocolError):
        conn.receive_data(b"data")


def test_error_attributes() -> None:
    error = SocksError("why", b"\x05\xff", 5)
    assert isinstance(error, ValueError)
    assert (str(error), error.reason, error.reply, error.version) == ("why", "why", b"\x05\xff", 5)
    assert "why" in repr(error)


# --------------------------------------------------------------------------- error mapping


@pytest.mark.parametrize(
    ("error", "reply"),
    [
        (NodeTimeoutError("refused, says the text"), 0x06),
        (NodeUnstableError("timed out, says the text", failure=DialFailure.REFUSED), 0x05),
        (NodeUnstableError("", failure=DialFailure.RESET), 0x05),
        (NodeUnstableError("", failure=DialFailure.NETWORK_UNREACHABLE), 0x03),
        (NodeUnstableError("", failure=DialFailure.HOST_UNREACHABLE), 0x04),
        (NodeUnstableError("connection refused", failure=DialFailure.DNS), 0x04),
        (NodeUnstableError("connection refused", failure=DialFailure.INVALID_HOST), 0x01),
        (NodeUnstableError("connection refused"), 0x01),  # reason unknown: text is not read
        (DialError("", failure=DialFailure.REFUSED), 0x05),
        (TargetForbiddenError("h:1 is not permitted"), 0x02),
        (InvalidTargetError("host too long"), 0x02),
        # not a dial outcome: the target was never tried
        (ConnectError("tunnel server: Connection refused"), 0x01),
        (StreamLimitError(""), 0x01),
        (StreamRefusedError("refused", code=99999), 0x01),
    ],
    ids=lambda x: type(x).__name__ if isinstance(x, Exception) else hex(x),
)
def test_reply_code_is_chosen_from_the_errors_structure(error: TunnelError, reply: int) -> None:
    assert reply_code_for(error) == reply
    assert isinstance(reply_code_for(error), ReplyCode)


# --------------------------------------------------------------------------- properties

DOMAIN_CHARS = string.ascii_letters + string.digits + ".-_"


@st.composite
def exchanges(draw: st.DrawFn) -> Exchange:
    kind = draw(st.sampled_from(["socks5", "socks5-password", "socks4", "socks4a"]))
    port = draw(st.integers(1, 65535))
    early = draw(st.binary(max_size=40))
    if kind == "socks4":
        ip = draw(st.binary(min_size=4, max_size=4).filter(lambda b: b[:3] != b"\0\0\0"))
        userid = draw(st.text(DOMAIN_CHARS, max_size=20))
        request = ConnectRequest(".".join(map(str, ip)), port, 4, AddressType.IPV4, userid or None)
        return s4_exchange(s4_request(ip, port, userid.encode()), request, early)
    if kind == "socks4a":
        name = draw(st.text(DOMAIN_CHARS, min_size=1, max_size=255))
        x = draw(st.integers(1, 255))
        request = ConnectRequest(name, port, 4, AddressType.DOMAIN, None)
        return s4_exchange(
            s4_request(bytes([0, 0, 0, x]), port, b"", name.encode()), request, early
        )
    atyp = draw(st.sampled_from(AddressType))
    if atyp is AddressType.IPV4:
        raw = draw(st.binary(min_size=4, max_size=4))
        host = ".".join(map(str, raw))
    elif atyp is AddressType.IPV6:
        raw = draw(st.binary(min_size=16, max_size=16))
        host = ipaddress.IPv6Address(raw).compressed
    else:
        host = draw(st.text(DOMAIN_CHARS, min_size=1, max_size=255))
        raw = host.encode()
    extra = draw(st.lists(st.integers(0, 255), max_size=5))
    if kind == "socks5":
        request = ConnectRequest(host, port, 5, atyp, None)
        methods = (*extra, 0)
        return s5_exchange(s5_request(atyp, raw, port), request, None, early, methods)
    user = draw(st.text(max_size=30).filter(lambda t: len(t.encode()) <= 255))
    pw = draw(st.text(max_size=30).filter(lambda t: len(t.encode()) <= 255))
    request = ConnectRequest(host, port, 5, atyp, user)
    methods = (2, *extra)
    return s5_exchange(s5_request(atyp, raw, port), request, (user, pw), early, methods)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(exchange=exchanges(), cuts=st.lists(st.integers(0, 2000), max_size=12))
def test_any_split_gives_the_same_result(exchange: Exchange, cuts: list[int]) -> None:
    data = exchange.client_bytes
    conn = exchange.conn()
    events: list[ConnectRequest] = []
    out = b""
    fed = 0
    for chunk in split(data, cuts):
        events += conn.receive_data(chunk)
        out += conn.data_to_send()
        fed += len(chunk)
        assert conn.buffered <= MAX_MESSAGE_SIZE
        if events:
            break
    assert events == [exchange.request]
    assert out == exchange.server_bytes
    # early data in the chunk that completed the request is leftover; the rest was never fed
    assert conn.leftover + data[fed:] == exchange.early
    assert conn.accept()[:2] in (b"\x05\x00", b"\x00\x5a")


def check_server_stream(stream: bytes, version: int | None, auth: bool) -> None:
    """``stream`` (everything the server sent, ending with a failure) is valid SOCKS."""
    if version is None:
        assert stream == b""
        return
    if version == 4:
        assert stream == SOCKS4_REJECT
        return
    expected_method = METHOD_PASSWORD if auth else METHOD_NONE
    if stream == METHOD_REFUSED:
        return
    assert stream[:2] == expected_method, stream
    rest = stream[2:]
    if auth:
        if rest == AUTH_FAILED:
            return
        assert rest[:2] == AUTH_OK, stream
        rest = rest[2:]
    assert len(rest) == 10, stream
    assert rest[0] == 5, stream
    assert 1 <= rest[1] <= 8, stream
    assert rest[2:] == b"\x00" + ZERO_ADDR


PREFIXES = [
    b"",
    b"\x04\x01",
    b"\x04\x01\x00\x50\x00\x00\x00\x01",
    b"\x05",
    b"\x05\x01\x00",
    b"\x05\x01\x02",
    b"\x05\x01\x00\x05\x01\x00",
    b"\x05\x01\x02\x01",
]


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    prefix=st.sampled_from(PREFIXES),
    garbage=st.binary(max_size=700),
    cuts=st.lists(st.integers(0, 2000), max_size=8),
    auth=st.booleans(),
)
def test_garbage_only_ever_yields_socks_error(
    prefix: bytes, garbage: bytes, cuts: list[int], auth: bool
) -> None:
    conn = SocksServerConnection(("u", "p") if auth else None)
    sent = b""
    error: SocksError | None = None
    events: list[Any] = []
    for chunk in [*split(prefix + garbage, cuts), b""]:
        try:
            events = conn.receive_data(chunk)
        except SocksError as exc:
            error = exc
            break
        sent += conn.data_to_send()
        assert conn.buffered <= MAX_MESSAGE_SIZE
        assert conn.state is not SocksState.CLOSED
        if events:  # garbage can be a valid request by chance; then the parser is done
            assert conn.state is SocksState.REPLY
            return
    assert error is not None  # end of stream always ends the negotiation
    assert conn.state is SocksState.CLOSED
    check_server_stream(sent + error.reply, error.version, auth)


@settings(max_examples=100, deadline=None)
@given(garbage=st.binary(min_size=MAX_MESSAGE_SIZE, max_size=MAX_MESSAGE_SIZE + 200))
def test_enough_garbage_never_waits(garbage: bytes) -> None:
    """A message can never be longer than MAX_MESSAGE_SIZE: with that many bytes the parser
    has either answered or failed, never still waiting."""
    conn = SocksServerConnection()
    try:
        events = conn.receive_data(garbage)
    except SocksError:
        return
    assert events
    assert conn.buffered == 0


# --------------------------------------------------------------------------- interoperability


def test_python_socks_client_sans_io() -> None:
    """A real client implementation's bytes, and its parsing of our replies."""
    socks5 = pytest.importorskip("python_socks._protocols.socks5")
    socks4 = pytest.importorskip("python_socks._protocols.socks4")

    client = socks5.Connection()
    server = SocksServerConnection(CREDS)
    assert server.receive_data(client.send(socks5.AuthMethodsRequest(*CREDS))) == []
    client.receive(server.data_to_send())
    assert server.receive_data(client.send(socks5.AuthRequest(*CREDS))) == []
    client.receive(server.data_to_send())
    [event] = server.receive_data(client.send(socks5.ConnectRequest("example.com", 443)))
    assert event == ConnectRequest("example.com", 443, 5, AddressType.DOMAIN, "alice")
    reply = client.receive(server.accept())
    assert (reply.bound_host, reply.bound_port) == ("0.0.0.0", 0)

    client = socks5.Connection()
    server = SocksServerConnection()
    server.receive_data(client.send(socks5.AuthMethodsRequest(None, None)))
    client.receive(server.data_to_send())
    server.receive_data(client.send(socks5.ConnectRequest("::1", 22)))
    with pytest.raises(Exception, match="TTL expired"):
        client.receive(server.reject(reply_code_for(NodeTimeoutError(""))))

    server = SocksServerConnection()
    [event] = server.receive_data(socks4.ConnectRequest("example.com", 80, "me").dumps())
    assert event == ConnectRequest("example.com", 80, 4, AddressType.DOMAIN, "me")
    assert socks4.Connection().receive(server.accept()).port == 0
