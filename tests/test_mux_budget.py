"""The session-wide receive budget of the sans-IO multiplexer: what all streams together may
make us buffer, the floor every stream keeps, and credit returning as buffers drain.

Two multiplexers back to back, no sockets (the real-socket tests are in
``test_session_budget.py``). The sender here always sends everything its windows allow, the
worst a peer can do without breaking the protocol.
"""

from __future__ import annotations

from typing import Any

import pytest
from test_mux import check_budget, make_pair, opened, pump, sent_frames

from pytunnel.errors import ErrorCode, StreamLimitError
from pytunnel.protocol import messages as m
from pytunnel.protocol.mux import (
    DEFAULT_MAX_STREAMS,
    DEFAULT_RECEIVE_BUDGET,
    DEFAULT_WINDOW,
    DataReceived,
    Multiplexer,
    Role,
    StreamEnded,
)

KIB = 1024
MIB = 1024 * KIB


def fill(sender: Multiplexer, receiver: Multiplexer, streams: list[int]) -> int:
    """Send on every stream all its window allows and deliver it; return bytes sent."""
    total = 0
    for sid in streams:
        size = sender.send_window(sid)
        if size:
            sender.send_data(sid, b"x" * size)
            total += size
    events = pump(sender, receiver)
    assert sum(len(e.data) for e in events if isinstance(e, DataReceived)) == total
    return total


def test_defaults_give_each_slot_a_floor_and_share_the_rest() -> None:
    mux = Multiplexer(Role.SERVER)
    assert mux.max_streams == DEFAULT_MAX_STREAMS == 16384
    assert mux.receive_budget == DEFAULT_RECEIVE_BUDGET == 256 * MIB
    assert mux.window_floor == 8 * KIB
    assert mux._pool == 128 * MIB  # 128 streams at a full window at once
    assert mux.receive_committed == mux.bytes_buffered == 0


@pytest.mark.parametrize(
    ("budget", "max_streams", "window", "floor"),
    [
        (64 * MIB, 16384, MIB, 2 * KIB),
        (256 * MIB, 4, MIB, MIB),  # room for every stream's whole window: no sharing
        (100, 1000, MIB, 1),  # never below a byte, so every stream can move
        (8 * MIB, 16, 1000, 1000),  # never above the window
    ],
)
def test_floor(budget: int, max_streams: int, window: int, floor: int) -> None:
    mux = Multiplexer(Role.SERVER, receive_budget=budget, max_streams=max_streams, window=window)
    assert mux.window_floor == floor


def test_budget_must_be_positive() -> None:
    with pytest.raises(ValueError, match="receive_budget"):
        Multiplexer(Role.CLIENT, receive_budget=0)


def test_few_streams_keep_the_whole_window_and_the_half_window_rule() -> None:
    """Far below the budget nothing changes on the wire: a full window at accept, one
    update of half a window once half a window was read."""
    client, server = make_pair()
    sid = opened(client, server)
    assert client.send_window(sid) == DEFAULT_WINDOW
    fill(client, server, [sid])
    server.consumed(sid, DEFAULT_WINDOW // 2 - 1)
    assert sent_frames(server) == []
    server.consumed(sid, 1)
    assert sent_frames(server) == [m.WindowUpdate(sid, DEFAULT_WINDOW // 2)]


def test_streams_that_never_read_cannot_exceed_the_budget() -> None:
    """64 streams of 1 MiB windows could hold 64 MiB; a 4 MiB budget holds 4 MiB."""
    budget = 4 * MIB
    kw: dict[str, Any] = {"receive_budget": budget, "max_streams": 64}
    client, server = make_pair(**kw)
    streams = [opened(client, server) for _ in range(64)]
    sent = fill(client, server, streams)
    # the peer has used every byte it was granted: it is all buffered, none read
    assert sum(client.send_window(s) for s in streams) == 0
    assert server.bytes_buffered == server.receive_committed == sent
    assert sent <= budget
    check_budget(server)
    # the first streams grew to full windows while the pool had room; the last got floors
    assert client.send_window(streams[0]) == 0
    assert server.window_floor == 32 * KIB
    # nothing more can come until the application reads
    assert fill(client, server, streams) == 0


def test_a_stream_opened_while_the_pool_is_held_still_gets_its_floor_and_moves() -> None:
    """The classic pitfall of a connection-wide window: stalled readers hold it all and every
    other stream stops. Here the floor is reserved per slot: 15 streams that were read for a
    while and then stopped hold the whole pool, and a newcomer still moves 1 MiB in
    floor-sized windows while they keep every byte they hold."""
    client, server = make_pair(receive_budget=2 * MIB, max_streams=16)
    floor = server.window_floor
    assert floor == 64 * KIB
    stalled = [opened(client, server) for _ in range(15)]
    for _ in range(6):  # read for a while: the streams grow into the pool...
        fill(client, server, stalled)
        for sid in stalled:
            server.consumed(sid, MIB)
        pump(server, client)
    fill(client, server, stalled)  # ...then stop reading, with every byte of credit used
    assert server._pool - server._extra < floor
    held = server.bytes_buffered
    fresh = opened(client, server)
    assert floor <= client.send_window(fresh) < 2 * floor  # the pool is gone, the floor is not
    moved = 0
    for _ in range(10_000):
        if moved >= MIB:
            break
        size = client.send_window(fresh)
        assert floor <= size < 2 * floor, "the stream stalled, or took from the pool"
        client.send_data(fresh, b"y" * size)
        [event] = pump(client, server)
        assert isinstance(event, DataReceived)
        moved += size
        server.consumed(fresh, size)
        pump(server, client)
        check_budget(server)
    assert moved >= MIB
    assert server.bytes_buffered == held  # the stalled streams' bytes are all still there
    assert server.receive_committed <= 2 * MIB


def test_streams_not_read_yet_hold_at_most_half_the_pool() -> None:
    """Idle streams (opened, never read) take pool credit only from one half of it: a stream
    that is being read still grows to a full window however many idle ones there are."""
    client, server = make_pair(receive_budget=64 * MIB, max_streams=256)
    floor, pool = server.window_floor, server._pool
    assert (floor, pool) == (128 * KIB, 32 * MIB)
    windows = [client.send_window(opened(client, server)) for _ in range(200)]
    assert windows[0] == DEFAULT_WINDOW
    assert windows[-1] == floor
    assert windows == sorted(windows, reverse=True)
    assert server._unproven <= pool // 2
    check_budget(server)
    active = opened(client, server)
    assert client.send_window(active) == floor
    fill(client, server, [active])
    server.consumed(active, floor)
    pump(server, client)
    assert client.send_window(active) == DEFAULT_WINDOW
    check_budget(server)


def test_credit_returns_to_the_pool_as_buffers_drain() -> None:
    client, server = make_pair(receive_budget=4 * MIB, max_streams=16)
    first = [opened(client, server) for _ in range(8)]
    fill(client, server, first)
    late = opened(client, server)
    assert client.send_window(late) == server.window_floor
    # the application reads everything the first streams hold...
    for sid in first:
        server.consumed(sid, MIB)
    pump(server, client)
    for sid in first:  # ...and closes them
        client.close_stream(sid)
        server.close_stream(sid)
        pump(client, server)
        pump(server, client)
    assert server.bytes_buffered == 0
    check_budget(server)
    # the late stream's next grant and a new stream's first are full windows again
    fill(client, server, [late])
    server.consumed(late, server.window_floor)
    pump(server, client)
    assert client.send_window(late) == DEFAULT_WINDOW
    assert client.send_window(opened(client, server)) == DEFAULT_WINDOW


def test_the_pool_is_shared_among_the_streams_that_hold_it() -> None:
    """Streams being read at once each get at most the floor plus the pool divided among
    them, so the pool is spread instead of staying with the first few. Credit already granted
    cannot be taken back, so it spreads as the streams are read: here one more stream gets a
    share each round (each round the streams use and read all they were granted)."""
    client, server = make_pair(receive_budget=16 * MIB, max_streams=64)
    floor, pool = server.window_floor, server._pool
    assert (floor, pool) == (128 * KIB, 8 * MIB)
    streams = [opened(client, server) for _ in range(16)]
    for _ in range(20):
        fill(client, server, streams)
        for sid in streams:
            server.consumed(sid, MIB)
        pump(server, client)
        check_budget(server)
    assert server._holders == 16
    windows = [client.send_window(s) for s in streams]
    assert all(w <= floor + pool // 16 for w in windows), windows
    assert sum(windows) > 8 * MIB  # and together they use it


def test_ended_streams_with_unread_bytes_still_count_until_read() -> None:
    """A stream finished both ways is forgotten, but what the application has not read of
    it is still ours to hold: it counts against the budget and the stream cap."""
    client, server = make_pair(receive_budget=4 * MIB, max_streams=2)
    sid = opened(client, server)
    client.send_data(sid, b"z" * 1000)
    client.send_fin(sid)
    events = pump(client, server)
    assert isinstance(events[-1], StreamEnded)
    server.send_fin(sid)  # both Fins: the stream is gone from the table
    pump(server, client)
    assert not server.has_stream(sid)
    assert server.bytes_buffered == 1000
    assert server.open_streams == 1
    opened(client, server)
    with pytest.raises(StreamLimitError):
        server.open_stream()
    assert not server.consumed(sid, 999)
    assert server.consumed(sid, 1)  # the last byte: the slot is free
    assert server.open_streams == 1
    assert server.bytes_buffered == 0
    check_budget(server)


@pytest.mark.parametrize("how", ["close", "reset"])
def test_dropping_an_ended_stream_frees_its_bytes(how: str) -> None:
    client, server = make_pair(max_streams=1)
    sid = opened(client, server)
    client.send_data(sid, b"z" * 10)
    client.send_fin(sid)
    pump(client, server)
    server.send_fin(sid)
    assert server.open_streams == 1
    if how == "close":
        server.close_stream(sid)
    else:
        server.reset_stream(sid, ErrorCode.CANCELLED)
    assert server.open_streams == server.bytes_buffered == 0
    check_budget(server)


def test_a_reset_drops_the_stream_s_bytes_from_the_budget() -> None:
    client, server = make_pair(receive_budget=MIB, max_streams=4)
    sid = opened(client, server)
    fill(client, server, [sid])
    assert server.bytes_buffered > 0
    client.reset_stream(sid, ErrorCode.CANCELLED)
    pump(client, server)
    assert server.bytes_buffered == server.receive_committed == 0
    check_budget(server)


def test_refused_streams_take_no_credit() -> None:
    client, server = make_pair(receive_budget=MIB, max_streams=4)
    sid = client.open_stream()
    pump(client, server)
    server.refuse_stream(sid, ErrorCode.DIAL_FAILED)
    pump(server, client)
    assert server.receive_committed == 0
    assert client.receive_committed == 0  # the opener's own window went back too
    check_budget(client)
    check_budget(server)


def test_data_after_our_close_is_not_counted() -> None:
    client, server = make_pair(receive_budget=MIB, max_streams=4)
    sid = opened(client, server)
    server.close_stream(sid)  # we are done; the peer still writes
    pump(server, client)
    client.send_data(sid, b"late")
    pump(client, server)
    assert server.bytes_buffered == server.receive_committed == 0
    check_budget(server)
