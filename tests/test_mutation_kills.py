"""Tests written to kill mutants that survived the mutation run (docs/mutation.md).

Each test is named after the behaviour it pins down; the mutants it kills are listed in
docs/mutation.md. They live here rather than in the module's own test file only to keep them
apart from files other work is reshaping at the same time.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from pytunnel import (
    ErrorCode,
    PermitOpen,
    PortRange,
    RemoteProtocolError,
    TLSError,
    VersionMismatchError,
)
from pytunnel._handshake import client_handshake, server_handshake
from pytunnel._policy import parse_port_ranges
from pytunnel.protocol import handshake as hs
from pytunnel.protocol.frames import FrameDecoder, encode_message
from pytunnel.protocol.messages import Challenge, Message, Welcome

# --- server policy: --allow-ports ranges ------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "ranges"),
    [
        ("1", (PortRange(1, 1),)),
        ("65535", (PortRange(65535, 65535),)),
        ("1-65535", (PortRange(1, 65535),)),
        ("8000-8002", (PortRange(8000, 8002),)),
        ("8000,9000-9100", (PortRange(8000, 8000), PortRange(9000, 9100))),
        (" 8000 , 9000 ,", (PortRange(8000, 8000), PortRange(9000, 9000))),
    ],
)
def test_port_ranges_parse_single_ports_ranges_and_comma_lists(
    text: str, ranges: tuple[PortRange, ...]
) -> None:
    assert parse_port_ranges(text) == ranges


@pytest.mark.parametrize("text", ["0", "65536", "0-10", "10-65536", "9-1"])
def test_port_ranges_outside_1_65535_or_reversed_are_refused(text: str) -> None:
    with pytest.raises(
        ValueError, match=r"^bad port range .*: ports must be 1-65535, low <= high$"
    ):
        parse_port_ranges(text)


@pytest.mark.parametrize("text", ["http", "80-", "-80", "1-2-3"])
def test_port_ranges_that_are_not_numbers_say_what_is_expected(text: str) -> None:
    with pytest.raises(ValueError, match=r"^bad port range .*: expected PORT or LOW-HIGH$"):
        parse_port_ranges(text)


@pytest.mark.parametrize("text", ["", ",", " , "])
def test_an_empty_port_range_list_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match=r"^empty port range$"):
        parse_port_ranges(text)


def test_port_range_bounds_are_inclusive() -> None:
    ports = PortRange(8000, 8002)
    assert 8000 in ports
    assert 8002 in ports
    assert 7999 not in ports
    assert 8003 not in ports
    assert "8000" not in ports


# --- server policy: --permit-open patterns -----------------------------------------------------


def test_permit_open_any_and_no_patterns_allow_everything() -> None:
    for policy in (PermitOpen.parse(None), PermitOpen.parse([]), PermitOpen.parse("any")):
        assert policy.patterns is None
        assert policy.allows("anything.example", 1)
    assert PermitOpen.parse(["db:5432", "any"]).patterns is None


def test_permit_open_none_allows_nothing() -> None:
    policy = PermitOpen.parse("none")
    assert policy.patterns == ()
    assert not policy.allows("localhost", 80)


def test_permit_open_accepts_one_string_with_several_patterns() -> None:
    policy = PermitOpen.parse("db:5432 cache:6379")
    assert policy.allows("db", 5432)
    assert policy.allows("cache", 6379)
    assert not policy.allows("db", 6379)


def test_permit_open_star_port_allows_every_port_of_that_host() -> None:
    policy = PermitOpen.parse("db:*")
    assert policy.allows("db", 1)
    assert policy.allows("db", 65535)
    assert not policy.allows("web", 80)


def test_permit_open_ipv6_pattern_in_brackets_matches_the_address() -> None:
    policy = PermitOpen.parse("[::1]:22")
    assert policy.allows("::1", 22)
    assert policy.allows("[::1]", 22)
    assert not policy.allows("::2", 22)
    assert not policy.allows("::1", 23)


@pytest.mark.parametrize("text", ["db", "db:", ":5432", ":"])
def test_permit_open_pattern_without_host_or_port_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match=r"^bad permit-open pattern .*: expected HOST:PORT$"):
        PermitOpen.parse(text)


def test_permit_open_name_patterns_with_digits_stay_name_patterns() -> None:
    # "db1" is all hex digits and "db1.example.com" has a dot: neither is an address pattern,
    # so both match the requested name before any DNS
    policy = PermitOpen.parse("db1:5432 db1.example.com:443")
    assert policy.allows("db1", 5432)
    assert policy.allows("DB1.example.com", 443)
    assert not policy.needs_address(5432)
    assert not policy.needs_address(443)


def test_permit_open_network_pattern_with_host_bits_set_covers_its_network() -> None:
    policy = PermitOpen.parse("10.0.0.5/24:22")
    assert policy.allows("10.0.0.200", 22)
    assert not policy.allows("10.0.1.5", 22)


def test_permit_open_ipv6_literal_pattern_matches_every_spelling_of_the_address() -> None:
    policy = PermitOpen.parse("[0:0:0:0:0:0:0:1]:22")
    assert policy.allows("::1", 22)
    assert policy.allows("0::1", 22)
    assert not policy.allows("::2", 22)


def test_permit_open_ipv6_wildcard_pattern_matches_addresses_not_names() -> None:
    policy = PermitOpen.parse("[fe80::*]:22")
    assert policy.needs_address(22)
    assert policy.allows("fe80::1", 22)
    assert not policy.allows("fe81::1", 22)


def test_permit_open_ipv6_zone_is_not_part_of_the_matched_address() -> None:
    policy = PermitOpen.parse("[fe80::?]:22")
    assert policy.allows("fe80::1%eth0", 22)
    assert policy.allows("[fe80::1%eth0]", 22)


def test_permit_open_a_name_wrapping_an_allowed_address_is_not_that_address() -> None:
    policy = PermitOpen.parse("127.0.0.1:22")
    assert not policy.allows("X127.0.0.1X", 22)
    assert policy.allows_address("X127.0.0.1X", 22) is False


def test_permit_open_requested_name_in_brackets_is_matched_without_them() -> None:
    assert PermitOpen.parse("db.internal:5432").allows("[db.internal]", 5432)


def test_permit_open_allows_address_refuses_a_name_and_any_allows_every_address() -> None:
    assert PermitOpen.parse("10.0.0.0/8:22").allows_address("db.internal", 22) is False
    assert PermitOpen.parse("*:22").allows_address("db.internal", 22) is False
    assert PermitOpen.parse(None).allows_address("10.1.2.3", 22) is True
    assert PermitOpen.parse(None).allows_address("db.internal", 22) is True


# --- the handshake, against a scripted peer -----------------------------------------------------

TOKEN = "mutation token"


async def _scripted_server(stream: trio.abc.Stream, replies: list[Message]) -> None:
    """Reads the client's Hello, then sends ``replies`` whatever the client says."""
    decoder = FrameDecoder(hs.PRE_AUTH_MAX_FRAME_SIZE)
    while decoder.next_message() is None:
        decoder.receive_data(await stream.receive_some())
    for reply in replies:
        await stream.send_all(encode_message(reply))


@pytest.mark.parametrize(
    "replies",
    [
        [Welcome(b"\0" * 32, 65536)],
        [Challenge(hs.PROTOCOL_VERSION, b"\1" * 32), Challenge(hs.PROTOCOL_VERSION, b"\1" * 32)],
    ],
    ids=["instead-of-challenge", "instead-of-welcome"],
)
async def test_client_handshake_refuses_an_out_of_order_server_message(
    replies: list[Message],
) -> None:
    a, b = trio.testing.memory_stream_pair()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_scripted_server, b, replies)
            with pytest.raises(RemoteProtocolError) as info:
                await client_handshake(a, TOKEN, max_frame_size=65536)
            assert info.value.code == ErrorCode.UNEXPECTED_MESSAGE
            nursery.cancel_scope.cancel()


async def test_client_handshake_refuses_a_version_it_did_not_offer() -> None:
    a, b = trio.testing.memory_stream_pair()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_scripted_server, b, [Challenge(99, b"\1" * 32)])
            with pytest.raises(VersionMismatchError, match="server chose version 99"):
                await client_handshake(a, TOKEN, max_frame_size=65536)
            nursery.cancel_scope.cancel()


async def test_client_handshake_to_a_tls_server_says_so() -> None:
    a, b = trio.testing.memory_stream_pair()

    async def tls_server() -> None:
        await b.receive_some()
        await b.send_all(b"\x16\x03\x03\x00\x2a" + b"\0" * 42)  # a TLS handshake record

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(tls_server)
            with pytest.raises(TLSError, match="connect with TLS"):
                await client_handshake(a, TOKEN, max_frame_size=65536)


async def test_server_handshake_to_a_tls_client_says_so() -> None:
    a, b = trio.testing.memory_stream_pair()
    await a.send_all(b"\x16\x03\x01\x00\x2a" + b"\0" * 42)  # a TLS ClientHello record
    with trio.fail_after(10), pytest.raises(TLSError, match="no TLS set up"):
        await server_handshake(b, TOKEN, max_frame_size=65536)


async def test_handshake_without_identity_carries_none_and_the_peers_frame_limits() -> None:
    a, b = trio.testing.memory_stream_pair()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            results = []

            async def serve() -> None:
                results.append(await server_handshake(b, TOKEN, max_frame_size=70000))

            nursery.start_soon(serve)
            mine = await client_handshake(a, TOKEN, max_frame_size=80000)
    theirs = results[0]
    assert mine.client_id == theirs.client_id == ""
    assert mine.version == theirs.version == hs.PROTOCOL_VERSION
    assert mine.peer_max_frame_size == 70000
    assert theirs.peer_max_frame_size == 80000
