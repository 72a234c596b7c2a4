"""Dial failures sorted by structure (``_dial.failure_of``), carried in ``Refuse`` codes
(``errors.refusal_code`` / ``refusal_error``) and mapped to SOCKS replies from that structure."""

from __future__ import annotations

import errno
import logging
import socket
import sys

import pytest
import trio
from helpers import closed_port, count_fds, session_pair

from pytunnel._dial import dial, failure_of
from pytunnel.errors import (
    DialError,
    DialFailure,
    ErrorCode,
    NodeTimeoutError,
    NodeUnstableError,
    StreamRefusedError,
    TargetForbiddenError,
    refusal_code,
    refusal_error,
)
from pytunnel.protocol.socks import ReplyCode, reply_code_for


@pytest.mark.parametrize(
    ("exc", "failure"),
    [
        (ConnectionRefusedError(errno.ECONNREFUSED, "x"), DialFailure.REFUSED),
        (OSError(errno.ECONNRESET, "x"), DialFailure.RESET),
        (OSError(errno.ENETUNREACH, "x"), DialFailure.NETWORK_UNREACHABLE),
        (OSError(errno.ENETDOWN, "x"), DialFailure.NETWORK_UNREACHABLE),
        (OSError(errno.EHOSTUNREACH, "x"), DialFailure.HOST_UNREACHABLE),
        (OSError(errno.EHOSTDOWN, "x"), DialFailure.HOST_UNREACHABLE),
        (OSError(errno.ETIMEDOUT, "x"), DialFailure.TIMEOUT),
        (socket.gaierror(socket.EAI_NONAME, "Name or service not known"), DialFailure.DNS),
        (UnicodeError("label empty or too long"), DialFailure.INVALID_HOST),
        (OSError(errno.EADDRNOTAVAIL, "connection refused, says the text"), DialFailure.UNKNOWN),
        (OSError("Connection refused"), DialFailure.UNKNOWN),  # text alone decides nothing
    ],
    ids=lambda x: type(x).__name__ if isinstance(x, BaseException) else x.name,
)
def test_dial_failure_is_sorted_by_errno_and_type_not_text(
    exc: BaseException, failure: DialFailure
) -> None:
    assert failure_of(exc) == failure


def test_dial_failure_of_several_addresses_prefers_the_targets_own_answer() -> None:
    if sys.version_info >= (3, 11):
        from builtins import ExceptionGroup
    else:
        from exceptiongroup import ExceptionGroup

    group = OSError("all attempts to connect failed")
    group.__cause__ = ExceptionGroup(  # what open_tcp_stream raises: one error per address
        "attempts",
        [
            OSError(errno.EHOSTUNREACH, "No route to host"),
            ConnectionRefusedError(errno.ECONNREFUSED, ""),
        ],
    )
    assert failure_of(group) == DialFailure.REFUSED


async def test_refused_dial_carries_its_reason(caplog: pytest.LogCaptureFixture) -> None:
    """A real refused connect on loopback: NODE_UNSTABLE (the log tag is kept), REFUSED."""
    caplog.set_level(logging.INFO)
    port = closed_port()
    with trio.fail_after(10), pytest.raises(NodeUnstableError) as info:
        await dial("127.0.0.1", port)
    assert info.value.code == ErrorCode.NODE_UNSTABLE
    assert info.value.failure is DialFailure.REFUSED
    assert "[NODE_UNSTABLE]" in caplog.text


async def test_invalid_host_name_dial_carries_its_reason() -> None:
    with trio.fail_after(10), pytest.raises(NodeUnstableError) as info:
        await dial("a" * 64 + ".example", 80)  # a label over 63 bytes: no lookup possible
    assert info.value.failure is DialFailure.INVALID_HOST
    assert info.value.reason.startswith("invalid host name (")


async def test_dial_reason_names_the_cause_without_the_target() -> None:
    """``reason`` is the cause alone, so a caller can name the target its own way."""
    port = closed_port()
    with trio.fail_after(10), pytest.raises(NodeUnstableError) as refused:
        await dial("127.0.0.1", port)
    assert refused.value.reason == "Connection refused"
    assert refused.value.message == f"dial 127.0.0.1:{port} failed: Connection refused"
    with trio.fail_after(10), pytest.raises(NodeTimeoutError) as slow:
        await dial("127.0.0.1", port, timeout=0)
    assert slow.value.reason == "timed out after 0 s"
    assert slow.value.message == f"dial 127.0.0.1:{port} timed out after 0 s"


def test_dial_reason_of_a_peers_refusal_is_its_message() -> None:
    error = refusal_error(ErrorCode.NODE_TIMEOUT, "dial db:5432 timed out", target="db:5432")
    assert isinstance(error, NodeTimeoutError)
    assert error.reason == "dial db:5432 timed out"


# ----------------------------------------------------------------------------- the wire


@pytest.mark.parametrize("failure", list(DialFailure), ids=lambda f: f.name)
def test_refusal_code_round_trips_the_failure(failure: DialFailure) -> None:
    """What the asking side rebuilds from a Refuse code is what the dialling side raised:
    the type, the code (NODE_UNSTABLE, whatever the reason) and the reason."""
    sent = NodeUnstableError("dial h:1 failed", target="h:1", failure=failure)
    got = refusal_error(refusal_code(sent), sent.message, target="h:1")
    assert type(got) is NodeUnstableError
    assert got.code == ErrorCode.NODE_UNSTABLE
    assert isinstance(got, DialError)
    expected = failure if refusal_code(sent) != ErrorCode.NODE_UNSTABLE else DialFailure.UNKNOWN
    assert got.failure is expected
    assert got.category == "NODE_UNSTABLE"


def test_refusal_code_of_other_errors_is_their_code() -> None:
    assert refusal_code(NodeTimeoutError("t")) == ErrorCode.NODE_TIMEOUT
    assert refusal_code(TargetForbiddenError("f")) == ErrorCode.TARGET_FORBIDDEN
    assert refusal_code(NodeUnstableError("u")) == ErrorCode.NODE_UNSTABLE  # reason unknown
    assert (
        refusal_code(NodeUnstableError("u", failure=DialFailure.DNS)) == ErrorCode.NODE_DNS_FAILED
    )
    assert refusal_error(ErrorCode.NODE_TIMEOUT, "").failure is DialFailure.TIMEOUT  # type: ignore[attr-defined]
    # a code this side does not know stays the generic refusal
    assert type(refusal_error(2099, "")) is StreamRefusedError


async def test_dial_reason_crosses_a_real_session() -> None:
    """Over a session the refusal's code carries the reason; the SOCKS reply follows it even
    when the (peer-supplied) text says something else."""
    with trio.fail_after(10):
        async with session_pair() as (client, server), trio.open_nursery() as nursery:

            async def server_side() -> None:
                incoming = await server.accept_stream()
                error = NodeUnstableError(
                    "dial h:1 failed: connection refused", failure=DialFailure.DNS
                )
                incoming.refuse(refusal_code(error), error.message)

            nursery.start_soon(server_side)
            with pytest.raises(NodeUnstableError) as info:
                await client.open_stream("h", 1)
    assert info.value.code == ErrorCode.NODE_UNSTABLE
    assert info.value.failure is DialFailure.DNS
    assert reply_code_for(info.value) is ReplyCode.HOST_UNREACHABLE


async def test_an_ip_literal_is_dialled_directly_and_a_failed_one_leaves_no_socket() -> None:
    """IP literals skip ``open_tcp_stream`` (no lookup, nursery or attempt task): the
    connection works like one it made, and refused or timed-out dials close their socket."""
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    async with listener:
        with trio.fail_after(10):
            stream = await dial("127.0.0.1", port)
            accepted = await listener.accept()
        assert stream.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        await stream.send_all(b"x")
        assert await accepted.receive_some(1) == b"x"
        await stream.aclose()
        await accepted.aclose()
    fds = count_fds()
    closed = closed_port()
    for _ in range(50):
        with trio.fail_after(10), pytest.raises(NodeUnstableError) as info:
            await dial("127.0.0.1", closed)
        assert info.value.failure is DialFailure.REFUSED
        with pytest.raises(NodeTimeoutError):
            await dial("127.0.0.1", closed, timeout=0)  # cancelled mid-connect
    assert count_fds() <= fds


async def test_an_ipv6_literal_is_dialled_directly() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        listener = (await trio.open_tcp_listeners(0, host="::1"))[0]
    except OSError:
        pytest.skip("no IPv6 loopback")
    async with listener:
        with trio.fail_after(10):
            stream = await dial("::1", listener.socket.getsockname()[1])
            accepted = await listener.accept()
        assert stream.socket.family == socket.AF_INET6
        await stream.aclose()
        await accepted.aclose()
