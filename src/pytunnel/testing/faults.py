"""Fault injection on a forward: what toxiproxy does, inside the tunnel.

Each forward carries a :class:`Faults` object; its settings apply per direction ("out": from the
side that accepted the connection towards the target; "in": back) and can be changed or cleared
at any time from the test. The relay consults it for every chunk, so a change takes effect on
connections already open.
"""

from __future__ import annotations

import random
from typing import Literal

import attrs
import trio

__all__ = ["DirectionFaults", "Faults", "FaultClosedError"]

Direction = Literal["out", "in", "both"]


class FaultClosedError(Exception):
    """Raised inside a relay when a fault closes its connection (``close_after``)."""


@attrs.define
class DirectionFaults:
    """Faults for one direction. All off by default."""

    #: Added delay per chunk, in seconds, plus a uniform random jitter of +- ``jitter``.
    latency: float = 0.0
    jitter: float = 0.0
    #: Throughput cap in bytes per second (``None``: unlimited).
    bandwidth: float | None = None
    #: Drop every byte while keeping the connection open (a silent peer).
    blackhole: bool = False
    #: Close the connection (cleanly, both ways) once this many bytes went this way on it.
    close_after: int | None = None
    #: Deliver data in slices of this many bytes, ``slice_delay`` seconds apart.
    slice_size: int | None = None
    slice_delay: float = 0.0

    @property
    def active(self) -> bool:
        return self != DirectionFaults()


class Faults:
    """The faults of one forward, settable and clearable at runtime."""

    def __init__(self) -> None:
        self.out = DirectionFaults()
        self.in_ = DirectionFaults()
        self._relays: set[trio.CancelScope] = set()

    def set(self, direction: Direction = "both", **settings: object) -> None:
        """``faults.set("in", latency=0.2, jitter=0.02)``; unknown names raise ``TypeError``."""
        sides = self._sides(direction)
        known = {field.name for field in attrs.fields(DirectionFaults)}
        unknown = sorted(set(settings) - known)
        if unknown:  # all or nothing: nothing is changed when a name is wrong
            raise TypeError(f"unknown fault {unknown[0]!r}")
        for name, value in settings.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and not value >= 0:
                raise ValueError(f"fault {name} must be >= 0, got {value!r}")
        for side in sides:
            for name, value in settings.items():
                setattr(side, name, value)

    def clear(self, direction: Direction = "both") -> None:
        """Remove every fault (of one direction)."""
        if direction in ("out", "both"):
            self.out = DirectionFaults()
        if direction in ("in", "both"):
            self.in_ = DirectionFaults()

    def reset_connections(self) -> int:
        """Reset every connection of the forward now (RST to both ends); returns how many."""
        scopes = list(self._relays)
        for scope in scopes:
            scope.cancel()
        return len(scopes)

    def _sides(self, direction: Direction) -> list[DirectionFaults]:
        if direction not in ("out", "in", "both"):
            raise ValueError(f"direction must be 'out', 'in' or 'both', not {direction!r}")
        return [s for d, s in (("out", self.out), ("in", self.in_)) if direction in (d, "both")]

    def side(self, outbound: bool) -> DirectionFaults:
        return self.out if outbound else self.in_


async def send_with_faults(
    sink: trio.abc.SendStream, chunk: bytes | bytearray, faults: DirectionFaults, sent: int
) -> int:
    """Send ``chunk`` through ``faults``; return how many bytes count as delivered.

    ``sent`` is how many bytes already went this way (for ``close_after``).
    """
    if faults.blackhole:
        return 0
    if faults.close_after is not None and sent + len(chunk) >= faults.close_after:
        allowed = max(0, faults.close_after - sent)
        if allowed:
            await sink.send_all(chunk[:allowed])
        raise FaultClosedError(f"closed after {faults.close_after} bytes")
    if faults.latency or faults.jitter:
        delay = faults.latency + random.uniform(-faults.jitter, faults.jitter)
        await trio.sleep(max(0.0, delay))
    size = faults.slice_size or len(chunk)
    for start in range(0, len(chunk), size):
        piece = chunk[start : start + size]
        if faults.bandwidth:
            await trio.sleep(len(piece) / faults.bandwidth)
        await sink.send_all(piece)
        if faults.slice_size and faults.slice_delay and start + size < len(chunk):
            await trio.sleep(faults.slice_delay)
    return len(chunk)
