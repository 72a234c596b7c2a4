"""Every message of the wire protocol, and the one converter that maps them to msgpack.

Each message is a frozen attrs class. On the wire a message is a msgpack map whose ``"t"`` key
names the type (the class's ``TAG``) and whose other keys are the fields, so a peer written in
another language needs nothing but a msgpack library. Payload bytes are msgpack ``bin``.

Field types are checked strictly when structuring (an ``int`` field does not accept ``"5"``, a
``bytes`` field does not accept a ``str``): a lenient decoder would let two implementations
disagree about what a frame means.

The messages fall into three layers, each with its own union (``HandshakeMessage``,
``SessionMessage``, ``ControlMessage``) and :class:`Layer`: a decoder is told which layer it
reads, so what it returns is already known to belong there. ``Message`` is the union of all
of them, for encoding.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any, ClassVar, TypeVar, Union

import attrs
from cattrs.gen import make_dict_unstructure_fn, override
from cattrs.preconf.msgpack import make_converter
from cattrs.strategies import configure_tagged_union

__all__ = [
    "ANY_LAYER",
    "CONTROL",
    "HANDSHAKE",
    "MAX_CLIENT_ID",
    "MAX_DATAGRAM",
    "MAX_DATAGRAM_BATCH",
    "MAX_GROUP",
    "MAX_STREAM_ID",
    "MAX_WINDOW",
    "MIN_MAX_FRAME_SIZE",
    "Accept",
    "Auth",
    "Bound",
    "Challenge",
    "ControlMessage",
    "Data",
    "Datagram",
    "Datagrams",
    "Fin",
    "ForwardState",
    "GoAway",
    "HandshakeMessage",
    "Hello",
    "Join",
    "Layer",
    "Message",
    "Open",
    "Ping",
    "Pong",
    "Refuse",
    "Reset",
    "SESSION",
    "SessionMessage",
    "WindowUpdate",
    "Welcome",
    "converter",
    "group_proof",
    "truncate_text",
    "valid_client_id",
]

MAX_U32 = 2**32 - 1
MAX_U64 = 2**64 - 1
#: Stream ids are unsigned 32-bit; 0 is reserved (never a stream).
MAX_STREAM_ID = MAX_U32
#: A window (and a window update) is at most 2**31 - 1 bytes, as in HTTP/2.
MAX_WINDOW = 2**31 - 1
#: Text fields are capped so a peer cannot make us hold megabytes of "reason". The limits count
#: bytes of UTF-8 (what crosses the wire), not characters, so every implementation agrees.
MAX_TEXT = 1024
MAX_HOST = 255
MAX_VERSIONS = 16
#: A client identity is at most this many bytes (a 128-bit random id is 32 hex digits).
MAX_CLIENT_ID = 64
#: The longest load-balanced group name, in UTF-8 bytes.
MAX_GROUP = 64
NONCE_SIZE = 32
MAC_SIZE = 32
#: Largest UDP payload carried (the IPv4 maximum: 65535 - 8 - 20).
MAX_DATAGRAM = 65507
#: Most datagrams one ``Datagrams`` message carries: a batch is what one read of a UDP socket
#: found waiting (64 at most in pytunnel), and a receiver's queue holds 256 per association,
#: so a peer cannot make one frame cost more than a queue's worth of work.
MAX_DATAGRAM_BATCH = 256
#: Smallest ``max_frame_size`` a peer may announce in ``Auth``/``Welcome``. Every message except
#: ``Data`` encodes to well under this (the text limits above are in bytes for that reason), so a
#: peer announcing at least this much can always be sent any control frame.
MIN_MAX_FRAME_SIZE = 4096


def _is_int(value: object) -> bool:
    # ``bool`` is an ``int`` to Python but msgpack encodes it as true/false, which no int field
    # accepts on decoding: refuse it here so that every valid message survives a round trip.
    return isinstance(value, int) and value.__class__ is not bool


def _u32(_inst: object, attribute: attrs.Attribute[int], value: int) -> None:
    if not (_is_int(value) and 0 <= value <= MAX_U32):
        raise ValueError(f"{attribute.name} must be an unsigned 32-bit integer, got {value!r}")


def _u64(_inst: object, attribute: attrs.Attribute[int], value: int) -> None:
    if not (_is_int(value) and 0 <= value <= MAX_U64):
        raise ValueError(f"{attribute.name} must be an unsigned 64-bit integer, got {value!r}")


def _stream_id(_inst: object, attribute: attrs.Attribute[int], value: int) -> None:
    if not (_is_int(value) and 1 <= value <= MAX_STREAM_ID):
        raise ValueError(f"{attribute.name} must be in 1..2**32-1, got {value!r}")


def _datagram_batch(
    _inst: object, attribute: attrs.Attribute[tuple[bytes, ...]], value: Any
) -> None:
    if not 2 <= len(value) <= MAX_DATAGRAM_BATCH:
        raise ValueError(f"{attribute.name} must hold 2..{MAX_DATAGRAM_BATCH} datagrams")
    for item in value:
        if item.__class__ is not bytes or len(item) > MAX_DATAGRAM:
            raise ValueError(f"{attribute.name} entries must be bytes of at most {MAX_DATAGRAM}")


def _window(_inst: object, attribute: attrs.Attribute[int], value: int) -> None:
    if not (_is_int(value) and 0 <= value <= MAX_WINDOW):
        raise ValueError(f"{attribute.name} must be in 0..2**31-1, got {value!r}")


def _delta(_inst: object, attribute: attrs.Attribute[int], value: int) -> None:
    if not (_is_int(value) and 1 <= value <= MAX_WINDOW):
        raise ValueError(f"{attribute.name} must be in 1..2**31-1, got {value!r}")


def _bool(_inst: object, attribute: attrs.Attribute[bool], value: bool) -> None:
    if value.__class__ is not bool:
        raise ValueError(f"{attribute.name} must be a bool, got {value!r}")


def _frame_limit(_inst: object, attribute: attrs.Attribute[int], value: int) -> None:
    if not (_is_int(value) and MIN_MAX_FRAME_SIZE <= value <= MAX_U32):
        raise ValueError(
            f"{attribute.name} must be in {MIN_MAX_FRAME_SIZE}..2**32-1, got {value!r}"
        )


def _versions(_inst: object, attribute: attrs.Attribute[tuple[int, ...]], value: Any) -> None:
    if len(value) > MAX_VERSIONS:
        raise ValueError(f"{attribute.name} has more than {MAX_VERSIONS} entries")
    for version in value:
        if not (_is_int(version) and 0 <= version <= MAX_U32):
            raise ValueError(f"{attribute.name} entries must be unsigned 32-bit integers")


_CLIENT_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._:-")


def valid_client_id(value: str) -> bool:
    """Whether ``value`` may be a client identity: empty (none), or 1-64 of ``[A-Za-z0-9._:-]``.

    A restricted alphabet means the server can log an identity as it is, with no escaping,
    and two implementations never disagree about whether two identities are the same.
    """
    return len(value) <= MAX_CLIENT_ID and all(c in _CLIENT_ID_CHARS for c in value)


def _client_id(_inst: object, attribute: attrs.Attribute[str], value: str) -> None:
    if not valid_client_id(value):
        raise ValueError(
            f"{attribute.name} must be at most {MAX_CLIENT_ID} characters of [A-Za-z0-9._:-]"
        )


def _max_utf8(limit: int) -> Any:
    def check(_inst: object, attribute: attrs.Attribute[str], value: str) -> None:
        # Fast path for ASCII; otherwise measure the UTF-8 encoding, which also rejects lone
        # surrogates (they cannot be encoded, so msgpack could not send them anyway).
        if len(value) > limit or (not value.isascii() and len(value.encode("utf-8")) > limit):
            raise ValueError(f"{attribute.name} is longer than {limit} bytes of UTF-8")

    return check


def truncate_text(text: str, limit: int = MAX_TEXT) -> str:
    """Cut ``text`` to at most ``limit`` bytes of UTF-8 without splitting a character."""
    if len(text) <= limit and text.isascii():
        return text
    raw = text.encode("utf-8", "replace")
    if len(raw) <= limit:
        return raw.decode("utf-8")
    return raw[:limit].decode("utf-8", "ignore")


def _max_len_bytes(limit: int) -> Any:
    def check(_inst: object, attribute: attrs.Attribute[bytes], value: bytes) -> None:
        if len(value) > limit:
            raise ValueError(f"{attribute.name} is longer than {limit} bytes")

    return check


def _exact_len(size: int) -> Any:
    def check(_inst: object, attribute: attrs.Attribute[bytes], value: bytes) -> None:
        if len(value) != size:
            raise ValueError(f"{attribute.name} must be exactly {size} bytes")

    return check


def _port(_inst: object, attribute: attrs.Attribute[int], value: int) -> None:
    if not (_is_int(value) and 0 <= value <= 65535):
        raise ValueError(f"{attribute.name} must be a port number, got {value!r}")


# ----------------------------------------------------------------------------- handshake


@attrs.frozen
class Hello:
    """Client -> server, first frame: the versions the client speaks and its nonce."""

    TAG: ClassVar[str] = "hello"
    versions: tuple[int, ...] = attrs.field(validator=_versions)
    nonce: bytes = attrs.field(validator=_exact_len(NONCE_SIZE))


@attrs.frozen
class Challenge:
    """Server -> client: the chosen version and the server's nonce."""

    TAG: ClassVar[str] = "challenge"
    version: int = attrs.field(validator=_u32)
    nonce: bytes = attrs.field(validator=_exact_len(NONCE_SIZE))


@attrs.frozen
class Auth:
    """Client -> server: HMAC-SHA256(token, client proof input); see ``protocol.handshake``."""

    TAG: ClassVar[str] = "auth"
    mac: bytes = attrs.field(validator=_exact_len(MAC_SIZE))
    #: The largest frame body the client accepts after the handshake (at least 4096).
    max_frame_size: int = attrs.field(validator=_frame_limit)
    #: The client's identity for the life of its tunnel ("" for none). A new session with
    #: the identity of a live one replaces it. Covered by ``mac``, so it cannot be swapped.
    client_id: str = attrs.field(default="", validator=_client_id)
    #: Version 2: the bytes the server may send on a stream it opens before the client's
    #: Accept (early data); 0 and left off the wire otherwise, as in version 1.
    early_window: int = attrs.field(default=0, validator=_window)


@attrs.frozen
class Welcome:
    """Server -> client: authentication succeeded; ``mac`` proves the server knows the token."""

    TAG: ClassVar[str] = "welcome"
    mac: bytes = attrs.field(validator=_exact_len(MAC_SIZE))
    #: The largest frame body the server accepts after the handshake (at least 4096).
    max_frame_size: int = attrs.field(validator=_frame_limit)
    #: Version 2: the bytes the client may send on a stream it opens before the server's
    #: Accept (early data); 0 and left off the wire otherwise, as in version 1.
    early_window: int = attrs.field(default=0, validator=_window)


# ----------------------------------------------------------------------------- streams


@attrs.frozen
class Open:
    """Open stream ``stream``. ``window`` is the opener's receive window.

    ``host``/``port`` name a target the receiver should dial and ``tag`` an application route
    (for example a forward id); the multiplexer carries them without interpreting them.
    ``datagrams`` fixes the stream's kind for its whole life: only a datagram stream (a UDP
    association) may carry ``Datagram`` messages, so a byte stream never needs, and a peer can
    never fill, a datagram queue. It is left off the wire when false, so a byte stream's
    ``Open`` is the same as before the field existed.
    """

    TAG: ClassVar[str] = "open"
    stream: int = attrs.field(validator=_stream_id)
    window: int = attrs.field(validator=_window)
    host: str = attrs.field(default="", validator=_max_utf8(MAX_HOST))
    port: int = attrs.field(default=0, validator=_port)
    tag: int = attrs.field(default=0, validator=_u32)
    datagrams: bool = attrs.field(default=False, validator=_bool)


@attrs.frozen
class Accept:
    """The stream is open; ``window`` is the acceptor's receive window."""

    TAG: ClassVar[str] = "accept"
    stream: int = attrs.field(validator=_stream_id)
    window: int = attrs.field(validator=_window)


@attrs.frozen
class Refuse:
    """The stream will not be opened; ``code`` is an ``ErrorCode`` (dial outcome, limit...)."""

    TAG: ClassVar[str] = "refuse"
    stream: int = attrs.field(validator=_stream_id)
    code: int = attrs.field(validator=_u32)
    message: str = attrs.field(default="", validator=_max_utf8(MAX_TEXT))


@attrs.frozen
class Data:
    """Payload bytes on a stream; counts against the receiver's window."""

    TAG: ClassVar[str] = "data"
    stream: int = attrs.field(validator=_stream_id)
    data: bytes


@attrs.frozen
class Datagram:
    """One UDP datagram belonging to stream ``stream`` (a UDP association).

    Not flow-controlled and never split: boundaries are kept, one datagram per message. A
    receiver drops datagrams it has no room for (that is UDP's contract) rather than stalling
    the session; datagrams for a stream that no longer exists are dropped silently.
    """

    TAG: ClassVar[str] = "dgram"
    stream: int = attrs.field(validator=_stream_id)
    data: bytes = attrs.field(validator=_max_len_bytes(MAX_DATAGRAM))


@attrs.frozen
class Datagrams:
    """Several UDP datagrams of stream ``stream``, in order: what one read of the sender's
    socket found waiting, in one frame instead of one frame each (protocol version 2 only).

    Each entry is one datagram, exactly as ``Datagram`` carries it (never merged or split);
    the same rules apply to each: not flow-controlled, dropped by a receiver with no room.
    2 to ``MAX_DATAGRAM_BATCH`` entries (one datagram travels as ``Datagram``), and the frame
    must fit the receiver's frame limit like any other.
    """

    TAG: ClassVar[str] = "dgrams"
    stream: int = attrs.field(validator=_stream_id)
    data: tuple[bytes, ...] = attrs.field(validator=_datagram_batch)


@attrs.frozen
class WindowUpdate:
    """The receiver consumed ``delta`` more bytes: the sender may send that much more."""

    TAG: ClassVar[str] = "window"
    stream: int = attrs.field(validator=_stream_id)
    delta: int = attrs.field(validator=_delta)


@attrs.frozen
class Fin:
    """The sender will send no more data on the stream (half-close)."""

    TAG: ClassVar[str] = "fin"
    stream: int = attrs.field(validator=_stream_id)


@attrs.frozen
class Reset:
    """Abort the stream in both directions at once."""

    TAG: ClassVar[str] = "reset"
    stream: int = attrs.field(validator=_stream_id)
    code: int = attrs.field(validator=_u32)
    message: str = attrs.field(default="", validator=_max_utf8(MAX_TEXT))


# ----------------------------------------------------------------------------- session


@attrs.frozen
class Ping:
    """Ask for a ``Pong`` with the same ``opaque`` value (keep-alive and RTT)."""

    TAG: ClassVar[str] = "ping"
    opaque: int = attrs.field(validator=_u64)


@attrs.frozen
class Pong:
    """Answer to ``Ping``."""

    TAG: ClassVar[str] = "pong"
    opaque: int = attrs.field(validator=_u64)


@attrs.frozen
class GoAway:
    """The sender is ending the session; ``code`` is an ``ErrorCode`` (0 = normal)."""

    TAG: ClassVar[str] = "goaway"
    code: int = attrs.field(validator=_u32)
    message: str = attrs.field(default="", validator=_max_utf8(MAX_TEXT))


# ----------------------------------------------------------------------------- in-stream


@attrs.frozen
class Bound:
    """Sent framed *inside* a remote-forward control stream, never at session level.

    Server -> client, first payload of an accepted listen request: where the server is actually
    listening (the port is the real one when 0 was asked for).
    """

    TAG: ClassVar[str] = "bound"
    host: str = attrs.field(validator=_max_utf8(MAX_HOST))
    port: int = attrs.field(validator=_port)


@attrs.frozen
class Join:
    """Sent framed inside a grouped remote forward's or name route's control stream, client ->
    server, first and once: the load-balanced group the forward joins.

    ``proof`` is HMAC-SHA256 of ``b"pytunnel-group\0" + group`` keyed with the group's secret
    (:func:`group_proof`): every member of a group must send the same one, and the secret
    itself never crosses the wire.
    """

    TAG: ClassVar[str] = "join"
    group: str = attrs.field(validator=_max_utf8(MAX_GROUP))
    proof: bytes = attrs.field(validator=_exact_len(MAC_SIZE))


def group_proof(group: str, key: bytes) -> bytes:
    """What a member of ``group`` holding ``key`` sends in its :class:`Join`."""
    return hmac.new(key, b"pytunnel-group\0" + group.encode(), hashlib.sha256).digest()


@attrs.frozen
class ForwardState:
    """Sent framed inside a remote-forward control stream, client -> server.

    The client's health probes found the forward's target down (``online`` false) or back up.
    While offline the server stops listening, so the public port refuses connections at once
    instead of accepting and dropping them.
    """

    TAG: ClassVar[str] = "fwdstate"
    online: bool
    reason: str = attrs.field(default="", validator=_max_utf8(MAX_TEXT))


# ----------------------------------------------------------------------------- layers

#: What may cross the wire before the session exists (``GoAway`` is the server's refusal).
HandshakeMessage = Union[Hello, Challenge, Auth, Welcome, GoAway]  # noqa: UP007
#: What the multiplexer exchanges once the handshake is over.
SessionMessage = Union[  # noqa: UP007
    Open,
    Accept,
    Refuse,
    Data,
    Datagram,
    Datagrams,
    WindowUpdate,
    Fin,
    Reset,
    Ping,
    Pong,
    GoAway,
]
#: What travels framed inside a remote forward's control stream.
ControlMessage = Union[Bound, Join, ForwardState]  # noqa: UP007

#: Every message, for encoding (a real Union object: cattrs needs one at runtime on 3.10).
Message = Union[HandshakeMessage, SessionMessage, ControlMessage]  # noqa: UP007

MESSAGE_TYPES: tuple[type[Any], ...] = Message.__args__  # type: ignore[attr-defined]


@attrs.frozen
class Layer:
    """The message kinds one layer of the protocol accepts from its peer.

    A frame decoder is given its layer, so a message of another layer (a ``Hello`` in the
    session, an ``Open`` inside a control stream) is a decode error, ``UNEXPECTED_MESSAGE``,
    and the state machine above it only ever sees its own kinds.
    """

    #: Says where the layer's messages travel, for error messages ("after the handshake").
    where: str
    types: frozenset[type[Any]]

    def __contains__(self, kind: object) -> bool:
        return kind in self.types


def _kinds(union: Any) -> frozenset[type[Any]]:
    return frozenset(union.__args__)


#: Before the session: ``Hello``, ``Challenge``, ``Auth``, ``Welcome`` and ``GoAway``.
HANDSHAKE = Layer("during the handshake", _kinds(HandshakeMessage))
#: The multiplexer's frames.
SESSION = Layer("after the handshake", _kinds(SessionMessage))
#: ``Bound``, ``Join`` and ``ForwardState``, framed inside a control stream.
CONTROL = Layer("on a forward's control stream", _kinds(ControlMessage))
#: Every message: for tools and tests that decode any frame.
ANY_LAYER = Layer("anywhere", frozenset(MESSAGE_TYPES))

_T = TypeVar("_T")


def _strict(expected: type[_T]) -> Any:
    """A structure hook that accepts exactly ``expected`` (no ``int("5")``, no ``bool`` ints)."""

    def hook(value: object, _type: object) -> _T:
        if type(value) is not expected:
            raise TypeError(f"expected {expected.__name__}, got {type(value).__name__}")
        return value

    return hook


def _int_tuple(value: object, _type: object) -> tuple[int, ...]:
    if type(value) is not list:
        raise TypeError(f"expected array, got {type(value).__name__}")
    if any(type(v) is not int for v in value):
        raise TypeError("expected array of integers")
    return tuple(value)


def _bytes_tuple(value: object, _type: object) -> tuple[bytes, ...]:
    if type(value) is not list:
        raise TypeError(f"expected array, got {type(value).__name__}")
    if any(type(v) is not bytes for v in value):
        raise TypeError("expected array of bin")
    return tuple(value)


def _build_converter() -> Any:
    conv = make_converter(forbid_extra_keys=True)
    for t in (int, str, bytes, bool):
        conv.register_structure_hook(t, _strict(t))
    conv.register_structure_hook_func(lambda t: t == tuple[int, ...], _int_tuple)
    conv.register_structure_hook_func(lambda t: t == tuple[bytes, ...], _bytes_tuple)
    conv.register_unstructure_hook(
        Open, make_dict_unstructure_fn(Open, conv, datagrams=override(omit_if_default=True))
    )
    # version 1 handshakes stay byte-identical: the version 2 field is left off when 0
    for kind in (Auth, Welcome):
        conv.register_unstructure_hook(
            kind,
            make_dict_unstructure_fn(kind, conv, early_window=override(omit_if_default=True)),
        )
    configure_tagged_union(
        Message,
        conv,
        tag_generator=lambda cls: str(getattr(cls, "TAG")),  # noqa: B009
        tag_name="t",
    )
    return conv


#: The single converter between message objects and msgpack-ready primitives.
converter = _build_converter()
