"""Early data (protocol version 2) in the sans-IO multiplexer: data after Open, before Accept.

Two multiplexers back to back, no sockets: the opener's window before and after the Accept,
the acceptor's budget, refusals dropping what was parked, a deferred Fin, and the violations
(too much early data, data before Accept from a version 1 peer, an Accept smaller than what
was already sent).
"""

from __future__ import annotations

from typing import Any

import pytest
from test_mux import check_budget, pump, sent_frames

from pytunnel.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from pytunnel.protocol import messages as m
from pytunnel.protocol.frames import encode_message
from pytunnel.protocol.mux import (
    DataReceived,
    Multiplexer,
    Role,
    StreamAccepted,
    StreamEnded,
    StreamOpened,
    StreamRefused,
    window_floor,
)
from pytunnel.protocol.streams import (
    TRANSITIONS,
    V2_TRANSITIONS,
    StreamEvent,
    StreamState,
    table_for,
)

EARLY = 4096
WINDOW = 65536


def v2_pair(**kw: Any) -> tuple[Multiplexer, Multiplexer]:
    """A client and a server that both announced ``EARLY`` (within their floor)."""
    kw.setdefault("window", WINDOW)
    kw.setdefault("receive_budget", 2 * 64 * WINDOW)
    kw.setdefault("max_streams", 64)
    args = dict(version=2, early_window=EARLY, peer_early_window=EARLY, **kw)
    return Multiplexer(Role.CLIENT, **args), Multiplexer(Role.SERVER, **args)


def test_the_table_allows_early_data_only_from_version_2() -> None:
    early = [
        (StreamState.OPENING, StreamEvent.SEND_DATA),
        (StreamState.PENDING, StreamEvent.RECV_DATA),
    ]
    assert not any(pair in TRANSITIONS for pair in early)
    assert all(V2_TRANSITIONS[pair] is pair[0] for pair in early)  # the state does not change
    assert set(V2_TRANSITIONS) - set(TRANSITIONS) == set(early)
    assert table_for(1) is TRANSITIONS
    assert table_for(2) is V2_TRANSITIONS


def test_data_sent_right_after_open_is_delivered_before_the_accept_in_order() -> None:
    client, server = v2_pair()
    sid = client.open_stream("target", 80)
    assert client.send_window(sid) == EARLY
    client.send_data(sid, b"a" * 1000)
    client.send_data(sid, b"b" * 3096)
    assert client.send_window(sid) == 0
    events = pump(client, server)
    assert events[0] == StreamOpened(sid, "target", 80, 0)
    assert b"".join(e.data for e in events[1:] if isinstance(e, DataReceived)) == (
        b"a" * 1000 + b"b" * 3096
    )
    assert server.bytes_buffered == EARLY
    check_budget(server)
    server.accept_stream(sid)
    assert pump(server, client) == [StreamAccepted(sid)]
    # the Accept's window counts from the start of the stream: the early bytes are in it
    assert client.send_window(sid) + EARLY == server._streams[sid].recv_window + EARLY
    assert server.consumed(sid, EARLY) is False
    check_budget(server)
    client.send_data(sid, b"c" * client.send_window(sid))  # all of the window is usable
    pump(client, server)
    check_budget(server)


def test_data_in_flight_when_the_accept_is_sent_is_counted_once() -> None:
    """The acceptor answers after half the early bytes; the rest crosses its Accept."""
    client, server = v2_pair()
    sid = client.open_stream()
    client.send_data(sid, b"x" * 2000)
    pump(client, server)
    server.accept_stream(sid)
    accept = server.data_to_send()
    client.send_data(sid, b"y" * 2096)  # still before the Accept arrives
    assert [type(e) for e in server.receive_data(client.data_to_send())] == [DataReceived]
    client.receive_data(accept)
    window = client.send_window(sid)
    assert window == server._streams[sid].recv_window  # both ends agree
    client.send_data(sid, b"z" * window)
    pump(client, server)  # exactly the window: no violation
    assert server._streams[sid].recv_window == 0
    check_budget(server)


def test_the_opener_cannot_send_more_than_the_early_window_before_the_accept() -> None:
    client, _ = v2_pair()
    sid = client.open_stream()
    with pytest.raises(LocalProtocolError) as info:
        client.send_data(sid, b"x" * (EARLY + 1))
    assert info.value.code == ErrorCode.FLOW_CONTROL_ERROR


def test_a_peer_exceeding_the_early_window_is_a_flow_control_error() -> None:
    _, server = v2_pair()
    frames = encode_message(m.Open(1, WINDOW)) + encode_message(m.Data(1, b"x" * EARLY))
    server.receive_data(frames)
    with pytest.raises(RemoteProtocolError) as info:
        server.receive_data(encode_message(m.Data(1, b"!")))
    assert info.value.code == ErrorCode.FLOW_CONTROL_ERROR
    assert server.error is info.value  # sticky: the session ends
    assert server.bytes_buffered == 0


def test_an_acceptor_that_announced_no_early_window_takes_no_early_data() -> None:
    server = Multiplexer(Role.SERVER, version=2, early_window=0)
    with pytest.raises(RemoteProtocolError) as info:
        server.receive_data(encode_message(m.Open(1, WINDOW)) + encode_message(m.Data(1, b"x")))
    assert info.value.code == ErrorCode.FLOW_CONTROL_ERROR


def test_data_before_accept_from_a_version_1_peer_is_still_a_state_error() -> None:
    server = Multiplexer(Role.SERVER, version=1, early_window=EARLY)
    assert server.early_window == 0  # a version 1 session has no early data at all
    with pytest.raises(RemoteProtocolError) as info:
        server.receive_data(encode_message(m.Open(1, WINDOW)) + encode_message(m.Data(1, b"x")))
    assert info.value.code == ErrorCode.STREAM_STATE_ERROR


def test_a_version_1_opener_waits_for_the_accept_as_before() -> None:
    client = Multiplexer(Role.CLIENT, version=1, peer_early_window=EARLY)
    sid = client.open_stream()
    assert client.send_window(sid) == 0
    with pytest.raises(LocalProtocolError) as info:
        client.send_data(sid, b"x")
    assert info.value.code == ErrorCode.STREAM_STATE_ERROR
    assert [type(f) for f in sent_frames(client)] == [m.Open]


def test_a_refusal_drops_the_early_data_and_what_is_still_in_flight() -> None:
    client, server = v2_pair()
    sid = client.open_stream()
    client.send_data(sid, b"x" * 3000)
    pump(client, server)
    assert server.bytes_buffered == 3000
    server.refuse_stream(sid, ErrorCode.NODE_TIMEOUT, "no answer")
    assert server.bytes_buffered == 0
    assert server.receive_committed == 0
    check_budget(server)
    refusal = server.data_to_send()
    client.send_data(sid, b"y" * 1096)  # crosses the Refuse
    assert server.receive_data(client.data_to_send()) == []  # dropped, no error
    assert client.receive_data(refusal) == [StreamRefused(sid, ErrorCode.NODE_TIMEOUT, "no answer")]
    assert not client.has_stream(sid)
    assert client.open_streams == 0
    assert server.bytes_buffered == 0
    assert server.open_streams == 0


def test_a_fin_before_the_accept_waits_for_it() -> None:
    """The acceptor never sees a Fin on a stream it has not answered."""
    client, server = v2_pair()
    sid = client.open_stream()
    client.send_data(sid, b"request")
    client.send_fin(sid)
    assert client.send_window(sid) == 0
    assert not client.can_send(sid)
    with pytest.raises(LocalProtocolError):
        client.send_data(sid, b"more")
    assert [type(f) for f in sent_frames(client)] == [m.Open, m.Data]
    client.send_fin(sid)  # idempotent
    # deliver the Open and Data again (sent_frames took them)
    server.receive_data(encode_message(m.Open(sid, client.window)))
    server.receive_data(encode_message(m.Data(sid, b"request")))
    server.accept_stream(sid)
    assert pump(server, client) == [StreamAccepted(sid)]
    assert [type(f) for f in sent_frames(client)] == [m.Fin]


def test_the_deferred_fin_reaches_the_acceptor_after_the_data() -> None:
    client, server = v2_pair()
    sid = client.open_stream()
    client.send_data(sid, b"request")
    client.send_fin(sid)
    pump(client, server)
    server.accept_stream(sid)
    pump(server, client)
    events = pump(client, server)
    assert events == [StreamEnded(sid)]


def test_an_accept_below_the_early_data_sent_is_a_flow_control_error() -> None:
    client, _ = v2_pair()
    sid = client.open_stream()
    client.send_data(sid, b"x" * 100)
    client.data_to_send()
    with pytest.raises(RemoteProtocolError) as info:
        client.receive_data(encode_message(m.Accept(sid, 99)))
    assert info.value.code == ErrorCode.FLOW_CONTROL_ERROR


def test_pending_streams_full_of_early_data_stay_inside_the_budget() -> None:
    """However many streams a peer opens and fills without an answer, each holds at most its
    floor: the receive budget holds."""
    streams = 16
    server = Multiplexer(
        Role.SERVER,
        version=2,
        window=WINDOW,
        receive_budget=streams * EARLY * 2,
        max_streams=streams,
        early_window=EARLY,
    )
    assert server.window_floor == EARLY == window_floor(WINDOW, streams * EARLY * 2, streams)
    for i in range(streams):
        sid = 2 * i + 1
        server.receive_data(
            encode_message(m.Open(sid, WINDOW)) + encode_message(m.Data(sid, b"x" * EARLY))
        )
        check_budget(server)
    assert server.receive_committed == streams * EARLY <= server.receive_budget


def test_an_early_window_above_the_floor_is_refused_locally() -> None:
    with pytest.raises(ValueError, match="early_window"):
        Multiplexer(Role.SERVER, version=2, receive_budget=1000, max_streams=10, early_window=51)


def test_a_datagram_stream_gets_no_early_window() -> None:
    client, server = v2_pair()
    sid = client.open_stream(datagrams=True)
    assert client.send_window(sid) == 0
    pump(client, server)
    with pytest.raises(RemoteProtocolError) as info:
        server.receive_data(encode_message(m.Data(sid, b"x")))
    assert info.value.code == ErrorCode.FLOW_CONTROL_ERROR


def test_early_data_after_an_automatic_refusal_is_dropped() -> None:
    """An Open refused at the stream limit took no credit; its early data is dropped."""
    server = Multiplexer(Role.SERVER, version=2, max_streams=1, early_window=1)
    server.receive_data(encode_message(m.Open(1, WINDOW)))
    events = server.receive_data(
        encode_message(m.Open(3, WINDOW)) + encode_message(m.Data(3, b"x"))
    )
    assert events == []
    assert [type(f) for f in sent_frames(server)] == [m.Refuse]
    assert server.bytes_buffered == 0
    assert server.open_streams == 1


def test_early_data_consumed_before_the_accept_grants_no_window() -> None:
    """A window update before the Accept would be a state error at the opener."""
    client, server = v2_pair()
    sid = client.open_stream()
    client.send_data(sid, b"x" * EARLY)
    pump(client, server)
    server.consumed(sid, EARLY)
    assert server.data_to_send() == b""
    server.accept_stream(sid)
    assert pump(server, client) == [StreamAccepted(sid)]
    assert client.send_window(sid) == server._streams[sid].recv_window
    check_budget(server)
