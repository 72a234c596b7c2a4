"""Bandwidth limits: a token bucket, and a stream wrapper whose sends take from one.

A forward's limit is a rate in bytes per second for each direction, shared by all of its
connections: one :class:`TokenBucket` per direction, and each relayed connection sends
through a :class:`LimitedStream` that takes tokens from it before every piece. The bucket
holds at most ``burst`` tokens (by default a tenth of a second's worth, at least 16 KiB), so an
idle forward cannot save up and then send a long burst above its rate.

Waiting for tokens is back-pressure like a slow reader: the relay's pump stops reading from
its source while its send waits, so the limit holds end to end without buffering. The waits
are deliberate, so a limited stream says it is ``paced`` and the relay's idle clock does not
count them as idleness.
"""

from __future__ import annotations

import math
import re

import trio

from ._relay import abort
from ._util import close_now, send_eof_now

__all__ = ["LimitedStream", "TokenBucket", "parse_rate"]

#: Largest piece sent at once: small enough that connections sharing a bucket take turns.
_PIECE = 16 * 1024
_MIN_BURST = 16 * 1024


class TokenBucket:
    """``rate`` bytes per second, at most ``burst`` at once. Waiters are served in arrival
    order (a fair lock), so one connection cannot starve the others of a shared limit."""

    def __init__(self, rate: float, burst: float | None = None) -> None:
        self._lock = trio.Lock()
        self._tokens = 0.0
        self._stamp: float | None = None
        self.rate = rate
        self.burst = burst

    @property
    def rate(self) -> float:
        return self._rate

    @rate.setter
    def rate(self, rate: float) -> None:
        """Change the rate; takes effect on the next piece of every connection."""
        if not (rate > 0 and math.isfinite(rate)):
            raise ValueError(f"a rate must be a positive number of bytes per second, not {rate!r}")
        self._rate = float(rate)

    @property
    def burst(self) -> float:
        return self._burst if self._burst is not None else max(_MIN_BURST, self._rate / 10)

    @burst.setter
    def burst(self, burst: float | None) -> None:
        if burst is not None and not (burst > 0 and math.isfinite(burst)):
            raise ValueError(f"a burst must be a positive number of bytes, not {burst!r}")
        self._burst = burst

    def _refill(self, now: float) -> None:
        if self._stamp is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self._rate)
        else:
            self._tokens = self.burst
        self._stamp = now

    async def take(self, size: int) -> None:
        """Wait until ``size`` bytes may be sent (``size`` at most ``burst``: callers send
        in pieces)."""
        async with self._lock:
            self._refill(trio.current_time())
            missing = size - self._tokens
            if missing > 0:
                await trio.sleep(missing / self._rate)
                self._refill(trio.current_time())
            self._tokens -= size


class LimitedStream(trio.abc.HalfCloseableStream):
    """``stream`` whose sends are limited by ``bucket``; receiving is untouched (the other
    end's wrapper limits the other direction)."""

    def __init__(self, stream: trio.abc.HalfCloseableStream, bucket: TokenBucket) -> None:
        self.stream = stream
        self.bucket = bucket

    @property
    def paced(self) -> bool:
        """Sends wait on purpose: not idleness for the relay."""
        return True

    def reset(self, code: int, message: str) -> None:
        abort(self.stream, code, message)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        piece = max(1, min(_PIECE, int(self.bucket.burst)))
        with memoryview(data) as view:
            if not view:
                await self.stream.send_all(b"")
            for start in range(0, len(view), piece):
                chunk = view[start : start + piece]
                await self.bucket.take(len(chunk))
                await self.stream.send_all(chunk)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.stream.send_eof()

    def send_eof_now(self) -> bool:
        """:meth:`send_eof` without a checkpoint, when the wrapped stream allows it."""
        return send_eof_now(self.stream)

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.stream.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.stream.aclose()

    def close_now(self) -> bool:
        """:meth:`aclose` without a checkpoint, when the wrapped stream allows it."""
        return close_now(self.stream)


_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "kbit": 1000 / 8,
    "mbit": 1000**2 / 8,
    "gbit": 1000**3 / 8,
    "kbps": 1000 / 8,
    "mbps": 1000**2 / 8,
    "gbps": 1000**3 / 8,
}
_RATE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-z]*)(?:/s)?\s*", re.IGNORECASE)


def parse_rate(text: str) -> float:
    """A rate as people write it: ``10MB/s``, ``500KiB/s``, ``100Mbit/s``, ``100Mbps``,
    ``2.5mb``, ``4096`` (bytes per second; decimal units are powers of 1000, ``KiB``... of
    1024, ``bit`` and ``bps`` units are bits). ``ValueError`` with the accepted forms
    otherwise."""
    match = _RATE.fullmatch(text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise ValueError(
            f"{text!r} is not a rate: write a number with B, KB, MB, GB, KiB, MiB, GiB, kbit, "
            "Mbit, Gbit (or kbps, Mbps, Gbps), optionally followed by /s "
            "(10MB/s, 500KiB/s, 100Mbit/s)"
        )
    rate = float(match.group(1)) * _UNITS[unit]
    if rate <= 0:
        raise ValueError(f"{text!r}: a rate must be more than zero")
    return rate
