"""EXPERIMENT (bench only, not part of the library): a fast path for Data frames.

Monkeypatches, reversibly, the two per-frame hot spots found by profiling the single-stream
session benchmark, to measure what they cost:

* ``Multiplexer.send_data`` -- instead of ``Data(...)`` -> cattrs ``unstructure`` -> ``packb``
  -> ``header + body`` -> ``self._out += frame`` (four copies of the payload plus an attrs
  object and a cattrs dispatch per frame), write the frame header and the msgpack envelope by
  hand and copy the payload once, straight from the caller's memoryview into ``self._out``.
  The bytes on the wire are identical to ``encode_message(Data(...))`` (checked by
  :func:`self_check`).
* ``FrameDecoder._next`` -- recognise the exact envelope that ``encode_message`` produces for a
  Data frame (``{"stream": uint, "data": bin, "t": "data"}`` in that order) and build the
  ``Data`` with one slice copy, skipping ``unpackb`` + cattrs ``structure``; any other byte
  layout (another key order, a different message, anything malformed) falls back to the
  generic ``decode_body``, so strictness is unchanged. The stream id is still range-checked by
  ``Data``'s attrs validator. The decoder also stops copying every read into one growing
  ``bytearray``: it parses frames in place in the ``bytes`` the transport returned and copies
  only a frame that straddles two reads. A Data payload is copied exactly once (into the
  ``bytes`` handed to the application), where the stock path copies it three times
  (``+=`` into the buffer, ``unpackb``'s ``bin``, and the front-deletion memmoves).

A second, separate experiment, ``install_inline_write()``, removes one task hop per write:
when the session's writer task is idle, ``Session._kick_writer`` (called by ``send_all`` after
queueing frames) tries one *non-blocking* ``send()`` of the queued frames straight on the socket
(trio ``SocketStream`` only) and leaves
whatever the kernel did not take (and every later frame) to the writer task as before. It never
blocks and never awaits, so cancellation semantics are unchanged; frame order is preserved
because it only runs while the writer is parked with nothing in flight.

Use ``install()`` / ``uninstall()``, or ``bench_session.py --fastpath`` / ``--inline-write``,
which add the patched session cases next to the unpatched ones in the same run.
"""

from __future__ import annotations

from typing import Any

import msgpack

from pytunnel.errors import ErrorCode, LocalProtocolError
from pytunnel.protocol import frames as _frames
from pytunnel.protocol import mux as _mux
from pytunnel.protocol.frames import HEADER_SIZE, FrameDecoder, decode_body, encode_message
from pytunnel.protocol.messages import Data, Message

_packb = msgpack.packb
_MAP3_STREAM = b"\x83\xa6stream"
_KEY_DATA = b"\xa4data"
_TAIL = b"\xa1t\xa4data"
_original: dict[str, Any] = {}


def _bin_header(n: int) -> bytes:
    if n < 0x100:
        return b"\xc4" + n.to_bytes(1, "big")
    if n < 0x10000:
        return b"\xc5" + n.to_bytes(2, "big")
    return b"\xc6" + n.to_bytes(4, "big")


def _uint(n: int) -> bytes:
    if n < 0x80:
        return n.to_bytes(1, "big")
    if n < 0x100:
        return b"\xcc" + n.to_bytes(1, "big")
    if n < 0x10000:
        return b"\xcd" + n.to_bytes(2, "big")
    return b"\xce" + n.to_bytes(4, "big")


def send_data(self: Any, stream_id: int, data: bytes | bytearray | memoryview) -> None:
    st = self._get(stream_id)
    if st.phase is not _mux._Phase.OPEN or st.local_fin:
        raise LocalProtocolError(
            f"stream {stream_id} is not open for sending", code=ErrorCode.STREAM_STATE_ERROR
        )
    size = len(data)
    if size > st.send_window:
        raise LocalProtocolError(
            f"{size} bytes exceed the send window of {st.send_window}",
            code=ErrorCode.FLOW_CONTROL_ERROR,
        )
    st.send_window -= size
    chunk = self.max_data_chunk
    out = self._out
    prefix = _MAP3_STREAM + _uint(stream_id) + _KEY_DATA
    limit = self._peer_max_frame_size
    view = memoryview(data)
    start = 0
    while True:  # bounded: advances by chunk >= 1 each turn, at least one frame (size 0 too)
        piece = view[start : start + chunk]
        n = len(piece)
        head = prefix + _bin_header(n)
        body_len = len(head) + n + len(_TAIL)
        if body_len > limit:
            raise LocalProtocolError(
                f"Data frame of {body_len} bytes exceeds the limit of {limit}",
                code=ErrorCode.FRAME_TOO_LARGE,
            )
        out += body_len.to_bytes(HEADER_SIZE, "big")
        out += head
        out += piece
        out += _TAIL
        start += chunk
        if start >= size:
            break


def _parse_data(buf: bytes | bytearray, start: int, end: int) -> Data | None:
    """The Data message if buf[start:end] is exactly our canonical Data body, else None."""
    p = start
    if buf[p : p + 8] != _MAP3_STREAM:
        return None
    p += 8
    if p >= end:
        return None
    b = buf[p]
    if b < 0x80:
        stream, p = b, p + 1
    elif b == 0xCC:
        stream, p = buf[p + 1], p + 2
    elif b == 0xCD:
        stream, p = int.from_bytes(buf[p + 1 : p + 3], "big"), p + 3
    elif b == 0xCE:
        stream, p = int.from_bytes(buf[p + 1 : p + 5], "big"), p + 5
    else:
        return None
    if buf[p : p + 5] != _KEY_DATA:
        return None
    p += 5
    if p >= end:
        return None
    b = buf[p]
    if b == 0xC4:
        n, p = buf[p + 1], p + 2
    elif b == 0xC5:
        n, p = int.from_bytes(buf[p + 1 : p + 3], "big"), p + 3
    elif b == 0xC6:
        n, p = int.from_bytes(buf[p + 1 : p + 5], "big"), p + 5
    else:
        return None
    if p + n + len(_TAIL) != end or buf[p + n : end] != _TAIL:
        return None
    if not 1 <= stream <= 2**32 - 1:
        return None  # let the generic path produce the precise error
    if type(buf) is bytes:
        payload = buf[p : p + n]  # one copy
    else:
        with memoryview(buf) as view, view[p : p + n] as piece:
            payload = bytes(piece)  # one copy
    return Data(stream, payload)


def _decode(buf: bytes | bytearray, start: int, end: int) -> Message:
    message = _parse_data(buf, start, end)
    if message is None:
        with memoryview(buf) as view, view[start:end] as body:
            message = decode_body(body)
    return message


# Copy-minimal decoder state (set on the FrameDecoder instance by the patched methods):
#   _fp_src      the last chunk handed to receive_data (bytes, never copied)
#   _fp_pos      how far into _fp_src we have parsed
#   _fp_pending  bytes of a frame that straddles two reads (the only bytes ever copied)


def receive_data(self: Any, data: bytes | bytearray | memoryview) -> None:
    if self._eof:
        raise LocalProtocolError("data received after end of stream")
    if not data:
        self._eof = True
        return
    if self._error is not None:
        return
    src = getattr(self, "_fp_src", b"")
    pos = getattr(self, "_fp_pos", 0)
    pending = getattr(self, "_fp_pending", None)
    if pending is None:
        pending = self._fp_pending = bytearray()
    if pos < len(src):  # rare: the caller did not take every message out; join everything
        self._fp_src = bytes(pending) + src[pos:] + bytes(data)
        self._fp_pending = bytearray()
    else:
        self._fp_src = data if type(data) is bytes else bytes(data)
    self._fp_pos = 0


def _frame_size(self: Any, header: bytes | bytearray) -> int:
    size = int.from_bytes(header, "big")
    if size > self._max_frame_size:
        raise _frames.RemoteProtocolError(
            f"frame of {size} bytes exceeds the limit of {self._max_frame_size}",
            code=ErrorCode.FRAME_TOO_LARGE,
        )
    return size


def _take(self: Any, pending: bytearray, want: int) -> int:
    """Move up to ``want`` bytes from the current read into ``pending``; return how many."""
    src, pos = self._fp_src, self._fp_pos
    take = min(want, len(src) - pos)
    if take > 0:
        with memoryview(src) as view, view[pos : pos + take] as piece:
            pending += piece
        self._fp_pos = pos + take
    return max(take, 0)


def _next(self: Any) -> Message | None:
    src: bytes = getattr(self, "_fp_src", b"")
    pos: int = getattr(self, "_fp_pos", 0)
    pending: bytearray | None = getattr(self, "_fp_pending", None)
    if pending is None:
        pending = self._fp_pending = bytearray()
    if pending:  # finish the frame that straddles reads
        if len(pending) < HEADER_SIZE:
            _take(self, pending, HEADER_SIZE - len(pending))
        if len(pending) >= HEADER_SIZE:
            size = _frame_size(self, pending[:HEADER_SIZE])
            need = HEADER_SIZE + size - len(pending)
            if _take(self, pending, need) == need:
                self._fp_pending = bytearray()
                return _decode(pending, HEADER_SIZE, HEADER_SIZE + size)
    else:
        avail = len(src) - pos
        if avail >= HEADER_SIZE:
            size = _frame_size(self, src[pos : pos + HEADER_SIZE])
            end = pos + HEADER_SIZE + size
            if end <= len(src):
                self._fp_pos = end
                return _decode(src, pos + HEADER_SIZE, end)
        if avail > 0:
            _take(self, pending, avail)
    if self._eof and pending:
        raise _frames.RemoteProtocolError(
            f"connection closed in the middle of a frame ({len(pending)} bytes pending)",
            code=ErrorCode.TRUNCATED_FRAME,
        )
    return None


def _buffered(self: Any) -> int:
    pending = getattr(self, "_fp_pending", None) or b""
    return len(pending) + len(getattr(self, "_fp_src", b"")) - getattr(self, "_fp_pos", 0)


def install(encode: bool = True, decode: bool = True) -> None:
    if _original:
        return
    _original["send_data"] = _mux.Multiplexer.send_data
    _original["receive_data"] = FrameDecoder.receive_data
    _original["_next"] = FrameDecoder._next
    _original["buffered"] = FrameDecoder.buffered
    if encode:
        _mux.Multiplexer.send_data = send_data  # type: ignore[method-assign]
    if decode:
        FrameDecoder.receive_data = receive_data  # type: ignore[method-assign]
        FrameDecoder._next = _next  # type: ignore[method-assign]
        FrameDecoder.buffered = property(_buffered)  # type: ignore[assignment,method-assign]


def uninstall() -> None:
    if not _original:
        return
    _mux.Multiplexer.send_data = _original["send_data"]  # type: ignore[method-assign]
    FrameDecoder.receive_data = _original["receive_data"]  # type: ignore[method-assign]
    FrameDecoder._next = _original["_next"]  # type: ignore[method-assign]
    FrameDecoder.buffered = _original["buffered"]  # type: ignore[method-assign]
    _original.clear()


# --------------------------------------------------------------------------- inline write


def _kick_writer(self: Any) -> None:
    """Try to hand queued frames to the kernel right now; the writer task does the rest.

    Only while the writer task is parked with nothing in flight (not inside
    ``transport.send_all`` and not already woken), so frame order is preserved.
    """
    if not getattr(self, "_writing", True) and not self._write_event.is_set() and not self.closed:
        raw = getattr(getattr(self._transport, "socket", None), "_sock", None)
        mux = self._mux
        if raw is not None and mux.bytes_to_send:
            data = mux.data_to_send()
            try:
                sent = raw.send(data)
            except OSError:  # incl. BlockingIOError; the writer task reports real errors
                sent = 0
            if sent:
                self.bytes_written += sent
            if sent < len(data):
                with memoryview(data) as view, view[sent:] as rest:
                    mux._out[:0] = rest  # back to the front of the queue, before newer frames
            else:
                self._drain_lot.unpark_all()
            if not mux.bytes_to_send:
                return
    self._write_event.set()


_original_inline: dict[str, Any] = {}


def install_inline_write() -> None:
    from pytunnel import _session

    if _original_inline:
        return
    _original_inline["_kick_writer"] = _session.Session._kick_writer
    _session.Session._kick_writer = _kick_writer  # type: ignore[method-assign]


def uninstall_inline_write() -> None:
    from pytunnel import _session

    if not _original_inline:
        return
    _session.Session._kick_writer = _original_inline.pop("_kick_writer")  # type: ignore[method-assign]


# --------------------------------------------------------------------------- batching writer

#: Stop collecting once this much is queued (keep it <= write_buffer_high: senders park above it).
BATCH_TARGET = 256 * 1024
#: At most this many extra scheduling rounds per transport write.
BATCH_ROUNDS = 8


async def _batching_writer(self: Any) -> None:
    """Session._writer (as in src at the time of writing), plus: before taking the queued
    frames, yield to the scheduler while that lets producers queue more, up to BATCH_TARGET
    bytes or BATCH_ROUNDS rounds. One send()/recv() then carries several frames instead of
    about one, which is what the single-stream loopback case lacks. If a round adds nothing
    (producers idle or parked) the frames go out at once, so the added latency is one
    scheduling round at most when the session is quiet."""
    import trio

    mux = self._mux
    transport = self._transport
    with self._writer_scope:
        try:
            while True:
                if not mux.bytes_to_send:
                    self._drain_lot.unpark_all()
                    self._write_event = trio.Event()
                    await self._write_event.wait()
                    continue
                for _ in range(BATCH_ROUNDS):
                    before = mux.bytes_to_send
                    if before >= BATCH_TARGET:
                        break
                    await trio.lowlevel.cancel_shielded_checkpoint()
                    if mux.bytes_to_send == before:
                        break
                data = mux.data_to_send()
                self._drain_lot.unpark_all()
                self._writing = True
                try:
                    await transport.send_all(data)
                finally:
                    self._writing = False
                self.bytes_written += len(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._terminate(exc)


_original_batch: dict[str, Any] = {}


def install_batching_writer() -> None:
    from pytunnel import _session

    if _original_batch:
        return
    _original_batch["_writer"] = _session.Session._writer
    _session.Session._writer = _batching_writer  # type: ignore[method-assign]


def uninstall_batching_writer() -> None:
    from pytunnel import _session

    if not _original_batch:
        return
    _session.Session._writer = _original_batch.pop("_writer")  # type: ignore[method-assign]


def self_check() -> None:
    """Fast encode == encode_message byte for byte; fast decode == generic decode."""
    import random

    from pytunnel.protocol.messages import Fin, WindowUpdate

    rng = random.Random(1)
    sizes = [0, 1, 255, 256, 65535, 65536, 65537, 200_000]
    ids = [1, 2, 127, 128, 255, 256, 65535, 65536, 2**32 - 1]
    for sid in ids:
        for n in sizes:
            payload = rng.randbytes(n)
            m = _mux.Multiplexer(_mux.Role.CLIENT, max_data_chunk=65536)
            st = _mux._Stream(sid, _mux._Phase.OPEN, 10**9, 10**6)
            m._streams[sid] = st
            m._out = bytearray()
            send_data(m, sid, payload)
            fast = bytes(m._out)
            expect = b"".join(
                encode_message(Data(sid, payload[i : i + 65536]), m._peer_max_frame_size)
                for i in range(0, max(n, 1), 65536)
            )
            assert fast == expect, (sid, n)
    # decoding: canonical frames, other messages, a reordered map, split at every few bytes
    stream = bytearray()
    msgs: list[Message] = []
    for sid in ids:
        for n in (0, 3, 300, 70000):
            msgs.append(Data(sid, rng.randbytes(n)))
    msgs += [WindowUpdate(5, 1000), Fin(3)]
    for msg in msgs:
        stream += encode_message(msg)
    reordered = _packb({"t": "data", "data": b"abc", "stream": 9})
    stream += len(reordered).to_bytes(4, "big") + reordered
    msgs.append(Data(9, b"abc"))
    bad_tail = [
        b"",  # clean end
        (5).to_bytes(4, "big") + b"\x83\xa6str",  # truncated frame at EOF
        (3).to_bytes(4, "big") + b"\xc1\xc1\xc1",  # not msgpack -> generic path's error
        (2**21).to_bytes(4, "big"),  # over max_frame_size
        (0).to_bytes(4, "big"),  # empty body
    ]

    def run(data: bytes, steps: list[int], drain_every: int) -> tuple[list[Message], Any]:
        dec = FrameDecoder(max_frame_size=1 << 20)
        got: list[Message] = []
        err: Any = None
        i = k = 0
        try:
            for _ in range(len(data) + 1):  # bounded: i advances by >= 1 each turn
                if i >= len(data):
                    break
                step = steps[k % len(steps)]
                dec.receive_data(data[i : i + step])
                i += step
                k += 1
                if k % drain_every == 0:
                    while (m := dec.next_message()) is not None:
                        got.append(m)
            dec.receive_data(b"")
            while (m := dec.next_message()) is not None:
                got.append(m)
        except Exception as exc:  # compare error type and code, not the message
            err = (type(exc), getattr(exc, "code", None))
        return got, err

    installed = bool(_original)
    for tail in bad_tail:
        data = bytes(stream) + tail
        for steps, every in (([len(data)], 1), ([1], 1), ([7], 1), ([4096], 2), ([65536, 3], 3)):
            uninstall()
            expect_result = run(data, steps, every)
            install()
            try:
                assert run(data, steps, every) == expect_result, (tail[:8], steps, every)
            finally:
                uninstall()
        assert expect_result[0][: len(msgs)] == msgs
    if installed:
        install()


if __name__ == "__main__":
    self_check()
    print("fastpath self-check ok")
