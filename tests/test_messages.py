"""Messages: every type round-trips, and every malformed map is rejected with a precise code.

The hypothesis strategies here build *valid* instances of every class in ``MESSAGE_TYPES``
(respecting the attrs validators); ``test_frames.py`` and ``test_mux.py`` import them.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

import attrs
import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pytunnel.errors import ErrorCode, RemoteProtocolError
from pytunnel.protocol import messages as m
from pytunnel.protocol.frames import decode_body, encode_message
from pytunnel.protocol.messages import MESSAGE_TYPES, Message, converter

# ----------------------------------------------------------------------------- strategies

U32 = 2**32 - 1
U64 = 2**64 - 1

u32s = st.integers(0, U32)
u64s = st.integers(0, U64)
stream_ids = st.integers(1, m.MAX_STREAM_ID)
windows = st.integers(0, m.MAX_WINDOW)
deltas = st.integers(1, m.MAX_WINDOW)
ports = st.integers(0, 65535)
error_codes = st.one_of(st.sampled_from(list(ErrorCode)).map(int), u32s)
nonces = st.binary(min_size=m.NONCE_SIZE, max_size=m.NONCE_SIZE)
macs = st.binary(min_size=m.MAC_SIZE, max_size=m.MAC_SIZE)
frame_limits = st.integers(m.MIN_MAX_FRAME_SIZE, U32)


def utf8_text(limit: int) -> st.SearchStrategy[str]:
    """Valid text: at most ``limit`` bytes of UTF-8, with the edge cases drawn on purpose."""
    return st.one_of(
        st.text(max_size=limit // 4),
        st.text(max_size=limit).filter(lambda s: len(s.encode()) <= limit),
        st.sampled_from(
            ["", "x" * limit, "\u00e9" * (limit // 2), "\U0001f600" * (limit // 4), "a\x00b"]
        ),
    )


def payloads() -> st.SearchStrategy[bytes]:
    """Payloads crossing every msgpack bin header size (bin 8 / 16 / 32)."""
    return st.one_of(
        st.binary(max_size=300),
        st.sampled_from([0, 255, 256, 65535, 65536, 70000]).map(lambda n: bytes([n % 251]) * n),
    )


STRATEGIES: dict[type[Any], st.SearchStrategy[Any]] = {
    m.Hello: st.builds(
        m.Hello, versions=st.lists(u32s, max_size=m.MAX_VERSIONS).map(tuple), nonce=nonces
    ),
    m.Challenge: st.builds(m.Challenge, version=u32s, nonce=nonces),
    m.Auth: st.builds(m.Auth, mac=macs, max_frame_size=frame_limits, early_window=windows),
    m.Welcome: st.builds(m.Welcome, mac=macs, max_frame_size=frame_limits, early_window=windows),
    m.Open: st.builds(
        m.Open,
        stream=stream_ids,
        window=windows,
        host=utf8_text(m.MAX_HOST),
        port=ports,
        tag=u32s,
        datagrams=st.booleans(),
    ),
    m.Accept: st.builds(m.Accept, stream=stream_ids, window=windows),
    m.Refuse: st.builds(
        m.Refuse, stream=stream_ids, code=error_codes, message=utf8_text(m.MAX_TEXT)
    ),
    m.Data: st.builds(m.Data, stream=stream_ids, data=payloads()),
    m.WindowUpdate: st.builds(m.WindowUpdate, stream=stream_ids, delta=deltas),
    m.Fin: st.builds(m.Fin, stream=stream_ids),
    m.Reset: st.builds(m.Reset, stream=stream_ids, code=error_codes, message=utf8_text(m.MAX_TEXT)),
    m.Ping: st.builds(m.Ping, opaque=u64s),
    m.Pong: st.builds(m.Pong, opaque=u64s),
    m.GoAway: st.builds(m.GoAway, code=error_codes, message=utf8_text(m.MAX_TEXT)),
    m.Bound: st.builds(m.Bound, host=utf8_text(m.MAX_HOST), port=ports),
    m.Datagram: st.builds(m.Datagram, stream=stream_ids, data=st.binary(max_size=2000)),
    m.Datagrams: st.builds(
        m.Datagrams,
        stream=stream_ids,
        data=st.lists(st.binary(max_size=300), min_size=2, max_size=20).map(tuple),
    ),
    m.ForwardState: st.builds(m.ForwardState, online=st.booleans(), reason=utf8_text(m.MAX_TEXT)),
    m.Join: st.builds(m.Join, group=utf8_text(m.MAX_GROUP), proof=macs),
}

#: One fixed, valid instance of every type (for table-driven tests).
EXAMPLES: dict[type[Any], Any] = {
    m.Hello: m.Hello((1, 2), bytes(range(32))),
    m.Challenge: m.Challenge(1, bytes(range(32, 64))),
    m.Auth: m.Auth(b"\x01" * 32, 1 << 20),
    m.Welcome: m.Welcome(b"\x02" * 32, 1 << 20),
    m.Open: m.Open(1, 1 << 20, "example.org", 443, 7),
    m.Accept: m.Accept(1, 1 << 20),
    m.Refuse: m.Refuse(1, ErrorCode.NODE_TIMEOUT, "timed out"),
    m.Data: m.Data(1, b"payload"),
    m.WindowUpdate: m.WindowUpdate(1, 4096),
    m.Fin: m.Fin(1),
    m.Reset: m.Reset(1, ErrorCode.CANCELLED, "bye"),
    m.Ping: m.Ping(42),
    m.Pong: m.Pong(42),
    m.GoAway: m.GoAway(ErrorCode.NORMAL, "shutdown"),
    m.Bound: m.Bound("0.0.0.0", 8080),
    m.Datagram: m.Datagram(5, b"\x12\x34 dns query"),
    m.Datagrams: m.Datagrams(5, (b"\x12\x34 dns query", b"", b"third")),
    m.ForwardState: m.ForwardState(False, "3 probes failed"),
    m.Join: m.Join("web", m.group_proof("web", b"secret")),
}

#: Any valid message of any type.
any_message: st.SearchStrategy[Any] = st.sampled_from(
    [STRATEGIES[cls] for cls in MESSAGE_TYPES if cls in STRATEGIES]
).flatmap(lambda strategy: strategy)


def field_types(cls: type[Any]) -> dict[str, Any]:
    attrs.resolve_types(cls)
    return {f.name: f.type for f in attrs.fields(cls)}


def required_fields(cls: type[Any]) -> list[str]:
    return [f.name for f in attrs.fields(cls) if f.default is attrs.NOTHING]


def wire_map(message: Any) -> dict[str, Any]:
    """The msgpack map a message travels as (``"t"`` included)."""
    return dict(converter.unstructure(message, Message))


def decode_map(obj: Any) -> Any:
    return decode_body(msgpack.packb(obj))


def assert_rejected(obj: Any, code: ErrorCode) -> RemoteProtocolError:
    with pytest.raises(RemoteProtocolError) as info:
        decode_map(obj)
    assert info.value.code == code, info.value
    return info.value


# ----------------------------------------------------------------------------- round trip


def test_every_message_type_has_a_strategy() -> None:
    assert set(STRATEGIES) == set(MESSAGE_TYPES)
    assert set(EXAMPLES) == set(MESSAGE_TYPES)
    tags = [cls.TAG for cls in MESSAGE_TYPES]
    assert len(set(tags)) == len(tags), "two message types share a tag"


@pytest.mark.parametrize("cls", MESSAGE_TYPES, ids=lambda cls: cls.__name__)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_round_trip_each_type(cls: type[Any], data: st.DataObject) -> None:
    message = data.draw(STRATEGIES[cls])
    obj = wire_map(message)
    assert obj["t"] == cls.TAG
    expected = {"t", *(f.name for f in attrs.fields(cls))}
    if cls is m.Open and not message.datagrams:
        expected.discard("datagrams")  # left off the wire when false
    if cls in (m.Auth, m.Welcome) and not message.early_window:
        expected.discard("early_window")  # version 2 only: left off when 0
    assert set(obj) == expected
    decoded = decode_body(encode_message(message)[4:])
    assert type(decoded) is cls
    assert decoded == message


@settings(max_examples=200, deadline=None)
@given(any_message)
def test_wire_map_uses_only_primitive_msgpack_types(message: Any) -> None:
    obj = msgpack.unpackb(encode_message(message)[4:], raw=False)
    for key, value in obj.items():
        assert type(key) is str
        assert type(value) in (int, str, bytes, list, bool), (key, value)
        if type(value) is list:
            entry = bytes if message.TAG == "dgrams" else int
            assert all(type(v) is entry for v in value)


def test_optional_fields_may_be_omitted() -> None:
    assert decode_map({"t": "open", "stream": 1, "window": 5}) == m.Open(1, 5, "", 0, 0)
    assert decode_map({"t": "refuse", "stream": 3, "code": 1007}) == m.Refuse(3, 1007, "")
    assert decode_map({"t": "reset", "stream": 3, "code": 1006}) == m.Reset(3, 1006, "")
    assert decode_map({"t": "goaway", "code": 0}) == m.GoAway(0, "")


def test_a_byte_stream_open_is_encoded_as_before_the_kind_existed() -> None:
    """``datagrams`` is omitted when false: a byte stream's Open stays byte-identical, and only
    a datagram stream's Open carries the field."""
    assert "datagrams" not in wire_map(m.Open(1, 5))
    assert wire_map(m.Open(1, 5, datagrams=True))["datagrams"] is True
    assert decode_map({"t": "open", "stream": 1, "window": 5, "datagrams": True}).datagrams
    assert decode_map({"t": "open", "stream": 1, "window": 5, "datagrams": False}) == m.Open(1, 5)


def test_a_version_1_handshake_is_encoded_as_before_version_2() -> None:
    """``early_window`` (version 2) is left off when 0, so a version 1 ``Auth`` and
    ``Welcome`` are byte-identical to what a version 1 implementation sends and accepts."""
    mac = bytes(32)
    assert encode_message(m.Auth(mac, 4096, "c")) == (
        b"\x00\x00\x00L\x84\xa3mac\xc4 " + mac + b"\xaemax_frame_size\xcd\x10\x00"
        b"\xa9client_id\xa1c\xa1t\xa4auth"
    )
    assert set(wire_map(m.Welcome(mac, 4096))) == {"t", "mac", "max_frame_size"}
    assert wire_map(m.Welcome(mac, 4096, 8192))["early_window"] == 8192
    assert decode_map(
        {"t": "auth", "mac": mac, "max_frame_size": 4096, "early_window": 5}
    ) == m.Auth(mac, 4096, "", 5)
    assert_rejected(
        {"t": "welcome", "mac": mac, "max_frame_size": 4096, "early_window": 2**31},
        ErrorCode.INVALID_FIELD,
    )


def test_open_kind_must_be_a_msgpack_bool() -> None:
    assert_rejected(
        {"t": "open", "stream": 1, "window": 5, "datagrams": 1}, ErrorCode.INVALID_FIELD
    )


def test_key_order_is_irrelevant() -> None:
    body = b"\x82\xa1t\xa4ping\xa6opaque\x07"  # "t" first, unlike our encoder
    assert decode_body(body) == m.Ping(7)


def test_field_names_and_tags_are_stable() -> None:
    """The wire names are the protocol: changing any of them breaks every other implementation."""
    expected = {
        "hello": ["versions", "nonce"],
        "challenge": ["version", "nonce"],
        "auth": ["mac", "max_frame_size", "client_id", "early_window"],
        "welcome": ["mac", "max_frame_size", "early_window"],
        "open": ["stream", "window", "host", "port", "tag", "datagrams"],
        "accept": ["stream", "window"],
        "refuse": ["stream", "code", "message"],
        "data": ["stream", "data"],
        "window": ["stream", "delta"],
        "fin": ["stream"],
        "reset": ["stream", "code", "message"],
        "ping": ["opaque"],
        "pong": ["opaque"],
        "goaway": ["code", "message"],
        "bound": ["host", "port"],
        "join": ["group", "proof"],
        "fwdstate": ["online", "reason"],
        "dgram": ["stream", "data"],
        "dgrams": ["stream", "data"],
    }
    actual = {cls.TAG: [f.name for f in attrs.fields(cls)] for cls in MESSAGE_TYPES}
    assert actual == expected


# ----------------------------------------------------------------------------- validators


@pytest.mark.parametrize(
    "build",
    [
        lambda: m.Open(0, 1),
        lambda: m.Open(2**32, 1),
        lambda: m.Open(1, -1),
        lambda: m.Open(1, 2**31),
        lambda: m.Open(1, 1, port=65536),
        lambda: m.Open(1, 1, host="x" * 256),
        lambda: m.Open(1, 1, host="\u00e9" * 128),  # 128 characters but 256 bytes
        lambda: m.Open(1, 1, host="\ud800"),  # a lone surrogate cannot be encoded
        lambda: m.WindowUpdate(1, 0),
        lambda: m.WindowUpdate(1, 2**31),
        lambda: m.Ping(-1),
        lambda: m.Ping(2**64),
        lambda: m.Ping(True),
        lambda: m.Open(1, 1, datagrams=1),
        lambda: m.Fin(True),
        lambda: m.Refuse(1, -1),
        lambda: m.Reset(1, 1, "x" * 1025),
        lambda: m.GoAway(0, "\U0001f600" * 257),
        lambda: m.Hello(tuple(range(17)), bytes(32)),
        lambda: m.Hello((-1,), bytes(32)),
        lambda: m.Hello((2**32,), bytes(32)),
        lambda: m.Hello((1,), bytes(31)),
        lambda: m.Challenge(1, bytes(33)),
        lambda: m.Auth(bytes(32), 4095),
        lambda: m.Auth(bytes(32), 0),
        lambda: m.Welcome(bytes(32), 2**32),
        lambda: m.Welcome(bytes(31), 4096),
    ],
)
def test_validators_reject(build: Any) -> None:
    with pytest.raises(ValueError, match=r"must|longer|more than|can't encode"):
        build()


def test_validators_accept_limits() -> None:
    m.Open(2**32 - 1, 2**31 - 1, "x" * 255, 65535, 2**32 - 1)
    m.Open(1, 0, "\u00e9" * 127)
    m.Reset(1, 2**32 - 1, "\U0001f600" * 256)
    m.Ping(2**64 - 1)
    m.Hello(tuple(range(16)), bytes(32))
    m.Auth(bytes(32), 4096)
    m.Refuse(1, ErrorCode.STREAM_LIMIT)  # an IntEnum is an int


@pytest.mark.parametrize(
    ("text", "limit"),
    [("", 5), ("abc", 5), ("abcdef", 5), ("\u00e9\u00e9\u00e9", 5), ("\U0001f600" * 3, 9)],
)
def test_truncate_text(text: str, limit: int) -> None:
    cut = m.truncate_text(text, limit)
    assert len(cut.encode()) <= limit
    assert text.startswith(cut)
    assert len(cut.encode()) > limit - 4 or cut == text


# ----------------------------------------------------------------------------- rejection


def _wrong_values(kind: Any, name: str) -> list[Any]:
    """Values of the wrong msgpack type (or range) for a field of Python type ``kind``."""
    common: list[Any] = [None, 1.5, [1], {"a": 1}]
    if kind is int:
        # msgpack cannot carry ints above 2**64 - 1, so a u64 field can only be too small.
        oversize = [2**32] if name != "opaque" else []
        return [*common, "5", b"5", True, False, -1, -(2**63), *oversize]
    if kind is str:
        return [*common, b"text", 5, True, "x" * 1025]
    if kind is bytes:
        return [*common, "x" * 32, 5, True, [0] * 32]
    if kind is bool:
        return [*common, 0, 1, "true", b"\x01"]
    if kind == tuple[int, ...]:
        return [*common[:2], "1", b"\x01", 1, [True], ["1"], [1.0], [-1], [2**32], [0] * 17]
    if kind == tuple[bytes, ...]:
        too_many = [b""] * (m.MAX_DATAGRAM_BATCH + 1)
        too_big = [b"", bytes(m.MAX_DATAGRAM + 1)]
        return [*common[:2], "1", b"\x01", 1, [], [b"one"], ["x", "y"], [1, 2], too_many, too_big]
    raise AssertionError(f"no wrong values for {kind}")


def _bad_maps() -> list[tuple[str, dict[str, Any]]]:
    cases = []
    for cls in MESSAGE_TYPES:
        base = wire_map(EXAMPLES[cls])
        for name, kind in field_types(cls).items():
            for wrong in _wrong_values(kind, name):
                cases.append((f"{cls.TAG}.{name}={wrong!r:.20}", {**base, name: wrong}))
    return cases


@pytest.fixture(scope="module")
def bad_maps() -> list[tuple[str, dict[str, Any]]]:
    return _bad_maps()


def test_wrong_field_types_and_ranges_are_invalid_field(
    bad_maps: list[tuple[str, dict[str, Any]]],
) -> None:
    assert len(bad_maps) > 100
    for label, obj in bad_maps:
        with pytest.raises(RemoteProtocolError) as info:
            decode_map(obj)
        assert info.value.code == ErrorCode.INVALID_FIELD, label


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(message=any_message, data=st.data())
def test_random_wrong_field_is_invalid_field(message: Any, data: st.DataObject) -> None:
    cls = type(message)
    obj = wire_map(message)
    types = field_types(cls)
    name = data.draw(st.sampled_from(sorted(types)))
    obj[name] = data.draw(st.sampled_from(_wrong_values(types[name], name)))
    assert_rejected(obj, ErrorCode.INVALID_FIELD)


@pytest.mark.parametrize("cls", MESSAGE_TYPES, ids=lambda cls: cls.__name__)
def test_missing_required_field_is_invalid_field(cls: type[Any]) -> None:
    base = wire_map(EXAMPLES[cls])
    for name in required_fields(cls):
        obj = {k: v for k, v in base.items() if k != name}
        assert_rejected(obj, ErrorCode.INVALID_FIELD)


@pytest.mark.parametrize("cls", MESSAGE_TYPES, ids=lambda cls: cls.__name__)
def test_extra_key_is_invalid_field(cls: type[Any]) -> None:
    base = wire_map(EXAMPLES[cls])
    assert_rejected({**base, "extra": 1}, ErrorCode.INVALID_FIELD)
    assert_rejected({**base, "T": base["t"]}, ErrorCode.INVALID_FIELD)


@pytest.mark.parametrize(
    "obj",
    [
        {"t": "nope", "stream": 1},
        {"t": "", "stream": 1},
        {"t": "Data", "stream": 1, "data": b""},  # tags are case-sensitive
        {"t": "DataReceived", "stream": 1},
        {"t": 1, "stream": 1},
        {"t": b"data", "stream": 1, "data": b""},  # bin, not str
        {"t": None},
        {"t": ["data"]},
        {b"t": "data", "stream": 1, "data": b""},  # bin key: not the tag
        {"stream": 1, "data": b""},  # no tag at all
        {},
    ],
)
def test_unknown_or_missing_tag_is_unknown_message(obj: dict[str, Any]) -> None:
    assert_rejected(obj, ErrorCode.UNKNOWN_MESSAGE)


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=30).filter(lambda t: t not in {cls.TAG for cls in MESSAGE_TYPES}))
def test_random_unknown_tag(tag: str) -> None:
    assert_rejected({"t": tag, "stream": 1}, ErrorCode.UNKNOWN_MESSAGE)


@pytest.mark.parametrize(
    "body",
    [
        b"",  # empty frame
        b"\xc1",  # never-used msgpack byte
        b"\x93\x01\x02\x03",  # array, not map
        b"\x05",  # int
        b"\xa4ping",  # str
        b"\xc0",  # nil
        b"\x81\x01\x02",  # int key
        b"\x81\x80\x01",  # map as key
        b"\x82\xa1t\xa4ping\xa6opaque",  # map cut short
        b"\x82\xa1t\xa4ping\xa6opaque\x07\x00",  # trailing byte after the map
        b"\x82\xa1t\xa4pi\xffg\xa6opaque\x07",  # str that is not UTF-8
        b"\xdf\xff\xff\xff\xff",  # map32 claiming 4 billion entries
        b"\x91" * 3000,  # deep nesting
    ],
)
def test_malformed_bodies(body: bytes) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        decode_body(body)
    assert info.value.code == ErrorCode.MALFORMED_FRAME, info.value


def test_duplicate_keys_are_malformed() -> None:
    """msgpack-python keeps the last duplicate, other decoders the first: refuse both."""
    ping = b"\x83\xa1t\xa4ping\xa6opaque\x01\xa6opaque\x02"
    with pytest.raises(RemoteProtocolError) as info:
        decode_body(ping)
    assert info.value.code == ErrorCode.MALFORMED_FRAME
    tag_twice = b"\x83\xa1t\xa4ping\xa6opaque\x01\xa1t\xa4pong"
    with pytest.raises(RemoteProtocolError) as info:
        decode_body(tag_twice)
    assert info.value.code == ErrorCode.MALFORMED_FRAME


def test_map16_and_map32_headers_are_accepted() -> None:
    items = b"\xa1t\xa4ping\xa6opaque\x07"
    assert decode_body(b"\xde\x00\x02" + items) == m.Ping(7)
    assert decode_body(b"\xdf\x00\x00\x00\x02" + items) == m.Ping(7)


def test_ext_type_value_is_invalid_field() -> None:
    with pytest.raises(RemoteProtocolError) as info:
        decode_body(b"\x82\xa1t\xa4ping\xa6opaque\xd4\x01\x00")  # fixext 1
    assert info.value.code == ErrorCode.INVALID_FIELD


def test_str_for_bytes_is_rejected_even_when_ascii() -> None:
    assert_rejected({"t": "data", "stream": 1, "data": "abc"}, ErrorCode.INVALID_FIELD)
    assert_rejected({"t": "hello", "versions": [1], "nonce": "x" * 32}, ErrorCode.INVALID_FIELD)


@pytest.mark.parametrize(
    ("obj", "code"),
    [
        ({"t": "x" * 5000}, ErrorCode.UNKNOWN_MESSAGE),
        ({"t": "\U0001f600" * 5000}, ErrorCode.UNKNOWN_MESSAGE),
        ({"t": "open", "stream": 1, "window": 1, "host": "h" * 5000}, ErrorCode.INVALID_FIELD),
        ({"t": "fin", "stream": 1, "\U0001f600" * 5000: 1}, ErrorCode.INVALID_FIELD),
    ],
)
def test_error_messages_fit_a_goaway(obj: dict[str, Any], code: ErrorCode) -> None:
    """The session sends the decoder's message back in a GoAway: it must be valid there."""
    err = assert_rejected(obj, code)
    assert len(err.message.encode()) <= 300
    m.GoAway(err.code, err.message)


def test_datagram_over_the_limit_is_refused_at_construction() -> None:
    """A datagram larger than MAX_DATAGRAM can be neither built nor decoded: UDP's own
    limit, so no peer can make us hold a bigger one."""
    m.Datagram(1, bytes(m.MAX_DATAGRAM))
    with pytest.raises(ValueError, match=f"data is longer than {m.MAX_DATAGRAM} bytes"):
        m.Datagram(1, bytes(m.MAX_DATAGRAM + 1))


def test_truncate_text_keeps_short_non_ascii_whole() -> None:
    """Text that is not ASCII but fits in the limit is returned as it is, not re-cut."""
    assert m.truncate_text("caf\u00e9", 5) == "caf\u00e9"
    assert m.truncate_text("caf\u00e9", 4) == "caf"


def test_the_group_proof_is_an_hmac_of_the_group_name() -> None:
    """Published in docs/protocol.md: another implementation must derive the same proof."""
    proof = m.group_proof("web", b"secret")
    assert proof == hmac.new(b"secret", b"pytunnel-group\0web", hashlib.sha256).digest()
    assert proof != m.group_proof("web2", b"secret")
    assert proof != m.group_proof("web", b"secret2")


# ----------------------------------------------------------------------------- exact behaviour
# Pinned down by the mutation run (docs/mutation.md).


@pytest.mark.parametrize(
    ("obj", "text"),
    [
        (
            {"t": "hello", "versions": "5", "nonce": bytes(32)},
            "invalid 'hello' message: TypeError: expected array, got str",
        ),
        (
            {"t": "hello", "versions": [1, "x"], "nonce": bytes(32)},
            "invalid 'hello' message: TypeError: expected array of integers",
        ),
        ({"t": "ping", "opaque": "5"}, "invalid 'ping' message: TypeError: expected int, got str"),
        (
            {"t": "hello", "versions": [1], "nonce": bytes(3)},
            "invalid 'hello' message: ValueError: nonce must be exactly 32 bytes",
        ),
        (
            {"t": "dgram", "stream": 1, "data": bytes(m.MAX_DATAGRAM + 1)},
            f"invalid 'dgram' message: ValueError: data is longer than {m.MAX_DATAGRAM} bytes",
        ),
        (
            {"t": "auth", "mac": bytes(32), "max_frame_size": 4096, "client_id": "a b"},
            "invalid 'auth' message: ValueError: client_id must be at most 64 characters of "
            "[A-Za-z0-9._:-]",
        ),
        (
            {"t": "goaway", "code": 0, "message": "\u00e9" * (m.MAX_TEXT // 2 + 1)},
            f"invalid 'goaway' message: ValueError: message is longer than {m.MAX_TEXT} bytes "
            "of UTF-8",
        ),
    ],
)
def test_invalid_fields_are_named_exactly(obj: dict[str, Any], text: str) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        decode_body(msgpack.packb(obj))
    assert (info.value.code, info.value.message) == (ErrorCode.INVALID_FIELD, text)


def test_client_ids_are_up_to_64_characters_of_the_alphabet() -> None:
    assert m.valid_client_id("a" * m.MAX_CLIENT_ID)
    assert not m.valid_client_id("a" * (m.MAX_CLIENT_ID + 1))
    assert m.valid_client_id("host-1.example:a_B9")
    assert m.valid_client_id("")
    assert not m.valid_client_id("a b")
    assert m.Auth(bytes(32), 4096, "x" * m.MAX_CLIENT_ID).client_id == "x" * m.MAX_CLIENT_ID


def test_text_limits_are_inclusive_in_utf8_bytes() -> None:
    exact = "\u00e9" * (m.MAX_TEXT // 2)  # 2 bytes each: exactly the limit
    assert m.GoAway(0, exact).message == exact
    with pytest.raises(ValueError, match=f"^message is longer than {m.MAX_TEXT} bytes of UTF-8$"):
        m.GoAway(0, exact + "e")


def test_a_datagram_of_exactly_the_limit_is_valid() -> None:
    assert len(m.Datagram(1, bytes(m.MAX_DATAGRAM)).data) == m.MAX_DATAGRAM


def test_truncate_text_replaces_what_utf8_cannot_encode() -> None:
    assert m.truncate_text("a\ud800b") == "a?b"
    assert m.truncate_text("\ud800" * 3, 2) == "??"


def test_a_layer_contains_exactly_its_kinds() -> None:
    assert m.Ping in m.SESSION
    assert m.Hello not in m.SESSION
    assert m.Bound in m.CONTROL
    assert m.Open not in m.CONTROL
