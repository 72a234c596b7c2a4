"""The relay's checkpoint-free close and half-close (``_util.close_now`` /
``send_eof_now``) against what trio's own ``aclose`` / ``send_eof`` do, on real loopback
connections and a real session's mux streams: same effect on the peer, same error in every
state."""

from __future__ import annotations

import socket
import struct

import pytest
import trio
import trio.testing
from helpers import open_pair, session_pair, tcp_stream_pair

import pytunnel
from pytunnel._ratelimit import LimitedStream, TokenBucket
from pytunnel._util import aclose_all, close_now, send_eof_now
from pytunnel.testing import FaultyStream


async def _reset_by_peer() -> tuple[trio.SocketStream, trio.SocketStream]:
    """A connection whose peer end was closed with an RST, already seen by ours."""
    mine, peer = await tcp_stream_pair()
    peer.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await peer.aclose()
    with trio.fail_after(10):
        try:
            while await mine.receive_some():
                pass
        except trio.BrokenResourceError:
            return mine, peer
    raise AssertionError("the reset was read as a clean EOF")


async def test_send_eof_now_on_a_socket_is_send_eof() -> None:
    mine, peer = await tcp_stream_pair()
    await mine.send_all(b"last")
    assert send_eof_now(mine)
    assert send_eof_now(mine)  # idempotent, as send_eof is
    got = b""
    with trio.fail_after(10):
        while chunk := await peer.receive_some():
            got += chunk
    assert got == b"last"  # everything sent before, then EOF
    await peer.send_all(b"back")  # the other direction still open
    with trio.fail_after(10):
        assert await mine.receive_some() == b"back"
    await aclose_all(mine, peer)


@pytest.mark.parametrize("how", ["closed", "reset"])
async def test_send_eof_now_raises_what_send_eof_raises(how: str) -> None:
    errors = []
    for use_now in (False, True):
        if how == "closed":
            mine, peer = await tcp_stream_pair()
            await mine.aclose()
        else:
            mine, peer = await _reset_by_peer()
        expected = trio.BrokenResourceError if how == "reset" else trio.ClosedResourceError
        try:
            if use_now:
                send_eof_now(mine)
            else:
                await mine.send_eof()
        except expected as exc:
            errors.append(type(exc))
        else:
            raise AssertionError(f"no {expected.__name__}")
        await aclose_all(mine, peer)
    assert errors[0] is errors[1]


async def test_close_now_closes_sockets_and_wrappers_at_once() -> None:
    faults = pytunnel.testing.Faults()
    mine, peer = await tcp_stream_pair()
    other, far = await tcp_stream_pair()
    a, b = faults.wrap(mine, LimitedStream(other, TokenBucket(1e9)))  # type: ignore[arg-type]
    assert isinstance(a, FaultyStream)
    assert close_now(a)
    assert close_now(b)
    assert mine.socket.fileno() == -1
    assert other.socket.fileno() == -1
    assert faults.reset_connections() == 0  # the wrapped pair left the faults
    for end in (peer, far):
        with trio.fail_after(10):
            assert await end.receive_some() == b""  # a clean close reached the peer
        await end.aclose()


async def test_close_now_and_send_eof_now_on_mux_streams() -> None:
    async with session_pair("tcp") as (client, server):
        mine, theirs = await open_pair(client, server)
        await mine.send_all(b"data")
        assert send_eof_now(mine)
        got = b""
        with trio.fail_after(10):
            while chunk := await theirs.receive_some():
                got += chunk
        assert got == b"data"
        assert close_now(mine)
        with pytest.raises(trio.ClosedResourceError):
            send_eof_now(mine)
        with pytest.raises(trio.ClosedResourceError):
            await mine.send_eof()
        assert close_now(theirs)


async def test_an_unknown_resource_is_left_to_aclose() -> None:
    send, receive = trio.testing.memory_stream_pair()
    assert not close_now(send)
    assert not send_eof_now(send)
    await aclose_all(send, receive)
    with pytest.raises(trio.ClosedResourceError):
        await send.send_all(b"x")
