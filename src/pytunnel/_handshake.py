"""The authentication handshake over a trio stream (the I/O half of ``protocol.handshake``).

The handshake runs before the session exists, with a small frame limit and a deadline, so an
unauthenticated peer can neither make us allocate nor hold a connection open for long. After it,
the same :class:`FrameDecoder` (with any bytes already read past the handshake) is handed to the
session.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress

import attrs
import trio

from ._session import Session, SessionConfig, open_session
from .errors import (
    AuthenticationError,
    ConnectError,
    ErrorCode,
    HandshakeTimeoutError,
    RemoteProtocolError,
    TLSError,
    TunnelError,
    VersionMismatchError,
    goaway_error,
)
from .protocol import handshake as hs
from .protocol.frames import FrameDecoder, encode_message
from .protocol.messages import Auth, Challenge, GoAway, Hello, Message, Welcome, truncate_text
from .protocol.mux import Role

__all__ = [
    "DEFAULT_HANDSHAKE_TIMEOUT",
    "send_goaway",
    "HandshakeResult",
    "client_handshake",
    "open_client_session",
    "open_server_session",
    "server_handshake",
]

log = logging.getLogger("pytunnel.handshake")

#: Seconds a handshake may take before the connection is dropped (slow-loris defence).
DEFAULT_HANDSHAKE_TIMEOUT = 10.0


@attrs.frozen
class HandshakeResult:
    """What the session needs from the handshake."""

    version: int
    #: The decoder, possibly holding bytes the peer sent right after the handshake.
    decoder: FrameDecoder
    #: Largest frame body the peer accepts.
    peer_max_frame_size: int
    #: The identity the client authenticated with ("" for none).
    client_id: str = ""


def _token_bytes(token: str | bytes) -> bytes:
    return token.encode("utf-8") if isinstance(token, str) else bytes(token)


#: A TLS record starts with its content type (22 handshake, 21 alert) and version 3.x; as a
#: length prefix that would be a frame of hundreds of megabytes, so it cannot be ours.
_TLS_RECORD_STARTS = (b"\x16\x03", b"\x15\x03")


async def _receive(
    stream: trio.abc.Stream, decoder: FrameDecoder, *, tls_hint: str = "", eof_hint: str = ""
) -> Message:
    first = decoder.buffered == 0
    while True:
        message = decoder.next_message()
        if message is not None:
            return message
        data = await stream.receive_some(hs.PRE_AUTH_MAX_FRAME_SIZE)
        if first and tls_hint and data[:2] in _TLS_RECORD_STARTS:
            raise TLSError(tls_hint)
        first = False
        decoder.receive_data(data)
        if not data:
            decoder.next_message()  # raises TRUNCATED_FRAME if a partial frame is pending
            raise ConnectError(eof_hint or "connection closed during the handshake")


async def _send(stream: trio.abc.Stream, message: Message) -> None:
    await stream.send_all(encode_message(message))


async def send_goaway(stream: trio.abc.Stream, code: int, text: str) -> None:
    """Best effort: tell the peer why, then close. Never raises, never waits long."""
    with (
        trio.move_on_after(1, shield=True),
        suppress(trio.BrokenResourceError, trio.ClosedResourceError),
    ):
        await _send(stream, GoAway(code, truncate_text(text)))
    await trio.aclose_forcefully(stream)


def _unexpected(message: Message, wanted: str) -> RemoteProtocolError:
    return RemoteProtocolError(
        f"expected {wanted}, got {type(message).__name__}", code=ErrorCode.UNEXPECTED_MESSAGE
    )


async def client_handshake(
    stream: trio.abc.Stream,
    token: str | bytes,
    *,
    timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
    max_frame_size: int,
    versions: tuple[int, ...] = hs.SUPPORTED_VERSIONS,
    client_id: str = "",
) -> HandshakeResult:
    """Authenticate to a server, as ``client_id`` if given. On failure the stream is closed
    and a typed error raised: ``AuthenticationError`` (1002), ``VersionMismatchError`` (1003),
    ``HandshakeTimeoutError``, ``RemoteProtocolError`` or ``ConnectError``."""
    key = _token_bytes(token)
    decoder = FrameDecoder(hs.PRE_AUTH_MAX_FRAME_SIZE)
    try:
        with trio.fail_after(timeout):
            client_nonce = hs.new_nonce()
            await _send(stream, Hello(versions, client_nonce))
            reply = await _receive(
                stream,
                decoder,
                tls_hint="the server speaks TLS: connect with TLS (--tls)",
                eof_hint="the server closed the connection before answering "
                "(if it is a TLS server, connect with TLS: --tls)",
            )
            if isinstance(reply, GoAway):
                raise goaway_error(reply.code, reply.message)
            if not isinstance(reply, Challenge):
                raise _unexpected(reply, "Challenge")
            if reply.version not in versions:
                raise VersionMismatchError(
                    f"server chose version {reply.version}, we speak {list(versions)}"
                )
            proof = hs.client_proof(key, reply.version, client_nonce, reply.nonce, client_id)
            await _send(stream, Auth(proof, max_frame_size, client_id))
            welcome = await _receive(stream, decoder)
            if isinstance(welcome, GoAway):
                raise goaway_error(welcome.code, welcome.message)
            if not isinstance(welcome, Welcome):
                raise _unexpected(welcome, "Welcome")
            expected = hs.server_proof(key, reply.version, client_nonce, reply.nonce, client_id)
            if not hs.verify(expected, welcome.mac):
                raise AuthenticationError("the server could not prove it knows the token")
    except trio.TooSlowError:
        await trio.aclose_forcefully(stream)
        raise HandshakeTimeoutError(f"no handshake answer within {timeout} s") from None
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        await trio.aclose_forcefully(stream)
        raise ConnectError(f"connection lost during the handshake: {exc}") from exc
    except TunnelError:
        await trio.aclose_forcefully(stream)
        raise
    decoder.max_frame_size = max_frame_size
    return HandshakeResult(reply.version, decoder, welcome.max_frame_size, client_id)


async def server_handshake(
    stream: trio.abc.Stream,
    token: str | bytes,
    *,
    timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
    max_frame_size: int,
    versions: tuple[int, ...] = hs.SUPPORTED_VERSIONS,
    peer: str = "?",
    first_frame_timeout: float | None = None,
) -> HandshakeResult:
    """Authenticate a client. On failure the peer is told why (``GoAway``), the stream is
    closed and the same typed error is raised here. The token is never logged.

    ``first_frame_timeout`` bounds the wait for the client's ``Hello`` alone: an honest client
    sends it at once, so a connection that stays silent is dropped long before ``timeout``
    and cannot hold a pending-handshake slot for the whole handshake deadline."""
    key = _token_bytes(token)
    decoder = FrameDecoder(hs.PRE_AUTH_MAX_FRAME_SIZE)
    waiting_for = "Hello"
    first_timeout = timeout if first_frame_timeout is None else min(timeout, first_frame_timeout)
    try:
        with trio.fail_after(timeout):
            with trio.fail_after(first_timeout):
                hello = await _receive(
                    stream,
                    decoder,
                    tls_hint="the client speaks TLS but this server has no TLS set up",
                )
            waiting_for = "Auth"
            if not isinstance(hello, Hello):
                raise _unexpected(hello, "Hello")
            version = hs.choose_version(hello.versions, versions)
            if version is None:
                raise VersionMismatchError(
                    f"client speaks versions {list(hello.versions)}, server speaks {list(versions)}"
                )
            server_nonce = hs.new_nonce()
            await _send(stream, Challenge(version, server_nonce))
            auth = await _receive(stream, decoder)
            if not isinstance(auth, Auth):
                raise _unexpected(auth, "Auth")
            expected = hs.client_proof(key, version, hello.nonce, server_nonce, auth.client_id)
            if not hs.verify(expected, auth.mac):
                raise AuthenticationError(f"client {peer} sent a wrong token proof")
            proof = hs.server_proof(key, version, hello.nonce, server_nonce, auth.client_id)
            await _send(stream, Welcome(proof, max_frame_size))
    except trio.TooSlowError:
        limit = first_timeout if waiting_for == "Hello" else timeout
        log.info(
            "handshake with %s timed out waiting for its %s (%.1f s)", peer, waiting_for, limit
        )
        await trio.aclose_forcefully(stream)
        raise HandshakeTimeoutError(
            f"handshake with {peer} timed out waiting for its {waiting_for}"
        ) from None
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        await trio.aclose_forcefully(stream)
        raise ConnectError(f"connection from {peer} lost during the handshake") from exc
    except AuthenticationError:
        log.warning("authentication failed for %s", peer)
        await send_goaway(stream, ErrorCode.AUTHENTICATION_FAILED, "authentication failed")
        raise
    except TunnelError as exc:
        log.warning("handshake with %s failed: %s", peer, exc)
        await send_goaway(stream, exc.code, exc.message)
        raise
    decoder.max_frame_size = max_frame_size
    return HandshakeResult(version, decoder, auth.max_frame_size, auth.client_id)


@asynccontextmanager
async def open_client_session(
    stream: trio.abc.Stream,
    token: str | bytes,
    config: SessionConfig | None = None,
    *,
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
    name: str = "client",
) -> AsyncIterator[Session]:
    """Authenticate as a client over ``stream``, then run a session on it."""
    config = config or SessionConfig()
    result = await client_handshake(
        stream, token, timeout=handshake_timeout, max_frame_size=config.max_frame_size
    )
    async with open_session(
        stream,
        Role.CLIENT,
        config,
        decoder=result.decoder,
        peer_max_frame_size=result.peer_max_frame_size,
        name=name,
    ) as session:
        yield session


@asynccontextmanager
async def open_server_session(
    stream: trio.abc.Stream,
    token: str | bytes,
    config: SessionConfig | None = None,
    *,
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
    peer: str = "?",
) -> AsyncIterator[Session]:
    """Authenticate a client over ``stream``, then run a session on it."""
    config = config or SessionConfig()
    result = await server_handshake(
        stream, token, timeout=handshake_timeout, max_frame_size=config.max_frame_size, peer=peer
    )
    async with open_session(
        stream,
        Role.SERVER,
        config,
        decoder=result.decoder,
        peer_max_frame_size=result.peer_max_frame_size,
        name=f"server<{peer}>",
    ) as session:
        yield session
