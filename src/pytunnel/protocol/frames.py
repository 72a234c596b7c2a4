"""Framing: a 4-byte big-endian length, then that many bytes of msgpack.

The length is checked against the limit before a single byte of the body is buffered beyond
what the transport already handed us, so a hostile length field cannot make us allocate.
Everything a peer can send wrong ends in :class:`RemoteProtocolError` with a precise code.
"""

from __future__ import annotations

from typing import Any, Final, cast

import msgpack

from ..errors import ErrorCode, LocalProtocolError, RemoteProtocolError, caused_by
from .messages import (
    ANY_LAYER,
    MESSAGE_TYPES,
    Data,
    Datagrams,
    Layer,
    Message,
    converter,
    truncate_text,
)

__all__ = [
    "DATAGRAMS_ENVELOPE",
    "DATA_FRAME",
    "DEFAULT_MAX_FRAME_SIZE",
    "HEADER_SIZE",
    "FrameDecoder",
    "append_datagrams_frame",
    "datagram_entry_size",
    "encode_message",
]

HEADER_SIZE = 4
#: Default ceiling on a frame body (1 MiB). Configurable per session.
DEFAULT_MAX_FRAME_SIZE = 1024 * 1024
#: Largest value the 4-byte length field can carry.
MAX_FRAME_SIZE_LIMIT = 2**32 - 1

_BY_TAG: dict[str, type[Any]] = {cls.TAG: cls for cls in MESSAGE_TYPES}
_packb = msgpack.packb
_unpackb = msgpack.unpackb
# Resolved once: converter.structure(obj, Message) would look the union's hook up (hashing the
# Union type) on every frame.
_unstructure_message = converter.get_unstructure_hook(Message)
_structure_message = converter.get_structure_hook(Message)

# The exact bytes encode_message produces around a Data payload: the map header and "stream"
# key, then the stream id, the "data" key, the bin header and payload, and the "t" entry last.
# Data frames are built and recognised with these directly (the hot path); the output is
# byte-identical to the generic encoder's, and anything else goes through msgpack + cattrs.
# (Final: the compiled build reads them as constants, not from the module's dict per frame.)
_DATA_HEAD: Final = b"\x83\xa6stream"
_DATA_KEY: Final = b"\xa4data"
_DATA_TAIL: Final = b"\xa1t\xa4data"
#: A Data body's bytes before its payload, at most: the head, a 32-bit stream id, the "data"
#: key and a bin 32 header.
_DATA_PREFIX_MAX: Final = 8 + 5 + 5 + 5
_new_object: Final = object.__new__
_set_field: Final = object.__setattr__  # the frozen class's own __setattr__ refuses


def _msgpack_uint(n: int) -> bytes:
    if n < 0x80:
        return n.to_bytes(1, "big")
    if n < 0x100:
        return b"\xcc" + n.to_bytes(1, "big")
    if n < 0x10000:
        return b"\xcd" + n.to_bytes(2, "big")
    return b"\xce" + n.to_bytes(4, "big")


def _bin_header(n: int) -> bytes:
    if n < 0x100:
        return b"\xc4" + n.to_bytes(1, "big")
    if n < 0x10000:
        return b"\xc5" + n.to_bytes(2, "big")
    return b"\xc6" + n.to_bytes(4, "big")


#: msgpack's positive fixint and bin 8 headers, built once: a small message's Data frame then
#: costs no helper call for its stream id or its length.
_FIXINT: Final = [n.to_bytes(1, "big") for n in range(0x80)]
_BIN8: Final = [b"\xc4" + n.to_bytes(1, "big") for n in range(0x100)]
_DATA_FIXED: Final = len(_DATA_HEAD) + len(_DATA_KEY) + len(_DATA_TAIL)


def append_data_frame(
    out: bytearray,
    stream_id: int,
    payload: bytes | bytearray | memoryview,
    max_frame_size: int = MAX_FRAME_SIZE_LIMIT,
) -> None:
    """Append a complete Data frame to ``out``, copying the payload once.

    Byte-identical to ``encode_message(Data(stream_id, bytes(payload)))`` (a test checks it),
    without building the message object or the intermediate copies.
    """
    size = len(payload)
    sid = _FIXINT[stream_id] if stream_id < 0x80 else _msgpack_uint(stream_id)
    bin_header = _BIN8[size] if size < 0x100 else _bin_header(size)
    body_size = _DATA_FIXED + len(sid) + len(bin_header) + size
    if body_size > max_frame_size:
        raise LocalProtocolError(
            f"Data frame of {body_size} bytes exceeds the limit of {max_frame_size}",
            code=ErrorCode.FRAME_TOO_LARGE,
        )
    out += b"".join(
        (body_size.to_bytes(HEADER_SIZE, "big"), _DATA_HEAD, sid, _DATA_KEY, bin_header)
    )
    out += payload
    out += _DATA_TAIL


# A Datagrams body as encode_message builds it: the same map header and "stream" key as Data,
# the "data" key and an array of bin entries, then the "t" entry last.
_DATAGRAMS_TAIL = b"\xa1t\xa6dgrams"
#: The most a Datagrams body holds besides its entries: map header, "stream" and a 32-bit id,
#: "data" and an array-16 header, the "t" entry (``MAX_DATAGRAM_BATCH`` needs no array 32).
DATAGRAMS_ENVELOPE = len(_DATA_HEAD) + 5 + len(_DATA_KEY) + 3 + len(_DATAGRAMS_TAIL)


def datagram_entry_size(size: int) -> int:
    """Bytes one datagram of ``size`` bytes takes in a Datagrams body (its bin header too)."""
    return size + (2 if size < 0x100 else 3 if size < 0x10000 else 5)


def append_datagrams_frame(
    out: bytearray,
    stream_id: int,
    payloads: list[bytes],
    max_frame_size: int = MAX_FRAME_SIZE_LIMIT,
) -> None:
    """Append one complete Datagrams frame to ``out``.

    Byte-identical to ``encode_message(Datagrams(stream_id, tuple(payloads)))`` (a test checks
    it) without the message object: msgpack packs the map in one C call. The caller keeps to
    the message's rules (2 to ``MAX_DATAGRAM_BATCH`` entries); the frame limit is checked here.
    """
    body = _packb({"stream": stream_id, "data": payloads, "t": Datagrams.TAG})
    size = len(body)
    if size > max_frame_size:
        raise LocalProtocolError(
            f"Datagrams frame of {size} bytes exceeds the limit of {max_frame_size}",
            code=ErrorCode.FRAME_TOO_LARGE,
        )
    out += size.to_bytes(HEADER_SIZE, "big")
    out += body


def _parse_datagrams(buf: bytes | bytearray, start: int, end: int) -> Datagrams | None:
    """The Datagrams message if ``buf[start:end]`` is a well-formed canonical Datagrams body,
    else None (then the generic decoder decides, and names what is wrong)."""
    if buf[end - len(_DATAGRAMS_TAIL) : end] != _DATAGRAMS_TAIL:
        return None
    with memoryview(buf) as view, view[start:end] as body:
        try:
            obj = _unpackb(body, raw=False, strict_map_key=True, use_list=True)
        except Exception:
            return None
    # three distinct keys under the three-entry map header: no duplicates, nothing extra
    if type(obj) is not dict or len(obj) != 3:
        return None
    stream, data = obj.get("stream"), obj.get("data")
    if obj.get("t") != Datagrams.TAG or type(stream) is not int or type(data) is not list:
        return None
    try:
        return Datagrams(stream, tuple(data))
    except ValueError:
        return None


def _be16(buf: bytes, p: int) -> int:
    return buf[p] << 8 | buf[p + 1]


def _be32(buf: bytes, p: int) -> int:
    """The big-endian 32-bit number at ``buf[p]`` (a frame's length, a stream id, a bin 32
    length), read by index: no slice and no ``int.from_bytes`` call in the compiled build."""
    return buf[p] << 24 | buf[p + 1] << 16 | buf[p + 2] << 8 | buf[p + 3]


def _data_layout(buf: bytes, start: int, end: int) -> tuple[int, int]:
    """``(stream id, payload offset)`` when the Data body ``buf[start:end]`` has exactly the
    canonical layout up to its payload, and the payload runs to ``len(_DATA_TAIL)`` bytes
    before ``end``; ``(0, 0)`` for anything else (then the generic decoder decides, with all
    its checks). The tail itself is the caller's to check.

    ``buf`` may hold only the body's first ``_DATA_PREFIX_MAX`` bytes (``end`` beyond its
    length): everything read here lies in them. Typed ``bytes`` so that the compiled build
    indexes and slices it directly, without a generic call per byte.
    """
    limit = min(end, len(buf))
    p = start + 8
    # each bound check leaves room for the bytes read by index after it (a body cut short
    # inside the stream id or the bin header must fall through to the generic decoder, not
    # index past the end of the buffer)
    if p + 1 >= limit or buf[start:p] != _DATA_HEAD:
        return 0, 0
    b = buf[p]
    if b < 0x80:
        stream, p = b, p + 1
    elif b == 0xCC:
        stream, p = buf[p + 1], p + 2
    elif b == 0xCD and p + 2 < limit:
        stream, p = _be16(buf, p + 1), p + 3
    elif b == 0xCE and p + 4 < limit:
        stream, p = _be32(buf, p + 1), p + 5
    else:
        return 0, 0
    if p + 6 >= limit or buf[p : p + 5] != _DATA_KEY:
        return 0, 0
    p += 5
    b = buf[p]
    if b == 0xC4:
        n, p = buf[p + 1], p + 2
    elif b == 0xC5 and p + 2 < limit:
        n, p = _be16(buf, p + 1), p + 3
    elif b == 0xC6 and p + 4 < limit:
        n, p = _be32(buf, p + 1), p + 5
    else:
        return 0, 0
    if p + n + len(_DATA_TAIL) != end or stream < 1:
        return 0, 0
    return stream, p


def _data_message(stream: int, payload: bytes) -> Data:
    # both fields are valid by construction (a stream id of 1..2**32-1, bytes): built without
    # attrs' validators, which would check them again for every frame
    message: Data = _new_object(Data)
    _set_field(message, "stream", stream)
    _set_field(message, "data", payload)
    return message


def encode_message(message: Message, max_frame_size: int = MAX_FRAME_SIZE_LIMIT) -> bytes:
    """Serialize one message as a complete frame (header included).

    Raises :class:`LocalProtocolError` if the body would exceed ``max_frame_size``: the caller
    (the multiplexer) is responsible for chunking data to fit the peer's limit.
    """
    body = _packb(_unstructure_message(message))
    size = len(body)
    if size > max_frame_size:
        raise LocalProtocolError(
            f"{type(message).__name__} frame of {size} bytes exceeds the limit of {max_frame_size}",
            code=ErrorCode.FRAME_TOO_LARGE,
        )
    return size.to_bytes(HEADER_SIZE, "big") + body


def decode_body(body: bytes | memoryview, layer: Layer = ANY_LAYER) -> Message:
    """Turn one frame body into a message of ``layer``, or raise :class:`RemoteProtocolError`
    (a valid message of another layer is ``UNEXPECTED_MESSAGE``)."""
    try:
        obj = _unpackb(body, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises a zoo of types; all mean "not valid msgpack"
        raise caused_by(
            RemoteProtocolError(
                f"frame body is not valid msgpack: {exc}", code=ErrorCode.MALFORMED_FRAME
            ),
            None,
        ) from None
    if type(obj) is not dict:
        raise RemoteProtocolError(
            f"frame body must be a msgpack map, got {type(obj).__name__}",
            code=ErrorCode.MALFORMED_FRAME,
        )
    if len(obj) != _map_length(body):
        # msgpack-python keeps the last of duplicate keys, another decoder may keep the first:
        # two implementations must never disagree about what a frame means.
        raise RemoteProtocolError(
            "frame body has duplicate map keys", code=ErrorCode.MALFORMED_FRAME
        )
    tag = obj.get("t")
    if type(tag) is not str or tag not in _BY_TAG:
        raise RemoteProtocolError(
            truncate_text(f"unknown message type {tag!r}", 200), code=ErrorCode.UNKNOWN_MESSAGE
        )
    try:
        message: Message = _structure_message(obj, Message)
    except Exception as exc:  # cattrs/attrs validation: wrong type, range, missing field
        raise caused_by(
            RemoteProtocolError(
                truncate_text(f"invalid {tag!r} message: {_describe(exc)}", 300),
                code=ErrorCode.INVALID_FIELD,
            ),
            None,
        ) from None
    return _check_layer(message, layer)


def _check_layer(message: Message, layer: Layer) -> Message:
    # After structuring, so a malformed message of another layer is still INVALID_FIELD.
    if type(message) not in layer.types:
        raise RemoteProtocolError(
            f"{type(message).__name__} is not valid {layer.where}",
            code=ErrorCode.UNEXPECTED_MESSAGE,
        )
    return message


def _map_length(body: bytes | memoryview) -> int:
    """The entry count in the header of the top-level map ``body`` starts with."""
    first = body[0]
    if first & 0xF0 == 0x80:  # fixmap
        return first & 0x0F
    if first == 0xDE:  # map 16
        return int.from_bytes(body[1:3], "big")
    return int.from_bytes(body[1:5], "big")  # 0xdf, map 32: the only other map header


def _describe(exc: BaseException) -> str:
    """Flatten cattrs' exception groups into one line for the log and the GoAway message."""
    subs = getattr(exc, "exceptions", None)
    if subs:
        return "; ".join(_describe(e) for e in subs)
    return f"{type(exc).__name__}: {exc}"


class _DataFrame:
    """The type of :data:`DATA_FRAME`."""

    __slots__ = ()


#: What :meth:`FrameDecoder.next_frame` returns for a Data frame: its fields are then in the
#: decoder's ``data_stream`` and ``data_payload``, and no message object was built.
DATA_FRAME: Final = _DataFrame()


class FrameDecoder:
    """Incremental decoder: feed any chunking of the byte stream, take out whole messages.

    Frames are parsed in place in the chunk the transport returned; only a frame that straddles
    two chunks is copied into a pending buffer. Once it has raised, the decoder stays broken and
    raises the same error again: a byte stream that lost framing cannot be resynchronized.

    ``layer`` is the set of message kinds accepted (see :class:`~.messages.Layer`); any other
    valid message is ``UNEXPECTED_MESSAGE``. It may be changed between frames, as when the
    handshake hands its decoder to the session.
    """

    def __init__(
        self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE, layer: Layer = ANY_LAYER
    ) -> None:
        self.max_frame_size = max_frame_size
        self.layer = layer
        #: The last chunk received, parsed from ``_pos`` on (never copied).
        self._chunk: bytes = b""
        self._pos = 0
        #: The beginning of a frame that straddles chunks (the only bytes ever copied).
        self._pending = bytearray()
        self._error: RemoteProtocolError | None = None
        self._eof = False
        #: The last Data frame :meth:`next_frame` answered ``DATA_FRAME`` for.
        self.data_stream = 0
        self.data_payload = b""

    @property
    def layer(self) -> Layer:
        """The message kinds accepted; may be changed between frames."""
        return self._layer

    @layer.setter
    def layer(self, value: Layer) -> None:
        self._layer = value
        self._takes_data = Data in value.types  # asked once here, not per Data frame

    @property
    def max_frame_size(self) -> int:
        """The largest body accepted; may be changed between frames (e.g. after the handshake)."""
        return self._max_frame_size

    @max_frame_size.setter
    def max_frame_size(self, value: int) -> None:
        if not 1 <= value <= MAX_FRAME_SIZE_LIMIT:
            raise ValueError(f"max_frame_size must be in 1..2**32-1, got {value}")
        self._max_frame_size = value

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as messages."""
        return len(self._pending) + len(self._chunk) - self._pos

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Append bytes from the transport. ``b""`` means end of stream."""
        if self._eof:
            raise LocalProtocolError("data received after end of stream")
        if not data:
            self._eof = True
            return
        if self._error is not None:  # a broken decoder drops input instead of keeping it
            return
        if self._pos < len(self._chunk):
            # The caller did not take every message out first. The rest may hold several
            # frames, so it stays a chunk (never pending, which holds one frame at most);
            # ``_pending`` is empty here, since a frame straddles chunks only once the last
            # chunk is used up.
            with memoryview(self._chunk) as view, view[self._pos :] as rest:
                self._chunk = b"".join((rest, data))
            self._pos = 0
        elif self._pending:
            self._chunk, self._pos = bytes(data), 0
        else:
            self._chunk = data if type(data) is bytes else bytes(data)
            self._pos = 0

    def next_message(self) -> Message | None:
        """Return the next complete message, or ``None`` if more bytes are needed.

        At end of stream with a partial frame left, raises ``TRUNCATED_FRAME``.
        """
        frame = self.next_frame()
        if frame is DATA_FRAME:
            return _data_message(self.data_stream, self.data_payload)
        return cast("Message | None", frame)

    def next_frame(self) -> Message | _DataFrame | None:
        """:meth:`next_message`, except that a canonical Data frame of an accepting layer is
        answered with :data:`DATA_FRAME`, its stream id and payload left in ``data_stream``
        and ``data_payload`` (valid until the next call): the multiplexer's way of reading
        the most common frame without building a message object for it."""
        if self._error is not None:
            raise self._error
        try:
            return self._next()
        except RemoteProtocolError as exc:
            self._error = exc
            self._chunk, self._pos, self._pending = b"", 0, bytearray()
            raise

    def _checked_size(self, size: int) -> int:
        """A frame header's body length, refused above the limit before any byte of the body
        is buffered."""
        if size > self._max_frame_size:
            raise RemoteProtocolError(
                f"frame of {size} bytes exceeds the limit of {self._max_frame_size}",
                code=ErrorCode.FRAME_TOO_LARGE,
            )
        return size

    def _take(self, want: int) -> int:
        """Move up to ``want`` bytes of the current chunk into the pending buffer."""
        chunk, pos = self._chunk, self._pos
        take = min(want, len(chunk) - pos)
        if take > 0:
            with memoryview(chunk) as view, view[pos : pos + take] as piece:
                self._pending += piece
            self._pos = pos + take
            return take
        return 0

    def _next(self) -> Message | _DataFrame | None:
        pending = self._pending
        if pending:  # finish the frame that straddles chunks
            if len(pending) < HEADER_SIZE:
                self._take(HEADER_SIZE - len(pending))
            if len(pending) >= HEADER_SIZE:
                size = self._checked_size(int.from_bytes(pending[:HEADER_SIZE], "big"))
                need = HEADER_SIZE + size - len(pending)
                if self._take(need) == need:
                    self._pending = bytearray()
                    return self._pending_frame(pending, size)
        else:
            chunk, pos = self._chunk, self._pos
            available = len(chunk) - pos
            if available >= HEADER_SIZE:
                size = self._checked_size(_be32(chunk, pos))
                start = pos + HEADER_SIZE
                end = start + size
                if end <= len(chunk):
                    self._pos = end
                    stream, p = _data_layout(chunk, start, end)
                    if p and chunk[end - len(_DATA_TAIL) : end] == _DATA_TAIL:
                        return self._data(stream, chunk[p : end - len(_DATA_TAIL)])
                    return _decode(chunk, start, end, self._layer)
            if available > 0:
                self._take(available)
        if self._eof and self._pending:
            raise RemoteProtocolError(
                f"connection closed in the middle of a frame ({len(self._pending)} bytes pending)",
                code=ErrorCode.TRUNCATED_FRAME,
            )
        return None

    def _pending_frame(self, frame: bytearray, size: int) -> Message | _DataFrame:
        """The frame of ``size`` body bytes that straddled chunks, whole in ``frame``: its
        prefix is parsed from a small copy, its payload copied out once."""
        stream, p = _data_layout(bytes(frame[: HEADER_SIZE + _DATA_PREFIX_MAX]), HEADER_SIZE,
                                 HEADER_SIZE + size)  # fmt: skip
        end = HEADER_SIZE + size
        if p and frame[end - len(_DATA_TAIL) :] == _DATA_TAIL:
            with memoryview(frame) as view, view[p : end - len(_DATA_TAIL)] as payload:
                return self._data(stream, bytes(payload))
        return _decode(frame, HEADER_SIZE, end, self._layer)

    def _data(self, stream: int, payload: bytes) -> Message | _DataFrame:
        if not self._takes_data:  # the layer's own error, as for any other message
            return _check_layer(_data_message(stream, payload), self._layer)
        self.data_stream = stream
        self.data_payload = payload
        return DATA_FRAME

    def feed(self, data: bytes | bytearray | memoryview) -> list[Message]:
        """Convenience: :meth:`receive_data` then every message now complete."""
        self.receive_data(data)
        out: list[Message] = []
        while (message := self.next_message()) is not None:
            out.append(message)
        return out


def _decode(buf: bytes | bytearray, start: int, end: int, layer: Layer) -> Message:
    """Any frame body but a canonical Data one (which :class:`FrameDecoder` reads itself)."""
    message: Message | None = None
    if buf[start : start + len(_DATA_HEAD)] == _DATA_HEAD:
        message = _parse_datagrams(buf, start, end)
    if message is None:
        with memoryview(buf) as view, view[start:end] as body:
            return decode_body(body, layer)
    return _check_layer(message, layer)
