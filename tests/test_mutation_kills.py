"""Tests written to kill mutants that survived the mutation run (docs/mutation.md).

Each test is named after the behaviour it pins down; the mutants it kills are listed in
docs/mutation.md. They live here rather than in the module's own test file only to keep them
apart from files other work is reshaping at the same time.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import hashlib
import ipaddress
import logging
import os
import socket
import ssl
import stat
import struct
import time
from pathlib import Path

import pytest
import trio
import trio.testing
from helpers import open_pair, session_pair, tcp_stream_pair

from pytunnel import (
    AuthenticationError,
    ConnectError,
    ErrorCode,
    HandshakeTimeoutError,
    LocalProtocolError,
    PermitOpen,
    PortRange,
    RelayStats,
    RemoteProtocolError,
    StreamResetError,
    TLSError,
    VersionMismatchError,
    errors,
)
from pytunnel._handshake import HandshakeResult, client_handshake, send_goaway, server_handshake
from pytunnel._policy import parse_port_ranges
from pytunnel._relay import relay
from pytunnel._tls import (
    certificate_fingerprint,
    client_tls_context,
    ensure_self_signed,
    parse_fingerprint,
    server_tls_context,
    tls_accept,
    tls_connect,
)
from pytunnel.protocol import handshake as hs
from pytunnel.protocol.frames import (
    _DATA_HEAD,
    _DATA_KEY,
    _DATA_TAIL,
    HEADER_SIZE,
    FrameDecoder,
    append_data_frame,
    decode_body,
    encode_message,
)
from pytunnel.protocol.messages import (
    SESSION,
    Auth,
    Challenge,
    Data,
    GoAway,
    Hello,
    Message,
    Ping,
    Welcome,
)
from pytunnel.protocol.socks import AddressType, SocksError, SocksServerConnection
from pytunnel.testing import Faults

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
    assert mine.version == theirs.version == max(hs.SUPPORTED_VERSIONS)
    assert mine.peer_max_frame_size == 70000
    assert theirs.peer_max_frame_size == 80000


# --- the handshake: what each side says when it refuses, and what it reads ------------------------


async def _read_frames(stream: trio.abc.Stream, count: int) -> list[Message]:
    decoder = FrameDecoder(hs.PRE_AUTH_MAX_FRAME_SIZE)
    messages: list[Message] = []
    while len(messages) < count:
        data = await stream.receive_some()
        if not data:
            break
        messages.extend(decoder.feed(data))
    return messages


async def test_server_handshake_names_the_message_it_wanted_and_the_one_it_got() -> None:
    a, b = trio.testing.memory_stream_pair()
    hello = Hello(hs.SUPPORTED_VERSIONS, b"\2" * 32)
    await a.send_all(encode_message(hello))
    await a.send_all(encode_message(hello))  # a second Hello where the Auth belongs
    with trio.fail_after(10), pytest.raises(RemoteProtocolError) as info:
        await server_handshake(b, TOKEN, max_frame_size=65536)
    assert info.value.code == ErrorCode.UNEXPECTED_MESSAGE
    assert info.value.message == "expected Auth, got Hello"
    challenge, goaway = await _read_frames(a, 2)
    assert isinstance(challenge, Challenge)
    assert isinstance(goaway, GoAway)
    assert (goaway.code, goaway.message) == (
        ErrorCode.UNEXPECTED_MESSAGE,
        "expected Auth, got Hello",
    )


async def test_server_handshake_names_a_wrong_first_message() -> None:
    a, b = trio.testing.memory_stream_pair()
    await a.send_all(encode_message(Welcome(b"\0" * 32, 65536)))
    with trio.fail_after(10), pytest.raises(RemoteProtocolError) as info:
        await server_handshake(b, TOKEN, max_frame_size=65536)
    assert info.value.message == "expected Hello, got Welcome"


@pytest.mark.parametrize(
    ("replies", "text"),
    [
        ([Welcome(b"\0" * 32, 65536)], "expected Challenge, got Welcome"),
        (
            [
                Challenge(hs.PROTOCOL_VERSION, b"\1" * 32),
                Challenge(hs.PROTOCOL_VERSION, b"\1" * 32),
            ],
            "expected Welcome, got Challenge",
        ),
    ],
    ids=["instead-of-challenge", "instead-of-welcome"],
)
async def test_client_handshake_names_the_message_it_wanted_and_the_one_it_got(
    replies: list[Message], text: str
) -> None:
    a, b = trio.testing.memory_stream_pair()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_scripted_server, b, replies)
            with pytest.raises(RemoteProtocolError) as info:
                await client_handshake(a, TOKEN, max_frame_size=65536)
            nursery.cancel_scope.cancel()
    assert info.value.message == text


async def test_server_handshake_speaks_only_the_versions_it_is_given() -> None:
    a, b = trio.testing.memory_stream_pair()
    await a.send_all(encode_message(Hello((hs.PROTOCOL_VERSION,), b"\2" * 32)))
    with trio.fail_after(10), pytest.raises(VersionMismatchError):
        await server_handshake(b, TOKEN, max_frame_size=65536, versions=(hs.PROTOCOL_VERSION + 1,))


async def test_handshake_errors_say_what_happened_in_full() -> None:
    # a client that closes before its Hello
    a, b = trio.testing.memory_stream_pair()
    await a.aclose()
    with trio.fail_after(10), pytest.raises(ConnectError) as info:
        await server_handshake(b, TOKEN, max_frame_size=65536)
    assert info.value.message == "connection closed during the handshake"
    # a server that closes without answering
    a, b = trio.testing.memory_stream_pair()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:

            async def close_after_hello() -> None:
                await b.receive_some()
                await b.aclose()

            nursery.start_soon(close_after_hello)
            with pytest.raises(ConnectError) as info:
                await client_handshake(a, TOKEN, max_frame_size=65536)
    assert info.value.message == (
        "the server closed the connection before answering "
        "(if it is a TLS server, connect with TLS: --tls)"
    )
    # TLS on the other end, both ways round
    a, b = trio.testing.memory_stream_pair()
    await a.send_all(b"\x16\x03\x01\x00\x2a" + b"\0" * 42)
    with trio.fail_after(10), pytest.raises(TLSError) as tls_info:
        await server_handshake(b, TOKEN, max_frame_size=65536)
    assert tls_info.value.message == "the client speaks TLS but this server has no TLS set up"
    a, b = trio.testing.memory_stream_pair()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:

            async def tls_server() -> None:
                await b.receive_some()
                await b.send_all(b"\x16\x03\x03\x00\x2a" + b"\0" * 42)

            nursery.start_soon(tls_server)
            with pytest.raises(TLSError) as tls_info:
                await client_handshake(a, TOKEN, max_frame_size=65536)
    assert tls_info.value.message == "the server speaks TLS: connect with TLS (--tls)"


async def test_server_handshake_with_a_peer_gone_before_the_challenge_is_a_connect_error() -> None:
    a, b = trio.testing.memory_stream_pair()
    await a.send_all(encode_message(Hello(hs.SUPPORTED_VERSIONS, b"\2" * 32)))
    await a.aclose()  # the Challenge finds nobody to send it to
    with trio.fail_after(10), pytest.raises(ConnectError) as info:
        await server_handshake(b, TOKEN, max_frame_size=65536, peer="10.0.0.9:1234")
    assert info.value.message == "connection from 10.0.0.9:1234 lost during the handshake"


async def test_client_handshake_with_a_server_gone_before_the_auth_is_a_connect_error() -> None:
    a, b = trio.testing.memory_stream_pair()

    async def challenge_and_leave() -> None:
        await b.receive_some()
        await b.send_all(encode_message(Challenge(hs.PROTOCOL_VERSION, b"\1" * 32)))
        await b.aclose()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(challenge_and_leave)
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(ConnectError, match="connection lost during the handshake: "):
                await client_handshake(a, TOKEN, max_frame_size=65536)


async def test_handshake_timeouts_say_which_message_was_awaited_and_the_limit(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "pytunnel.handshake")
    # silent from the start: the first-frame limit applies
    _a, b = trio.testing.memory_stream_pair()
    with pytest.raises(HandshakeTimeoutError) as info:
        await server_handshake(b, TOKEN, max_frame_size=65536, timeout=10, first_frame_timeout=2)
    assert info.value.message == "handshake with ? timed out waiting for its Hello"
    # silent after the Hello: the whole handshake's limit applies
    a, b = trio.testing.memory_stream_pair()
    await a.send_all(encode_message(Hello(hs.SUPPORTED_VERSIONS, b"\2" * 32)))
    with pytest.raises(HandshakeTimeoutError) as info:
        await server_handshake(
            b, TOKEN, max_frame_size=65536, timeout=10, first_frame_timeout=2, peer="p:1"
        )
    assert info.value.message == "handshake with p:1 timed out waiting for its Auth"
    assert [r.getMessage() for r in caplog.records] == [
        "handshake with ? timed out waiting for its Hello (2.0 s)",
        "handshake with p:1 timed out waiting for its Auth (10.0 s)",
    ]
    # the client's own deadline
    a, _b = trio.testing.memory_stream_pair()
    with pytest.raises(HandshakeTimeoutError) as client_info:
        await client_handshake(a, TOKEN, max_frame_size=65536, timeout=3)
    assert client_info.value.message == "no handshake answer within 3 s"


async def test_wrong_token_is_logged_with_the_peer_and_the_client_is_told(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "pytunnel.handshake")
    a, b = trio.testing.memory_stream_pair()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            server_errors: list[AuthenticationError] = []

            async def serve() -> None:
                try:
                    await server_handshake(b, TOKEN, max_frame_size=65536, peer="p:2")
                except AuthenticationError as exc:
                    server_errors.append(exc)

            nursery.start_soon(serve)
            with pytest.raises(AuthenticationError) as info:
                await client_handshake(a, "another token", max_frame_size=65536)
    assert info.value.message == "authentication failed"
    assert server_errors[0].message == "client p:2 sent a wrong token proof"
    assert [r.getMessage() for r in caplog.records] == ["authentication failed for p:2"]


async def test_a_refused_handshake_is_logged_with_the_peer_and_the_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "pytunnel.handshake")
    a, b = trio.testing.memory_stream_pair()
    await a.send_all(encode_message(Welcome(b"\0" * 32, 65536)))
    with trio.fail_after(10), pytest.raises(RemoteProtocolError):
        await server_handshake(b, TOKEN, max_frame_size=65536, peer="p:3")
    assert [r.getMessage() for r in caplog.records] == [
        "handshake with p:3 failed: [UNEXPECTED_MESSAGE] expected Hello, got Welcome"
    ]


async def test_client_handshake_refuses_a_server_that_cannot_prove_the_token() -> None:
    a, b = trio.testing.memory_stream_pair()

    async def impostor() -> None:
        await b.receive_some()
        # the nonce starts a read of its own with the bytes that begin a TLS record: only the
        # first bytes of the answer are checked for TLS, never the middle of a frame
        frame = encode_message(Challenge(hs.PROTOCOL_VERSION, b"\x16\x03" + b"\1" * 30))
        cut = frame.index(b"\x16\x03")
        await b.send_all(frame[:cut])
        await trio.testing.wait_all_tasks_blocked()
        await b.send_all(frame[cut:])
        await b.receive_some()
        await b.send_all(encode_message(Welcome(b"\0" * 32, 65536)))

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(impostor)
            with pytest.raises(AuthenticationError) as info:
                await client_handshake(a, TOKEN, max_frame_size=65536)
    assert info.value.message == "the server could not prove it knows the token"


async def test_tls_looking_bytes_after_the_hello_are_an_oversized_frame_not_tls() -> None:
    a, b = trio.testing.memory_stream_pair()

    async def hello_then_tls() -> None:
        await a.send_all(encode_message(Hello(hs.SUPPORTED_VERSIONS, b"\2" * 32)))
        await _read_frames(a, 1)  # the Challenge: the next read starts afresh
        await a.send_all(b"\x16\x03\x01\x00\x2a" + b"\0" * 42)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hello_then_tls)
            with pytest.raises(RemoteProtocolError) as info:
                await server_handshake(b, TOKEN, max_frame_size=65536)
    assert info.value.code == ErrorCode.FRAME_TOO_LARGE


async def test_server_handshake_reads_no_further_ahead_than_a_pre_auth_frame() -> None:
    """Bytes pipelined after the Auth stay in the returned decoder, and no read takes more than
    the pre-authentication frame limit, so an unauthenticated peer cannot make us buffer more."""
    a, b = trio.testing.memory_stream_pair()
    ping = encode_message(Ping(7))
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            results: list[HandshakeResult] = []

            async def serve() -> None:
                results.append(await server_handshake(b, TOKEN, max_frame_size=65536))

            nursery.start_soon(serve)
            client_nonce = b"\2" * 32
            await a.send_all(encode_message(Hello(hs.SUPPORTED_VERSIONS, client_nonce)))
            (challenge,) = await _read_frames(a, 1)
            assert isinstance(challenge, Challenge)
            proof = hs.client_proof(
                TOKEN.encode(), challenge.version, client_nonce, challenge.nonce, ""
            )
            await a.send_all(encode_message(Auth(proof, 65536, "")) + ping * 1000)
    decoder = results[0].decoder
    assert 0 < decoder.buffered <= hs.PRE_AUTH_MAX_FRAME_SIZE
    decoder.layer = SESSION  # as the session that takes the decoder over does
    assert decoder.next_message() == Ping(7)


async def test_send_goaway_never_raises_on_a_closed_stream() -> None:
    a, _b = trio.testing.memory_stream_pair()
    await a.aclose()
    with trio.fail_after(10):
        await send_goaway(a, ErrorCode.PROTOCOL_ERROR, "x")


async def test_send_goaway_is_sent_even_when_the_caller_is_cancelled() -> None:
    a, b = trio.testing.memory_stream_pair()
    with trio.CancelScope() as scope:
        scope.cancel()
        await send_goaway(b, ErrorCode.PROTOCOL_ERROR, "bye")
    with trio.fail_after(10):
        (goaway,) = await _read_frames(a, 1)
    assert goaway == GoAway(ErrorCode.PROTOCOL_ERROR, "bye")


async def test_send_goaway_to_a_peer_that_does_not_read_gives_up_after_a_second(
    autojump_clock: trio.abc.Clock,
) -> None:
    _a, b = trio.testing.lockstep_stream_pair()
    start = trio.current_time()
    await send_goaway(b, ErrorCode.PROTOCOL_ERROR, "bye")
    assert trio.current_time() - start == pytest.approx(1)


# --- the relay ------------------------------------------------------------------------------------


def test_relay_stats_count_errors_per_category() -> None:
    stats = RelayStats()
    stats.count_error("REFUSED")
    stats.count_error("REFUSED")
    stats.count_error("LINK_DOWN")
    assert stats.errors == {"REFUSED": 2, "LINK_DOWN": 1}


def test_relay_stats_count_failures_under_their_category() -> None:
    """A policy refusal is ``FORBIDDEN``, apart from limits (``REFUSED``); a target that
    cannot even be asked for is a bad argument, not the policy's answer."""
    stats = RelayStats()
    stats.count_failure(errors.TargetForbiddenError("x:1 is not permitted", target="x:1"))
    stats.count_failure(errors.InvalidTargetError("a host of over 255 bytes"))
    stats.count_failure(errors.StreamLimitError("at the limit"))
    stats.count_failure(errors.NodeTimeoutError("slow"))
    stats.count_failure(errors.SessionClosedError("gone"))
    assert stats.errors == {"FORBIDDEN": 1, "REFUSED": 2, "NODE_TIMEOUT": 1, "LINK_DOWN": 1}


async def test_relay_stats_count_relays_open_at_once() -> None:
    stats = RelayStats()
    ends = [trio.testing.memory_stream_pair() for _ in range(4)]
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for (_left, a), (_right, b) in (ends[0:2], ends[2:4]):
                nursery.start_soon(functools.partial(relay, a, b, stats=stats))
            await trio.testing.wait_all_tasks_blocked()
            assert (stats.active_connections, stats.total_connections) == (2, 2)
            for outside, _relay_side in ends:
                await outside.send_eof()
    assert (stats.active_connections, stats.total_connections) == (0, 2)


async def test_relay_close_after_counts_every_byte_that_went_that_way(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``close_after`` is a budget for the whole direction: bytes sent before the fault was
    set and bytes of every earlier chunk count, so the cut comes after exactly that many."""
    left, relay_a = trio.testing.memory_stream_pair()
    right, relay_b = trio.testing.memory_stream_pair()
    faults = Faults()
    got = bytearray()
    caplog.set_level(logging.DEBUG, "pytunnel.relay")

    async def send_and_see_it_arrive(chunk: bytes) -> None:
        # one chunk at a time, so that each is one read of the relay's
        expected = len(got) + len(chunk)
        await left.send_all(chunk)
        while len(got) < expected:
            got.extend(await right.receive_some())

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(functools.partial(relay, relay_a, relay_b, faults=faults))
            await send_and_see_it_arrive(b"a" * 400)  # no fault yet
            await send_and_see_it_arrive(b"b" * 400)
            faults.set("out", close_after=1400)
            await send_and_see_it_arrive(b"c" * 400)  # 1,200 so far
            await left.send_all(b"d" * 400)  # only 200 of these fit the budget
            while chunk := await right.receive_some():
                got.extend(chunk)
    assert bytes(got) == b"a" * 400 + b"b" * 400 + b"c" * 400 + b"d" * 200
    assert [r.getMessage() for r in caplog.records] == ["relay: closed after 1400 bytes"]
    assert faults.reset_connections() == 0  # the finished relay is no longer the forward's


async def _read_to_the_end(stream: trio.abc.ReceiveStream) -> None:
    while await stream.receive_some():
        pass


def _rst_close(stream: trio.SocketStream) -> None:
    stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


async def test_relay_resets_the_requester_when_the_reply_is_cut() -> None:
    """The request reached its EOF but the reply did not: the requester must see a reset, not
    an EOF that would make the cut reply look complete."""
    requester, relay_a = await tcp_stream_pair()
    target, relay_b = await tcp_stream_pair()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(relay, relay_a, relay_b)
            await requester.send_all(b"request")
            await requester.send_eof()
            got = b""
            while chunk := await target.receive_some():
                got += chunk
            assert got == b"request"
            await target.send_all(b"half a rep")
            _rst_close(target)
            await target.aclose()
            with pytest.raises(trio.BrokenResourceError):
                await _read_to_the_end(requester)
    await requester.aclose()


async def test_relay_tells_the_mux_peer_the_other_side_broke(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, "pytunnel.relay")
    async with session_pair("tcp") as (client, server):
        mine, theirs = await open_pair(client, server)
        outside, relay_side = await tcp_stream_pair()
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(functools.partial(relay, relay_side, mine, idle_timeout=60))
                await outside.send_all(b"x")
                assert await theirs.receive_some() == b"x"
                _rst_close(outside)
                await outside.aclose()
                with pytest.raises(trio.BrokenResourceError) as info:
                    await theirs.receive_some()
        cause = info.value.__cause__
        assert isinstance(cause, StreamResetError)
        assert (cause.code, cause.message) == (
            ErrorCode.CANCELLED,
            "the other side of the relay broke",
        )
        (record,) = caplog.records
        assert record.getMessage().startswith("relay ended by a broken side: BrokenResourceError(")
        await theirs.aclose()


async def test_relay_idle_for_exactly_its_timeout_is_an_idle_reset(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "pytunnel.relay")
    async with session_pair("memory") as (client, server):
        mine, theirs = await open_pair(client, server)
        _outside, relay_side = trio.testing.memory_stream_pair()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(functools.partial(relay, relay_side, mine, idle_timeout=7))
            with pytest.raises(trio.BrokenResourceError) as info:
                await theirs.receive_some()
        cause = info.value.__cause__
        assert isinstance(cause, StreamResetError)
        assert (cause.code, cause.message) == (ErrorCode.IDLE_TIMEOUT, "idle for 7 s")
        assert [r.getMessage() for r in caplog.records] == ["relay reset after 7 s idle"]
        await theirs.aclose()


async def test_relay_whose_socket_is_closed_under_it_does_not_raise() -> None:
    outside, relay_a = await tcp_stream_pair()
    other, relay_b = await tcp_stream_pair()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(relay, relay_a, relay_b)
            await trio.testing.wait_all_tasks_blocked()
            await relay_a.aclose()  # the relay's own socket, closed by someone else
            with pytest.raises(trio.BrokenResourceError):
                await _read_to_the_end(other)
    await outside.aclose()
    await other.aclose()


# --- TLS: fingerprints, contexts, the self-signed certificate, handshake deadlines -------------


def test_fingerprint_with_a_character_outside_base64_is_refused() -> None:
    good = certificate_fingerprint(b"any certificate")
    assert parse_fingerprint(good) == hashlib.sha256(b"any certificate").digest()
    with pytest.raises(ValueError, match="not base64"):
        parse_fingerprint(good + "!!!!")  # still a multiple of four once the "!" are dropped
    with pytest.raises(
        ValueError, match=r"^bad fingerprint 'not hex': expected SHA256:<base64> or hex$"
    ):
        parse_fingerprint("not hex")


async def test_tls_files_that_cannot_be_loaded_are_named_with_the_reason(tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(TLSError) as info:
        await client_tls_context(ca_file=missing)
    assert info.value.message == f"cannot load the CA {missing}: No such file or directory"
    with pytest.raises(TLSError) as info:
        await client_tls_context(cert_file=missing)
    assert info.value.message == (
        f"cannot load the client certificate {missing}: No such file or directory"
    )
    with pytest.raises(TLSError) as info:
        await client_tls_context(ca_file=garbage)
    # OpenSSL's short reason where it gives one, not the whole "[X509: ...] ..." text
    assert info.value.message == f"cannot load the CA {garbage}: NO_CERTIFICATE_OR_CRL_FOUND"
    with pytest.raises(TLSError) as info:
        await client_tls_context(ca_file="nul\0byte.pem")
    assert info.value.message.startswith("cannot load the CA nul\0byte.pem: embedded null ")


async def test_client_tls_context_trusts_the_system_store_unless_pinned() -> None:
    system = ssl.create_default_context().cert_store_stats()["x509_ca"]
    verified = await client_tls_context()
    assert verified.cert_store_stats()["x509_ca"] == system
    assert verified.check_hostname
    pinned = await client_tls_context(pinned=True)
    assert pinned.cert_store_stats()["x509_ca"] == 0
    assert not pinned.check_hostname


async def test_tls_client_certificate_and_key_in_one_file_need_no_key_file(tmp_path: Path) -> None:
    cert, key, _ = await ensure_self_signed(tmp_path / "tls")
    both = tmp_path / "both.pem"
    both.write_bytes(cert.read_bytes() + key.read_bytes())
    await client_tls_context(cert_file=both, pinned=True)


async def test_self_signed_certificate_is_a_leaf_for_its_names_valid_now(tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    directory = tmp_path / "not" / "yet" / "there"
    cert_path, key_path, _ = await ensure_self_signed(directory)
    assert (cert_path.name, key_path.name) == ("server.crt", "server.key")
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    common_name = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert common_name == "localhost"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert not san.critical
    assert san.value.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.value.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical
    assert constraints.value.ca is False
    now = datetime.datetime.now(datetime.timezone.utc)
    assert cert.not_valid_before_utc <= now
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == datetime.timedelta(
        days=3650, minutes=5
    )


async def test_self_signed_certificate_in_an_impossible_place_says_why(tmp_path: Path) -> None:
    blocker = tmp_path / "a file"
    blocker.write_text("")
    with pytest.raises(TLSError) as info:
        await ensure_self_signed(blocker / "tls")
    assert info.value.message == (
        f"cannot set up the self-signed certificate in {blocker / 'tls'}: Not a directory"
    )
    with pytest.raises(TLSError) as info:
        await ensure_self_signed("nul\0dir")
    assert info.value.message.startswith(
        "cannot set up the self-signed certificate in nul\0dir: embedded null "
    )


async def test_self_signed_certificate_is_valid_now_in_any_local_time_zone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from cryptography import x509

    caplog.set_level(logging.INFO, "pytunnel.tls")
    monkeypatch.setenv("TZ", "XXX-9")  # nine hours east of UTC
    time.tzset()
    try:
        cert_path, _, _ = await ensure_self_signed(tmp_path / "tls")
    finally:
        monkeypatch.undo()
        time.tzset()
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    assert cert.not_valid_before_utc <= datetime.datetime.now(datetime.timezone.utc)
    assert [r.getMessage() for r in caplog.records] == [
        f"created a self-signed certificate in {tmp_path / 'tls'}"
    ]


async def test_tls_handshakes_that_never_finish_time_out_with_a_tls_error(
    autojump_clock: trio.abc.Clock,
) -> None:
    a, _b = trio.testing.memory_stream_pair()
    context = await client_tls_context(pinned=True)
    with pytest.raises(TLSError) as info:
        await tls_connect(a, context, server_hostname=None, timeout=4)
    assert info.value.message == "TLS handshake did not finish within 4 s"
    _a, b = trio.testing.memory_stream_pair()
    with pytest.raises(TLSError) as info:
        await tls_accept(
            b, ssl.create_default_context(ssl.Purpose.CLIENT_AUTH), timeout=4, peer="p:4"
        )
    assert info.value.message == "TLS handshake with p:4 timed out"


async def test_tls_peer_answering_with_an_impossible_record_is_not_speaking_tls() -> None:
    a, b = trio.testing.memory_stream_pair()

    async def not_tls() -> None:
        await b.receive_some()
        await b.send_all(b"\x16\x03\x03\xff\xff" + b"\0" * 100)  # a record longer than TLS allows

    context = await client_tls_context(pinned=True)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(not_tls)
            with pytest.raises(TLSError) as info:
                await tls_connect(a, context, server_hostname=None, timeout=10)
    assert info.value.message == "the peer is not speaking TLS (PACKET_LENGTH_TOO_LONG)"


async def test_tls_pin_mismatch_names_both_fingerprints(tmp_path: Path) -> None:
    cert, key, fingerprint = await ensure_self_signed(tmp_path / "tls")
    server_context = await server_tls_context(cert, key)
    client_context = await client_tls_context(pinned=True)
    wrong = "SHA256:" + "A" * 43
    a, b = trio.testing.memory_stream_pair()

    async def serve() -> None:
        with contextlib.suppress(TLSError):
            await tls_accept(b, server_context, timeout=10, peer="p:5")

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            with pytest.raises(TLSError) as info:
                await tls_connect(
                    a, client_context, server_hostname=None, fingerprint=wrong, timeout=10
                )
    assert info.value.message == (
        f"server certificate fingerprint mismatch: expected {wrong}, got {fingerprint}"
    )


# --- frames: the Data fast paths and what the decoder says about bad bodies ----------------------


@pytest.mark.parametrize("n", [1, 127, 128, 255, 256, 65535, 65536])
def test_data_frame_fast_paths_agree_with_msgpack_at_every_integer_width(n: int) -> None:
    """Stream ids and payload sizes at the edges of msgpack's integer and bin widths: the
    hand-written encoder and parser must agree with the generic codec byte for byte."""
    message = Data(n, b"\x5a" * n)
    out = bytearray()
    append_data_frame(out, n, message.data)
    assert bytes(out) == encode_message(message)
    assert FrameDecoder().feed(bytes(out)) == [message]
    assert decode_body(bytes(out[HEADER_SIZE:])) == message


def test_data_frame_of_exactly_the_limit_is_allowed_and_one_byte_more_is_not() -> None:
    exact = len(encode_message(Data(1, b"x" * 100))) - HEADER_SIZE
    append_data_frame(bytearray(), 1, b"x" * 100, max_frame_size=exact)
    with pytest.raises(LocalProtocolError) as info:
        append_data_frame(bytearray(), 1, b"x" * 101, max_frame_size=exact)
    assert info.value.code == ErrorCode.FRAME_TOO_LARGE
    assert info.value.message == f"Data frame of {exact + 1} bytes exceeds the limit of {exact}"
    with pytest.raises(LocalProtocolError) as info:
        encode_message(Ping(1), max_frame_size=3)
    assert info.value.message == "Ping frame of 16 bytes exceeds the limit of 3"


@pytest.mark.parametrize(
    "body",
    [
        # a stream id of 0x80 in one byte is an empty map in msgpack, not the number 128
        _DATA_HEAD + b"\x80" + _DATA_KEY + b"\xc4\x01x" + _DATA_TAIL,
        # a map header announcing four entries where three follow
        b"\x84" + _DATA_HEAD[1:] + b"\x01" + _DATA_KEY + b"\xc4\x01x" + _DATA_TAIL,
        # cut right after the "stream" key, or right after the "data" key
        _DATA_HEAD,
        _DATA_HEAD + b"\x01" + _DATA_KEY,
        # another key of the same length where "data" belongs
        _DATA_HEAD + b"\x01\xa4dato\xc4\x01x" + _DATA_TAIL,
    ],
    ids=["0x80-is-a-map", "wrong-map-length", "cut-after-stream", "cut-after-data", "other-key"],
)
def test_a_body_that_only_looks_like_data_is_left_to_the_generic_decoder(body: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_body(body)
    with pytest.raises(RemoteProtocolError):  # the decoder's fast path for Data frames
        FrameDecoder().feed(len(body).to_bytes(HEADER_SIZE, "big") + body)


@pytest.mark.parametrize(
    ("body", "code", "text"),
    [
        (b"\xc1", ErrorCode.MALFORMED_FRAME, "frame body is not valid msgpack: "),
        (b"\x91\x01", ErrorCode.MALFORMED_FRAME, "frame body must be a msgpack map, got list"),
        (
            b"\x82\xa1t\xa4ping\xa1t\xa4ping",
            ErrorCode.MALFORMED_FRAME,
            "frame body has duplicate map keys",
        ),
        (b"\x81\xa1t\xa4nope", ErrorCode.UNKNOWN_MESSAGE, "unknown message type 'nope'"),
        (
            b"\x83\xa1t\xa4data\xa6stream\xa1x\xa4data\xa1y",
            ErrorCode.INVALID_FIELD,
            "invalid 'data' message: TypeError: expected int, got str; "
            "TypeError: expected bytes, got str",
        ),
    ],
    ids=["not-msgpack", "not-a-map", "duplicate-keys", "unknown-type", "two-bad-fields"],
)
def test_decode_body_says_exactly_what_is_wrong(body: bytes, code: int, text: str) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        decode_body(body)
    assert (info.value.code, info.value.message) == (code, text)


def test_unknown_message_type_is_quoted_in_at_most_200_characters() -> None:
    tag = "z" * 178  # one character too many for the 200 of the whole message
    body = b"\x81\xa1t\xd9" + len(tag).to_bytes(1, "big") + tag.encode()
    with pytest.raises(RemoteProtocolError) as info:
        decode_body(body)
    assert info.value.message == f"unknown message type '{tag}'"[:200]


def test_a_map_of_256_or_more_distinct_keys_is_not_taken_for_duplicates() -> None:
    keys = b"".join(b"\xa4" + f"k{i:03d}".encode() + b"\x00" for i in range(300))
    body = b"\xde" + (302).to_bytes(2, "big") + b"\xa1t\xa4ping\xa6opaque\x01" + keys
    with pytest.raises(RemoteProtocolError) as info:
        decode_body(body)
    assert info.value.code == ErrorCode.INVALID_FIELD  # extra fields, not duplicate keys


# --- SOCKS: what the parser tells the log and the client, and its edges ---------------------------

_PASSWORD = ("u", "p")
_S5_NONE = b"\x05\x01\x00"
_S5_GENERAL = "05010001000000000000"
_S4_REJECTED = "005b000000000000"


@pytest.mark.parametrize(
    ("auth", "allow_socks4", "chunks", "reason", "reply"),
    [
        (None, True, [b"\x05\x00"], "SOCKS5 greeting offers no methods", "05ff"),
        (
            _PASSWORD,
            True,
            [b"\x05\x02\x00\x01"],
            "SOCKS5 client does not offer username/password authentication, which this proxy "
            "requires (offered 00 01)",
            "05ff",
        ),
        (
            None,
            True,
            [b"\x05\x02\x01\x02"],
            "SOCKS5 client does not offer 'no authentication', the only method this proxy has "
            "(offered 01 02)",
            "05ff",
        ),
        # the method list is exactly NMETHODS bytes: the 00 after it is not offered
        (
            None,
            True,
            [b"\x05\x01\x02\x00"],
            "SOCKS5 client does not offer 'no authentication', the only method this proxy has "
            "(offered 02)",
            "05ff",
        ),
        (
            _PASSWORD,
            True,
            [b"\x05\x01\x02", b"\x02\x01u\x01p"],
            "username/password sub-negotiation has version 0x02, expected 0x01",
            "05020101",
        ),
        (
            _PASSWORD,
            True,
            [b"\x05\x01\x02", b"\x01\x46" + b"a" * 70 + b"\x01p"],
            f"SOCKS5 authentication failed for user {'a' * 64!r}",
            "05020101",
        ),
        (
            None,
            True,
            [_S5_NONE, b"\x04\x01\x00\x01"],
            "SOCKS5 request has version 0x04, expected 0x05",
            "0500" + _S5_GENERAL,
        ),
        (
            None,
            True,
            [_S5_NONE, b"\x05\x01\x00\x03\x00"],
            "SOCKS5 request has an empty domain name",
            "0500" + _S5_GENERAL,
        ),
        (
            None,
            True,
            [_S5_NONE, b"\x05\x01\x00\x07"],
            "SOCKS5 request has unknown address type 0x07",
            "050005080001000000000000",
        ),
        (
            None,
            True,
            [_S5_NONE, b"\x05\x01\x00\x03\x46" + b"a" * 69 + b" \x00\x50"],
            f"SOCKS5 request has an invalid domain name {b'a' * 64!r}",
            "0500" + _S5_GENERAL,
        ),
        (
            None,
            True,
            [_S5_NONE, b"\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x00"],
            "SOCKS5 CONNECT to port 0",
            "0500" + _S5_GENERAL,
        ),
        (
            None,
            True,
            [b"\x04\x02\x00\x50\x7f\x00\x00\x01\x00"],
            "SOCKS4 BIND is not supported, only CONNECT",
            _S4_REJECTED,
        ),
        (
            _PASSWORD,
            True,
            [b"\x04\x01\x00\x50\x7f\x00\x00\x01\x00"],
            "SOCKS4 client refused: this proxy requires username/password authentication, "
            "which only SOCKS5 can carry",
            _S4_REJECTED,
        ),
        (
            None,
            False,
            [b"\x04\x01\x00\x50\x7f\x00\x00\x01\x00"],
            "SOCKS4 client refused: this proxy serves SOCKS5 only",
            _S4_REJECTED,
        ),
        (
            None,
            True,
            [b"\x04\x01\x00\x00\x7f\x00\x00\x01\x00"],
            "SOCKS4 CONNECT to port 0",
            _S4_REJECTED,
        ),
        (
            None,
            True,
            [b"\x04\x01\x00\x50\x00\x00\x00\x01\x00" + b"a" * 69 + b" \x00"],
            f"SOCKS4a request has an invalid domain name {b'a' * 64!r}",
            _S4_REJECTED,
        ),
        (
            None,
            True,
            [b"\x04\x01\x00\x50\x7f\x00\x00\x01" + b"u" * 256],
            "SOCKS4 USERID longer than 255 bytes",
            _S4_REJECTED,
        ),
        (
            None,
            True,
            [b"\x04\x01\x00\x50\x00\x00\x00\x01\x00" + b"n" * 256],
            "SOCKS4 domain name longer than 255 bytes",
            _S4_REJECTED,
        ),
        (
            _PASSWORD,
            True,
            [b"\x05\x01\x02", b"\x01\x01", b""],
            "client closed the connection during SOCKS negotiation "
            "(with 2 bytes of an unfinished message)",
            "05020101",
        ),
        (
            None,
            True,
            [_S5_NONE, b"\x05\x01", b""],
            "client closed the connection during SOCKS negotiation "
            "(with 2 bytes of an unfinished message)",
            "0500" + _S5_GENERAL,
        ),
        (
            None,
            True,
            [_S5_NONE, b""],
            "client closed the connection during SOCKS negotiation (early)",
            "0500" + _S5_GENERAL,
        ),
        (
            None,
            True,
            [b"\x05\x03\x00", b""],
            "client closed the connection during SOCKS negotiation "
            "(with 3 bytes of an unfinished message)",
            "05ff",
        ),
        (
            None,
            True,
            [b"\x04\x01\x00", b""],
            "client closed the connection during SOCKS negotiation "
            "(with 3 bytes of an unfinished message)",
            _S4_REJECTED,
        ),
        (None, True, [b""], "client closed the connection before sending anything", ""),
        (
            None,
            True,
            [b"GET /index.html HTTP/1.1\r\n"],
            "not a SOCKS client (looks like HTTP: b'GET /index.html '); this port speaks SOCKS 4/5",
            "",
        ),
        (
            None,
            True,
            [b"M-SEARCH * HTTP/1.1\r\n"],
            "not a SOCKS client (looks like HTTP: b'M-SEARCH * HTTP/'); this port speaks SOCKS 4/5",
            "",
        ),
        (
            None,
            True,
            [b"get / HTTP/1.1\r\n"],
            "not a SOCKS client: first byte 0x67, expected 0x04 or 0x05",
            "",
        ),
    ],
)
def test_socks_refusals_say_exactly_why_and_answer_the_client(
    auth: tuple[str, str] | None,
    allow_socks4: bool,
    chunks: list[bytes],
    reason: str,
    reply: str,
) -> None:
    conn = SocksServerConnection(auth, allow_socks4=allow_socks4)
    for chunk in chunks[:-1]:
        assert conn.receive_data(chunk) == []
    with pytest.raises(SocksError) as caught:
        conn.receive_data(chunks[-1])
    assert (caught.value.reason, caught.value.reply.hex()) == (reason, reply)


def test_socks_calls_out_of_turn_are_named() -> None:
    conn = SocksServerConnection()
    assert (conn.request, conn.leftover) == (None, b"")
    for call, name in ((conn.accept, "accept"), (conn.reject, "reject")):
        with pytest.raises(LocalProtocolError) as caught:
            call()
        assert caught.value.message == f"{name}() needs a pending ConnectRequest (state greeting)"
    conn.receive_data(_S5_NONE + b"\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x50")
    with pytest.raises(LocalProtocolError) as caught:
        conn.receive_data(b"x")
    assert caught.value.message == "the SOCKS request is complete: relay further bytes directly"
    conn.reject()
    with pytest.raises(LocalProtocolError) as caught:
        conn.receive_data(b"x")
    assert caught.value.message == "the SOCKS connection already failed or was rejected"


def _requested(conn: SocksServerConnection, request: bytes) -> SocksServerConnection:
    conn.receive_data(_S5_NONE + request)
    return conn


def test_socks_accept_takes_every_port_and_names_of_1_to_255_bytes() -> None:
    request = b"\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x50"
    reply = _requested(SocksServerConnection(), request).accept("0.0.0.0", 0xFFFF)
    assert reply.hex() == "0500" + "05000001" + "00000000" + "ffff"
    for name in ("a", "n" * 255):
        reply = _requested(SocksServerConnection(), request).accept(name, 1)
        assert reply == b"\x05\x00\x05\x00\x00\x03" + bytes([len(name)]) + name.encode() + b"\0\1"


def test_socks_domain_refuses_only_spaces_and_control_characters() -> None:
    def host(name: bytes) -> str:
        conn = SocksServerConnection()
        request = b"\x05\x01\x00\x03" + bytes([len(name)]) + name + b"\x00\x50"
        (event,) = conn.receive_data(_S5_NONE + request)
        assert event.atyp is AddressType.DOMAIN
        return event.host

    assert host(b"a!b.example") == "a!b.example"
    assert host("é.example".encode()) == "é.example"
    with pytest.raises(SocksError, match="invalid domain name"):
        host(b"a\x7fb")


def test_socks4_userid_that_is_not_utf8_is_decoded_with_replacement() -> None:
    conn = SocksServerConnection()
    (event,) = conn.receive_data(b"\x04\x01\x00\x50\x7f\x00\x00\x01\xffu\x00")
    assert event.username == "\ufffdu"


def test_socks_error_built_by_hand_owes_the_client_nothing() -> None:
    error = SocksError("why")
    assert (error.reply, error.version) == (b"", None)
