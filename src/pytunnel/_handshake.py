"""The authentication handshake over a trio stream: the I/O driver of ``protocol.handshake``.

The state machines there decide everything about the exchange; this module only reads frames
(handshake messages only, at most 4 KiB each, within a deadline, so an unauthenticated peer can
neither make us allocate nor hold a connection open for long), feeds them in, writes what the
machine answers, and turns I/O failures into typed errors. After it, the same
:class:`FrameDecoder` (with any bytes already read past the handshake) is handed to the
session. It knows nothing of proofs, versions or message order.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from typing import cast

import attrs
import trio

from .errors import (
    AuthenticationError,
    ConnectError,
    HandshakeTimeoutError,
    TLSError,
    TunnelError,
)
from .protocol import handshake as hs
from .protocol.frames import FrameDecoder, encode_message
from .protocol.messages import HANDSHAKE, GoAway, HandshakeMessage, Message, truncate_text
from .protocol.mux import Role
from .session import Session, SessionConfig, open_session

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
    #: The identity the client authenticated with ("" for none); a node link's node id.
    client_id: str = ""
    #: Whether the peer is a node of the cluster (authenticated by the cluster secret).
    node: bool = False
    #: Version 2: what we announced the peer may send before our Accept, and what it
    #: announced we may (0 in a version 1 session).
    early_window: int = 0
    peer_early_window: int = 0

    def open_session(
        self, stream: trio.abc.Stream, role: Role, config: SessionConfig, *, name: str
    ) -> AbstractAsyncContextManager[Session]:
        """The session that follows this handshake on ``stream``: it starts with the bytes the
        handshake read past its last frame and sends frames up to the peer's limit."""
        return open_session(
            stream,
            role,
            config,
            decoder=self.decoder,
            peer_max_frame_size=self.peer_max_frame_size,
            name=name,
            version=self.version,
            early_window=self.early_window,
            peer_early_window=self.peer_early_window,
        )


#: A TLS record starts with its content type (22 handshake, 21 alert) and version 3.x; as a
#: length prefix that would be a frame of hundreds of megabytes, so it cannot be ours.
_TLS_RECORD_STARTS = (b"\x16\x03", b"\x15\x03")


def _new_decoder() -> FrameDecoder:
    return FrameDecoder(hs.PRE_AUTH_MAX_FRAME_SIZE, layer=HANDSHAKE)


async def _receive(
    stream: trio.abc.Stream, decoder: FrameDecoder, *, tls_hint: str = "", eof_hint: str = ""
) -> HandshakeMessage:
    first = decoder.buffered == 0
    while True:
        message = decoder.next_message()
        if message is not None:
            return cast(HandshakeMessage, message)  # the decoder's layer is HANDSHAKE
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


async def client_handshake(
    stream: trio.abc.Stream,
    token: str | bytes,
    *,
    timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
    max_frame_size: int,
    versions: tuple[int, ...] = hs.SUPPORTED_VERSIONS,
    client_id: str = "",
    node: bool = False,
    early_window: int = 0,
) -> HandshakeResult:
    """Authenticate to a server, as ``client_id`` if given (with ``node``, as the node
    ``client_id`` of a cluster whose secret is ``token``). On failure the stream is closed
    and a typed error raised: ``AuthenticationError`` (1002), ``VersionMismatchError`` (1003),
    ``HandshakeTimeoutError``, ``RemoteProtocolError`` or ``ConnectError``.

    ``early_window`` (version 2) is what the server may send on a stream it opens before we
    accept it: the session's ``SessionConfig.early_window``, or 0 for none."""
    machine = hs.ClientHandshake(
        token,
        max_frame_size=max_frame_size,
        versions=versions,
        client_id=client_id,
        node=node,
        early_window=early_window,
    )
    decoder = _new_decoder()
    try:
        with trio.fail_after(timeout):
            await _send(stream, machine.start())
            step = machine.receive(
                await _receive(
                    stream,
                    decoder,
                    tls_hint="the server speaks TLS: connect with TLS (--tls)",
                    eof_hint="the server closed the connection before answering "
                    "(if it is a TLS server, connect with TLS: --tls)",
                )
            )
            while step.result is None:
                if step.send is not None:
                    await _send(stream, step.send)
                step = machine.receive(await _receive(stream, decoder))
    except trio.TooSlowError:
        await trio.aclose_forcefully(stream)
        raise HandshakeTimeoutError(f"no handshake answer within {timeout} s") from None
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        await trio.aclose_forcefully(stream)
        raise ConnectError(f"connection lost during the handshake: {exc}") from exc
    except TunnelError:
        await trio.aclose_forcefully(stream)
        raise
    return _result(step.result, decoder, max_frame_size, early_window)


def _result(
    done: hs.Authenticated, decoder: FrameDecoder, max_frame_size: int, early_window: int
) -> HandshakeResult:
    decoder.max_frame_size = max_frame_size
    return HandshakeResult(
        done.version,
        decoder,
        done.peer_max_frame_size,
        done.client_id,
        node=done.node,
        early_window=early_window if done.version >= 2 else 0,
        peer_early_window=done.peer_early_window,
    )


async def server_handshake(
    stream: trio.abc.Stream,
    token: str | bytes,
    *,
    timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
    max_frame_size: int,
    versions: tuple[int, ...] = hs.SUPPORTED_VERSIONS,
    peer: str = "?",
    first_frame_timeout: float | None = None,
    node_secret: str | bytes | None = None,
    early_window: int = 0,
) -> HandshakeResult:
    """Authenticate a client. On failure the peer is told why (``GoAway``), the stream is
    closed and the same typed error is raised here. The token is never logged.

    ``first_frame_timeout`` bounds the wait for the client's ``Hello`` alone: an honest client
    sends it at once, so a connection that stays silent is dropped long before ``timeout``
    and cannot hold a pending-handshake slot for the whole handshake deadline.
    ``node_secret``: a peer may authenticate as a node of the cluster with it (see
    ``HandshakeResult.node``). ``early_window``: as :func:`client_handshake`'s, for the
    streams the client opens."""
    machine = hs.ServerHandshake(
        token,
        max_frame_size=max_frame_size,
        versions=versions,
        peer=peer,
        node_secret=node_secret,
        early_window=early_window,
    )
    decoder = _new_decoder()
    first_timeout = timeout if first_frame_timeout is None else min(timeout, first_frame_timeout)
    waiting_for = machine.expecting
    try:
        with trio.fail_after(timeout):
            with trio.fail_after(first_timeout):
                hello = await _receive(
                    stream,
                    decoder,
                    tls_hint="the client speaks TLS but this server has no TLS set up",
                )
            step = machine.receive(hello)
            waiting_for = machine.expecting
            while step.result is None:
                if step.send is not None:
                    await _send(stream, step.send)
                waiting_for = machine.expecting
                step = machine.receive(await _receive(stream, decoder))
            if step.send is not None:
                await _send(stream, step.send)
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
    except TunnelError as exc:
        if isinstance(exc, AuthenticationError):
            log.warning("authentication failed for %s", peer)
        else:
            log.warning("handshake with %s failed: %s", peer, exc)
        refusal = machine.refusal(exc)
        await send_goaway(stream, refusal.code, refusal.message)
        raise
    return _result(step.result, decoder, max_frame_size, early_window)


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
        stream,
        token,
        timeout=handshake_timeout,
        max_frame_size=config.max_frame_size,
        early_window=config.early_window,
    )
    async with result.open_session(stream, Role.CLIENT, config, name=name) as session:
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
        stream,
        token,
        timeout=handshake_timeout,
        max_frame_size=config.max_frame_size,
        peer=peer,
        early_window=config.early_window,
    )
    async with result.open_session(stream, Role.SERVER, config, name=f"server<{peer}>") as session:
        yield session
