"""OpenSSH-style forward specifications."""

from __future__ import annotations

import pytest

from pytunnel._spec import ForwardSpec, parse_forward_spec, parse_host_port


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("8080:localhost:80", ForwardSpec(None, 8080, "localhost", 80)),
        ("0:127.0.0.1:22", ForwardSpec(None, 0, "127.0.0.1", 22)),
        ("0.0.0.0:8080:db:5432", ForwardSpec("0.0.0.0", 8080, "db", 5432)),
        ("[::1]:8080:[2001:db8::1]:443", ForwardSpec("::1", 8080, "2001:db8::1", 443)),
        ("8080:localhost:80/tcp", ForwardSpec(None, 8080, "localhost", 80)),
        ("5353:127.0.0.1:53/udp", ForwardSpec(None, 5353, "127.0.0.1", 53, "udp")),
    ],
)
def test_valid_specs(spec: str, expected: ForwardSpec) -> None:
    assert parse_forward_spec(spec) == expected


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("8080", "expected"),
        ("x:host:80", "not a number"),
        ("8080:host:0", "out of range"),
        ("70000:host:80", "out of range"),
        ("8080::80", "missing target host"),
        ("[::1:8080:host:80", "unbalanced"),
        ("8080:host:80/sctp", "unknown protocol"),
    ],
)
def test_invalid_specs(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_forward_spec(spec)


def test_host_port() -> None:
    assert parse_host_port("7000") == ("127.0.0.1", 7000)
    assert parse_host_port(":7000") == ("127.0.0.1", 7000)
    assert parse_host_port("[::1]:7000") == ("::1", 7000)
    assert parse_host_port("example.org:1") == ("example.org", 1)
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_host_port("a:b:c")


def test_host_port_accepts_an_address_tuple() -> None:
    """A client's ``connect(("::1", 7000))`` and ``connect("[::1]:7000")`` mean the same and
    meet the same checks."""
    assert parse_host_port(("::1", 7000)) == parse_host_port("[::1]:7000") == ("::1", 7000)
    assert parse_host_port(("", 7000)) == ("127.0.0.1", 7000)
    for port in (70000, -1, True, "7000"):
        with pytest.raises(ValueError, match="out of range"):
            parse_host_port(("host", port))  # type: ignore[arg-type]


def test_host_port_refuses_port_zero_when_told() -> None:
    """Port 0 is "any free port" for an address to listen on, never one to connect to."""
    assert parse_host_port("host:0") == ("host", 0)
    with pytest.raises(ValueError, match="out of range 1-65535"):
        parse_host_port("host:0", allow_zero=False)
    with pytest.raises(ValueError, match="out of range 1-65535"):
        parse_host_port(("host", 0), allow_zero=False)
    assert parse_host_port("host:1", allow_zero=False) == ("host", 1)


def test_host_port_unbracketed_ipv6_says_brackets() -> None:
    with pytest.raises(ValueError, match=r"brackets: \[::1\]:7000"):
        parse_host_port("::1:7000")


def test_target_host_over_255_bytes_is_rejected_by_the_spec() -> None:
    from pytunnel import InvalidTargetError

    with pytest.raises(InvalidTargetError, match="300 bytes long; at most 255"):
        parse_forward_spec("1:" + "a" * 300 + ":80")
    # UTF-8 bytes count, not characters: 128 two-byte characters are 256 bytes
    with pytest.raises(ValueError, match="256 bytes long"):
        parse_forward_spec("1:" + "é" * 128 + ":80")
    assert parse_forward_spec("1:" + "a" * 255 + ":80").target_host == "a" * 255
