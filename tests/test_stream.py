"""MuxStream on its own: it needs nothing from a session but the ``StreamCarrier`` interface.

The carrier here is a complete (if trivial) one, not a mock: two streams wired back to back with
an unlimited window, so every test exercises the stream's own half of the contract.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from pytunnel.errors import ErrorCode, StreamResetError
from pytunnel.session import MuxStream

pytestmark = pytest.mark.timeout(30)


class _BackToBack:
    """Carries what one stream sends straight into the other stream (same id on both)."""

    max_data_chunk = 4

    def __init__(self) -> None:
        self.peer: MuxStream | None = None
        self.credited = 0
        self.datagrams: list[bytes] = []

    def _to(self) -> MuxStream:
        assert self.peer is not None
        return self.peer

    def send_window(self, stream_id: int) -> int:
        return 1 << 30

    def has_room(self, size: int) -> bool:
        return True

    async def wait_for_room(self, size: int) -> None:  # pragma: no cover - always has room
        raise AssertionError("never out of room")

    def send_data(self, stream_id: int, data: memoryview) -> None:
        self._to().deliver_data(bytes(data))

    def send_data_nowait(self, stream_id: int, data: bytes | bytearray | memoryview) -> int:
        with memoryview(data) as view:
            for start in range(0, len(view), self.max_data_chunk):
                self.send_data(stream_id, view[start : start + self.max_data_chunk])
        return len(data)

    def send_fin(self, stream_id: int) -> None:
        self._to().deliver_eof()

    def send_datagram(self, stream_id: int, data: bytes | bytearray | memoryview) -> bool:
        self._to().deliver_datagram(bytes(data))
        return True

    def consumed(self, stream_id: int, size: int) -> None:
        self.credited += size

    def close_stream(self, stream_id: int, *, abort: bool) -> None:
        if abort:
            self.reset_stream(stream_id, ErrorCode.CANCELLED, "closed with unread data")
        else:
            self._to().deliver_eof()

    def reset_stream(self, stream_id: int, code: int, message: str) -> None:
        self._to().break_with(StreamResetError(message, code=code))


def _pair(*, datagrams: bool = False) -> tuple[MuxStream, _BackToBack, MuxStream, _BackToBack]:
    carry_a, carry_b = _BackToBack(), _BackToBack()
    a = MuxStream(carry_a, 1, "example", 80, datagrams=datagrams)
    b = MuxStream(carry_b, 1, "example", 80, datagrams=datagrams)
    carry_a.peer, carry_b.peer = b, a
    return a, carry_a, b, carry_b


async def test_a_stream_runs_over_any_carrier_in_data_frame_sized_pieces() -> None:
    a, _, b, carry_b = _pair()
    await a.send_all(b"0123456789")  # max_data_chunk 4: three Data payloads
    assert b.bytes_buffered == 10
    assert list(b._buffer) == [b"0123", b"4567", b"89"]
    await a.send_eof()
    got = b""
    while chunk := await b.receive_some(3):
        got += chunk
    assert got == b"0123456789"
    assert carry_b.credited == 10  # every byte read is credited back, and only once
    assert b.bytes_buffered == 0
    await b.send_all(b"back")
    assert await a.receive_some() == b"back"


async def test_a_reset_reaches_the_peer_through_the_carrier_with_its_code() -> None:
    a, _, b, _ = _pair()
    a.reset(ErrorCode.IDLE_TIMEOUT, "idle")
    with pytest.raises(trio.BrokenResourceError) as info:
        await b.receive_some()
    assert isinstance(info.value.__cause__, StreamResetError)
    assert info.value.__cause__.code == ErrorCode.IDLE_TIMEOUT
    with pytest.raises(trio.ClosedResourceError):
        await a.send_all(b"x")


async def test_closing_with_unread_data_asks_the_carrier_to_abort() -> None:
    a, _, b, _ = _pair()
    await b.send_all(b"unread")
    await a.aclose()
    with pytest.raises(trio.BrokenResourceError):
        await b.send_all(b"x")


async def test_session_end_wakes_a_parked_reader_with_the_right_error() -> None:
    """Closed by us: ``ClosedResourceError``; by the peer: ``BrokenResourceError`` with the
    reason; a peer that had finished: what it sent stays readable, then ``b""``."""
    reason = trio.BrokenResourceError("transport lost")

    async def read(stream: MuxStream, into: list[BaseException]) -> None:
        try:
            await stream.receive_some()
        except (trio.ClosedResourceError, trio.BrokenResourceError) as exc:
            into.append(exc)

    for locally, expected in ((True, trio.ClosedResourceError), (False, trio.BrokenResourceError)):
        a, _, _, _ = _pair()
        caught: list[BaseException] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read, a, caught)
            await trio.testing.wait_all_tasks_blocked()
            a.session_ended(reason, locally=locally)
        assert [type(exc) for exc in caught] == [expected]
        if not locally:
            assert caught[0].__cause__ is reason
    a, _, b, _ = _pair()
    await b.send_all(b"last words")
    await b.send_eof()
    a.session_ended(reason, locally=False)
    got = b""
    while chunk := await a.receive_some():
        got += chunk
    assert got == b"last words"
    with pytest.raises(trio.BrokenResourceError):
        await a.send_all(b"x")


async def test_datagrams_go_through_the_carrier_outside_the_byte_stream() -> None:
    a, _, b, _ = _pair(datagrams=True)
    assert a.send_datagram(b"one")
    assert await b.receive_datagram() == b"one"
    assert b.bytes_buffered == 0
    assert a.datagrams_sent == 1
    assert b.datagrams_received == 1
