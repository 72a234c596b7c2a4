"""The sans-IO multiplexer: two instances wired back to back, no sockets, no trio."""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)

from pytunnel.errors import (
    ErrorCode,
    LocalProtocolError,
    RemoteProtocolError,
    StreamLimitError,
)
from pytunnel.protocol import messages as m
from pytunnel.protocol.frames import FrameDecoder, encode_message
from pytunnel.protocol.messages import MAX_WINDOW
from pytunnel.protocol.mux import (
    DEFAULT_RECEIVE_BUDGET,
    DatagramReceived,
    DataReceived,
    Event,
    GoAwayReceived,
    Multiplexer,
    PingReceived,
    PongReceived,
    Role,
    StreamAccepted,
    StreamEnded,
    StreamOpened,
    StreamRefused,
    StreamReset,
    WindowOpened,
)

# ----------------------------------------------------------------------------- helpers


def check_budget(mux: Multiplexer) -> None:
    """The receive budget's books balance and hold: the credit above the floors, counted
    afresh from every stream, is what the multiplexer keeps, and stays within the pool."""
    floor = mux.window_floor
    streams = mux._streams.values()
    over = [max(0, st.recv_window + st.held - floor) for st in streams]
    over += [max(0, held - floor) for held in mux._unread.values()]
    assert mux._extra == sum(over)
    assert mux._holders == sum(1 for n in over if n)
    unproven = sum(max(0, st.recv_window + st.held - floor) for st in streams if not st.read)
    assert mux._unproven == unproven
    assert mux._extra <= mux._pool
    assert mux.bytes_buffered == sum(st.held for st in streams) + sum(mux._unread.values())
    assert mux.receive_committed <= max(mux.receive_budget, mux.max_streams)
    assert all(st.recv_window + st.held <= mux.window for st in streams)


def make_pair(**kw: Any) -> tuple[Multiplexer, Multiplexer]:
    return Multiplexer(Role.CLIENT, **kw), Multiplexer(Role.SERVER, **kw)


def pump(src: Multiplexer, dst: Multiplexer) -> list[Event]:
    """Move everything ``src`` queued into ``dst``; return ``dst``'s events."""
    data = src.data_to_send()
    return dst.receive_data(data) if data else []  # b"" would mean end of stream


def sent_frames(mux: Multiplexer) -> list[Any]:
    """Take and decode what ``mux`` queued (without delivering it anywhere)."""
    return FrameDecoder(2**32 - 1).feed(bytes(mux.data_to_send()))


def feed(mux: Multiplexer, *messages: Any) -> list[Event]:
    """Hand-craft frames from the peer."""
    return mux.receive_data(b"".join(encode_message(msg) for msg in messages))


@contextmanager
def remote_error(code: ErrorCode) -> Iterator[None]:
    with pytest.raises(RemoteProtocolError) as info:
        yield
    assert info.value.code == code, info.value


def opened(opener: Multiplexer, acceptor: Multiplexer, **kw: Any) -> int:
    """Open a stream from ``opener``, accept it on ``acceptor``, deliver both ways."""
    sid = opener.open_stream(**kw)
    [event] = pump(opener, acceptor)
    assert event == StreamOpened(
        sid, kw.get("host", ""), kw.get("port", 0), kw.get("tag", 0), kw.get("datagrams", False)
    )
    acceptor.accept_stream(sid)
    assert pump(acceptor, opener) == [StreamAccepted(sid)]
    return sid


def received(events: list[Event], sid: int) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, DataReceived) and e.stream == sid)


# ----------------------------------------------------------------------------- opening


def test_open_accept() -> None:
    client, server = make_pair(window=1000)
    sid = client.open_stream("example.org", 443, 7)
    assert sid == 1
    assert client.has_stream(1)
    assert client.send_window(1) == 0  # nothing may be sent before the Accept
    assert not client.can_send(1)
    with pytest.raises(LocalProtocolError) as info:
        client.send_data(1, b"x")
    assert info.value.code == ErrorCode.STREAM_STATE_ERROR
    [frame] = FrameDecoder().feed(bytes(client.data_to_send()))
    assert frame == m.Open(1, 1000, "example.org", 443, 7)
    assert server.receive_data(encode_message(frame)) == [StreamOpened(1, "example.org", 443, 7)]
    assert server.send_window(1) == 0  # not open until we accept
    server.accept_stream(1)
    assert server.send_window(1) == 1000
    assert pump(server, client) == [StreamAccepted(1)]
    assert client.send_window(1) == 1000
    assert client.can_send(1)
    assert server.can_send(1)
    with pytest.raises(LocalProtocolError):
        server.accept_stream(1)  # answered already


def test_windows_are_per_side() -> None:
    client = Multiplexer(Role.CLIENT, window=100)
    server = Multiplexer(Role.SERVER, window=5000)
    sid = opened(client, server)
    assert client.send_window(sid) == 5000
    assert server.send_window(sid) == 100


def test_stream_id_parity() -> None:
    client, server = make_pair()
    assert [client.open_stream() for _ in range(3)] == [1, 3, 5]
    assert [server.open_stream() for _ in range(3)] == [2, 4, 6]
    events = pump(client, server) + pump(server, client)
    assert {e.stream for e in events if isinstance(e, StreamOpened)} == {1, 2, 3, 4, 5, 6}


def test_refuse_with_code_and_message() -> None:
    client, server = make_pair()
    sid = client.open_stream("10.0.0.1", 22)
    pump(client, server)
    server.refuse_stream(sid, ErrorCode.NODE_TIMEOUT, "no answer in 10 s")
    assert not server.has_stream(sid)
    assert pump(server, client) == [StreamRefused(sid, ErrorCode.NODE_TIMEOUT, "no answer in 10 s")]
    assert not client.has_stream(sid)
    assert client.open_streams == server.open_streams == 0
    with pytest.raises(LocalProtocolError):
        server.refuse_stream(sid, 1)  # gone


def test_long_texts_are_truncated_to_the_byte_limit() -> None:
    client, server = make_pair()
    sid = client.open_stream()
    pump(client, server)
    server.refuse_stream(sid, 1, "\u00e9" * 2000)
    [event] = pump(server, client)
    assert isinstance(event, StreamRefused)
    assert event.message == "\u00e9" * 512
    client.go_away(0, "x" * 5000)
    [goaway] = pump(client, server)
    assert goaway == GoAwayReceived(0, "x" * 1024)


def test_answer_unknown_stream_is_local_error() -> None:
    client, _ = make_pair()
    with pytest.raises(LocalProtocolError):
        client.accept_stream(7)
    with pytest.raises(LocalProtocolError):
        client.send_data(7, b"x")
    with pytest.raises(LocalProtocolError):
        client.send_fin(7)
    own = client.open_stream()
    with pytest.raises(LocalProtocolError):
        client.accept_stream(own)  # we opened it: only the peer answers


# ----------------------------------------------------------------------------- data


def test_data_both_directions() -> None:
    client, server = make_pair()
    sid = opened(client, server)
    client.send_data(sid, b"ping")
    assert pump(client, server) == [DataReceived(sid, b"ping")]
    server.send_data(sid, bytearray(b"pong"))
    server.send_data(sid, memoryview(b"!!"))
    assert pump(server, client) == [DataReceived(sid, b"pong"), DataReceived(sid, b"!!")]


def test_the_data_sink_takes_data_that_no_event_precedes_and_keeps_frame_order() -> None:
    client, server = make_pair()
    one, two, three = opened(client, server), opened(client, server), opened(client, server)
    sunk: list[tuple[int, bytes, int]] = []
    # the sink sees the multiplexer as it is at that frame: its bytes are booked already
    server.data_sink = lambda sid, data: sunk.append((sid, data, server.bytes_buffered))
    client.send_data(one, b"a")
    client.send_data(two, b"bb")
    client.send_fin(one)
    client.send_data(two, b"ccc")  # after an event: returned as an event, in order
    assert pump(client, server) == [StreamEnded(one), DataReceived(two, b"ccc")]
    assert sunk == [(one, b"a", 1), (two, b"bb", 3)]
    # a frame the multiplexer drops (its stream is closed here) never reaches the sink
    server.close_stream(two, 0.0)
    client.send_data(two, b"dd")
    assert pump(client, server) == []
    assert len(sunk) == 2
    # a Data frame in a non-canonical encoding (keys in another order) goes the same way
    body = b"\x83\xa1t\xa4data\xa6stream" + bytes([three]) + b"\xa4data\xc4\x01z"
    assert server.receive_data(len(body).to_bytes(4, "big") + body) == []
    assert sunk[2:] == [(three, b"z", server.bytes_buffered)]
    server.data_sink = None
    client.send_data(three, b"e")
    assert pump(client, server) == [DataReceived(three, b"e")]


def test_large_data_is_chunked() -> None:
    client, server = make_pair(max_data_chunk=1000)
    sid = opened(client, server)
    payload = bytes(range(256)) * 20
    client.send_data(sid, payload)
    frames = sent_frames(client)
    assert [len(f.data) for f in frames] == [1000] * 5 + [120]
    assert b"".join(f.data for f in frames) == payload


def test_a_256_kib_write_is_one_frame_by_default() -> None:
    """The default chunk is a relay's whole read (256 KiB); 600,000 bytes are three frames."""
    client, server = make_pair()
    sid = opened(client, server)
    payload = bytes(range(256)) * 2344 + bytes(256)  # 600,320 bytes
    client.send_data(sid, payload)
    frames = sent_frames(client)
    assert [len(f.data) for f in frames] == [262_144, 262_144, 76_032]
    assert b"".join(f.data for f in frames) == payload


def test_chunks_fit_the_peers_frame_limit() -> None:
    client = Multiplexer(Role.CLIENT, peer_max_frame_size=4096)
    server = Multiplexer(Role.SERVER, max_frame_size=4096)
    sid = opened(client, server)
    assert client.max_data_chunk <= 4096 - 64
    client.send_data(sid, bytes(50_000))
    assert received(pump(client, server), sid) == bytes(50_000)


def test_many_streams_interleaved() -> None:
    client, server = make_pair()
    sids = [opened(client, server) for _ in range(10)]
    for sid in sids:
        client.send_data(sid, str(sid).encode() * 3)
    events = pump(client, server)
    for sid in sids:
        assert received(events, sid) == str(sid).encode() * 3


# ----------------------------------------------------------------------------- flow control


def test_sender_cannot_exceed_window() -> None:
    client, server = make_pair(window=1000)
    sid = opened(client, server)
    client.send_data(sid, bytes(600))
    assert client.send_window(sid) == 400
    with pytest.raises(LocalProtocolError) as info:
        client.send_data(sid, bytes(401))
    assert info.value.code == ErrorCode.FLOW_CONTROL_ERROR
    client.send_data(sid, bytes(400))
    assert client.send_window(sid) == 0
    with pytest.raises(LocalProtocolError) as info:
        client.send_data(sid, b"x")
    assert info.value.code == ErrorCode.FLOW_CONTROL_ERROR
    assert received(pump(client, server), sid) == bytes(1000)


def test_peer_exceeding_window_is_flow_control_error() -> None:
    client, server = make_pair(window=1000)
    sid = opened(client, server)
    with remote_error(ErrorCode.FLOW_CONTROL_ERROR):
        feed(server, m.Data(sid, bytes(1001)))


def test_peer_exceeding_window_over_several_frames() -> None:
    client, server = make_pair(window=1000)
    sid = opened(client, server)
    assert received(feed(server, m.Data(sid, bytes(700))), sid) == bytes(700)
    with remote_error(ErrorCode.FLOW_CONTROL_ERROR):
        feed(server, m.Data(sid, bytes(301)))


def test_window_update_after_half_consumed() -> None:
    client, server = make_pair(window=1000)
    sid = opened(client, server)
    client.send_data(sid, bytes(1000))
    pump(client, server)
    assert client.send_window(sid) == 0
    server.consumed(sid, 300)
    assert server.bytes_to_send == 0  # less than half: nothing yet
    server.consumed(sid, 199)
    assert server.bytes_to_send == 0
    server.consumed(sid, 1)  # 500 = half the window
    assert sent_frames(server) == [m.WindowUpdate(sid, 500)]
    feed(client, m.WindowUpdate(sid, 500))
    assert client.send_window(sid) == 500
    server.consumed(sid, 500)
    assert pump(server, client) == [WindowOpened(sid)]
    assert client.send_window(sid) == 1000
    # the granted window is really usable, and exactly
    client.send_data(sid, bytes(1000))
    assert received(pump(client, server), sid) == bytes(1000)


def test_no_window_update_after_peer_fin_or_for_nothing() -> None:
    client, server = make_pair(window=100)
    sid = opened(client, server)
    client.send_data(sid, bytes(100))
    client.send_fin(sid)
    pump(client, server)
    server.consumed(sid, 100)
    server.consumed(sid, 0)
    server.consumed(99, 100)  # unknown stream: ignored
    assert server.bytes_to_send == 0


def test_zero_window_announced() -> None:
    _, server = make_pair()
    events = feed(server, m.Open(1, 0))
    assert events == [StreamOpened(1, "", 0, 0)]
    server.accept_stream(1)
    assert server.send_window(1) == 0
    assert feed(server, m.WindowUpdate(1, 10)) == [WindowOpened(1)]
    assert server.send_window(1) == 10


def test_window_update_overflow() -> None:
    # a budget with room for the largest window (the default one grants at most a quarter)
    client, server = make_pair(window=MAX_WINDOW, receive_budget=2**34)
    sid = opened(client, server)
    assert client.send_window(sid) == MAX_WINDOW
    with remote_error(ErrorCode.FLOW_CONTROL_ERROR):
        feed(client, m.WindowUpdate(sid, 1))


def test_window_update_before_accept_is_state_error() -> None:
    _, server = make_pair()
    feed(server, m.Open(1, 100))
    with remote_error(ErrorCode.STREAM_STATE_ERROR):
        feed(server, m.WindowUpdate(1, 10))


# ----------------------------------------------------------------------------- fin / reset / close


def test_fin_both_ways_removes_the_stream() -> None:
    client, server = make_pair()
    sid = opened(client, server)
    client.send_data(sid, b"request")
    client.send_fin(sid)
    assert not client.can_send(sid)
    assert client.send_window(sid) == 0
    client.send_fin(sid)  # idempotent: nothing more sent
    events = pump(client, server)
    assert events == [DataReceived(sid, b"request"), StreamEnded(sid)]
    assert server.has_stream(sid)  # half-closed: the server may still answer
    server.send_data(sid, b"response")
    server.send_fin(sid)
    assert not server.has_stream(sid)
    assert pump(server, client) == [DataReceived(sid, b"response"), StreamEnded(sid)]
    assert not client.has_stream(sid)
    with pytest.raises(LocalProtocolError):
        client.send_data(sid, b"late")


def test_send_after_fin_is_local_error() -> None:
    client, server = make_pair()
    sid = opened(client, server)
    client.send_fin(sid)
    with pytest.raises(LocalProtocolError) as info:
        client.send_data(sid, b"x")
    assert info.value.code == ErrorCode.STREAM_STATE_ERROR


def test_fin_twice_is_state_error() -> None:
    client, server = make_pair()
    sid = opened(client, server)
    feed(server, m.Fin(sid))
    with remote_error(ErrorCode.STREAM_STATE_ERROR):
        feed(server, m.Fin(sid))


def test_data_after_fin_is_state_error() -> None:
    client, server = make_pair()
    sid = opened(client, server)
    feed(server, m.Fin(sid))
    with remote_error(ErrorCode.STREAM_STATE_ERROR):
        feed(server, m.Data(sid, b"x"))


def test_fin_before_accept_is_state_error() -> None:
    _, server = make_pair()
    feed(server, m.Open(1, 100))
    with remote_error(ErrorCode.STREAM_STATE_ERROR):
        feed(server, m.Fin(1))


def test_reset() -> None:
    client, server = make_pair()
    sid = opened(client, server)
    server.send_data(sid, b"in flight")
    server.send_fin(sid)
    client.reset_stream(sid, ErrorCode.CANCELLED, "bored")
    assert not client.has_stream(sid)
    client.reset_stream(sid)  # already gone: a no-op
    # frames the server sent before it saw the Reset cross it on the wire: dropped silently
    assert pump(server, client) == []
    assert pump(client, server) == [StreamReset(sid, ErrorCode.CANCELLED, "bored")]
    assert not server.has_stream(sid)
    assert client.open_streams == server.open_streams == 0


def test_reset_while_opening() -> None:
    client, server = make_pair()
    sid = client.open_stream()
    client.reset_stream(sid, ErrorCode.CANCELLED)
    assert pump(client, server) == [StreamOpened(sid, "", 0, 0), StreamReset(sid, 1006, "")]
    with pytest.raises(LocalProtocolError):
        server.accept_stream(sid)
    assert not server.has_stream(sid)


def test_accept_crossing_a_reset_is_ignored() -> None:
    client, server = make_pair()
    sid = client.open_stream()
    pump(client, server)
    server.accept_stream(sid)
    server.send_data(sid, b"hello")
    client.reset_stream(sid)
    assert pump(server, client) == []  # Accept and Data for a stream we reset
    assert pump(client, server) == [StreamReset(sid, ErrorCode.CANCELLED, "")]


def test_frames_for_a_reset_stream_are_ignored() -> None:
    client, server = make_pair(window=100)
    sid = opened(client, server)
    feed(client, m.Reset(sid, 1, ""))
    assert not client.has_stream(sid)
    for late in [
        m.Data(sid, b"x"),
        m.WindowUpdate(sid, 5),
        m.Fin(sid),
        m.Reset(sid, 2, ""),
        m.Accept(sid, 5),
        m.Refuse(sid, 5),
    ]:
        assert feed(client, late) == []
    assert client.bytes_to_send == 0


def test_peer_reset_of_pending_stream() -> None:
    client, server = make_pair()
    sid = client.open_stream()
    pump(client, server)
    server.reset_stream(sid, ErrorCode.TARGET_FORBIDDEN, "no")
    assert pump(server, client) == [StreamReset(sid, ErrorCode.TARGET_FORBIDDEN, "no")]


def test_close_then_peer_data_is_answered_with_reset() -> None:
    client, server = make_pair()
    sid = opened(client, server)
    server.close_stream(sid)
    assert sent_frames(server) == [m.Fin(sid)]
    feed(client, m.Fin(sid))
    assert server.has_stream(sid)  # the client has not finished yet
    # the client keeps writing: the server answers with Reset instead of buffering it
    assert feed(server, m.Data(sid, b"anyone there?")) == []
    assert sent_frames(server) == [
        m.Reset(sid, ErrorCode.CANCELLED, "stream closed by the receiver")
    ]
    assert not server.has_stream(sid)
    assert feed(server, m.Data(sid, b"more")) == []  # later frames: ignored


def test_close_then_peer_fin_is_clean() -> None:
    client, server = make_pair()
    sid = opened(client, server)
    server.close_stream(sid)
    assert pump(server, client) == [StreamEnded(sid)]
    client.send_fin(sid)
    assert not client.has_stream(sid)
    assert pump(client, server) == [StreamEnded(sid)]
    assert not server.has_stream(sid)
    assert server.bytes_to_send == 0  # no Reset


def test_close_after_peer_fin_is_clean() -> None:
    client, server = make_pair()
    sid = opened(client, server)
    client.send_fin(sid)
    pump(client, server)
    server.close_stream(sid)
    assert not server.has_stream(sid)
    assert sent_frames(server) == [m.Fin(sid)]


def test_close_after_own_fin() -> None:
    client, server = make_pair()
    sid = opened(client, server)
    server.send_fin(sid)
    server.close_stream(sid)
    assert server.has_stream(sid)
    assert sent_frames(server) == [m.Fin(sid)]
    feed(server, m.Data(sid, b"x"))
    assert [type(f) for f in sent_frames(server)] == [m.Reset]
    server.close_stream(sid)  # gone: a no-op


@pytest.mark.parametrize("side", ["opener", "acceptor"])
def test_close_before_open_resets(side: str) -> None:
    client, server = make_pair()
    sid = client.open_stream()
    pump(client, server)
    closer, other = (client, server) if side == "opener" else (server, client)
    closer.close_stream(sid)
    assert not closer.has_stream(sid)
    [event] = pump(closer, other)
    assert isinstance(event, StreamReset)
    assert event.code == ErrorCode.CANCELLED
    assert not other.has_stream(sid)


# ----------------------------------------------------------------------------- session level


def test_ping_is_answered_automatically() -> None:
    client, server = make_pair()
    client.ping(2**64 - 1)
    assert pump(client, server) == [PingReceived(2**64 - 1)]
    assert pump(server, client) == [PongReceived(2**64 - 1)]
    assert client.bytes_to_send == 0


def test_go_away() -> None:
    client, server = make_pair()
    sid = opened(client, server)
    racing = server.open_stream()  # crosses the GoAway on the wire
    client.go_away(ErrorCode.NORMAL, "bye")
    client.go_away(ErrorCode.INTERNAL, "again")  # only the first is sent
    assert client.goaway_sent
    with pytest.raises(LocalProtocolError) as info:
        client.open_stream()
    assert info.value.code == ErrorCode.GOING_AWAY
    assert pump(client, server) == [GoAwayReceived(0, "bye")]
    assert server.goaway_received
    with pytest.raises(LocalProtocolError) as info:
        server.open_stream()
    assert info.value.code == ErrorCode.GOING_AWAY
    assert pump(server, client) == []  # the racing Open was refused automatically
    assert pump(client, server) == [
        StreamRefused(racing, ErrorCode.GOING_AWAY, "session is going away")
    ]
    # streams already open keep working until the session closes
    client.send_data(sid, b"still here")
    assert pump(client, server) == [DataReceived(sid, b"still here")]


def test_stream_limit() -> None:
    client = Multiplexer(Role.CLIENT)
    server = Multiplexer(Role.SERVER, max_streams=2)
    sids = [client.open_stream() for _ in range(3)]
    events = pump(client, server)
    assert events == [StreamOpened(sids[0], "", 0, 0), StreamOpened(sids[1], "", 0, 0)]
    assert pump(server, client) == [
        StreamRefused(sids[2], ErrorCode.STREAM_LIMIT, "limit of 2 streams")
    ]
    server.refuse_stream(sids[0], ErrorCode.DIAL_FAILED)
    sid = client.open_stream()  # room again
    pump(server, client)
    assert pump(client, server) == [StreamOpened(sid, "", 0, 0)]
    # the local side counts too
    with pytest.raises(StreamLimitError):
        server.open_stream()


def test_local_stream_limit() -> None:
    client = Multiplexer(Role.CLIENT, max_streams=1)
    client.open_stream()
    with pytest.raises(StreamLimitError) as info:
        client.open_stream()
    assert info.value.code == ErrorCode.STREAM_LIMIT


# ----------------------------------------------------------------------------- violations


def test_stream_id_reuse() -> None:
    _, server = make_pair()
    feed(server, m.Open(1, 100))
    with remote_error(ErrorCode.STREAM_STATE_ERROR):
        feed(server, m.Open(1, 100))


def test_stream_id_not_increasing() -> None:
    _, server = make_pair()
    feed(server, m.Open(5, 100))
    with remote_error(ErrorCode.STREAM_STATE_ERROR):
        feed(server, m.Open(3, 100))


def test_stream_id_reuse_after_close() -> None:
    client, server = make_pair()
    sid = opened(client, server)
    client.reset_stream(sid)
    pump(client, server)
    with remote_error(ErrorCode.STREAM_STATE_ERROR):
        feed(server, m.Open(sid, 100))


@pytest.mark.parametrize(("role", "sid"), [(Role.SERVER, 2), (Role.CLIENT, 1), (Role.CLIENT, 3)])
def test_wrong_parity(role: Role, sid: int) -> None:
    mux = Multiplexer(role)
    with remote_error(ErrorCode.STREAM_STATE_ERROR):
        feed(mux, m.Open(sid, 100))
    assert mux.error is not None
    assert mux.error.message == f"peer used our stream id parity: {sid}"


@pytest.mark.parametrize(
    "message",
    [
        m.Data(9, b"x"),
        m.Data(10, b"x"),
        m.WindowUpdate(9, 1),
        m.Fin(9),
        m.Reset(9, 0),
        m.Accept(9, 1),
        m.Refuse(9, 1),
        m.Accept(2, 1),  # the server's own (unused) id
    ],
)
def test_unknown_stream_id(message: Any) -> None:
    _, server = make_pair()
    feed(server, m.Open(1, 100))
    with remote_error(ErrorCode.STREAM_STATE_ERROR):
        feed(server, message)


def test_data_on_pending_stream() -> None:
    _, server = make_pair()
    feed(server, m.Open(1, 100))
    with remote_error(ErrorCode.STREAM_STATE_ERROR):
        feed(server, m.Data(1, b"too early"))


@pytest.mark.parametrize("answer", [m.Accept(1, 100), m.Refuse(1, 1)])
def test_answer_twice_or_to_own_open(answer: Any) -> None:
    client, server = make_pair()
    sid = opened(client, server)
    with remote_error(ErrorCode.STREAM_STATE_ERROR):
        feed(client, answer)  # already open
    with remote_error(ErrorCode.STREAM_STATE_ERROR):
        feed(server, m.Accept(sid, 100))  # the server is the acceptor, not the opener


@pytest.mark.parametrize(
    "message",
    [
        m.Hello((1,), bytes(32)),
        m.Challenge(1, bytes(32)),
        m.Auth(bytes(32), 4096),
        m.Welcome(bytes(32), 4096),
        m.Bound("0.0.0.0", 80),
    ],
    ids=lambda msg: type(msg).__name__,
)
def test_handshake_message_after_handshake(message: Any) -> None:
    client, server = make_pair()
    with remote_error(ErrorCode.UNEXPECTED_MESSAGE):
        feed(server, message)
    with remote_error(ErrorCode.UNEXPECTED_MESSAGE):
        feed(client, message)


def test_decoder_errors_surface_through_the_mux() -> None:
    client, server = make_pair(max_frame_size=4096)
    with remote_error(ErrorCode.FRAME_TOO_LARGE):
        server.receive_data((4097).to_bytes(4, "big"))
    with remote_error(ErrorCode.TRUNCATED_FRAME):
        client.receive_data(encode_message(m.Ping(1))[:-1])
        client.receive_data(b"")


def test_end_of_stream_between_frames_is_clean() -> None:
    client, server = make_pair()
    client.ping(1)
    assert server.receive_data(bytes(client.data_to_send()) + b"") == [PingReceived(1)]
    assert server.receive_data(b"") == []


def test_pong_never_exceeds_a_minimal_peer_limit() -> None:
    """A peer may announce ``MIN_MAX_FRAME_SIZE``: every control frame must still fit."""
    server = Multiplexer(Role.SERVER, peer_max_frame_size=m.MIN_MAX_FRAME_SIZE)
    feed(server, m.Ping(2**64 - 1), m.Open(1, 1))
    server.refuse_stream(1, 2**32 - 1, "\U0001f600" * 5000)
    server.go_away(2**32 - 1, "\U0001f600" * 5000)
    frames = server.data_to_send()
    assert len(FrameDecoder(m.MIN_MAX_FRAME_SIZE).feed(bytes(frames))) == 3


# ----------------------------------------------------------------------------- random operations


class Chooser(Protocol):
    def choice(self, options: list[int]) -> int: ...
    def integer(self, low: int, high: int) -> int: ...
    def payload(self, size: int) -> bytes: ...


class Model:
    """Both ends of a connection driven by random *legal* operations, with a reference model.

    Nothing may raise; every byte delivered is a prefix of what was sent on that stream and
    direction; a Fin arrives only after all the data; once all frames are delivered, streams
    that were not aborted (reset, or closed while the peer was writing) delivered everything.
    """

    SIDES = ("client", "server")

    def __init__(
        self, window: int, chunk: int, max_streams: int, budget: int = DEFAULT_RECEIVE_BUDGET
    ) -> None:
        self.mux = {
            role.name.lower(): Multiplexer(
                role,
                window=window,
                max_data_chunk=chunk,
                max_streams=max_streams,
                receive_budget=budget,
            )
            for role in Role
        }
        self.sent: dict[tuple[str, int], bytearray] = defaultdict(bytearray)
        self.got: dict[tuple[str, int], bytearray] = defaultdict(bytearray)
        self.unconsumed: dict[tuple[str, int], int] = defaultdict(int)
        self.pending: dict[str, set[int]] = {"client": set(), "server": set()}
        self.known: set[int] = set()
        self.aborted: set[int] = set()
        self.pings: dict[str, list[int]] = {"client": [], "server": []}
        self.delivered_bytes = 0

    @staticmethod
    def other(side: str) -> str:
        return "server" if side == "client" else "client"

    def deliver(self, side: str) -> None:
        to = self.other(side)
        for event in pump(self.mux[side], self.mux[to]):
            self.handle(to, event)

    def handle(self, side: str, event: Event) -> None:
        peer = self.other(side)
        match event:
            case StreamOpened(sid):
                self.pending[side].add(sid)
            case DataReceived(sid, data):
                assert data
                self.got[side, sid] += data
                self.unconsumed[side, sid] += len(data)
                self.delivered_bytes += len(data)
                assert self.sent[peer, sid].startswith(self.got[side, sid])
            case StreamEnded(sid):
                assert self.got[side, sid] == self.sent[peer, sid]
            case StreamReset(sid):
                self.aborted.add(sid)
            case PongReceived(opaque):
                assert self.pings[side].pop(0) == opaque
            case _:
                pass

    def can_open(self, side: str) -> bool:
        mux = self.mux[side]
        return not (mux.goaway_sent or mux.goaway_received or mux.open_streams >= mux.max_streams)

    # -- operations (each one legal by construction)

    def open(self, side: str) -> None:
        if self.can_open(side):
            self.known.add(self.mux[side].open_stream("h", 1, 2))

    def open_and_accept(self, side: str) -> None:
        """Open, deliver, accept at once: gets streams to carry data within a short run."""
        if not self.can_open(side):
            return
        peer = self.other(side)
        sid = self.mux[side].open_stream()
        self.known.add(sid)
        self.deliver(side)
        if sid in self.pending[peer] and self.mux[peer].has_stream(sid):
            self.pending[peer].discard(sid)
            self.mux[peer].accept_stream(sid)
            self.deliver(peer)

    def answer(self, side: str, pick: Chooser, accept: bool) -> None:
        mux = self.mux[side]
        self.pending[side] = {s for s in self.pending[side] if mux.has_stream(s)}
        if not self.pending[side]:
            return
        sid = pick.choice(sorted(self.pending[side]))
        self.pending[side].discard(sid)
        if accept:
            mux.accept_stream(sid)
        else:
            mux.refuse_stream(sid, ErrorCode.DIAL_FAILED, "nope")

    def send(self, side: str, pick: Chooser) -> None:
        mux = self.mux[side]
        options = sorted(s for s in self.known if mux.send_window(s) > 0)
        if not options:
            return
        sid = pick.choice(options)
        payload = pick.payload(pick.integer(1, min(mux.send_window(sid), 300)))
        mux.send_data(sid, payload)
        self.sent[side, sid] += payload

    def consume(self, side: str, pick: Chooser) -> None:
        options = sorted(s for s in self.known if self.unconsumed[side, s] > 0)
        if not options:
            return
        sid = pick.choice(options)
        size = pick.integer(1, self.unconsumed[side, sid])
        self.unconsumed[side, sid] -= size
        self.mux[side].consumed(sid, size)

    def fin(self, side: str, pick: Chooser) -> None:
        mux = self.mux[side]
        options = sorted(s for s in self.known if mux.can_send(s))
        if options:
            mux.send_fin(pick.choice(options))

    def close(self, side: str, pick: Chooser) -> None:
        if self.known:
            sid = pick.choice(sorted(self.known))
            self.mux[side].close_stream(sid)
            self.aborted.add(sid)  # the peer's further data is refused, not delivered

    def reset(self, side: str, pick: Chooser) -> None:
        if self.known:
            sid = pick.choice(sorted(self.known))
            self.mux[side].reset_stream(sid, ErrorCode.CANCELLED, "random reset")
            self.aborted.add(sid)

    def ping(self, side: str, opaque: int) -> None:
        self.mux[side].ping(opaque)
        self.pings[side].append(opaque)

    def go_away(self, side: str) -> None:
        self.mux[side].go_away(ErrorCode.NORMAL, "done")

    def settle(self) -> None:
        """Deliver until both directions are quiet, then everything sent must have arrived."""
        while self.mux["client"].bytes_to_send or self.mux["server"].bytes_to_send:
            self.deliver("client")
            self.deliver("server")
        for (side, sid), sent in self.sent.items():
            got = self.got[self.other(side), sid]
            if sid in self.aborted:
                assert sent.startswith(got)
            else:
                assert got == sent, (side, sid)
        assert not self.pings["client"]
        assert not self.pings["server"]

    def check(self) -> None:
        for side, mux in self.mux.items():
            assert mux.open_streams <= mux.max_streams
            check_budget(mux)
            unconsumed = sum(n for (where, _), n in self.unconsumed.items() if where == side)
            assert mux.bytes_buffered <= unconsumed
            for sid in self.known:
                assert 0 <= mux.send_window(sid) <= MAX_WINDOW


class _DrawChooser:
    def __init__(self, data: st.DataObject) -> None:
        self.data = data

    def choice(self, options: list[int]) -> int:
        return self.data.draw(st.sampled_from(options))

    def integer(self, low: int, high: int) -> int:
        return self.data.draw(st.integers(low, high))

    def payload(self, size: int) -> bytes:
        return self.data.draw(st.binary(min_size=size, max_size=size))


class _RandomChooser:
    def __init__(self, rnd: random.Random) -> None:
        self.rnd = rnd

    def choice(self, options: list[int]) -> int:
        return self.rnd.choice(options)

    def integer(self, low: int, high: int) -> int:
        return self.rnd.randint(low, high)

    def payload(self, size: int) -> bytes:
        return self.rnd.randbytes(size)


sides = st.sampled_from(Model.SIDES)


class MuxPair(RuleBasedStateMachine):
    """Hypothesis drives :class:`Model`: it shrinks any failure to a minimal sequence."""

    @initialize(
        window=st.sampled_from([1, 2, 7, 64, 1000]),
        chunk=st.sampled_from([1, 3, 64]),
        max_streams=st.integers(1, 6),
        budget=st.sampled_from([DEFAULT_RECEIVE_BUDGET, 1, 5, 40, 3000]),
    )
    def setup(self, window: int, chunk: int, max_streams: int, budget: int) -> None:
        self.model = Model(window, chunk, max_streams, budget)

    @rule(side=sides)
    def open(self, side: str) -> None:
        self.model.open(side)

    @rule(side=sides)
    def open_and_accept(self, side: str) -> None:
        self.model.open_and_accept(side)

    @rule(side=sides)
    def deliver(self, side: str) -> None:
        self.model.deliver(side)

    @rule(side=sides, data=st.data(), accept=st.booleans())
    def answer(self, side: str, data: st.DataObject, accept: bool) -> None:
        self.model.answer(side, _DrawChooser(data), accept)

    @rule(side=sides, data=st.data())
    def send(self, side: str, data: st.DataObject) -> None:
        self.model.send(side, _DrawChooser(data))

    @rule(side=sides, data=st.data())
    def send_and_deliver(self, side: str, data: st.DataObject) -> None:
        self.model.send(side, _DrawChooser(data))
        self.model.deliver(side)

    @rule(side=sides, data=st.data())
    def consume(self, side: str, data: st.DataObject) -> None:
        self.model.consume(side, _DrawChooser(data))

    @rule(side=sides, data=st.data())
    def fin(self, side: str, data: st.DataObject) -> None:
        self.model.fin(side, _DrawChooser(data))

    @rule(side=sides, data=st.data(), dice=st.integers(0, 3))
    def close(self, side: str, data: st.DataObject, dice: int) -> None:
        if dice == 0:
            self.model.close(side, _DrawChooser(data))

    @rule(side=sides, data=st.data(), dice=st.integers(0, 3))
    def reset(self, side: str, data: st.DataObject, dice: int) -> None:
        if dice == 0:
            self.model.reset(side, _DrawChooser(data))

    @rule(side=sides, opaque=st.integers(0, 2**64 - 1))
    def ping(self, side: str, opaque: int) -> None:
        self.model.ping(side, opaque)

    @rule(side=sides, dice=st.integers(0, 9))
    def go_away(self, side: str, dice: int) -> None:
        if dice == 0:  # rarely: it ends all opening
            self.model.go_away(side)

    @rule()
    def settle(self) -> None:
        self.model.settle()

    @invariant()
    def sane(self) -> None:
        self.model.check()

    def teardown(self) -> None:
        if hasattr(self, "model"):
            self.model.settle()


TestMuxPair = MuxPair.TestCase
TestMuxPair.settings = settings(
    max_examples=60,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


@pytest.mark.parametrize("seed", range(12))
def test_random_operations_soak(seed: int) -> None:
    """Long seeded runs for volume (the state machine above is for shrinking)."""
    rnd = random.Random(seed)
    pick = _RandomChooser(rnd)
    model = Model(
        window=rnd.choice([1, 10, 100, 1000, 5000]),
        chunk=rnd.choice([1, 7, 100, 1000]),
        max_streams=rnd.randint(1, 8),
        budget=rnd.choice([DEFAULT_RECEIVE_BUDGET, 1, 20, 2000, 20000]),
    )
    weighted: list[tuple[float, Callable[[str], None]]] = [
        (3, lambda side: model.open_and_accept(side)),
        (1, lambda side: model.open(side)),
        (3, lambda side: model.deliver(side)),
        (2, lambda side: model.answer(side, pick, rnd.random() < 0.8)),
        (8, lambda side: model.send(side, pick)),
        (4, lambda side: model.consume(side, pick)),
        (1, lambda side: model.fin(side, pick)),
        (0.15, lambda side: model.close(side, pick)),
        (0.15, lambda side: model.reset(side, pick)),
        (1, lambda side: model.ping(side, rnd.getrandbits(64))),
        (0.003, lambda side: model.go_away(side)),
        (0.2, lambda side: model.settle()),
    ]
    ops = [op for _, op in weighted]
    weights = [weight for weight, _ in weighted]
    for _ in range(1500):
        rnd.choices(ops, weights)[0](rnd.choice(Model.SIDES))
        model.check()
    model.settle()
    assert model.delivered_bytes > 0


# ----------------------------------------------------------------------------- window checks


def test_receive_window_accepts_exactly_the_window_and_not_one_byte_more() -> None:
    client, server = make_pair(window=1000)
    sid = opened(client, server)
    assert received(feed(server, m.Data(sid, bytes(1000))), sid) == bytes(1000)
    with remote_error(ErrorCode.FLOW_CONTROL_ERROR):
        feed(server, m.Data(sid, b"x"))


def test_receive_window_grows_by_exactly_what_was_granted() -> None:
    client, server = make_pair(window=1000)
    sid = opened(client, server)
    feed(server, m.Data(sid, bytes(1000)))
    server.consumed(sid, 600)
    assert sent_frames(server) == [m.WindowUpdate(sid, 600)]
    assert received(feed(server, m.Data(sid, bytes(600))), sid) == bytes(600)
    with remote_error(ErrorCode.FLOW_CONTROL_ERROR):
        feed(server, m.Data(sid, b"x"))


def test_send_window_grows_by_exactly_the_update() -> None:
    client, server = make_pair(window=1000)
    sid = opened(client, server)
    client.send_data(sid, bytes(1000))
    feed(client, m.WindowUpdate(sid, 7))
    assert client.send_window(sid) == 7
    with pytest.raises(LocalProtocolError) as info:
        client.send_data(sid, bytes(8))
    assert info.value.code == ErrorCode.FLOW_CONTROL_ERROR
    client.send_data(sid, bytes(7))
    assert client.send_window(sid) == 0


def test_windows_are_per_stream_and_per_direction() -> None:
    client, server = make_pair(window=100)
    first = opened(client, server)
    second = opened(client, server)
    feed(server, m.Data(first, bytes(100)))  # fills only the first stream, one direction
    assert received(feed(server, m.Data(second, bytes(100))), second) == bytes(100)
    assert server.send_window(first) == 100
    server.send_data(first, bytes(100))
    with remote_error(ErrorCode.FLOW_CONTROL_ERROR):
        feed(server, m.Data(first, b"x"))


def test_a_chunked_send_counts_every_chunk_against_the_window() -> None:
    client, server = make_pair(window=1000, max_data_chunk=64)
    sid = opened(client, server)
    client.send_data(sid, bytes(1000))
    frames = sent_frames(client)
    assert len(frames) == 16
    assert sum(len(f.data) for f in frames) == 1000
    assert client.send_window(sid) == 0


# ----------------------------------------------------------------------------- stream kinds


def test_the_datagram_kind_travels_in_open() -> None:
    client, server = make_pair()
    sid = client.open_stream("dns.example", 53, 2, datagrams=True)
    assert sent_frames(client) == [m.Open(sid, client.window, "dns.example", 53, 2, True)]
    assert feed(server, m.Open(1, 100, datagrams=True)) == [StreamOpened(1, "", 0, 0, True)]
    assert feed(server, m.Open(3, 100)) == [StreamOpened(3, "", 0, 0, False)]


def test_datagrams_flow_on_a_datagram_stream() -> None:
    client, server = make_pair()
    sid = opened(client, server, datagrams=True)
    assert client.can_send_datagram(sid)
    assert server.can_send_datagram(sid)
    client.send_datagram(sid, b"query")
    assert pump(client, server) == [DatagramReceived(sid, b"query")]
    server.send_datagram(sid, b"answer")
    assert pump(server, client) == [DatagramReceived(sid, b"answer")]


def test_datagram_on_a_byte_stream_is_a_protocol_violation() -> None:
    """A byte stream never queues datagrams: a peer sending one there is cut off."""
    client, server = make_pair()
    sid = opened(client, server)
    with remote_error(ErrorCode.STREAM_STATE_ERROR):
        feed(server, m.Datagram(sid, b"x" * 60_000))
    client2, server2 = make_pair()
    sid = opened(server2, client2)  # the same from the server's side
    with remote_error(ErrorCode.STREAM_STATE_ERROR):
        feed(server2, m.Datagram(sid, b"x"))


def test_a_byte_stream_cannot_send_datagrams() -> None:
    client, server = make_pair()
    sid = opened(client, server)
    assert not client.can_send_datagram(sid)
    with pytest.raises(LocalProtocolError) as info:
        client.send_datagram(sid, b"x")
    assert info.value.code == ErrorCode.STREAM_STATE_ERROR
    assert client.bytes_to_send == 0


# ----------------------------------------------------------------------------- control first


def test_control_frames_overtake_queued_data() -> None:
    client, server = make_pair(window=10_000)
    sid = opened(client, server)
    client.send_data(sid, bytes(5000))
    client.send_fin(sid)
    client.ping(7)
    feed(client, m.Ping(9))
    feed(client, m.Data(sid, bytes(6000)))
    client.consumed(sid, 6000)
    client.go_away(ErrorCode.NORMAL, "bye")
    assert [type(f).__name__ for f in sent_frames(client)] == [
        "Ping",
        "Pong",
        "WindowUpdate",
        "Data",
        "Fin",
        "GoAway",
    ]


def test_goaway_does_not_overtake_what_was_queued_before_it() -> None:
    """GoAway means "nothing more from me": an Open, Data and Fin queued before it reach the
    peer before it, so closing a busy session loses nothing it had already sent."""
    client, server = make_pair()
    sid = opened(client, server)
    client.send_data(sid, b"hello")
    client.send_fin(sid)
    late = client.open_stream()
    client.go_away(ErrorCode.NORMAL, "bye")
    events = pump(client, server)
    assert events[:4] == [
        DataReceived(sid, b"hello"),
        StreamEnded(sid),
        StreamOpened(late, "", 0, 0),
        GoAwayReceived(0, "bye"),
    ]


def test_an_open_after_the_peers_goaway_is_refused() -> None:
    _client, server = make_pair()
    feed(server, m.GoAway(0, "bye"))
    feed(server, m.Open(1, 1000))
    assert [type(f).__name__ for f in sent_frames(server)] == ["Refuse"]


def test_reset_waits_behind_the_open_of_its_own_stream() -> None:
    """A Reset may not reach the peer before the Open it cancels (the id would be unknown)."""
    client, server = make_pair()
    other = opened(client, server)
    client.send_data(other, bytes(100))
    sid = client.open_stream()
    client.reset_stream(sid)
    frames = sent_frames(client)
    assert [type(f).__name__ for f in frames] == ["Data", "Open", "Reset"]
    # once the Open has gone out, a Reset jumps ahead of other streams' data
    client.send_data(other, bytes(100))
    another = client.open_stream()
    client.data_to_send()
    client.send_data(other, bytes(100))
    client.reset_stream(another)
    assert [type(f).__name__ for f in sent_frames(client)] == ["Reset", "Data"]


def test_reordering_keeps_every_stream_valid_for_the_peer() -> None:
    """Whatever mix of frames is queued, the peer decodes it without a protocol error."""
    rng = random.Random(5)
    client, server = make_pair(window=4000)
    live: list[int] = []
    for _ in range(400):
        action = rng.randrange(6)
        if action == 0 or not live:
            live.append(client.open_stream())
        elif action == 1:
            client.reset_stream(live.pop(rng.randrange(len(live))))
        elif action == 2:
            client.ping(rng.randrange(100))
        else:
            sid = rng.choice(live)
            if client.send_window(sid):
                client.send_data(sid, bytes(min(50, client.send_window(sid))))
        if rng.random() < 0.3:
            for event in pump(client, server):
                if isinstance(event, StreamOpened) and server.has_stream(event.stream):
                    server.accept_stream(event.stream)
            pump(server, client)
    pump(client, server)


# ----------------------------------------------------------------------------- floods


def test_ping_flood_without_reading_is_cut_off() -> None:
    _, server = make_pair(max_control_queue=10_000)
    pong = len(encode_message(m.Pong(2**64 - 1)))
    with remote_error(ErrorCode.FLOOD):
        for opaque in range(10_000 // pong + 2):
            feed(server, m.Ping(2**64 - 1 - opaque))
    assert server.bytes_to_send <= 10_000 + pong


def test_replies_taken_by_the_transport_do_not_count() -> None:
    _, server = make_pair(max_control_queue=1000)
    for opaque in range(500):
        feed(server, m.Ping(opaque))
        server.data_to_send()  # a peer that reads: never a flood


def test_refusal_flood_without_reading_is_cut_off() -> None:
    _, server = make_pair(max_streams=1, max_control_queue=2000)
    feed(server, m.Open(1, 100))
    with remote_error(ErrorCode.FLOOD):
        for sid in range(3, 400, 2):
            feed(server, m.Open(sid, 100))


def test_refusals_by_the_application_count_as_replies() -> None:
    _, server = make_pair(max_control_queue=2000)
    with remote_error(ErrorCode.FLOOD):
        for sid in range(1, 400, 2):
            feed(server, m.Open(sid, 100))
            server.refuse_stream(sid, ErrorCode.DIAL_FAILED, "x" * 50)


def test_resets_of_data_sent_to_closed_streams_count_as_replies() -> None:
    client, server = make_pair(max_control_queue=300)
    sids = [opened(client, server) for _ in range(30)]
    for sid in sids:
        server.close_stream(sid)
    server.data_to_send()
    with remote_error(ErrorCode.FLOOD):
        for sid in sids:
            feed(server, m.Data(sid, b"x"))


def test_a_burst_is_decoded_in_bounded_batches() -> None:
    _, server = make_pair()
    server.feed(b"".join(encode_message(m.Ping(i)) for i in range(10)))
    assert server.next_events(4) == [PingReceived(i) for i in range(4)]
    assert server.frames_pending
    assert server.next_events(4) == [PingReceived(i) for i in range(4, 8)]
    assert server.next_events(4) == [PingReceived(8), PingReceived(9)]
    assert not server.frames_pending
    assert server.next_events() == []


# ----------------------------------------------------------------------------- linger


def test_a_closed_stream_lingers_until_the_peer_finishes() -> None:
    client, server = make_pair()
    sid = opened(client, server)
    client.close_stream(sid, now=10.0)
    assert client.lingering == 1
    assert client.oldest_lingering == 10.0
    assert client.expire_lingering(closed_before=9.0) == 0
    pump(client, server)
    server.send_fin(sid)
    pump(server, client)
    assert not client.has_stream(sid)
    assert client.lingering == 0
    assert client.oldest_lingering is None


def test_a_silent_peer_loses_its_half_closed_streams_after_the_linger() -> None:
    client, server = make_pair()
    first, second, third = (opened(client, server) for _ in range(3))
    client.close_stream(first, now=1.0)
    client.close_stream(second, now=2.0)
    client.close_stream(third, now=3.0)
    client.data_to_send()
    assert client.expire_lingering(closed_before=2.0) == 2
    assert client.open_streams == 1
    assert client.lingering == 1
    assert sent_frames(client) == [
        m.Reset(first, ErrorCode.CANCELLED, "the peer did not finish in time"),
        m.Reset(second, ErrorCode.CANCELLED, "the peer did not finish in time"),
    ]
    assert client.oldest_lingering == 3.0


def test_a_stream_closed_after_the_peer_finished_does_not_linger() -> None:
    client, server = make_pair()
    sid = opened(client, server)
    server.send_fin(sid)
    pump(server, client)
    client.close_stream(sid, now=1.0)
    assert client.lingering == 0
    assert not client.has_stream(sid)


@pytest.mark.parametrize("end", ["reset_by_peer", "reset_by_us", "data_after_close"])
def test_a_lingering_stream_that_ends_otherwise_is_forgotten(end: str) -> None:
    client, server = make_pair()
    sid = opened(client, server)
    client.close_stream(sid, now=1.0)
    if end == "reset_by_peer":
        feed(client, m.Reset(sid, ErrorCode.CANCELLED))
    elif end == "reset_by_us":
        client.reset_stream(sid)
    else:
        feed(client, m.Data(sid, b"late"))
    assert client.lingering == 0
    assert client.oldest_lingering is None


def test_expiring_every_lingering_stream() -> None:
    client, server = make_pair()
    sids = [opened(client, server) for _ in range(3)]
    for sid in sids:
        client.close_stream(sid, now=1.0)
    assert client.expire_lingering(closed_before=100.0) == 3
    assert client.open_streams == 0
    assert client.oldest_lingering is None


def test_datagram_edge_cases_on_a_datagram_stream() -> None:
    client, server = make_pair()
    sid = opened(client, server, datagrams=True)
    with pytest.raises(LocalProtocolError):
        client.send_datagram(sid, bytes(m.MAX_DATAGRAM + 1))
    server.close_stream(sid)
    assert feed(server, m.Datagram(sid, b"after close")) == []  # closed: dropped
    server.reset_stream(sid)
    assert feed(server, m.Datagram(sid, b"after reset")) == []  # gone: dropped
    with remote_error(ErrorCode.STREAM_STATE_ERROR):
        feed(server, m.Datagram(99, b"never opened"))
    _, acceptor = make_pair()
    feed(acceptor, m.Open(1, 100, datagrams=True))
    with remote_error(ErrorCode.STREAM_STATE_ERROR):
        feed(acceptor, m.Datagram(1, b"before accept"))


# ----------------------------------------------------------------------------- local misuse


@pytest.mark.parametrize("window", [0, -1, MAX_WINDOW + 1])
def test_constructor_refuses_a_window_outside_the_protocol_range(window: int) -> None:
    with pytest.raises(ValueError, match=r"^window must be in") as info:
        Multiplexer(Role.CLIENT, window=window)
    assert str(info.value) == f"window must be in 1..2**31-1, got {window}"


@pytest.mark.parametrize("max_streams", [0, -5])
def test_constructor_refuses_a_stream_cap_below_one(max_streams: int) -> None:
    with pytest.raises(ValueError, match="max_streams"):
        Multiplexer(Role.SERVER, max_streams=max_streams)


def test_constructor_accepts_the_bounds_of_the_window_range() -> None:
    assert Multiplexer(Role.CLIENT, window=1).window == 1
    assert Multiplexer(Role.CLIENT, window=MAX_WINDOW).window == MAX_WINDOW


@pytest.mark.parametrize(("role", "last"), [(Role.CLIENT, 2**32 - 1), (Role.SERVER, 2**32 - 2)])
def test_opening_past_the_last_stream_id_is_a_typed_local_error(role: Role, last: int) -> None:
    """Stream ids are u32 and never reused: once a side has used its last id of its parity,
    opening fails cleanly (nothing queued, nothing registered) instead of sending an id the
    peer must reject. Opening 2**31 streams is not practical, so the counter is moved to the
    last id directly."""
    mux = Multiplexer(role)
    mux._next_id = last
    assert mux.open_stream() == last
    assert mux.has_stream(last)
    assert [type(f) for f in sent_frames(mux)] == [m.Open]
    with pytest.raises(LocalProtocolError) as info:
        mux.open_stream()
    assert (info.value.code, info.value.message) == (
        ErrorCode.STREAM_STATE_ERROR,
        "stream ids exhausted",
    )
    assert mux.open_streams == 1
    assert mux.bytes_to_send == 0


def test_refusing_a_stream_that_is_not_awaiting_an_answer_is_a_local_error() -> None:
    client, server = make_pair()
    sid = opened(client, server)  # accepted already
    with pytest.raises(LocalProtocolError, match="not awaiting an answer"):
        server.refuse_stream(sid, ErrorCode.CANCELLED)
    own = client.open_stream()  # ours: only the peer answers it
    client.data_to_send()
    with pytest.raises(LocalProtocolError, match="not awaiting an answer"):
        client.refuse_stream(own, ErrorCode.CANCELLED)
    # both streams are untouched and nothing was queued
    assert server.can_send(sid)
    assert client.has_stream(own)
    assert client.bytes_to_send == server.bytes_to_send == 0


def test_sending_a_datagram_before_the_stream_is_accepted_is_a_typed_local_error() -> None:
    client, server = make_pair()
    sid = client.open_stream(datagrams=True)
    queued = client.bytes_to_send  # the Open
    assert not client.can_send_datagram(sid)
    with pytest.raises(LocalProtocolError) as info:
        client.send_datagram(sid, b"too early")
    assert info.value.code == ErrorCode.STREAM_STATE_ERROR
    assert client.bytes_to_send == queued
    pump(client, server)
    server.accept_stream(sid)
    pump(server, client)
    client.send_datagram(sid, b"now")  # the same stream, once open
    assert pump(client, server) == [DatagramReceived(sid, b"now")]


def test_fin_before_the_stream_is_accepted_is_a_local_error() -> None:
    client, _ = make_pair()
    sid = client.open_stream()
    client.data_to_send()
    with pytest.raises(LocalProtocolError, match="not open"):
        client.send_fin(sid)
    assert client.has_stream(sid)
    assert client.bytes_to_send == 0


def test_an_empty_data_frame_is_accepted_and_yields_no_event() -> None:
    """An empty Data frame is valid (it costs no window): nothing to deliver, the stream stays
    open with its window whole, and the next data still arrives."""
    client, server = make_pair(window=100)
    sid = opened(client, server)
    assert feed(server, m.Data(sid, b"")) == []
    assert server.has_stream(sid)
    assert feed(server, m.Data(sid, b"x" * 100)) == [DataReceived(sid, b"x" * 100)]


@pytest.mark.parametrize("last_fin", ["local", "remote"])
def test_a_stream_finished_both_ways_is_forgotten_and_closing_it_is_a_no_op(
    last_fin: str,
) -> None:
    """Whichever Fin comes last, the stream leaves the table at once, so ``close_stream`` never
    meets a stream finished both ways: it has nothing left to send or to linger on."""
    client, server = make_pair()
    sid = opened(client, server)
    if last_fin == "local":
        server.send_fin(sid)
        assert pump(server, client) == [StreamEnded(sid)]
        client.send_fin(sid)
    else:
        client.send_fin(sid)
        pump(client, server)
        server.send_fin(sid)
        assert pump(server, client) == [StreamEnded(sid)]
    assert not client.has_stream(sid)
    client.data_to_send()
    client.close_stream(sid, now=1.0)
    assert client.lingering == 0
    assert client.bytes_to_send == 0
    assert client.open_streams == 0


def test_multiplexer_decodes_session_frames_only_whatever_decoder_it_is_given() -> None:
    """The handshake's decoder is handed over with its layer: the multiplexer switches it to
    session frames, so a ForwardState at session level is refused by decoding."""
    decoder = FrameDecoder(4096, layer=m.HANDSHAKE)
    server = Multiplexer(Role.SERVER, decoder=decoder)
    assert decoder.layer is m.SESSION
    with remote_error(ErrorCode.UNEXPECTED_MESSAGE):
        server.receive_data(encode_message(m.ForwardState(True)))


# ----------------------------------------------------------------------------- state table

from pytunnel.protocol.streams import (  # noqa: E402
    TRANSITIONS,
    VIOLATIONS,
    StreamEvent,
    StreamState,
    allows,
)

LIVE_STATES = [s for s in StreamState if s is not StreamState.CLOSED]


def test_state_table_as_a_whole() -> None:
    """The rules read from the table: data goes only where that direction is open,
    datagrams wherever the stream is open, a Reset anywhere, and nothing leaves CLOSED."""
    sends = {s for s in StreamState if allows(s, StreamEvent.SEND_DATA)}
    receives = {s for s in StreamState if allows(s, StreamEvent.RECV_DATA)}
    assert sends == {StreamState.OPEN, StreamState.REMOTE_FIN}
    assert receives == {StreamState.OPEN, StreamState.LOCAL_FIN}
    for event in (StreamEvent.SEND_DATAGRAM, StreamEvent.RECV_DATAGRAM, StreamEvent.RECV_WINDOW):
        assert {s for s in StreamState if allows(s, event)} == sends | receives
    for event in (StreamEvent.RECV_RESET, StreamEvent.SEND_RESET):
        assert {s for s in StreamState if allows(s, event)} == set(LIVE_STATES)
    assert not any(state is StreamState.CLOSED for state, _ in TRANSITIONS)
    # every event some state forbids has its error
    for event in StreamEvent:
        if any(not allows(s, event) for s in LIVE_STATES):
            assert event in VIOLATIONS


def _stream_in(state: StreamState) -> tuple[Multiplexer, int]:
    """A multiplexer holding datagram stream ``sid`` in ``state`` (so every frame kind is
    about the state only, never about the stream's kind)."""
    client, server = make_pair()
    if state is StreamState.PENDING:
        sid = client.open_stream(datagrams=True)
        pump(client, server)
        return server, sid
    if state is StreamState.OPENING:
        return client, client.open_stream(datagrams=True)
    sid = opened(client, server, datagrams=True)
    if state is StreamState.LOCAL_FIN:
        client.send_fin(sid)
    elif state is StreamState.REMOTE_FIN:
        server.send_fin(sid)
        pump(server, client)
    return client, sid


RECEIVED = {
    StreamEvent.RECV_ACCEPT: lambda sid: m.Accept(sid, 1000),
    StreamEvent.RECV_REFUSE: lambda sid: m.Refuse(sid, 1),
    StreamEvent.RECV_DATA: lambda sid: m.Data(sid, b"x"),
    StreamEvent.RECV_DATAGRAM: lambda sid: m.Datagram(sid, b"x"),
    StreamEvent.RECV_WINDOW: lambda sid: m.WindowUpdate(sid, 1),
    StreamEvent.RECV_FIN: lambda sid: m.Fin(sid),
    StreamEvent.RECV_RESET: lambda sid: m.Reset(sid, 1),
}


@pytest.mark.parametrize("state", LIVE_STATES, ids=lambda s: s.name)
@pytest.mark.parametrize("event", list(RECEIVED), ids=lambda e: e.name)
def test_received_frame_follows_the_state_table(state: StreamState, event: StreamEvent) -> None:
    mux, sid = _stream_in(state)
    frame = RECEIVED[event](sid)
    if allows(state, event):
        feed(mux, frame)
        assert mux.has_stream(sid) == (TRANSITIONS[state, event] is not StreamState.CLOSED)
    else:
        code, text = VIOLATIONS[event]
        with remote_error(code):
            feed(mux, frame)
        assert mux.error is not None
        assert mux.error.message == text.format(id=sid)


SENT = {
    StreamEvent.SEND_ACCEPT: lambda mux, sid: mux.accept_stream(sid),
    StreamEvent.SEND_REFUSE: lambda mux, sid: mux.refuse_stream(sid, 1),
    StreamEvent.SEND_DATA: lambda mux, sid: mux.send_data(sid, b""),
    StreamEvent.SEND_DATAGRAM: lambda mux, sid: mux.send_datagram(sid, b"x"),
    StreamEvent.SEND_FIN: lambda mux, sid: mux.send_fin(sid),
    StreamEvent.SEND_RESET: lambda mux, sid: mux.reset_stream(sid),
}


@pytest.mark.parametrize("state", LIVE_STATES, ids=lambda s: s.name)
@pytest.mark.parametrize("event", list(SENT), ids=lambda e: e.name)
def test_local_call_follows_the_state_table(state: StreamState, event: StreamEvent) -> None:
    """A forbidden call is a LocalProtocolError that changes nothing: the multiplexer stays
    usable (unlike after the peer's violation)."""
    mux, sid = _stream_in(state)
    if allows(state, event):
        SENT[event](mux, sid)
        assert mux.has_stream(sid) == (TRANSITIONS[state, event] is not StreamState.CLOSED)
    else:
        code, text = VIOLATIONS[event]
        with pytest.raises(LocalProtocolError) as info:
            SENT[event](mux, sid)
        assert (info.value.code, info.value.message) == (code, text.format(id=sid))
        assert mux.has_stream(sid)
        assert mux.error is None


# ----------------------------------------------------------------------------- sticky error


def test_peer_violation_is_sticky() -> None:
    """After a violation nothing more from the peer is processed: not even a valid Ping that
    came in the same chunk, and every later feed raises the same error."""
    _client, server = make_pair()
    with pytest.raises(RemoteProtocolError) as first:
        feed(server, m.Data(99, b"x"), m.Ping(1))  # stream 99 was never opened
    with pytest.raises(RemoteProtocolError) as info:
        server.next_events()  # the Ping behind the violation is not processed
    assert info.value is first.value
    error = server.error
    assert error is not None
    assert error.code == ErrorCode.STREAM_STATE_ERROR
    for call in (
        server.next_events,
        lambda: server.receive_data(encode_message(m.Ping(2))),
        lambda: server.feed(b""),
    ):
        with pytest.raises(RemoteProtocolError) as info:
            call()
        assert info.value is error
    assert server.bytes_to_send == 0  # no Pong for the Ping behind the violation


def test_after_a_violation_streams_are_gone_and_sends_raise_its_code() -> None:
    client, server = make_pair(window=1000)
    sid = opened(client, server)
    with remote_error(ErrorCode.FLOW_CONTROL_ERROR):
        feed(server, m.Data(sid, bytes(1001)))
    error = server.error
    assert error is not None
    assert not server.has_stream(sid)
    assert server.open_streams == 0
    assert server.send_window(sid) == 0
    assert not server.can_send(sid)
    assert not server.can_send_datagram(sid)
    for call in (
        lambda: server.send_data(sid, b"x"),
        lambda: server.send_fin(sid),
        lambda: server.accept_stream(sid),
    ):
        with pytest.raises(LocalProtocolError) as info:
            call()
        assert info.value.code == error.code
        assert info.value.__cause__ is error
    with pytest.raises(LocalProtocolError) as info:
        server.open_stream()
    assert info.value.code == ErrorCode.GOING_AWAY
    # teardown stays possible: these queue nothing and raise nothing
    server.ping(1)
    server.reset_stream(sid)
    server.close_stream(sid)
    server.consumed(sid, 10)
    assert server.bytes_to_send == 0
    server.go_away(error.code, error.message)  # the one frame still sent
    assert sent_frames(server) == [m.GoAway(error.code, error.message)]


def test_local_misuse_is_not_sticky() -> None:
    """A refused call is checked before anything changes, so the multiplexer is not left in
    an inconsistent state and stays usable (h11 needs ERROR for a half-sent message; nothing
    here is ever half-queued)."""
    client, server = make_pair()
    sid = opened(client, server)
    with pytest.raises(LocalProtocolError):
        client.accept_stream(sid)
    assert client.error is None
    client.send_data(sid, b"ok")
    assert received(pump(client, server), sid) == b"ok"


# ----------------------------------------------------------------------------- exact behaviour
# Pinned down by the mutation run (docs/mutation.md): texts, bounds and orderings that the
# tests above exercised without checking exactly.


def test_local_misuse_errors_say_exactly_what_is_wrong() -> None:
    client, server = make_pair(window=10, max_streams=1)
    with pytest.raises(LocalProtocolError) as info:
        client.send_data(9, b"x")
    assert (info.value.code, info.value.message) == (
        ErrorCode.STREAM_STATE_ERROR,
        "stream 9 is not open",
    )
    sid = opened(client, server)
    with pytest.raises(StreamLimitError) as limit:
        client.open_stream()
    assert limit.value.message == "already 1 streams open"
    with pytest.raises(LocalProtocolError) as info:
        client.send_data(sid, bytes(11))
    assert (info.value.code, info.value.message) == (
        ErrorCode.FLOW_CONTROL_ERROR,
        "11 bytes exceed the send window of 10",
    )
    with pytest.raises(LocalProtocolError) as info:
        client.send_datagram(sid, b"x")
    assert (info.value.code, info.value.message) == (
        ErrorCode.STREAM_STATE_ERROR,
        f"stream {sid} is a byte stream, not a datagram stream",
    )
    client.go_away()
    with pytest.raises(LocalProtocolError) as info:
        client.open_stream()
    assert (info.value.code, info.value.message) == (
        ErrorCode.GOING_AWAY,
        "session is going away",
    )


def test_calls_after_a_violation_name_it() -> None:
    _, server = make_pair()
    with remote_error(ErrorCode.STREAM_STATE_ERROR):
        feed(server, m.Data(7, b"x"))
    error = server.error
    assert error is not None
    assert error.message == "frame for unknown stream 7"
    assert str(error) == "[STREAM_STATE_ERROR] frame for unknown stream 7"
    with pytest.raises(LocalProtocolError) as info:
        server.send_data(7, b"x")
    assert info.value.message == (
        "the multiplexer stopped after a protocol violation: frame for unknown stream 7"
    )


def test_a_datagram_of_exactly_the_limit_is_sent() -> None:
    client, server = make_pair()
    sid = opened(client, server, datagrams=True)
    client.send_datagram(sid, bytes(m.MAX_DATAGRAM))
    assert pump(client, server) == [DatagramReceived(sid, bytes(m.MAX_DATAGRAM))]
    with pytest.raises(LocalProtocolError) as info:
        client.send_datagram(sid, bytes(m.MAX_DATAGRAM + 1))
    assert info.value.message == f"datagram of {m.MAX_DATAGRAM + 1} bytes exceeds {m.MAX_DATAGRAM}"


def test_refusal_and_goaway_without_a_message_carry_none() -> None:
    client, server = make_pair()
    sid = client.open_stream()
    pump(client, server)
    server.refuse_stream(sid, ErrorCode.CONNECT_FAILED)
    server.go_away()
    assert pump(server, client) == [
        StreamRefused(sid, ErrorCode.CONNECT_FAILED, ""),
        GoAwayReceived(ErrorCode.NORMAL, ""),
    ]


def test_a_stream_closed_before_it_opened_is_reset_saying_so() -> None:
    client, server = make_pair()
    sid = client.open_stream()
    pump(client, server)
    client.close_stream(sid)
    assert sent_frames(client) == [
        m.Reset(sid, ErrorCode.CANCELLED, "closed before the stream opened")
    ]


def test_a_stream_closed_without_a_time_lingers_from_time_zero() -> None:
    client, server = make_pair()
    sid = opened(client, server)
    client.close_stream(sid)
    assert client.oldest_lingering == 0.0
    assert client.expire_lingering(0.0) == 1


@pytest.mark.parametrize(
    "last",
    ["accept", "data", "datagram", "fin"],
)
def test_a_reset_never_overtakes_a_queued_frame_of_its_own_stream(last: str) -> None:
    """Whatever frame of the stream is still queued (not only its Open), its Reset follows it:
    the peer must not see the stream end before a frame that belongs to it."""
    client, server = make_pair()
    if last == "accept":
        sid = client.open_stream(datagrams=True)
        pump(client, server)
        server.accept_stream(sid)
        frame: Any = m.Accept(sid, server.window)
    else:
        sid = opened(client, server, datagrams=True)
        if last == "data":
            server.send_data(sid, b"x")
            frame = m.Data(sid, b"x")
        elif last == "datagram":
            server.send_datagram(sid, b"x")
            frame = m.Datagram(sid, b"x")
        else:
            server.send_fin(sid)
            frame = m.Fin(sid)
    server.reset_stream(sid)
    assert sent_frames(server) == [frame, m.Reset(sid, ErrorCode.CANCELLED, "")]


def test_window_is_granted_at_half_an_odd_window_rounded_down() -> None:
    client, server = make_pair(window=3)
    sid = opened(client, server)
    client.send_data(sid, b"x")
    pump(client, server)
    server.consumed(sid, 1)
    assert sent_frames(server) == [m.WindowUpdate(sid, 1)]


def test_consuming_nothing_grants_nothing_even_with_a_one_byte_window() -> None:
    client, server = make_pair(window=1)
    sid = opened(client, server)
    server.consumed(sid, 0)
    assert server.bytes_to_send == 0


def test_only_the_reset_itself_counts_as_a_reply_to_data_on_a_closed_stream() -> None:
    """The flood bound counts the reply bytes, not what else is waiting for the transport."""
    client, server = make_pair(max_control_queue=100)
    closed = opened(client, server)
    busy = opened(client, server)
    server.close_stream(closed)
    server.data_to_send()
    server.send_data(busy, bytes(10_000))  # our own data, queued: not a reply
    assert feed(server, m.Data(closed, b"x")) == []
    assert server.error is None


def test_no_frame_larger_than_the_peers_limit_is_queued() -> None:
    """Even a control frame or a reply is checked against the peer's limit (the handshake
    makes it at least 4096, which every control frame fits)."""
    _, server = make_pair(peer_max_frame_size=10)
    with pytest.raises(LocalProtocolError) as info:
        server.open_stream()
    assert info.value.code == ErrorCode.FRAME_TOO_LARGE
    with pytest.raises(LocalProtocolError) as info:
        server.ping(1)
    assert info.value.code == ErrorCode.FRAME_TOO_LARGE
    with pytest.raises(LocalProtocolError) as info:
        feed(server, m.Ping(1))
    assert info.value.code == ErrorCode.FRAME_TOO_LARGE
    assert server.bytes_to_send == 0


def test_a_new_multiplexer_starts_idle_with_its_settings() -> None:
    mux = Multiplexer(Role.SERVER, peer_max_frame_size=60)
    assert mux.role is Role.SERVER
    assert mux.goaway_sent is False
    assert mux.goaway_received is False
    assert mux.frames_pending is False
    # a peer limit with no room for a payload beside the envelope still gets 1-byte chunks
    assert mux.max_data_chunk == 1
    with pytest.raises(ValueError, match=r"^max_streams must be at least 1$"):
        Multiplexer(Role.CLIENT, max_streams=0)


def test_data_is_chunked_to_one_byte_for_a_tiny_peer_limit() -> None:
    client, server = make_pair(peer_max_frame_size=60)
    sid = opened(client, server)
    client.send_data(sid, b"ab")
    assert sent_frames(client) == [m.Data(sid, b"a"), m.Data(sid, b"b")]


def test_peer_violations_say_exactly_what_is_wrong() -> None:
    def message_of(mux: Multiplexer, *frames: Any) -> str:
        with pytest.raises(RemoteProtocolError) as info:
            feed(mux, *frames)
        return info.value.message

    client, server = make_pair()
    sid = opened(client, server)
    assert message_of(client, m.Datagram(sid, b"x")) == (
        f"datagram on stream {sid}, which is a byte stream"
    )
    client, server = make_pair()
    sid = opened(client, server)
    assert message_of(client, m.WindowUpdate(sid, MAX_WINDOW)) == f"window of {sid} overflowed"
    _, server = make_pair()
    assert message_of(server, m.Open(3, 100), m.Open(1, 100)) == (
        "stream id 1 reused or not increasing"
    )


def test_a_window_update_up_to_exactly_the_largest_window_is_allowed() -> None:
    client, server = make_pair(window=MAX_WINDOW - 1, receive_budget=2**34)
    sid = opened(client, server)
    assert feed(client, m.WindowUpdate(sid, 1)) == [WindowOpened(sid)]
    assert client.send_window(sid) == MAX_WINDOW


def test_replies_of_exactly_the_bound_are_not_a_flood() -> None:
    pong = len(encode_message(m.Pong(1)))
    _, server = make_pair(max_control_queue=pong)
    assert feed(server, m.Ping(1)) == [PingReceived(1)]
    server.data_to_send()  # taken: the count starts again from nothing
    assert feed(server, m.Ping(1)) == [PingReceived(1)]
    with remote_error(ErrorCode.FLOOD):
        feed(server, m.Ping(1))
    assert server.error is not None
    assert server.error.message == (
        f"the peer sends requests without reading the replies ({2 * pong} bytes of replies queued)"
    )


def test_a_reset_of_a_stream_with_nothing_queued_overtakes_data_after_one_write() -> None:
    """After exactly one transport write, a stream the peer opened (nothing of it queued yet)
    is still known to have nothing queued: its Reset goes ahead of other streams' data."""
    client, server = make_pair()
    other = opened(client, server)  # the server's Accept was its one write so far
    sid = client.open_stream()
    pump(client, server)
    server.send_data(other, b"x")
    server.reset_stream(sid)
    assert sent_frames(server) == [m.Reset(sid, ErrorCode.CANCELLED, ""), m.Data(other, b"x")]
