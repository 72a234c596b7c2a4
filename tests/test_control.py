"""The remote-forward control stream: the sans-IO protocol (``protocol/control.py``) and
``ControlChannel`` over a real session (``_control.py``)."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing
from helpers import session_pair

from pytunnel._control import ControlChannel
from pytunnel.errors import ErrorCode, ForwardError, LocalProtocolError, RemoteProtocolError
from pytunnel.protocol import routes
from pytunnel.protocol.control import CONTROL_MAX_FRAME_SIZE, ControlProtocol, ControlRole
from pytunnel.protocol.frames import encode_message
from pytunnel.protocol.messages import (
    MAX_HOST,
    MAX_TEXT,
    Bound,
    Data,
    ForwardState,
    Join,
    Open,
    group_proof,
)

BOUND = Bound("0.0.0.0", 8080)
OFFLINE = ForwardState(False, "3 health probes failed")


def _deliver(src_bytes: bytes, dst: ControlProtocol) -> list[Any]:
    dst.receive_data(src_bytes)
    out = []
    while (message := dst.next_message()) is not None:
        out.append(message)
    return out


# ----------------------------------------------------------------------------- sans-IO


def test_control_sequence_bound_then_forward_states() -> None:
    server, client = ControlProtocol(ControlRole.SERVER), ControlProtocol(ControlRole.CLIENT)
    assert _deliver(server.send(BOUND), client) == [BOUND]
    assert server.bound
    assert client.bound
    frames = client.send(OFFLINE) + client.send(ForwardState(True, "target reachable"))
    assert _deliver(frames, server) == [OFFLINE, ForwardState(True, "target reachable")]
    server.receive_data(b"")
    assert server.next_message() is None
    assert server.eof


@pytest.mark.parametrize(
    ("role", "message", "why"),
    [
        (ControlRole.CLIENT, OFFLINE, "before the server's Bound"),
        (ControlRole.CLIENT, BOUND, "nothing but ForwardState"),
        (ControlRole.SERVER, OFFLINE, "nothing but Bound"),
    ],
)
def test_control_refuses_to_send_out_of_role_or_order(
    role: ControlRole, message: Any, why: str
) -> None:
    with pytest.raises(LocalProtocolError, match=why):
        ControlProtocol(role).send(message)


def test_control_server_sends_bound_once() -> None:
    server = ControlProtocol(ControlRole.SERVER)
    server.send(BOUND)
    with pytest.raises(LocalProtocolError, match="already sent"):
        server.send(BOUND)


@pytest.mark.parametrize(
    ("role", "frames"),
    [
        (ControlRole.CLIENT, [OFFLINE]),  # the server never sends ForwardState
        (ControlRole.CLIENT, [BOUND, BOUND]),  # nor anything after Bound
        (ControlRole.SERVER, [BOUND]),  # the client never sends Bound
        (ControlRole.SERVER, [Data(1, b"x")]),  # nor a session frame (decoder's layer)
        (ControlRole.CLIENT, [Open(1, 1000)]),
    ],
    ids=["fwdstate-to-client", "second-bound", "bound-to-server", "data", "open"],
)
def test_control_refuses_an_unexpected_message_and_stays_failed(
    role: ControlRole, frames: list[Any]
) -> None:
    end = ControlProtocol(role)
    if role is ControlRole.SERVER:
        end.send(BOUND)
    *valid, last = [encode_message(f) for f in frames]
    for frame in valid:
        assert _deliver(frame, end)
    end.receive_data(last)
    with pytest.raises(RemoteProtocolError) as info:
        end.next_message()
    assert info.value.code == ErrorCode.UNEXPECTED_MESSAGE
    with pytest.raises(RemoteProtocolError) as again:
        end.next_message()
    assert again.value is info.value


def test_control_server_refuses_forward_state_before_it_sent_bound() -> None:
    server = ControlProtocol(ControlRole.SERVER)
    server.receive_data(encode_message(OFFLINE))
    with pytest.raises(RemoteProtocolError, match="before Bound"):
        server.next_message()


def test_control_eof_before_bound_is_a_forward_error() -> None:
    client = ControlProtocol(ControlRole.CLIENT)
    client.receive_data(b"")
    with pytest.raises(ForwardError, match="before confirming"):
        client.next_message()


def test_control_eof_inside_a_frame_is_truncated() -> None:
    server = ControlProtocol(ControlRole.SERVER)
    server.send(BOUND)
    server.receive_data(encode_message(OFFLINE)[:-1])
    assert server.next_message() is None
    server.receive_data(b"")
    with pytest.raises(RemoteProtocolError) as info:
        server.next_message()
    assert info.value.code == ErrorCode.TRUNCATED_FRAME


def test_control_frame_limit_fits_the_largest_messages_only() -> None:
    """Why 4096: the largest valid control messages fit, anything bigger cannot be buffered."""
    largest = [Bound("h" * MAX_HOST, 65535), ForwardState(False, "r" * MAX_TEXT)]
    assert all(len(encode_message(m)) - 4 < CONTROL_MAX_FRAME_SIZE // 2 for m in largest)
    server = ControlProtocol(ControlRole.SERVER)
    server.receive_data((CONTROL_MAX_FRAME_SIZE + 1).to_bytes(4, "big"))
    with pytest.raises(RemoteProtocolError) as info:
        server.next_message()
    assert info.value.code == ErrorCode.FRAME_TOO_LARGE


# ----------------------------------------------------------------------------- over a session


async def test_control_channel_over_a_session() -> None:
    """Bound, then ForwardState updates, then the client's close ends the server's loop."""
    received: list[Any] = []
    with trio.fail_after(10):
        async with session_pair() as (client, server), trio.open_nursery() as nursery:

            async def server_side() -> None:
                incoming = await server.accept_stream()
                assert incoming.tag == routes.LISTEN
                channel = ControlChannel(incoming.accept(), ControlRole.SERVER)
                await channel.send(BOUND)
                async for message in channel.forward_states():
                    received.append(message)

            nursery.start_soon(server_side)
            stream = await client.open_stream("0.0.0.0", 0, tag=routes.LISTEN)
            channel = ControlChannel(stream, ControlRole.CLIENT)
            assert await channel.receive_bound() == BOUND
            await channel.send(OFFLINE)
            await channel.send(ForwardState(True, "back"))
            await stream.aclose()
    assert received == [OFFLINE, ForwardState(True, "back")]


async def test_control_channel_close_before_bound_is_a_forward_error() -> None:
    with trio.fail_after(10):
        async with session_pair() as (client, server), trio.open_nursery() as nursery:

            async def server_side() -> None:
                await (await server.accept_stream()).accept().aclose()

            nursery.start_soon(server_side)
            stream = await client.open_stream(tag=routes.LISTEN)
            with pytest.raises(ForwardError, match="before confirming"):
                await ControlChannel(stream, ControlRole.CLIENT).receive_bound()
            await stream.aclose()


async def test_control_channel_reset_propagates_as_the_stream_raises_it() -> None:
    with trio.fail_after(10):
        async with session_pair() as (client, server), trio.open_nursery() as nursery:

            async def server_side() -> None:
                incoming = await server.accept_stream()
                stream = incoming.accept()
                await stream.send_all(b"\x00")
                stream.reset(ErrorCode.GOING_AWAY, "server shutting down")

            nursery.start_soon(server_side)
            stream = await client.open_stream(tag=routes.LISTEN)
            # half a frame, then a reset: not a protocol error, the stream's own failure
            with pytest.raises(trio.BrokenResourceError) as info:
                await ControlChannel(stream, ControlRole.CLIENT).receive_bound()
            assert getattr(info.value.__cause__, "code", None) == ErrorCode.GOING_AWAY
            await stream.aclose()


async def test_control_channel_refuses_a_bad_message_from_the_peer() -> None:
    a, b = trio.testing.memory_stream_pair()
    with trio.fail_after(10):
        await a.send_all(encode_message(BOUND))
        with pytest.raises(RemoteProtocolError) as info:
            await ControlChannel(b, ControlRole.SERVER).receive()
    assert info.value.code == ErrorCode.UNEXPECTED_MESSAGE


# ----------------------------------------------------------------------------- groups

JOIN = Join("web", group_proof("web", b"group secret"))


def test_a_group_member_joins_first_then_the_sequence_is_the_usual_one() -> None:
    server = ControlProtocol(ControlRole.SERVER, grouped=True)
    client = ControlProtocol(ControlRole.CLIENT, grouped=True)
    with pytest.raises(LocalProtocolError, match="Bound before the client's Join"):
        server.send(BOUND)
    assert _deliver(client.send(JOIN), server) == [JOIN]
    assert server.joined
    assert client.joined
    assert _deliver(server.send(BOUND), client) == [BOUND]
    assert _deliver(client.send(OFFLINE), server) == [OFFLINE]
    with pytest.raises(LocalProtocolError, match="Join was already sent"):
        client.send(JOIN)


def test_join_is_refused_where_there_is_no_group_and_required_where_there_is() -> None:
    with pytest.raises(LocalProtocolError, match="no group"):
        ControlProtocol(ControlRole.CLIENT).send(JOIN)
    plain = ControlProtocol(ControlRole.SERVER)
    with pytest.raises(RemoteProtocolError, match="no group") as info:
        _deliver(encode_message(JOIN, CONTROL_MAX_FRAME_SIZE), plain)
    assert info.value.code == ErrorCode.UNEXPECTED_MESSAGE
    grouped = ControlProtocol(ControlRole.SERVER, grouped=True)
    with pytest.raises(RemoteProtocolError, match="before Join"):
        _deliver(encode_message(OFFLINE, CONTROL_MAX_FRAME_SIZE), grouped)
    twice = ControlProtocol(ControlRole.SERVER, grouped=True)
    with pytest.raises(RemoteProtocolError, match="again"):
        _deliver(encode_message(JOIN, CONTROL_MAX_FRAME_SIZE) * 2, twice)
    client = ControlProtocol(ControlRole.CLIENT, grouped=True)
    with pytest.raises(RemoteProtocolError, match="before Bound"):
        _deliver(encode_message(JOIN, CONTROL_MAX_FRAME_SIZE), client)
