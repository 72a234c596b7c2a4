"""A multiplexed session over any trio ``Stream``: the public namespace of the multiplexer
(``pytunnel.session``); it knows nothing of tunnels, routes or handshakes.

:class:`Session` (``pytunnel._session``, compiled by mypyc in a compiled build) runs one reader
and one writer task over the transport; :class:`SessionConfig` (``pytunnel._session_config``)
holds its tunables. This module stays pure Python in every build because it holds what mypyc
cannot compile: :func:`open_session` is an ``asynccontextmanager`` (an async generator).

:class:`Session` is the :class:`~pytunnel._stream.StreamCarrier` of its streams: a
:class:`MuxStream` reaches the session only through that interface, and the session reaches a
stream only through its ``deliver_*``, ``window_opened``, ``break_with`` and
``session_ended`` calls.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from ._incoming import IncomingStream, StreamSlot
from ._session import Session
from ._session_config import SessionConfig
from ._stream import MuxStream, StreamCarrier
from ._util import unwrap_cancelled
from .protocol.frames import FrameDecoder
from .protocol.mux import Role

__all__ = [
    "IncomingStream",
    "MuxStream",
    "Role",
    "Session",
    "SessionConfig",
    "StreamCarrier",
    "StreamSlot",
    "open_session",
    "wait_stream_end",
]


async def wait_stream_end(stream: MuxStream) -> BaseException | None:
    """Until the peer ends ``stream`` (data it sends is discarded, as on a control stream):
    ``None`` for a clean close, else the ``BrokenResourceError`` (its cause says why)."""
    try:
        while await stream.receive_some():
            pass
    except trio.BrokenResourceError as exc:
        return exc
    return None


@asynccontextmanager
async def open_session(
    transport: trio.abc.Stream,
    role: Role,
    config: SessionConfig | None = None,
    *,
    decoder: FrameDecoder | None = None,
    peer_max_frame_size: int | None = None,
    name: str = "",
    version: int = 1,
    early_window: int = 0,
    peer_early_window: int = 0,
) -> AsyncIterator[Session]:
    """Run a session over ``transport`` for the duration of the ``async with`` block.

    ``decoder`` hands over bytes already read past the handshake, ``version`` is the protocol
    version it chose, ``early_window`` and ``peer_early_window`` the early windows it
    announced (version 2; see :attr:`SessionConfig.early_window`). The block's own exceptions
    propagate unwrapped (no ``ExceptionGroup``); leaving the block closes the session and the
    transport, and no task started here outlives it.
    """
    session = Session(
        transport,
        role,
        config or SessionConfig(),
        decoder=decoder,
        peer_max_frame_size=peer_max_frame_size,
        name=name,
        version=version,
        early_window=early_window,
        peer_early_window=peer_early_window,
    )
    body_error: BaseException | None = None
    with unwrap_cancelled():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session._run, name="pytunnel.session.Session._run")
            try:
                yield session
            except BaseException as exc:
                body_error = exc
            finally:
                await session.aclose()
                session._cancel_scope.cancel()
    if body_error is not None:
        raise body_error
