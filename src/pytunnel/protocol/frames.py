"""Framing: a 4-byte big-endian length, then that many bytes of msgpack.

The length is checked against the limit before a single byte of the body is buffered beyond
what the transport already handed us, so a hostile length field cannot make us allocate.
Everything a peer can send wrong ends in :class:`RemoteProtocolError` with a precise code.
"""

from __future__ import annotations

from typing import Any

import msgpack

from ..errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from .messages import MESSAGE_TYPES, Message, converter, truncate_text

__all__ = [
    "DEFAULT_MAX_FRAME_SIZE",
    "HEADER_SIZE",
    "FrameDecoder",
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
_unstructure = converter.unstructure
_structure = converter.structure


def encode_message(message: Message, max_frame_size: int = MAX_FRAME_SIZE_LIMIT) -> bytes:
    """Serialize one message as a complete frame (header included).

    Raises :class:`LocalProtocolError` if the body would exceed ``max_frame_size``: the caller
    (the multiplexer) is responsible for chunking data to fit the peer's limit.
    """
    body = _packb(_unstructure(message, Message))
    size = len(body)
    if size > max_frame_size:
        raise LocalProtocolError(
            f"{type(message).__name__} frame of {size} bytes exceeds the limit of {max_frame_size}",
            code=ErrorCode.FRAME_TOO_LARGE,
        )
    return size.to_bytes(HEADER_SIZE, "big") + body


def decode_body(body: bytes | memoryview) -> Message:
    """Turn one frame body into a message, or raise :class:`RemoteProtocolError`."""
    try:
        obj = _unpackb(body, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises a zoo of types; all mean "not valid msgpack"
        raise RemoteProtocolError(
            f"frame body is not valid msgpack: {exc}", code=ErrorCode.MALFORMED_FRAME
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
        message: Message = _structure(obj, Message)
    except Exception as exc:  # cattrs/attrs validation: wrong type, range, missing field
        raise RemoteProtocolError(
            truncate_text(f"invalid {tag!r} message: {_describe(exc)}", 300),
            code=ErrorCode.INVALID_FIELD,
        ) from None
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


class FrameDecoder:
    """Incremental decoder: feed any chunking of the byte stream, take out whole messages.

    Once it has raised, the decoder stays broken and raises the same error again: a byte stream
    that lost framing cannot be resynchronized.
    """

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        self.max_frame_size = max_frame_size
        self._buffer = bytearray()
        self._error: RemoteProtocolError | None = None
        self._eof = False

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
        return len(self._buffer)

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Append bytes from the transport. ``b""`` means end of stream."""
        if self._eof:
            raise LocalProtocolError("data received after end of stream")
        if not data:
            self._eof = True
            return
        if self._error is None:  # a broken decoder drops input instead of buffering it forever
            self._buffer += data

    def next_message(self) -> Message | None:
        """Return the next complete message, or ``None`` if more bytes are needed.

        At end of stream with a partial frame left, raises ``TRUNCATED_FRAME``.
        """
        if self._error is not None:
            raise self._error
        try:
            return self._next()
        except RemoteProtocolError as exc:
            self._error = exc
            self._buffer = bytearray()
            raise

    def _next(self) -> Message | None:
        buf = self._buffer
        have = len(buf)
        if have >= HEADER_SIZE:
            size = int.from_bytes(buf[:HEADER_SIZE], "big")
            if size > self._max_frame_size:
                raise RemoteProtocolError(
                    f"frame of {size} bytes exceeds the limit of {self._max_frame_size}",
                    code=ErrorCode.FRAME_TOO_LARGE,
                )
            end = HEADER_SIZE + size
            if have >= end:
                with memoryview(buf) as view:
                    body = view[HEADER_SIZE:end]
                    try:
                        message = decode_body(body)
                    finally:
                        body.release()
                del buf[:end]
                return message
        if self._eof and have:
            raise RemoteProtocolError(
                f"connection closed in the middle of a frame ({have} bytes pending)",
                code=ErrorCode.TRUNCATED_FRAME,
            )
        return None

    def feed(self, data: bytes | bytearray | memoryview) -> list[Message]:
        """Convenience: :meth:`receive_data` then every message now complete."""
        self.receive_data(data)
        out: list[Message] = []
        while (message := self.next_message()) is not None:
            out.append(message)
        return out
