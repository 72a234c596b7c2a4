"""The authentication handshake's pure parts: versions, nonces and the two proofs.

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
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from .messages import NONCE_SIZE

__all__ = [
    "PRE_AUTH_MAX_FRAME_SIZE",
    "PROTOCOL_VERSION",
    "SUPPORTED_VERSIONS",
    "choose_version",
    "client_proof",
    "new_nonce",
    "server_proof",
    "verify",
]

#: The protocol version this implementation speaks.
PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS: tuple[int, ...] = (PROTOCOL_VERSION,)
#: Until a peer has authenticated, no frame may be larger than this.
PRE_AUTH_MAX_FRAME_SIZE = 4096

_CLIENT_LABEL = b"pytunnel client proof\x00"
_SERVER_LABEL = b"pytunnel server proof\x00"


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


def verify(expected: bytes, received: bytes) -> bool:
    """Constant-time comparison, so timing does not leak how much of a MAC was right."""
    return hmac.compare_digest(expected, received)
