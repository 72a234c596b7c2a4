"""The stream capabilities the relay asks of the streams it carries, by ``isinstance``.

They are ``runtime_checkable`` protocols, which a module compiled by mypyc cannot define (its
classes are not protocol classes at run time), so they live here, in a module that stays
Python, and :mod:`pytunnel._relay` (compiled) imports them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

from ._direct import DirectReader
from ._stream import DirectWriter

__all__ = [
    "BreakableStream",
    "DirectReceive",
    "DirectSink",
    "DirectSource",
    "PacedStream",
    "ResettableStream",
]


@runtime_checkable
class ResettableStream(Protocol):
    """A stream that can abort both directions at once, so its peer sees a reset, not EOF."""

    def reset(self, code: int, message: str) -> None: ...


class BreakableStream(Protocol):
    """A stream that can tell, synchronously, the moment it breaks (a mux stream)."""

    def call_on_break(self, callback: Callable[[], None] | None) -> None: ...


@runtime_checkable
class PacedStream(Protocol):
    """A stream whose sends may be slow on purpose (injected latency, bandwidth caps)."""

    @property
    def paced(self) -> bool:
        """True while sends are delayed deliberately: the relay's idle clock stops for them."""
        ...


@runtime_checkable
class DirectSource(Protocol):
    """A stream that can hand arriving data to a writer while its reader waits (a mux
    stream: :meth:`pytunnel._stream.MuxStream.deliver_directly`)."""

    def deliver_directly(
        self, writer: DirectWriter | None, wake: Callable[[], None] | None = None
    ) -> bool: ...


@runtime_checkable
class DirectSink(Protocol):
    """A stream that takes bytes without waiting when it can: a mux stream (within its
    window), or a wrapper that lets the writer of the stream it wraps (:func:`direct_writer`)
    bypass its ``send_all`` (a fault injector with no fault set)."""

    def direct_writer(self) -> DirectWriter | None: ...


@runtime_checkable
class DirectReceive(Protocol):
    """A wrapper whose wrapped stream can be read directly (:func:`direct_reader`), with the
    wrapper's own conditions (a fault injector's cut and reset)."""

    def direct_reader(self) -> DirectReader | None: ...
