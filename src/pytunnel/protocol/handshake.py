"""The authentication handshake: two sans-IO state machines and their pure parts.

:class:`ClientHandshake` and :class:`ServerHandshake` hold every rule that decides a
handshake: the order of the messages, the choice of version, both proof checks, the binding of
``client_id`` and what a refused client is told. Feed each the peer's message and it answers
with the message to send, the outcome, or a typed error; the I/O driver (``_handshake.py``)
only reads frames with its deadline and frame limit and writes what it is told. Nothing here
imports trio or touches a socket, so the whole exchange runs synchronously in tests.

The exchange (see ``docs/protocol.md``)::

    client -> server  Hello(versions, client_nonce)
    server -> client  Challenge(version, server_nonce)        or GoAway(1003)
    client -> server  Auth(mac = HMAC(token, client transcript), client_id)
    server -> client  Welcome(mac = HMAC(token, server transcript), max_frame_size)
                                                              or GoAway(1002)

Both nonces are fresh random 32-byte values, so a recorded exchange cannot be replayed, and the
two transcripts are domain-separated so the server's proof cannot be reflected back as a
client's. The client's identity (``Auth.client_id``) is part of both transcripts, so nobody
without the token can present a session under another client's identity. The token itself
never crosses the wire.

A *node link* (one node of a cluster connecting to another) runs the same exchange keyed by
the cluster secret, with transcripts of their own labels (``node_proof``): a node's proof is
never a client's, whatever the two keys are, so a client cannot pass as a node nor a node as
a client. ``Auth.client_id`` carries the connecting node's id.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import secrets
from collections.abc import Callable
from typing import TypeAlias

import attrs

from ..errors import (
    AuthenticationError,
    ErrorCode,
    LocalProtocolError,
    RemoteProtocolError,
    TunnelError,
    VersionMismatchError,
    goaway_error,
)
from .messages import (
    NONCE_SIZE,
    Auth,
    Challenge,
    GoAway,
    HandshakeMessage,
    Hello,
    Welcome,
    truncate_text,
)

__all__ = [
    "PRE_AUTH_MAX_FRAME_SIZE",
    "PROTOCOL_VERSION",
    "SUPPORTED_VERSIONS",
    "Authenticated",
    "ClientHandshake",
    "HandshakeState",
    "ServerHandshake",
    "Step",
    "choose_version",
    "client_proof",
    "new_nonce",
    "node_proof",
    "node_server_proof",
    "server_proof",
    "verify",
]

#: The newest protocol version this implementation speaks. Version 2 adds early data and
#: datagram batches (see ``docs/protocol.md``, "Version 2"): each side announces an
#: ``early_window`` in its ``Auth``/``Welcome``; a version 1 handshake carries none and is the
#: same on the wire.
PROTOCOL_VERSION = 2
SUPPORTED_VERSIONS: tuple[int, ...] = (1, PROTOCOL_VERSION)
#: Until a peer has authenticated, no frame may be larger than this.
PRE_AUTH_MAX_FRAME_SIZE = 4096

#: ``client_proof`` or ``server_proof``: (token, version, client nonce, server nonce, id).
_Proof: TypeAlias = Callable[[bytes, int, bytes, bytes, str], bytes]

_CLIENT_LABEL = b"pytunnel client proof\x00"
_SERVER_LABEL = b"pytunnel server proof\x00"
#: The labels of a node link's transcripts (the connecting node's, then the answering one's).
_NODE_LABEL = b"pytunnel node proof\x00"
_NODE_SERVER_LABEL = b"pytunnel node server proof\x00"


def new_nonce() -> bytes:
    """A fresh random nonce from the OS CSPRNG."""
    return secrets.token_bytes(NONCE_SIZE)


def choose_version(
    offered: tuple[int, ...], supported: tuple[int, ...] = SUPPORTED_VERSIONS
) -> int | None:
    """The highest version both sides speak, or ``None``."""
    common = set(offered) & set(supported)
    return max(common) if common else None


def _transcript(
    label: bytes, version: int, client_nonce: bytes, server_nonce: bytes, client_id: str
) -> bytes:
    # Everything before the identity has a fixed length, so appending it with a length byte
    # keeps transcripts unambiguous; without an identity the transcript is what it always was.
    head = label + version.to_bytes(4, "big") + client_nonce + server_nonce
    if not client_id:
        return head
    raw = client_id.encode("ascii")
    return head + len(raw).to_bytes(1, "big") + raw


def client_proof(
    token: bytes, version: int, client_nonce: bytes, server_nonce: bytes, client_id: str = ""
) -> bytes:
    """HMAC-SHA256 proving the client knows ``token``, bound to the identity it claims."""
    msg = _transcript(_CLIENT_LABEL, version, client_nonce, server_nonce, client_id)
    return hmac.new(token, msg, hashlib.sha256).digest()


def server_proof(
    token: bytes, version: int, client_nonce: bytes, server_nonce: bytes, client_id: str = ""
) -> bytes:
    """HMAC-SHA256 proving the server knows ``token`` (mutual authentication) and saw the
    identity the client claimed."""
    msg = _transcript(_SERVER_LABEL, version, client_nonce, server_nonce, client_id)
    return hmac.new(token, msg, hashlib.sha256).digest()


def node_proof(
    secret: bytes, version: int, client_nonce: bytes, server_nonce: bytes, node_id: str = ""
) -> bytes:
    """HMAC-SHA256 proving a connecting node knows the cluster ``secret``."""
    msg = _transcript(_NODE_LABEL, version, client_nonce, server_nonce, node_id)
    return hmac.new(secret, msg, hashlib.sha256).digest()


def node_server_proof(
    secret: bytes, version: int, client_nonce: bytes, server_nonce: bytes, node_id: str = ""
) -> bytes:
    """HMAC-SHA256 proving the node answering a node link knows the cluster ``secret``."""
    msg = _transcript(_NODE_SERVER_LABEL, version, client_nonce, server_nonce, node_id)
    return hmac.new(secret, msg, hashlib.sha256).digest()


def verify(expected: bytes, received: bytes) -> bool:
    """Constant-time comparison, so timing does not leak how much of a MAC was right."""
    return hmac.compare_digest(expected, received)


def token_bytes(token: str | bytes) -> bytes:
    """The HMAC key for ``token`` (UTF-8 for text)."""
    return token.encode("utf-8") if isinstance(token, str) else bytes(token)


# --------------------------------------------------------------------------- state machines


class HandshakeState(enum.Enum):
    """Where one side's handshake is. ``DONE`` and ``ERROR`` are final."""

    #: Client only: ``Hello`` not sent yet (see :meth:`ClientHandshake.start`).
    START = "start"
    #: The next message from the peer is the one named by ``expecting``.
    WAITING = "waiting"
    DONE = "done"
    #: The handshake failed; every later call raises the same error again.
    ERROR = "error"


@attrs.frozen
class Authenticated:
    """What a successful handshake established, for the session that follows."""

    version: int
    #: Largest frame body the peer accepts from now on.
    peer_max_frame_size: int
    #: The identity the client authenticated with ("" for none); a node link's node id.
    client_id: str = ""
    #: Whether the peer authenticated as a node of the cluster (by the cluster secret).
    node: bool = False
    #: Version 2: the bytes we may send on a stream we open before the peer accepts it.
    peer_early_window: int = 0


@attrs.frozen
class Step:
    """The answer to one received message: what to send now (if anything) and, once the
    handshake has succeeded, its outcome."""

    send: HandshakeMessage | None = None
    result: Authenticated | None = None


def _early_window(version: int, message: Auth | Welcome) -> int:
    """The peer's early window, which only a version 2 handshake may carry."""
    if version < 2 and message.early_window:
        raise RemoteProtocolError(
            f"early_window in a version {version} handshake", code=ErrorCode.INVALID_FIELD
        )
    return message.early_window


def _unexpected(message: HandshakeMessage, wanted: str) -> RemoteProtocolError:
    return RemoteProtocolError(
        f"expected {wanted}, got {type(message).__name__}", code=ErrorCode.UNEXPECTED_MESSAGE
    )


class _Machine:
    """The state both sides share: the sticky ERROR and what is expected next."""

    def __init__(self, expecting: str) -> None:
        self.state = HandshakeState.WAITING
        #: The name of the message the peer must send next ("" when none is).
        self.expecting = expecting
        self._error: TunnelError | None = None

    def receive(self, message: HandshakeMessage) -> Step:
        """Take the peer's next message; the subclass says which errors it raises. Once one
        was raised, every later call raises it again."""
        if self._error is not None:
            raise self._error
        if self.state is not HandshakeState.WAITING:
            raise LocalProtocolError(f"the handshake expects no message ({self.state.value})")
        try:
            return self._receive(message)
        except TunnelError as exc:
            raise self._fail(exc) from None

    def _receive(self, message: HandshakeMessage) -> Step:
        raise NotImplementedError

    def _expect(self, name: str) -> None:
        self.expecting = name

    def _finish(self) -> None:
        self.state = HandshakeState.DONE
        self.expecting = ""

    def _fail(self, error: TunnelError) -> TunnelError:
        self.state = HandshakeState.ERROR
        self.expecting = ""
        self._error = error
        return error


class ClientHandshake(_Machine):
    """The client's side: send ``Hello``, answer ``Challenge`` with ``Auth``, check
    ``Welcome``.

    Args:
      token: the shared secret (never sent; only HMACs of it are).
      max_frame_size: the largest frame body we accept after the handshake (sent in ``Auth``).
      versions: the versions we offer.
      client_id: the identity we claim ("" for none); bound into both proofs.
      nonce: our nonce; a fresh random one unless given (tests pin it).
      node: authenticate as a node of the cluster (``token`` is then the cluster secret and
        ``client_id`` this node's id), with the node link's proofs.
      early_window: the bytes the server may send on a stream it opens before we accept it
        (sent in ``Auth`` when the server chose version 2 or later; 0: none).

    Errors from :meth:`receive`: ``SessionClosedError`` and the ``ConnectError`` subclasses a
    server's ``GoAway`` stands for, :class:`VersionMismatchError` for a version we did not
    offer, :class:`AuthenticationError` when the server cannot prove it knows the token,
    :class:`RemoteProtocolError` (``UNEXPECTED_MESSAGE``) for a message out of order.
    """

    def __init__(
        self,
        token: str | bytes,
        *,
        max_frame_size: int,
        versions: tuple[int, ...] = SUPPORTED_VERSIONS,
        client_id: str = "",
        nonce: bytes | None = None,
        node: bool = False,
        early_window: int = 0,
    ) -> None:
        super().__init__("")
        self._early_window = early_window
        self.state = HandshakeState.START
        self._node = node
        self._key = token_bytes(token)
        self._max_frame_size = max_frame_size
        self._versions = versions
        self._client_id = client_id
        self._nonce = new_nonce() if nonce is None else nonce
        self._challenge: Challenge | None = None

    def start(self) -> Hello:
        """The first message to send."""
        if self.state is not HandshakeState.START:
            raise LocalProtocolError("the handshake has already started")
        self.state = HandshakeState.WAITING
        self._expect("Challenge")
        return Hello(self._versions, self._nonce)

    def _receive(self, message: HandshakeMessage) -> Step:
        if isinstance(message, GoAway):  # the server refused us, at either step
            raise goaway_error(message.code, message.message)
        challenge = self._challenge
        if challenge is None:
            if not isinstance(message, Challenge):
                raise _unexpected(message, "Challenge")
            if message.version not in self._versions:
                raise VersionMismatchError(
                    f"server chose version {message.version}, we speak {list(self._versions)}"
                )
            self._challenge = message
            self._expect("Welcome")
            proof = self._proof(node_proof if self._node else client_proof, message)
            early = self._early_window if message.version >= 2 else 0
            return Step(send=Auth(proof, self._max_frame_size, self._client_id, early))
        if not isinstance(message, Welcome):
            raise _unexpected(message, "Welcome")
        if not verify(
            self._proof(node_server_proof if self._node else server_proof, challenge), message.mac
        ):
            raise AuthenticationError("the server could not prove it knows the token")
        peer_early = _early_window(challenge.version, message)
        self._finish()
        return Step(
            result=Authenticated(
                challenge.version,
                message.max_frame_size,
                self._client_id,
                node=self._node,
                peer_early_window=peer_early,
            )
        )

    def _proof(self, kind: _Proof, challenge: Challenge) -> bytes:
        return kind(self._key, challenge.version, self._nonce, challenge.nonce, self._client_id)


class ServerHandshake(_Machine):
    """The server's side: answer ``Hello`` with ``Challenge``, check ``Auth``, send
    ``Welcome``.

    Args:
      token: the shared secret.
      max_frame_size: the largest frame body we accept after the handshake (in ``Welcome``).
      versions: the versions we speak; the highest one in common is chosen.
      peer: who the client is, for error messages (never sent to it).
      nonce: our nonce; a fresh random one unless given (tests pin it).
      node_secret: the cluster secret; set, a peer may also authenticate as a node with it
        (``Authenticated.node``). ``None``: clients only.
      early_window: the bytes the client may send on a stream it opens before we accept it
        (sent in ``Welcome`` when version 2 or later was chosen; 0: none).

    Errors from :meth:`receive`: :class:`VersionMismatchError` (no common version),
    :class:`AuthenticationError` (a wrong proof), :class:`RemoteProtocolError` for a message
    out of order. Whatever the error, :meth:`refusal` is the ``GoAway`` to send before closing.
    """

    def __init__(
        self,
        token: str | bytes,
        *,
        max_frame_size: int,
        versions: tuple[int, ...] = SUPPORTED_VERSIONS,
        peer: str = "?",
        nonce: bytes | None = None,
        node_secret: str | bytes | None = None,
        early_window: int = 0,
    ) -> None:
        super().__init__("Hello")
        self._early_window = early_window
        self._key = token_bytes(token)
        self._node_key = None if node_secret is None else token_bytes(node_secret)
        self._max_frame_size = max_frame_size
        self._versions = versions
        self._peer = peer
        self._nonce = new_nonce() if nonce is None else nonce
        self._hello: Hello | None = None
        self._version = 0

    def _receive(self, message: HandshakeMessage) -> Step:
        hello = self._hello
        if hello is None:
            if not isinstance(message, Hello):
                raise _unexpected(message, "Hello")
            version = choose_version(message.versions, self._versions)
            if version is None:
                raise VersionMismatchError(
                    f"client speaks versions {list(message.versions)}, "
                    f"server speaks {list(self._versions)}"
                )
            self._hello, self._version = message, version
            self._expect("Auth")
            return Step(send=Challenge(version, self._nonce))
        if not isinstance(message, Auth):
            raise _unexpected(message, "Auth")
        peer_early = _early_window(self._version, message)
        args = (self._key, self._version, hello.nonce, self._nonce, message.client_id)
        if verify(client_proof(*args), message.mac):
            answer, node = server_proof(*args), False
        elif self._node_key is not None and verify(
            node_proof(self._node_key, *args[1:]), message.mac
        ):
            answer, node = node_server_proof(self._node_key, *args[1:]), True
        else:
            raise AuthenticationError(f"client {self._peer} sent a wrong token proof")
        self._finish()
        early = self._early_window if self._version >= 2 else 0
        return Step(
            send=Welcome(answer, self._max_frame_size, early),
            result=Authenticated(
                self._version,
                message.max_frame_size,
                message.client_id,
                node=node,
                peer_early_window=peer_early,
            ),
        )

    @staticmethod
    def refusal(error: TunnelError) -> GoAway:
        """The ``GoAway`` that tells a refused client why. A failed authentication is told
        no more than that (which step failed, or for whom, is nothing a guesser should learn);
        any other error is told by its code and message."""
        if isinstance(error, AuthenticationError):
            return GoAway(ErrorCode.AUTHENTICATION_FAILED, "authentication failed")
        return GoAway(error.code, truncate_text(error.message))
