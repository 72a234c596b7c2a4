"""MuxStream against trio's own conformance suite for half-closeable streams."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
import trio
from helpers import open_pair, session_pair
from trio.testing import check_half_closeable_stream

from pytunnel import SessionConfig


async def _run_check(transport: str, clogged_config: SessionConfig | None) -> None:
    async with (
        session_pair(transport) as (client, server),
        session_pair(transport, clogged_config or SessionConfig()) as (c2, s2),
    ):

        async def maker() -> tuple[trio.abc.HalfCloseableStream, trio.abc.HalfCloseableStream]:
            return await open_pair(client, server)

        async def clogged() -> tuple[trio.abc.HalfCloseableStream, trio.abc.HalfCloseableStream]:
            # a 1-byte window, already used: nothing more goes until the peer reads
            a, b = await open_pair(c2, s2)
            await a.send_all(b"c")
            await b.send_all(b"c")
            return a, b

        clogged_maker: Callable[[], Awaitable[object]] | None = clogged if clogged_config else None
        await check_half_closeable_stream(maker, clogged_maker)  # type: ignore[arg-type]


@pytest.mark.parametrize("clog", [False, True])
async def test_check_half_closeable_stream(transport: str, clog: bool) -> None:
    config = SessionConfig(window=1, write_buffer_high=0) if clog else None
    await _run_check(transport, config)
