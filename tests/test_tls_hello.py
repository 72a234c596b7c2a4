"""The ClientHello reader (``pytunnel.protocol.tls_hello``) on real hellos from Python's ssl
and from ``openssl s_client``, split every way, and on every kind of malformed input."""

from __future__ import annotations

import functools
import itertools
import shutil
import socket
import ssl
import struct
import subprocess
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pytunnel.protocol.tls_hello import (
    ALERT_UNRECOGNIZED_NAME,
    ClientHello,
    ClientHelloError,
    ClientHelloReader,
    alert,
    valid_host_name,
)


@functools.lru_cache
def python_hello(server_name: str | None, alpn: tuple[str, ...] = ()) -> bytes:
    """The first flight of a real TLS client (Python's ssl over memory BIOs)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if alpn:
        context.set_alpn_protocols(list(alpn))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def test_a_real_hello_gives_its_name_and_alpn() -> None:
    data = python_hello("App.Example.COM", ("h2", "http/1.1"))
    reader = ClientHelloReader()
    hello = reader.feed(data)
    assert hello == ClientHello("app.example.com", ("h2", "http/1.1"), 0x0303)
    assert bytes(reader.data) == data  # everything kept, to relay on unchanged


def test_a_hello_without_sni_has_no_name() -> None:
    hello = ClientHelloReader().feed(python_hello(None))
    assert hello is not None
    assert hello.server_name is None


@settings(deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=600), max_size=8))
def test_a_real_hello_split_anywhere_reads_the_same(cuts: list[int]) -> None:
    data = python_hello("split.example")
    reader = ClientHelloReader()
    bounds = [0, *sorted({c for c in cuts if c < len(data)}), len(data)]
    results = [reader.feed(data[a:b]) for a, b in itertools.pairwise(bounds)]
    assert results[:-1] == [None] * (len(results) - 1)
    assert results[-1] is not None
    assert results[-1].server_name == "split.example"


def _records(handshake: bytes, size: int) -> bytes:
    """``handshake`` carried in records of at most ``size`` bytes each."""
    out = b""
    for at in range(0, len(handshake), size):
        piece = handshake[at : at + size]
        out += bytes([22, 3, 1]) + struct.pack("!H", len(piece)) + piece
    return out


@pytest.mark.parametrize("size", [1, 7, 100])
def test_a_hello_over_many_records_is_joined(size: int) -> None:
    data = python_hello("records.example")
    handshake = data[5:]  # Python sends one record
    hello = ClientHelloReader().feed(_records(handshake, size))
    assert hello is not None
    assert hello.server_name == "records.example"


def test_bytes_after_the_hello_are_kept_for_the_backend() -> None:
    data = python_hello("early.example") + b"\x17\x03\x03\x00\x01x"  # an early-data record
    reader = ClientHelloReader()
    assert reader.feed(data) is not None
    assert bytes(reader.data) == data


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_openssl_s_client_hello_gives_its_name() -> None:
    """A hello written by another TLS stack: OpenSSL's own client, over loopback."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    got: list[ClientHello | None] = []

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(10)
            reader = ClientHelloReader()
            hello = None
            while hello is None:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                hello = reader.feed(chunk)
            got.append(hello)
            conn.sendall(alert(ALERT_UNRECOGNIZED_NAME))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        result = subprocess.run(
            [
                "openssl",
                "s_client",
                "-connect",
                f"127.0.0.1:{port}",
                "-servername",
                "shop.example.org",
                "-alpn",
                "h2",
            ],
            input=b"",
            capture_output=True,
            timeout=30,
            check=False,
        )
    finally:
        thread.join(10)
        listener.close()
    assert got == [ClientHello("shop.example.org", ("h2",), 0x0303)]
    assert result.returncode != 0  # our alert ended its handshake
    assert b"unrecognized name" in result.stderr.lower() or b"alert" in result.stderr.lower()


def test_the_alert_record() -> None:
    assert alert(ALERT_UNRECOGNIZED_NAME) == bytes([21, 3, 1, 0, 2, 2, 112])


# --------------------------------------------------------------------------- bad input


def _hello(
    *,
    version: int = 0x0303,
    session: bytes = b"",
    suites: bytes = b"\x13\x01",
    compression: bytes = b"\x00",
    extensions: bytes | None = b"",
) -> bytes:
    body = struct.pack("!H", version) + bytes(32) + bytes([len(session)]) + session
    body += struct.pack("!H", len(suites)) + suites + bytes([len(compression)]) + compression
    if extensions is not None:
        body += struct.pack("!H", len(extensions)) + extensions
    return bytes([1]) + len(body).to_bytes(3, "big") + body


def _cut_hello(**field: bytes) -> bytes:
    """A hello whose body stops inside the one field given: that field's length claims one
    byte more than follows, and nothing comes after it."""
    [(name, value)] = field.items()
    body = struct.pack("!H", 0x0303) + bytes(32)
    for key, size, default in (
        ("session", 1, b""),
        ("suites", 2, b"\x13\x01"),
        ("compression", 1, b"\x00"),
        ("extensions", 2, b""),
    ):
        if key == name:
            body += (len(value) + 1).to_bytes(size, "big") + value
            break
        body += len(default).to_bytes(size, "big") + default
    return bytes([1]) + len(body).to_bytes(3, "big") + body


def _ext(kind: int, data: bytes) -> bytes:
    return struct.pack("!HH", kind, len(data)) + data


def _sni(*names: tuple[int, bytes]) -> bytes:
    entries = b"".join(bytes([kind]) + struct.pack("!H", len(n)) + n for kind, n in names)
    return _ext(0, struct.pack("!H", len(entries)) + entries)


def _one_record(handshake: bytes) -> bytes:
    return bytes([22, 3, 1]) + struct.pack("!H", len(handshake)) + handshake


def test_a_minimal_hello_without_extensions_is_accepted() -> None:
    hello = ClientHelloReader().feed(_one_record(_hello(extensions=None)))
    assert hello == ClientHello(None, (), 0x0303)


def test_an_unknown_name_type_is_ignored_beside_a_host_name() -> None:
    data = _one_record(_hello(extensions=_sni((7, b"other"), (0, b"a.example"))))
    hello = ClientHelloReader().feed(data)
    assert hello is not None
    assert hello.server_name == "a.example"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"GET / HTTP/1.1\r\n", "a TLS record of content type 71, not a handshake"),
        (b"\x80\x2e\x01\x00\x02", "an SSL 2 hello, not TLS"),
        (bytes([22, 2, 0, 0, 1, 1]), "a record of version 2.0, not TLS"),
        (bytes([22, 3, 5, 0, 1, 1]), "a record of version 3.5, not TLS"),
        (bytes([22, 3, 1, 0, 0]), "an empty handshake record"),
        (bytes([22, 3, 1, 0x50, 0x01]), "a record of 20481 bytes, over the TLS limit"),
        (_one_record(bytes([2, 0, 0, 0])), "handshake message type 2, not a ClientHello"),
        (_one_record(_hello() + b"\x01"), "handshake bytes after the ClientHello"),
        (_one_record(_hello(version=0x0200)), "ClientHello version 0x0200, not TLS"),
        (_one_record(_hello(session=bytes(33))), "ClientHello: session id longer than 32 bytes"),
        (_one_record(_hello(suites=b"")), "ClientHello: cipher suites empty or of odd length"),
        (_one_record(_hello(suites=b"\x13")), "ClientHello: cipher suites empty or of odd length"),
        (_one_record(_hello(compression=b"")), "ClientHello: no compression method"),
        (
            _one_record(_hello(extensions=b"\x00")),
            "ClientHello extensions: extension type runs past its end",
        ),
        (
            _one_record(_hello(extensions=_ext(0, b""))),
            "server_name: name list length runs past its end",
        ),
        (
            _one_record(_hello(extensions=_ext(5, b"") + _ext(5, b""))),
            "ClientHello: extension 5 twice",
        ),
        (
            _one_record(_hello(extensions=_sni((0, b"a.example"), (0, b"b.example")))),
            "ClientHello: more than one host name",
        ),
        (
            _one_record(_hello(extensions=_sni((7, b"x")))),
            "ClientHello: server_name without a host name",
        ),
        (
            _one_record(_hello(extensions=_sni((0, "é.example".encode())))),
            "ClientHello: server name is not ASCII",
        ),
        (
            _one_record(_hello(extensions=_sni((0, b"a..example")))),
            "ClientHello: 'a..example' is not a valid host name",
        ),
        (
            _one_record(_hello(extensions=_sni((0, b"example.")))),
            "ClientHello: 'example.' is not a valid host name",
        ),
        (
            _one_record(_hello(extensions=_sni((0, b"-a.example")))),
            "ClientHello: '-a.example' is not a valid host name",
        ),
        (
            _one_record(_hello(extensions=_sni((0, b"a b.example")))),
            "ClientHello: 'a b.example' is not a valid host name",
        ),
        (
            _one_record(_hello(extensions=_sni((0, b"a" * 64 + b".example")))),
            f"ClientHello: {'a' * 64 + '.example'!r} is not a valid host name",
        ),
        (
            _one_record(_hello(extensions=_sni((0, b"")))),
            "ClientHello: '' is not a valid host name",
        ),
        (
            _one_record(_hello(extensions=_ext(16, b"\x00\x01\x00"))),
            "ClientHello: an empty ALPN protocol name",
        ),
        (
            _one_record(_hello(extensions=_ext(16, b"\x00\x05\x02h2"))),
            "ALPN: protocol list runs past its end",
        ),
        (
            _one_record(_hello(extensions=_sni((0, b"a-.example")))),
            "ClientHello: 'a-.example' is not a valid host name",
        ),
        (
            _one_record(_hello(extensions=_sni((0, b"a" * 100)))),
            f"ClientHello: {'a' * 80!r} is not a valid host name",
        ),
        (_one_record(bytes([1, 0, 0, 1, 3])), "ClientHello: version runs past its end"),
        (_one_record(bytes([1, 0, 0, 4, 3, 3, 0, 0])), "ClientHello: random runs past its end"),
        (
            _one_record(bytes([1, 0, 0, 34, 3, 3]) + bytes(32)),
            "ClientHello: session id length runs past its end",
        ),
        (_one_record(_cut_hello(session=b"ab")), "ClientHello: session id runs past its end"),
        (
            _one_record(_cut_hello(suites=b"\x13\x01")),
            "ClientHello: cipher suites runs past its end",
        ),
        (
            _one_record(_cut_hello(compression=b"\x00")),
            "ClientHello: compression methods runs past its end",
        ),
        (
            _one_record(_cut_hello(extensions=b"\x00\x00\x00\x00")),
            "ClientHello: extensions runs past its end",
        ),
        (
            _one_record(_hello(extensions=b"\x00\x00\x00\x05\x00")),
            "ClientHello extensions: extension 0 runs past its end",
        ),
        (
            _one_record(_hello(extensions=_ext(0, b"\x00\x01\x00"))),
            "server_name list: host name length runs past its end",
        ),
        (
            _one_record(_hello(extensions=_ext(0, b"\x00\x03\x00\x00\x05"))),
            "server_name list: host name runs past its end",
        ),
        (
            _one_record(_hello(extensions=_ext(16, b"\x00\x02\x05h"))),
            "ALPN list: protocol runs past its end",
        ),
        (
            _one_record(_hello(extensions=_ext(16, b"\x00"))),
            "ALPN: protocol list length runs past its end",
        ),
    ],
)
def test_a_bad_hello_is_one_clear_error(data: bytes, message: str) -> None:
    with pytest.raises(ClientHelloError) as info:
        ClientHelloReader().feed(data)
    assert str(info.value) == message


def test_bytes_after_the_extensions_are_refused() -> None:
    handshake = _hello()
    body = handshake[4:] + b"\x00"
    data = _one_record(bytes([1]) + len(body).to_bytes(3, "big") + body)
    with pytest.raises(ClientHelloError) as info:
        ClientHelloReader().feed(data)
    assert str(info.value) == "ClientHello: bytes after the extensions"


def test_a_hello_larger_than_the_limit_is_refused_before_it_is_all_in() -> None:
    reader = ClientHelloReader(max_size=1024)
    header = bytes([1]) + (5000).to_bytes(3, "big")
    with pytest.raises(ClientHelloError, match="over 1024"):
        reader.feed(_one_record(header + bytes(100)))


def test_records_that_never_complete_a_hello_stop_at_the_limit() -> None:
    reader = ClientHelloReader(max_size=2000)
    partial = bytes([1]) + (1990).to_bytes(3, "big")
    reader.feed(_one_record(partial))
    for _ in range(18):  # 1,899 bytes in: still waiting
        assert reader.feed(_one_record(bytes(100))) is None
    with pytest.raises(ClientHelloError, match="no complete ClientHello in the first 2000"):
        reader.feed(_one_record(bytes(100)))


def test_a_hello_is_read_only_once() -> None:
    reader = ClientHelloReader()
    reader.feed(python_hello("once.example"))
    with pytest.raises(RuntimeError):
        reader.feed(b"x")


@given(st.lists(st.binary(max_size=400), max_size=10))
def test_any_bytes_are_a_hello_an_error_or_a_bounded_wait(chunks: list[bytes]) -> None:
    reader = ClientHelloReader(max_size=4096)
    for chunk in chunks:
        try:
            if reader.feed(chunk) is not None:
                return
        except ClientHelloError:
            return
        assert len(reader.data) <= 4096


@settings(deadline=None)
@given(st.data())
def test_a_real_hello_with_one_byte_changed_is_never_misread(data: st.DataObject) -> None:
    """Flip one byte of a real hello: the reader either still finds the same name (the byte
    was outside it), finds a name that is a valid host name, waits, or refuses; it never
    raises anything else."""
    hello = bytearray(python_hello("flip.example", ("h2",)))
    index = data.draw(st.integers(min_value=0, max_value=len(hello) - 1))
    hello[index] ^= data.draw(st.integers(min_value=1, max_value=255))
    try:
        result = ClientHelloReader().feed(bytes(hello))
    except ClientHelloError:
        return
    if result is not None and result.server_name is not None:
        assert result.server_name == result.server_name.lower()
        assert all(0 < len(label) <= 63 for label in result.server_name.split("."))


# --------------------------------------------------------------------------- exact behaviour
# Pinned down by the mutation run (docs/mutation.md).


def test_host_name_bounds_are_inclusive() -> None:
    assert valid_host_name("a")
    assert valid_host_name("a" * 63 + ".example")
    assert not valid_host_name("a" * 64 + ".example")
    exact = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])
    assert len(exact) == 253
    assert valid_host_name(exact)
    assert not valid_host_name(exact + "d")
    assert not valid_host_name("a-.example")


def test_a_hello_with_a_name_and_no_alpn_offers_none() -> None:
    hello = ClientHelloReader().feed(_one_record(_hello(extensions=_sni((0, b"a.example")))))
    assert hello == ClientHello("a.example", (), 0x0303)


def test_one_byte_that_is_not_a_handshake_is_refused_at_once() -> None:
    with pytest.raises(ClientHelloError) as info:
        ClientHelloReader().feed(b"G")
    assert str(info.value) == "a TLS record of content type 71, not a handshake"


def test_a_record_header_cut_after_a_record_waits() -> None:
    reader = ClientHelloReader()
    partial = _hello()[:10]
    assert reader.feed(_one_record(partial) + bytes([22, 3, 1])) is None


def test_record_versions_up_to_3_4_and_records_of_exactly_the_limit_are_read() -> None:
    data = bytes([22, 3, 4]) + struct.pack("!H", len(_hello())) + _hello()
    assert ClientHelloReader().feed(data) == ClientHello(None, (), 0x0303)
    limit = 2**14 + 2048
    header = bytes([1]) + (limit + 10).to_bytes(3, "big")
    record = bytes([22, 3, 1]) + struct.pack("!H", limit) + header + bytes(limit - 4)
    assert ClientHelloReader().feed(record) is None


def test_limits_on_the_hello_are_inclusive() -> None:
    handshake = _hello()
    assert ClientHelloReader(max_size=len(handshake)).feed(_one_record(handshake)) is not None
    reader = ClientHelloReader(max_size=100)
    start = _one_record(bytes([1]) + (96).to_bytes(3, "big") + bytes(85))
    assert reader.feed(start + _one_record(b"\x00")) is None
    assert len(reader.data) == 100  # exactly the limit in, still waiting


def test_a_hello_length_uses_all_three_bytes() -> None:
    reader = ClientHelloReader(max_size=2**17)
    handshake = bytes([1]) + (70000).to_bytes(3, "big") + bytes(5000)
    assert reader.feed(_records(handshake, 2**14)) is None


def test_a_hello_is_read_only_once_and_says_so() -> None:
    reader = ClientHelloReader()
    reader.feed(python_hello("once.example"))
    with pytest.raises(RuntimeError) as info:
        reader.feed(b"x")
    assert str(info.value) == "the ClientHello was already read"
