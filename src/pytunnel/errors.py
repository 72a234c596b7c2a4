"""The one exception hierarchy of pytunnel.

Every error carries a stable numeric ``code``. The codes are part of the wire protocol: they travel
in ``GoAway``, ``Refuse`` and ``Reset`` messages, so that the side that asked can raise the same
typed exception that the side that failed would have raised. They never change meaning once
released; see ``docs/protocol.md`` for the table.

This module is deliberately free of ``trio`` so that the sans-IO protocol layer can use it.
"""

from __future__ import annotations

import enum
import re
from typing import ClassVar, TypeVar

#: How a refusal names the time to retry ("... retry in 4.5 s"); part of the GoAway text.
_RETRY_IN = re.compile(r"retry in (\d+(?:\.\d+)?) s")


class ErrorCode(enum.IntEnum):
    """Stable numeric codes shared by exceptions and the wire protocol."""

    #: Clean shutdown (only in ``GoAway``/``Reset``; not an error).
    NORMAL = 0
    #: Unspecified internal failure of the peer.
    INTERNAL = 1000
    #: The tunnel server could not be reached or the connection failed.
    CONNECT_FAILED = 1001
    #: The token was wrong (or the server could not prove it knows it).
    AUTHENTICATION_FAILED = 1002
    #: The peers share no protocol version.
    UNSUPPORTED_VERSION = 1003
    #: The handshake did not finish within its time limit.
    HANDSHAKE_TIMEOUT = 1004
    #: The peer is shutting down (``GoAway`` during server or client shutdown).
    GOING_AWAY = 1005
    #: A stream was cancelled by the application (``Reset`` after ``aclose`` with unread data).
    CANCELLED = 1006
    #: The peer has too many open streams.
    STREAM_LIMIT = 1007
    #: A relayed connection was idle for longer than its idle timeout.
    IDLE_TIMEOUT = 1008
    #: The server has too many connections waiting to authenticate; try again later.
    SERVER_BUSY = 1009
    #: No heartbeat answer within the heartbeat timeout: the link is considered dead.
    HEARTBEAT_TIMEOUT = 1010
    #: The TLS handshake failed: untrusted or expired certificate, wrong name or pin, or the
    #: peer does not speak TLS.
    TLS_FAILED = 1011
    #: Too many failed authentications from this address: try again later.
    RATE_LIMITED = 1012
    # -- transports (1020-1029): what stands between the client and the server --
    #: A proxy on the way to the server (HTTP CONNECT, SOCKS) could not be reached, refused
    #: (407, 403, a SOCKS failure) or stalled.
    PROXY_FAILED = 1020
    #: The WebSocket upgrade was refused (403, 404, 502...) or the WebSocket broke the rules.
    WEBSOCKET_FAILED = 1021

    # -- protocol violations (1100-1199): remote ones end the session with GoAway --
    #: A protocol violation with no more precise code; also an ``Open`` with an unknown route.
    PROTOCOL_ERROR = 1100
    #: A frame's length header is above the receiver's limit (or, locally, an oversized frame).
    FRAME_TOO_LARGE = 1101
    #: A frame body is not one valid msgpack map with unique string keys.
    MALFORMED_FRAME = 1102
    #: A frame's ``"t"`` tag is missing, not a string, or names no message type.
    UNKNOWN_MESSAGE = 1103
    #: A field is missing, extra, of the wrong msgpack type or out of range.
    INVALID_FIELD = 1104
    #: The connection ended in the middle of a frame.
    TRUNCATED_FRAME = 1105
    #: Data beyond the receive window, a window above 2**31-1, or (locally) beyond the send window.
    FLOW_CONTROL_ERROR = 1106
    #: A frame or call that the stream's id or state does not allow.
    STREAM_STATE_ERROR = 1107
    #: A valid message of another layer or step (a handshake message in the session, ...).
    UNEXPECTED_MESSAGE = 1108
    #: The peer keeps sending requests (pings, opens) without reading the replies.
    FLOOD = 1109

    # -- dial outcomes (2000-2099) --
    #: Connecting to the requested target failed, for no more precise reason.
    DIAL_FAILED = 2000
    #: The target did not answer within the connect timeout.
    NODE_TIMEOUT = 2001
    #: The dial failed fast: refused, unreachable, DNS failure or reset.
    NODE_UNSTABLE = 2002
    #: The dialling side's policy (``--permit-open``) does not allow the target.
    TARGET_FORBIDDEN = 2003
    # NODE_UNSTABLE with its reason, in ``Refuse`` only (see ``refusal_code``); the exception
    # raised for each is ``NodeUnstableError`` with code NODE_UNSTABLE and that ``failure``.
    #: NODE_UNSTABLE: the target refused the connection.
    NODE_REFUSED = 2010
    #: NODE_UNSTABLE: the connection was reset or aborted while being set up.
    NODE_RESET = 2011
    #: NODE_UNSTABLE: no route to the target's network (network unreachable or down).
    NODE_NETWORK_UNREACHABLE = 2012
    #: NODE_UNSTABLE: no route to the target host (host unreachable or down).
    NODE_HOST_UNREACHABLE = 2013
    #: NODE_UNSTABLE: the target's name did not resolve.
    NODE_DNS_FAILED = 2014
    #: NODE_UNSTABLE: the target's name cannot even be looked up (an invalid IDNA name).
    NODE_INVALID_HOST = 2015

    # -- forward set-up outcomes (2100-2199) --
    #: A remote forward could not be set up, for no more precise reason.
    FORWARD_FAILED = 2100
    #: The port to listen on is already taken.
    ADDRESS_IN_USE = 2101
    #: The operating system refused the bind (a privileged port, for example).
    PERMISSION_DENIED = 2102
    #: The server's policy does not allow listening on that port or address.
    PORT_NOT_ALLOWED = 2103
    #: The client already has as many forwards as the server allows.
    FORWARD_LIMIT = 2104
    #: The host name of a name route is already routed to another client.
    NAME_IN_USE = 2105
    #: The server does not route that name: not a host name, not under its domain, not
    #: admitted by its allowed domains, or no shared HTTP/HTTPS listener for it.
    NAME_NOT_ALLOWED = 2106
    #: A load-balanced group holds the port or name with another group name or secret.
    GROUP_MISMATCH = 2107
    #: A cluster node cannot reach its engine or renew its lease, so it owns nothing new.
    CLUSTER_UNAVAILABLE = 2108


class TunnelError(Exception):
    """Base of every error pytunnel raises on purpose.

    ``code`` is stable across releases and is what crosses the wire; ``str(error)`` is an English
    message for people and may change.
    """

    default_code: ClassVar[ErrorCode] = ErrorCode.INTERNAL

    def __init__(self, message: str = "", *, code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code: int = int(code if code is not None else self.default_code)

    def __str__(self) -> str:
        name = _code_name(self.code)
        return f"[{name}] {self.message}" if self.message else f"[{name}]"


def _code_name(code: int) -> str:
    try:
        return ErrorCode(code).name
    except ValueError:
        return f"CODE_{code}"


# --------------------------------------------------------------------------- protocol errors


class ProtocolError(TunnelError):
    """The protocol was not followed; see the two subclasses for whose fault it was."""

    default_code = ErrorCode.PROTOCOL_ERROR


class LocalProtocolError(ProtocolError):
    """Our own code asked the protocol layer for something the protocol forbids.

    This is a bug in the caller (sending on a stream that does not exist, reusing a stream id);
    nothing was sent to the peer.
    """


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol forbids: a bad frame, message, field or state.

    The session that sees it answers with ``GoAway`` carrying ``code`` and closes the connection.
    """


# --------------------------------------------------------------------------- session errors


class ConnectError(TunnelError):
    """The tunnel could not be established (server unreachable, connection lost in handshake)."""

    default_code = ErrorCode.CONNECT_FAILED


class AuthenticationError(ConnectError):
    """The peer rejected our token, or could not prove it knows the token itself.

    The message never contains the token.
    """

    default_code = ErrorCode.AUTHENTICATION_FAILED


class VersionMismatchError(ConnectError):
    """The two ends share no protocol version."""

    default_code = ErrorCode.UNSUPPORTED_VERSION


class HandshakeTimeoutError(ConnectError):
    """The handshake did not complete in time (a slow or silent peer)."""

    default_code = ErrorCode.HANDSHAKE_TIMEOUT


class ServerBusyError(ConnectError):
    """The server refused the connection before the handshake: too many pending handshakes."""

    default_code = ErrorCode.SERVER_BUSY


class TLSError(ConnectError):
    """The TLS layer failed: certificate not trusted, expired, wrong host name, fingerprint
    mismatch, or the peer is not speaking TLS."""

    default_code = ErrorCode.TLS_FAILED


class RateLimitedError(ConnectError):
    """The server refuses this address for a while after repeated authentication failures.

    ``retry_after`` is the wait in seconds the server named in its refusal (``None`` if it
    named none): an attempt after it is answered normally again."""

    default_code = ErrorCode.RATE_LIMITED

    @property
    def retry_after(self) -> float | None:
        match = _RETRY_IN.search(self.message)
        return float(match.group(1)) if match else None


class ProxyError(ConnectError):
    """A proxy on the way to the server failed us: unreachable, refused the request (HTTP
    status or SOCKS reply, in ``status``), or stalled. ``proxy`` names it (no password)."""

    default_code = ErrorCode.PROXY_FAILED

    def __init__(self, message: str = "", *, proxy: str = "", status: int | None = None) -> None:
        super().__init__(message)
        self.proxy = proxy
        self.status = status


class WebSocketError(ConnectError):
    """The WebSocket transport failed: the upgrade was refused (``status``, the HTTP status
    of the answer) or not answered, or the peer broke the WebSocket protocol. ``url`` names
    the endpoint."""

    default_code = ErrorCode.WEBSOCKET_FAILED

    def __init__(self, message: str = "", *, url: str = "", status: int | None = None) -> None:
        super().__init__(message)
        self.url = url
        self.status = status


class SessionClosedError(TunnelError):
    """The session ended (``GoAway`` received, transport lost, or closed locally).

    ``code`` is the reason code from the ``GoAway`` when there was one.
    """

    default_code = ErrorCode.GOING_AWAY


# --------------------------------------------------------------------------- stream errors


class StreamRefusedError(TunnelError):
    """The peer refused to open a stream; the code says why.

    Refusals whose code is a dial outcome are raised as the matching :class:`DialError`
    subclass instead (see :func:`error_from_code`).
    """

    default_code = ErrorCode.INTERNAL


class StreamLimitError(StreamRefusedError):
    """The peer already has as many open streams as it allows."""

    default_code = ErrorCode.STREAM_LIMIT


class DialFailure(enum.IntEnum):
    """Why a dial failed, as a structure: what a SOCKS reply (or any caller) decides on, so
    that nothing has to read the English of an error message.

    The dialling side sorts the OS's failure into one of these (``_dial``); it crosses the
    wire inside the ``Refuse`` code (see :func:`refusal_code`).
    """

    #: Not known: an older peer, or an OS error with no better category.
    UNKNOWN = 0
    #: No answer within the connect timeout (or the OS's own ETIMEDOUT).
    TIMEOUT = 1
    #: The target actively refused the connection (RST to our SYN).
    REFUSED = 2
    #: The connection was reset or aborted while being set up.
    RESET = 3
    #: No route to the target's network.
    NETWORK_UNREACHABLE = 4
    #: No route to the target host.
    HOST_UNREACHABLE = 5
    #: The target's name did not resolve.
    DNS = 6
    #: The target's name cannot be looked up at all.
    INVALID_HOST = 7
    #: The dialling side's policy does not allow the target.
    NOT_PERMITTED = 8


class DialError(StreamRefusedError):
    """Dialling a target failed. ``target`` is ``"host:port"``; ``category`` is the log tag;
    ``failure`` says why, as a :class:`DialFailure`, and ``reason`` in a few words without the
    target (``"connection refused"``, ``"timed out after 5 s"``), for callers that name the
    target their own way; it is the whole message when only the message is known (a peer's
    refusal)."""

    default_code = ErrorCode.DIAL_FAILED
    category: ClassVar[str] = "DIAL_FAILED"
    default_failure: ClassVar[DialFailure] = DialFailure.UNKNOWN

    def __init__(
        self,
        message: str = "",
        *,
        target: str = "",
        code: int | None = None,
        failure: DialFailure | None = None,
        reason: str = "",
    ) -> None:
        super().__init__(message, code=code)
        self.target = target
        self.failure = self.default_failure if failure is None else failure
        self.reason = reason or self.message


class NodeTimeoutError(DialError):
    """The dial timed out: the target did not answer within the connect timeout."""

    default_code = ErrorCode.NODE_TIMEOUT
    category = "NODE_TIMEOUT"
    default_failure = DialFailure.TIMEOUT


class UnansweredError(NodeTimeoutError):
    """The peer did not answer a stream opened with early data within its answer timeout
    (``Session.open_stream(..., answer_timeout=)``): the far end is silent, not refusing."""


class NodeUnstableError(DialError):
    """The dial failed fast: refused, unreachable, DNS failure or reset."""

    default_code = ErrorCode.NODE_UNSTABLE
    category = "NODE_UNSTABLE"


class TargetForbiddenError(DialError):
    """The target is not allowed by the dialling side's policy (``--permit-open``)."""

    default_code = ErrorCode.TARGET_FORBIDDEN
    category = "TARGET_FORBIDDEN"
    default_failure = DialFailure.NOT_PERMITTED


class InvalidTargetError(TargetForbiddenError, ValueError):
    """The target cannot even be asked for: a host name over 255 bytes of UTF-8 (or not
    encodable), a port out of range. Raised locally, before anything is sent, so one bad
    target fails its own request instead of the session; also a ``ValueError``, since it is
    a bad argument."""

    category = "INVALID_TARGET"


class ForwardError(TunnelError):
    """A forward could not be set up. ``address`` is the ``"host:port"`` that was asked for.

    Not a :class:`StreamRefusedError`, although the server says it by refusing a stream: to
    the caller of ``forward_remote`` it is a forward that failed, and an ``except
    StreamRefusedError`` around ``open_stream`` must not also catch a busy port."""

    default_code = ErrorCode.FORWARD_FAILED

    def __init__(self, message: str = "", *, address: str = "", code: int | None = None) -> None:
        super().__init__(message, code=code)
        self.address = address


class AddressInUseError(ForwardError):
    """The port to listen on is already taken."""

    default_code = ErrorCode.ADDRESS_IN_USE


class PermissionDeniedError(ForwardError):
    """The operating system refused the bind (a privileged port, for example)."""

    default_code = ErrorCode.PERMISSION_DENIED


class PortNotAllowedError(ForwardError):
    """The server's policy does not allow listening on that port or address."""

    default_code = ErrorCode.PORT_NOT_ALLOWED


class ForwardLimitError(ForwardError):
    """The client already has as many forwards as the server allows."""

    default_code = ErrorCode.FORWARD_LIMIT


class NameInUseError(AddressInUseError):
    """The host name of a name route is already routed to another client.

    An ``AddressInUseError``: a name on a shared port is a public address like a port, and it
    is handled the same way (a restore that meets it keeps retrying, as the other owner may
    leave)."""

    default_code = ErrorCode.NAME_IN_USE


class GroupMismatchError(ForwardError):
    """The port or name is served by a load-balanced group, and this forward's group name or
    secret is not that group's."""

    default_code = ErrorCode.GROUP_MISMATCH


class NameNotAllowedError(ForwardError, ValueError):
    """The server does not route that name (see ``ErrorCode.NAME_NOT_ALLOWED``)."""

    default_code = ErrorCode.NAME_NOT_ALLOWED


class ClusterUnavailableError(ForwardError):
    """A node of a cluster cannot register anything right now: its engine is unreachable or
    its lease could not be renewed in time, so it could not be sure to be the only owner (no
    split brain). Transient: the node recovers by itself once the engine answers again."""

    default_code = ErrorCode.CLUSTER_UNAVAILABLE


class ClusterAuthError(ClusterUnavailableError):
    """The cluster's engine and this node do not accept each other: its certificate does
    not verify against the CA given, it refused this node's client certificate, or it
    refused the user and password (or the user may not use the registry's keys). Waiting
    does not fix a wrong setting, so at start this ends ``serve`` with one line; later (a
    password changed under a running node) it is handled as an outage, which it is."""


_BY_CODE: dict[int, type[TunnelError]] = {
    ErrorCode.CLUSTER_UNAVAILABLE: ClusterUnavailableError,
    ErrorCode.FORWARD_FAILED: ForwardError,
    ErrorCode.ADDRESS_IN_USE: AddressInUseError,
    ErrorCode.PERMISSION_DENIED: PermissionDeniedError,
    ErrorCode.PORT_NOT_ALLOWED: PortNotAllowedError,
    ErrorCode.FORWARD_LIMIT: ForwardLimitError,
    ErrorCode.NAME_IN_USE: NameInUseError,
    ErrorCode.NAME_NOT_ALLOWED: NameNotAllowedError,
    ErrorCode.GROUP_MISMATCH: GroupMismatchError,
    ErrorCode.SERVER_BUSY: ServerBusyError,
    ErrorCode.RATE_LIMITED: RateLimitedError,
    ErrorCode.AUTHENTICATION_FAILED: AuthenticationError,
    ErrorCode.UNSUPPORTED_VERSION: VersionMismatchError,
    ErrorCode.HANDSHAKE_TIMEOUT: HandshakeTimeoutError,
    ErrorCode.STREAM_LIMIT: StreamLimitError,
    ErrorCode.DIAL_FAILED: DialError,
    ErrorCode.NODE_TIMEOUT: NodeTimeoutError,
    ErrorCode.NODE_UNSTABLE: NodeUnstableError,
    ErrorCode.TARGET_FORBIDDEN: TargetForbiddenError,
}


def printable(text: str) -> str:
    """``text`` safe to put in a log line or an error message: control and other
    non-printable characters (newlines, escape sequences, U+2028...) and backslashes are
    escaped backslash-style, so a peer-supplied string can never forge or split a log line.

    Applied where peer-supplied text (hosts, reasons) enters an error or a log line.
    """
    if text.isprintable() and "\\" not in text:
        return text
    return "".join(map(_escape, text))


def _escape(char: str) -> str:
    if char == "\\":  # escaped too, so an escape in the output is never the peer's own text
        return "\\\\"
    if char.isprintable():
        return char
    return char.encode("unicode_escape").decode("ascii")


#: The ``Refuse`` code that carries each reason of a NODE_UNSTABLE dial failure.
_UNSTABLE_CODES: dict[DialFailure, ErrorCode] = {
    DialFailure.REFUSED: ErrorCode.NODE_REFUSED,
    DialFailure.RESET: ErrorCode.NODE_RESET,
    DialFailure.NETWORK_UNREACHABLE: ErrorCode.NODE_NETWORK_UNREACHABLE,
    DialFailure.HOST_UNREACHABLE: ErrorCode.NODE_HOST_UNREACHABLE,
    DialFailure.DNS: ErrorCode.NODE_DNS_FAILED,
    DialFailure.INVALID_HOST: ErrorCode.NODE_INVALID_HOST,
}
_UNSTABLE_FAILURES: dict[int, DialFailure] = {c: f for f, c in _UNSTABLE_CODES.items()}


def refusal_code(error: TunnelError) -> int:
    """The code to put in the ``Refuse`` that reports ``error`` to the side that asked.

    A ``NodeUnstableError`` whose reason is known is sent as that reason's own code
    (``NODE_REFUSED``...), so the reason crosses the wire as a number, not as English; the
    asking side's :func:`refusal_error` turns it back into a ``NodeUnstableError`` with code
    ``NODE_UNSTABLE`` and the same ``failure``. A peer that does not know those codes raises
    the generic ``StreamRefusedError`` for them, as it must for any code it does not know.
    Every other error is sent as its own code."""
    if isinstance(error, NodeUnstableError):
        return _UNSTABLE_CODES.get(error.failure, error.code)
    return error.code


def refusal_error(code: int, message: str, *, target: str = "") -> TunnelError:
    """Build the exception that a ``Refuse`` with ``code`` stands for on the asking side.

    ``message`` comes from the peer: it is escaped (see :func:`printable`)."""
    message = printable(message)
    failure = _UNSTABLE_FAILURES.get(code)
    if failure is not None:
        return NodeUnstableError(message, target=target, failure=failure)
    cls = _BY_CODE.get(code, StreamRefusedError)
    if issubclass(cls, DialError):
        return cls(message, target=target, code=code)
    if issubclass(cls, ForwardError):
        return cls(message, address=target, code=code)
    if issubclass(cls, StreamRefusedError):
        return cls(message, code=code)
    return StreamRefusedError(message, code=code)


def goaway_error(code: int, message: str) -> TunnelError:
    """Build the exception that a ``GoAway`` with ``code`` stands for on the receiving side
    (``message``, from the peer, escaped)."""
    message = printable(message)
    cls = _BY_CODE.get(code)
    if cls is not None and issubclass(cls, ConnectError):
        return cls(message, code=code)
    return SessionClosedError(message, code=code)


class StreamResetError(TunnelError):
    """The peer reset the stream; ``code`` is the reason it gave. Raised as the ``__cause__``
    of the ``BrokenResourceError`` that stream operations raise."""

    default_code = ErrorCode.CANCELLED


_E = TypeVar("_E", bound=BaseException)


def caused_by(exc: _E, cause: BaseException | None) -> _E:
    """``exc`` with ``cause`` as its ``__cause__`` (and its context suppressed), as
    ``raise exc from cause`` would leave it.

    The modules that may be compiled by mypyc raise through this: compiled code drops the
    ``from`` clause of a ``raise`` in many cases (in coroutines, in ``except`` blocks, with an
    attribute or a narrowed local as the cause), while an assigned ``__cause__`` survives. A
    ``from`` kept next to it (where a linter wants one) changes nothing in either build.
    """
    exc.__cause__ = cause
    return exc
