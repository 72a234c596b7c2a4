"""A stream that hands out bytes already read from it before reading on.

Whoever peeks at the start of a connection (the server telling a WebSocket upgrade from a
tunnel handshake, the CONNECT client that may have read past the proxy's answer) gives those
bytes back through this wrapper, so the next reader sees the connection from its first byte.
"""

from __future__ import annotations

import operator

import trio

__all__ = ["PrefixedStream"]


class PrefixedStream(trio.abc.Stream):
    """``transport`` with ``prefix`` put back in front of what it receives.

    Sends, closing and everything else go straight to ``transport``, which this owns.
    """

    def __init__(self, prefix: bytes | bytearray, transport: trio.abc.Stream) -> None:
        self._prefix = bytes(prefix)
        self.transport = transport

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.transport.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if max_bytes is not None:
            max_bytes = operator.index(max_bytes)
            if max_bytes < 1:
                raise ValueError("max_bytes must be at least 1")
        if self._prefix:
            if max_bytes is None or max_bytes >= len(self._prefix):
                chunk, self._prefix = self._prefix, b""
            else:
                chunk, self._prefix = self._prefix[:max_bytes], self._prefix[max_bytes:]
            await trio.lowlevel.checkpoint()
            return chunk
        return await self.transport.receive_some(max_bytes)

    async def aclose(self) -> None:
        self._prefix = b""
        await self.transport.aclose()
