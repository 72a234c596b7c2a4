"""``PrefixedStream``: bytes peeked off a stream are read first, then the stream itself."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from pytunnel.transports._prefixed import PrefixedStream


async def test_the_prefix_comes_first_in_pieces_then_the_stream() -> None:
    a, b = trio.testing.memory_stream_pair()
    stream = PrefixedStream(b"peeked", b)
    await a.send_all(b" and the rest")
    assert await stream.receive_some(4) == b"peek"
    assert await stream.receive_some() == b"ed"
    assert await stream.receive_some() == b" and the rest"
    await stream.send_all(b"back")
    assert await a.receive_some() == b"back"
    await a.aclose()
    assert await stream.receive_some() == b""
    await stream.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await stream.receive_some()


async def test_max_bytes_is_checked_even_while_the_prefix_lasts() -> None:
    _, b = trio.testing.memory_stream_pair()
    stream = PrefixedStream(b"x", b)
    with pytest.raises(ValueError, match="at least 1"):
        await stream.receive_some(0)
    with pytest.raises(TypeError):
        await stream.receive_some(1.5)  # type: ignore[arg-type]
    assert await stream.receive_some(1) == b"x"


async def test_with_an_empty_prefix_it_passes_trios_stream_conformance_checks() -> None:
    async def maker() -> tuple[PrefixedStream, PrefixedStream]:
        a, b = trio.testing.memory_stream_pair()
        return PrefixedStream(b"", a), PrefixedStream(b"", b)

    async def clogged() -> tuple[PrefixedStream, PrefixedStream]:
        a, b = trio.testing.lockstep_stream_pair()
        return PrefixedStream(b"", a), PrefixedStream(b"", b)

    await trio.testing.check_two_way_stream(maker, clogged)
