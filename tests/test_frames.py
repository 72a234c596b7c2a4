"""Framing: a 4-byte big-endian length, then a msgpack body; any chunking, any garbage."""

from __future__ import annotations

import itertools
import random
import re
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_messages import any_message

from pytunnel.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from pytunnel.protocol import frames
from pytunnel.protocol import messages as m
from pytunnel.protocol.frames import (
    _DATA_HEAD,
    _DATA_KEY,
    _DATA_TAIL,
    DEFAULT_MAX_FRAME_SIZE,
    HEADER_SIZE,
    FrameDecoder,
    encode_message,
)

ERROR_CODES = {int(code) for code in ErrorCode}
#: Everything the decoder itself may raise.
DECODER_CODES = {
    ErrorCode.FRAME_TOO_LARGE,
    ErrorCode.MALFORMED_FRAME,
    ErrorCode.UNKNOWN_MESSAGE,
    ErrorCode.INVALID_FIELD,
    ErrorCode.TRUNCATED_FRAME,
}


def frame(body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + body


def drain(decoder: FrameDecoder) -> list[Any]:
    out = []
    while (message := decoder.next_message()) is not None:
        out.append(message)
    return out


def decode_chunks(chunks: list[bytes], max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> list[Any]:
    decoder = FrameDecoder(max_frame_size)
    out: list[Any] = []
    for chunk in chunks:
        out += decoder.feed(chunk)
    out += decoder.feed(b"")  # clean end of stream: nothing left over
    assert decoder.buffered == 0
    return out


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges) if b > a]


messages_list = st.lists(any_message, min_size=1, max_size=8)


# ----------------------------------------------------------------------------- encoding


def test_header_is_big_endian_length_of_body() -> None:
    encoded = encode_message(m.Ping(1))
    body = encoded[HEADER_SIZE:]
    assert encoded[:HEADER_SIZE] == len(body).to_bytes(4, "big")
    assert msgpack.unpackb(body) == {"t": "ping", "opaque": 1}


def test_known_encoding() -> None:
    """Pin one exact frame (the example in docs/protocol.md)."""
    encoded = encode_message(m.Data(1, b"hi"))
    assert encoded.hex() == "0000001983a673747265616d01a464617461c4026869a174a464617461"


def test_examples_in_the_protocol_document() -> None:
    """The hex dumps in docs/protocol.md section 4.5 are what the code produces."""
    doc = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"
    if not doc.exists():  # pragma: no cover - e.g. an installed copy of the tests
        pytest.skip("docs/protocol.md not found")
    dumps: list[str] = []
    current: list[str] = []
    for line in doc.read_text().splitlines():
        if re.fullmatch(r"(?:[0-9a-f]{2} )*[0-9a-f]{2}", line.strip()):
            current.append(line.strip())
        elif current:
            dumps.append(" ".join(current))
            current = []
    examples: list[Any] = [
        m.Open(1, 1048576, "example.org", 443, 0),
        m.WindowUpdate(3, 524288),
        m.Ping(7),
        m.GoAway(1107, "bad"),
    ]
    assert [encode_message(msg).hex(" ") for msg in examples] == dumps


@pytest.mark.parametrize(
    ("size", "marker"),
    [
        (0, b"\xc4\x00"),
        (255, b"\xc4\xff"),
        (256, b"\xc5\x01\x00"),
        (65535, b"\xc5\xff\xff"),
        (65536, b"\xc6\x00\x01\x00\x00"),
        (100_000, b"\xc6\x00\x01\x86\xa0"),
    ],
)
def test_data_payload_is_msgpack_bin(size: int, marker: bytes) -> None:
    payload = bytes([0x61]) * size  # ASCII: would be a valid str too, yet must travel as bin
    encoded = encode_message(m.Data(3, payload))
    assert marker + payload in encoded
    obj = msgpack.unpackb(encoded[HEADER_SIZE:], raw=True)
    assert type(obj[b"data"]) is bytes
    # the same map with a str payload is refused
    bad = msgpack.packb({"t": "data", "stream": 3, "data": payload.decode()})
    with pytest.raises(RemoteProtocolError) as info:
        FrameDecoder().feed(frame(bad))
    assert info.value.code == ErrorCode.INVALID_FIELD


def test_encode_over_limit_is_local_error() -> None:
    message = m.Data(1, bytes(1000))
    size = len(encode_message(message)) - HEADER_SIZE
    assert encode_message(message, max_frame_size=size)  # exactly at the limit is fine
    with pytest.raises(LocalProtocolError) as info:
        encode_message(message, max_frame_size=size - 1)
    assert info.value.code == ErrorCode.FRAME_TOO_LARGE


@settings(max_examples=50, deadline=None)
@given(any_message)
def test_every_control_message_fits_the_minimum_frame_size(message: Any) -> None:
    """What makes ``MIN_MAX_FRAME_SIZE`` safe to announce: only Data can be bigger."""
    if not isinstance(message, m.Data):
        encode_message(message, max_frame_size=m.MIN_MAX_FRAME_SIZE)


def test_largest_possible_control_frames_fit() -> None:
    big = "\U0001f600" * (m.MAX_TEXT // 4)
    host = "\u00e9" * (m.MAX_HOST // 2)
    largest: list[Any] = [
        m.Refuse(2**32 - 1, 2**32 - 1, big),
        m.Reset(2**32 - 1, 2**32 - 1, big),
        m.GoAway(2**32 - 1, big),
        m.Open(2**32 - 1, 2**31 - 1, host, 65535, 2**32 - 1),
        m.Hello(tuple(range(2**32 - 16, 2**32)), bytes(32)),
    ]
    for message in largest:
        assert len(encode_message(message)) - HEADER_SIZE < 1200


# ----------------------------------------------------------------------------- chunking


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages=messages_list, cuts=st.lists(st.integers(0, 2**20), max_size=20))
def test_any_chunking_yields_the_same_messages(messages: list[Any], cuts: list[int]) -> None:
    stream = b"".join(encode_message(msg) for msg in messages)
    assert decode_chunks(split(stream, cuts)) == messages


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(any_message.filter(lambda x: not isinstance(x, m.Data)), min_size=1, max_size=4))
def test_one_byte_at_a_time(messages: list[Any]) -> None:
    frames = [encode_message(msg) for msg in messages]
    ends = [sum(len(f) for f in frames[: i + 1]) for i in range(len(frames))]
    stream = b"".join(frames)
    decoder = FrameDecoder()
    out: list[Any] = []
    for i in range(len(stream)):
        out += decoder.feed(stream[i : i + 1])
        # a message comes out exactly when its last byte arrives, never earlier
        assert len(out) == sum(1 for end in ends if end <= i + 1)
    assert out == messages
    assert decoder.feed(b"") == []


def test_one_byte_at_a_time_large_data() -> None:
    message = m.Data(5, bytes(range(256)) * 300)
    out = []
    decoder = FrameDecoder()
    for byte in memoryview(encode_message(message)):
        out += decoder.feed(bytes([byte]))
    assert out == [message]


@settings(
    max_examples=10,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.large_base_example],
)
@given(st.lists(any_message, min_size=100, max_size=100), st.randoms(use_true_random=False))
def test_hundred_frames_at_once_and_in_random_chunks(
    messages: list[Any], rnd: random.Random
) -> None:
    stream = b"".join(encode_message(msg) for msg in messages)
    assert decode_chunks([stream]) == messages
    chunks, pos = [], 0
    while pos < len(stream):
        size = rnd.choice([1, 2, 3, 4, 5, 7, 100, 4096, 70000])
        chunks.append(stream[pos : pos + size])
        pos += size
    assert decode_chunks(chunks) == messages


def test_accepts_bytearray_and_memoryview_input() -> None:
    stream = encode_message(m.Ping(1)) + encode_message(m.Data(1, b"x"))
    assert FrameDecoder().feed(bytearray(stream)) == [m.Ping(1), m.Data(1, b"x")]
    assert FrameDecoder().feed(memoryview(stream)) == [m.Ping(1), m.Data(1, b"x")]


# ----------------------------------------------------------------------------- limits


def test_header_over_limit_fails_before_the_body_arrives() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(b"\xff\xff")
    assert decoder.next_message() is None  # half a header: nothing known yet
    decoder.receive_data(b"\xff\xff")  # a 4 GiB frame announced, none of it sent
    with pytest.raises(RemoteProtocolError) as info:
        decoder.next_message()
    assert info.value.code == ErrorCode.FRAME_TOO_LARGE
    assert decoder.buffered == 0


@pytest.mark.parametrize("limit", [4096, DEFAULT_MAX_FRAME_SIZE])
def test_limit_is_inclusive(limit: int) -> None:
    def body(n: int) -> bytes:
        return msgpack.packb({"t": "data", "stream": 1, "data": bytes(n)})

    size = next(n for n in range(limit, 0, -1) if len(body(n)) == limit)
    exact, payload = body(size), bytes(size)
    assert FrameDecoder(limit).feed(frame(exact)) == [m.Data(1, payload)]
    with pytest.raises(RemoteProtocolError) as info:
        FrameDecoder(limit - 1).feed(frame(exact)[:HEADER_SIZE])
    assert info.value.code == ErrorCode.FRAME_TOO_LARGE


def test_limit_can_change_between_frames() -> None:
    small, big = encode_message(m.Ping(1)), encode_message(m.Data(1, bytes(5000)))
    decoder = FrameDecoder(4096)
    assert decoder.feed(small) == [m.Ping(1)]
    decoder.max_frame_size = 8192  # e.g. after the handshake
    assert decoder.feed(big) == [m.Data(1, bytes(5000))]


@pytest.mark.parametrize("bad", [0, -1, 2**32])
def test_limit_must_fit_the_header(bad: int) -> None:
    with pytest.raises(ValueError, match="max_frame_size"):
        FrameDecoder(bad)


# ----------------------------------------------------------------------------- end of stream


@pytest.mark.parametrize("keep", [1, 3, 4, 5, -1])
def test_eof_mid_frame_is_truncated(keep: int) -> None:
    encoded = encode_message(m.Data(1, b"hello"))
    decoder = FrameDecoder()
    assert decoder.feed(encoded + encoded[:keep]) == [m.Data(1, b"hello")]
    decoder.receive_data(b"")
    with pytest.raises(RemoteProtocolError) as info:
        decoder.next_message()
    assert info.value.code == ErrorCode.TRUNCATED_FRAME


def test_clean_eof() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(encode_message(m.Ping(1)) * 2)
    decoder.receive_data(b"")
    # whole frames received before the end are still delivered
    assert drain(decoder) == [m.Ping(1), m.Ping(1)]
    assert decoder.next_message() is None


def test_data_after_eof_is_a_local_error() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(b"")
    with pytest.raises(LocalProtocolError):
        decoder.receive_data(b"x")


# ----------------------------------------------------------------------------- broken decoder


def test_decoder_stays_broken() -> None:
    decoder = FrameDecoder()
    good = encode_message(m.Ping(1))
    with pytest.raises(RemoteProtocolError) as first:
        decoder.feed(frame(b"\xc1"))
    assert first.value.code == ErrorCode.MALFORMED_FRAME
    for _ in range(3):
        decoder.receive_data(good)  # input after the error is dropped, not buffered
        assert decoder.buffered == 0
        with pytest.raises(RemoteProtocolError) as again:
            decoder.next_message()
        assert again.value.code == ErrorCode.MALFORMED_FRAME


def test_error_in_the_middle_of_a_batch() -> None:
    good = encode_message(m.Ping(1))
    decoder = FrameDecoder()
    decoder.receive_data(good + frame(msgpack.packb({"t": "nope"})) + good)
    assert decoder.next_message() == m.Ping(1)
    for _ in range(2):
        with pytest.raises(RemoteProtocolError) as info:
            decoder.next_message()
        assert info.value.code == ErrorCode.UNKNOWN_MESSAGE


# ----------------------------------------------------------------------------- fuzzing


def _assert_only_remote_errors(chunks: list[bytes], max_frame_size: int) -> None:
    decoder = FrameDecoder(max_frame_size)
    error: RemoteProtocolError | None = None
    try:
        for chunk in [*chunks, b""]:
            decoder.feed(chunk)
    except RemoteProtocolError as exc:  # anything else propagates and fails the test
        error = exc
    if error is not None:
        assert error.code in ERROR_CODES
        assert error.code in DECODER_CODES
        with pytest.raises(RemoteProtocolError):
            decoder.next_message()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.lists(st.integers(0, 200), max_size=5))
def test_random_garbage(garbage: bytes, cuts: list[int]) -> None:
    _assert_only_remote_errors(split(garbage, cuts), 1 << 16)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_garbage_inside_a_valid_header(body: bytes) -> None:
    _assert_only_remote_errors([frame(body)], 4096)


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=10)
    | st.binary(max_size=10),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=8) | st.integers(0, 5), children, max_size=4)
    ),
    max_leaves=12,
)
field_names = st.sampled_from(
    ["t", "stream", "window", "data", "code", "message", "opaque", "nonce", "versions", "x"]
)
tags = st.sampled_from(["data", "open", "ping", "hello", "reset", "goaway", "bound", "zzz"])


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(field_names, msgpack_values, max_size=6), tags)
def test_random_maps_decode_or_fail_cleanly(obj: dict[str, Any], tag: str) -> None:
    obj.setdefault("t", tag)
    body = msgpack.packb(obj)
    decoder = FrameDecoder()
    error: RemoteProtocolError | None = None
    try:
        messages = decoder.feed(frame(body))
    except RemoteProtocolError as exc:
        error = exc
    if error is not None:
        assert error.code in {
            ErrorCode.MALFORMED_FRAME,
            ErrorCode.UNKNOWN_MESSAGE,
            ErrorCode.INVALID_FIELD,
        }
    else:  # it happened to be valid: it must then re-encode to the same values
        assert len(messages) == 1
        again = msgpack.unpackb(encode_message(messages[0])[HEADER_SIZE:])
        for key, value in obj.items():
            assert again[key] == value


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages_list, st.integers(0, 10_000), st.binary(min_size=1, max_size=8))
def test_corrupting_a_valid_stream(messages: list[Any], where: int, junk: bytes) -> None:
    stream = bytearray(b"".join(encode_message(msg) for msg in messages))
    pos = where % len(stream)
    stream[pos : pos + len(junk)] = junk
    _assert_only_remote_errors([bytes(stream)], DEFAULT_MAX_FRAME_SIZE)


# ----------------------------------------------------------------------------- Data fast path


@settings(max_examples=200, deadline=None)
@given(
    stream=st.integers(min_value=1, max_value=2**32 - 1),
    payload=st.one_of(
        st.binary(max_size=300),
        st.sampled_from([b"x" * 255, b"y" * 256, b"z" * 65535, b"w" * 65536, b"v" * 70000]),
    ),
)
def test_data_fast_path_is_byte_identical(stream: int, payload: bytes) -> None:
    """The hand-built Data frame equals the generic encoder's, and decodes to the same."""
    from pytunnel.protocol.frames import append_data_frame
    from pytunnel.protocol.messages import Data

    out = bytearray()
    append_data_frame(out, stream, memoryview(payload))
    assert bytes(out) == encode_message(Data(stream, payload))
    decoder = FrameDecoder(2**20)
    assert decoder.feed(bytes(out)) == [Data(stream, payload)]
    # split anywhere, including inside the header and the payload
    cut = len(out) // 3
    decoder = FrameDecoder(2**20)
    assert decoder.feed(bytes(out[:cut])) + decoder.feed(bytes(out[cut:])) == [
        Data(stream, payload)
    ]


def test_data_fast_path_respects_the_frame_limit() -> None:
    from pytunnel.protocol.frames import append_data_frame

    with pytest.raises(LocalProtocolError):
        append_data_frame(bytearray(), 1, b"x" * 5000, 4096)


def test_non_canonical_data_goes_through_the_strict_decoder() -> None:
    """Same Data, other key order: accepted by the generic path; stream 0 is still refused."""
    import msgpack

    from pytunnel.protocol.messages import Data

    body = msgpack.packb({"t": "data", "data": b"abc", "stream": 3})
    assert FrameDecoder().feed(len(body).to_bytes(4, "big") + body) == [Data(3, b"abc")]
    zero = b"\x83\xa6stream\x00\xa4data\xc4\x01x\xa1t\xa4data"
    with pytest.raises(RemoteProtocolError) as info:
        FrameDecoder().feed(len(zero).to_bytes(4, "big") + zero)
    assert info.value.code == ErrorCode.INVALID_FIELD


# ------------------------------------------------------- receiving before every message is taken


def test_receiving_before_the_previous_chunk_is_drained_keeps_order() -> None:
    """A caller may hand over more bytes while complete messages are still waiting: nothing
    is lost or reordered, including a frame that straddles the old and the new bytes."""
    first, second, third = m.Ping(1), m.Data(3, b"x" * 100), m.Pong(2)
    decoder = FrameDecoder()
    wire = encode_message(first) + encode_message(second) + encode_message(third)
    cut = len(encode_message(first)) + len(encode_message(second)) + 2  # inside third's header
    decoder.receive_data(wire[:cut])
    assert decoder.next_message() == first
    assert decoder.buffered == cut - len(encode_message(first))
    decoder.receive_data(wire[cut:])  # second is still waiting in the first chunk
    assert decoder.next_message() == second
    assert decoder.next_message() == third
    assert decoder.next_message() is None
    assert decoder.buffered == 0


def test_max_frame_size_reads_back() -> None:
    decoder = FrameDecoder(4096)
    assert decoder.max_frame_size == 4096
    decoder.max_frame_size = 1 << 20
    assert decoder.max_frame_size == 1 << 20


def test_frames_left_after_the_handshake_decode_with_the_next_bytes() -> None:
    """The handshake takes ``Auth`` out and hands the decoder on with an ``Open`` still in
    it; the session then feeds the next bytes before asking for messages. Everything must
    come out, in order (the ``Open`` and all that followed used to be stuck for good)."""
    decoder = FrameDecoder(4096)
    decoder.receive_data(encode_message(m.Auth(bytes(32), 1 << 20)) + encode_message(m.Ping(7)))
    assert isinstance(decoder.next_message(), m.Auth)
    decoder.max_frame_size = 1 << 20
    for i in range(3):
        decoder.receive_data(encode_message(m.Pong(i)))
        got = []
        while (message := decoder.next_message()) is not None:
            got.append(message)
        assert got == ([m.Ping(7), m.Pong(0)] if i == 0 else [m.Pong(i)])


@pytest.mark.parametrize(
    ("stream_field", "expected"),
    [
        (b"\xcf" + (3).to_bytes(8, "big"), m.Data(3, b"abc")),  # uint64: legal, not minimal
        (b"\xd0\x03", m.Data(3, b"abc")),  # int8 holding a positive id
        (b"\xff", None),  # -1: refused by the strict decoder
    ],
)
def test_data_with_an_unusual_stream_id_encoding_goes_through_the_strict_decoder(
    stream_field: bytes, expected: m.Data | None
) -> None:
    """The fast path reads only the minimal unsigned encodings of the stream id; any other
    (canonical key order otherwise) falls back to the generic decoder, which accepts a valid id
    however it is encoded and refuses a negative one."""
    body = b"\x83\xa6stream" + stream_field + b"\xa4data\xc4\x03abc\xa1t\xa4data"
    assert msgpack.unpackb(body)["stream"] == (expected.stream if expected else -1)
    if expected is None:
        with pytest.raises(RemoteProtocolError) as info:
            FrameDecoder().feed(frame(body))
        assert info.value.code == ErrorCode.INVALID_FIELD
    else:
        assert FrameDecoder().feed(frame(body)) == [expected]


@pytest.mark.parametrize("payload_field", [b"\xa3abc", b"\xc0"])  # a str, nil: not bin
def test_data_whose_payload_is_not_bin_is_refused_by_the_strict_decoder(
    payload_field: bytes,
) -> None:
    """The fast path takes only a bin payload; anything else (canonical keys otherwise) goes to
    the generic decoder, which refuses it with one typed error."""
    body = b"\x83\xa6stream\x03\xa4data" + payload_field + b"\xa1t\xa4data"
    with pytest.raises(RemoteProtocolError) as info:
        FrameDecoder().feed(frame(body))
    assert info.value.code == ErrorCode.INVALID_FIELD


# ----------------------------------------------------------------------------- layers

LAYER_EXAMPLES = [
    (m.SESSION, m.Hello((1,), bytes(32))),
    (m.SESSION, m.Welcome(bytes(32), 4096)),
    (m.SESSION, m.Bound("0.0.0.0", 80)),
    (m.HANDSHAKE, m.Open(1, 1000)),
    (m.HANDSHAKE, m.Data(1, b"x")),  # the Data fast path checks the layer too
    (m.CONTROL, m.Data(1, b"x")),
    (m.CONTROL, m.GoAway(0, "")),
    (m.CONTROL, m.Auth(bytes(32), 4096)),
]


@pytest.mark.parametrize(
    ("layer", "message"), LAYER_EXAMPLES, ids=lambda x: getattr(x, "where", type(x).__name__)
)
def test_decoder_of_a_layer_refuses_another_layers_message(layer: m.Layer, message: Any) -> None:
    """A decoder only returns its own layer's kinds: another layer's valid message is
    UNEXPECTED_MESSAGE, and the decoder stays broken like after any decode error."""
    decoder = FrameDecoder(layer=layer)
    with pytest.raises(RemoteProtocolError) as info:
        decoder.feed(encode_message(message))
    assert info.value.code == ErrorCode.UNEXPECTED_MESSAGE
    assert f"{type(message).__name__} is not valid {layer.where}" in str(info.value)
    with pytest.raises(RemoteProtocolError):
        decoder.next_message()


@pytest.mark.parametrize(
    ("layer", "message"),
    [
        (m.HANDSHAKE, m.Hello((1,), bytes(32))),
        (m.HANDSHAKE, m.GoAway(1003, "no common version")),
        (m.SESSION, m.Data(1, b"x")),
        (m.SESSION, m.GoAway(0, "")),
        (m.CONTROL, m.Bound("::", 8080)),
        (m.CONTROL, m.ForwardState(False, "down")),
    ],
    ids=lambda x: getattr(x, "where", type(x).__name__),
)
def test_decoder_of_a_layer_returns_its_own_messages(layer: m.Layer, message: Any) -> None:
    assert FrameDecoder(layer=layer).feed(encode_message(message)) == [message]


def test_layer_can_change_between_frames() -> None:
    """The handshake hands its decoder to the session, which switches it to session frames."""
    decoder = FrameDecoder(layer=m.HANDSHAKE)
    decoder.receive_data(encode_message(m.Welcome(bytes(32), 4096)) + encode_message(m.Ping(1)))
    assert decoder.next_message() == m.Welcome(bytes(32), 4096)
    decoder.layer = m.SESSION
    assert decoder.next_message() == m.Ping(1)


def test_malformed_message_of_another_layer_is_still_invalid_field() -> None:
    """Fields are checked before the layer, so the code does not depend on the layer."""
    body = msgpack.packb({"t": "hello", "versions": [1], "nonce": b"short"})
    with pytest.raises(RemoteProtocolError) as info:
        FrameDecoder(layer=m.SESSION).feed(frame(body))
    assert info.value.code == ErrorCode.INVALID_FIELD


def test_layers_partition_the_messages() -> None:
    """Every message belongs to a layer; only GoAway to two (the server's handshake refusal
    and the end of a session)."""
    layers = (m.HANDSHAKE, m.SESSION, m.CONTROL)
    assert set().union(*(layer.types for layer in layers)) == set(m.MESSAGE_TYPES)
    assert m.HANDSHAKE.types & m.SESSION.types == {m.GoAway}
    assert not m.CONTROL.types & (m.HANDSHAKE.types | m.SESSION.types)
    assert m.ANY_LAYER.types == set(m.MESSAGE_TYPES)


# ----------------------------------------------------------------------------- exact behaviour
# Pinned down by the mutation run (docs/mutation.md).


@pytest.mark.parametrize(
    "body",
    [
        _DATA_HEAD + b"\xcc",  # cut inside a 1-byte stream id
        _DATA_HEAD + b"\x01" + _DATA_KEY + b"\xc4",  # cut inside the bin header
    ],
)
def test_a_data_body_cut_inside_a_field_is_malformed_not_a_crash(body: bytes) -> None:
    """Regression: the Data fast path read one byte past such a body and raised IndexError
    when the frame ended the buffer, instead of leaving the body to the generic decoder."""
    with pytest.raises(RemoteProtocolError) as info:
        FrameDecoder().feed(frame(body))
    assert info.value.code == ErrorCode.MALFORMED_FRAME


def _fast_data(wire: bytes | bytearray, max_frame_size: int = 2**32 - 1) -> tuple[int, bytes]:
    """The stream id and payload of the Data frame after the Ping frame that starts ``wire``,
    as the decoder's fast path reads it: ``next_frame`` answers ``DATA_FRAME`` only when the
    fast path took the body (the generic decoder would build a message)."""
    decoder = FrameDecoder(max_frame_size, layer=m.SESSION)
    decoder.receive_data(wire)
    assert decoder.next_frame() == m.Ping(1)
    assert decoder.next_frame() is frames.DATA_FRAME
    return decoder.data_stream, decoder.data_payload


@pytest.mark.parametrize("stream", [1, 2, 127, 128, 255, 256, 65535, 65536, 2**32 - 1])
@pytest.mark.parametrize("size", [0, 1, 255, 256, 65535, 65536])
@pytest.mark.parametrize("kind", [bytes, bytearray])
def test_the_data_fast_path_recognises_every_canonical_data_body(
    stream: int, size: int, kind: type[bytes]
) -> None:
    """The fast path must not give up on a body it was written for (the generic decoder would
    return the same message, only slower), wherever the frame sits in the buffer."""
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    wire = kind(encode_message(m.Ping(1)) + encode_message(m.Data(stream, payload)))
    stream_id, data = _fast_data(wire)
    assert (stream_id, data) == (stream, payload)
    assert type(data) is bytes


def test_a_data_body_with_another_tag_is_not_taken_for_data() -> None:
    body = _DATA_HEAD + b"\x01" + _DATA_KEY + b"\xc4\x01x" + b"\xa1t\xa4open"
    assert len(body) == len(_DATA_HEAD + b"\x01" + _DATA_KEY + b"\xc4\x01x" + _DATA_TAIL)
    for split in (False, True):  # in one chunk, and straddling two (the pending path)
        decoder = FrameDecoder(layer=m.SESSION)
        wire = encode_message(m.Ping(1)) + frame(body)
        decoder.receive_data(wire[:-3] if split else wire)
        assert decoder.next_frame() == m.Ping(1)
        if split:
            assert decoder.next_frame() is None
            decoder.receive_data(wire[-3:])
        with pytest.raises(RemoteProtocolError) as info:
            decoder.next_frame()
        assert info.value.code == ErrorCode.INVALID_FIELD


def test_data_frames_never_reach_the_generic_decoder() -> None:
    """Data frames of every stream-id width in one buffer: each one ``DATA_FRAME`` (the fast
    path; the generic decoder answers a message object), in the pure and the compiled build
    alike (where a patched module function would not be seen by the decoder's calls)."""
    data = b"".join(
        encode_message(m.Data(stream, bytes(300))) for stream in (1, 200, 70000, 2**32 - 1)
    )
    decoder = FrameDecoder(layer=m.SESSION)
    decoder.receive_data(data)
    for stream in (1, 200, 70000, 2**32 - 1):
        assert decoder.next_frame() is frames.DATA_FRAME
        assert (decoder.data_stream, decoder.data_payload) == (stream, bytes(300))
    assert decoder.next_frame() is None


def test_the_decoder_keeps_its_own_copy_of_a_mutable_buffer() -> None:
    decoder = FrameDecoder()
    buf = bytearray(encode_message(m.Ping(1)) + encode_message(m.Ping(2)))
    decoder.receive_data(buf)
    assert decoder.next_message() == m.Ping(1)
    buf[:] = bytes(len(buf))  # the caller reuses its buffer
    assert decoder.next_message() == m.Ping(2)


def test_a_tiny_bad_frame_is_refused_however_it_is_split() -> None:
    """A 1-byte body (an empty map) split anywhere, with more frames behind it, is still read
    as exactly its own bytes."""
    data = frame(b"\x80") + encode_message(m.Ping(1)) * 2
    for cut in range(1, len(data)):
        decoder = FrameDecoder()

        def first_message(decoder: FrameDecoder = decoder, cut: int = cut) -> object:
            decoder.receive_data(data[:cut])
            message = decoder.next_message()
            if message is None:
                decoder.receive_data(data[cut:])
                message = decoder.next_message()
            return message

        with pytest.raises(RemoteProtocolError) as info:
            first_message()
        assert info.value.code == ErrorCode.UNKNOWN_MESSAGE, cut


def test_decoder_errors_say_exactly_what_is_wrong() -> None:
    decoder = FrameDecoder(100)
    with pytest.raises(RemoteProtocolError) as info:
        decoder.feed((101).to_bytes(4, "big"))
    assert info.value.message == "frame of 101 bytes exceeds the limit of 100"
    decoder = FrameDecoder()
    decoder.receive_data(encode_message(m.Ping(1))[:7])
    assert decoder.next_message() is None
    with pytest.raises(RemoteProtocolError) as info:
        decoder.feed(b"")
    assert info.value.message == "connection closed in the middle of a frame (7 bytes pending)"
    with pytest.raises(LocalProtocolError) as local:
        decoder.receive_data(b"x")
    assert local.value.message == "data received after end of stream"


def test_the_data_fast_path_reads_all_four_bytes_of_a_large_payloads_length() -> None:
    payload = bytes(2**24 + 1)
    wire = encode_message(m.Ping(1)) + encode_message(m.Data(1, payload))
    assert _fast_data(wire) == (1, payload)


@pytest.mark.parametrize("stream", [1, 127, 128, 256, 65536, 2**32 - 1])
@pytest.mark.parametrize("size", [0, 1, 256, 65536])
def test_next_frame_reads_a_canonical_data_frame_into_fields_however_it_is_split(
    stream: int, size: int
) -> None:
    """In one chunk or straddling two (the pending path), at every cut: ``DATA_FRAME`` with the
    stream id and payload, and ``next_message`` the same frame as a message."""
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    wire = encode_message(m.Data(stream, payload)) + encode_message(m.Ping(9))
    cuts = range(1, len(wire)) if size <= 256 else [1, 4, 5, 20, 30, len(wire) - 20]
    for cut in [0, *cuts]:
        decoder = FrameDecoder(2**32 - 1, layer=m.SESSION)
        decoder.receive_data(wire[:cut] or wire)
        got = decoder.next_frame()
        if cut:
            if got is None:
                decoder.receive_data(wire[cut:])
                got = decoder.next_frame()
            else:
                decoder.receive_data(wire[cut:])
        assert got is frames.DATA_FRAME, cut
        assert (decoder.data_stream, decoder.data_payload) == (stream, payload)
        assert type(decoder.data_payload) is bytes
        assert decoder.next_frame() == m.Ping(9)
        assert decoder.next_frame() is None
        other = FrameDecoder(2**32 - 1)
        got_messages = other.feed(wire[:cut] or wire) + (other.feed(wire[cut:]) if cut else [])
        assert got_messages == [m.Data(stream, payload), m.Ping(9)], cut


@pytest.mark.parametrize("split", [False, True])
def test_a_data_frame_in_a_layer_without_data_is_unexpected_on_the_fast_path(split: bool) -> None:
    wire = encode_message(m.Data(1, b"x" * 300))
    decoder = FrameDecoder(layer=m.HANDSHAKE)
    if split:
        decoder.receive_data(wire[:10])
        assert decoder.next_frame() is None
    decoder.receive_data(wire[10:] if split else wire)
    with pytest.raises(RemoteProtocolError) as info:
        decoder.next_frame()
    assert info.value.code == ErrorCode.UNEXPECTED_MESSAGE
    assert info.value.message == f"Data is not valid {m.HANDSHAKE.where}"
    # the layer may change between frames: the fast path follows it
    decoder = FrameDecoder(layer=m.HANDSHAKE)
    decoder.layer = m.SESSION
    decoder.receive_data(wire)
    assert decoder.next_frame() is frames.DATA_FRAME
    assert decoder.layer is m.SESSION
