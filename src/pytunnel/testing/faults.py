"""Fault injection: what toxiproxy does, inside the tunnel, as a trio stream wrapper.

:class:`FaultyStream` wraps any ``trio.abc.HalfCloseableStream`` and applies one direction of a
:class:`Faults` object to what is sent into it. Each forward carries a ``Faults``; its settings
apply per direction ("out": from the side that accepted the connection towards the target;
"in": back) and can be changed or cleared at any time from the test: the wrapper reads them on
every send, so a change takes effect on connections already open.

This module knows nothing of sessions, forwards or the relay's internals: whoever sets up a
relay wraps its two streams (:meth:`Faults.wrap`) and the relay treats them like any other
stream. Two capabilities let it do so without knowing the class: ``paced`` (a send that is
slow on purpose is not idleness) and ``reset`` (abort the wrapped stream).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
from collections.abc import Callable, Iterator
from typing import Literal, cast

import attrs
import trio

from .._direct import raw_socket
from .._fault_io import DeliveryGate, Link, LinkedReader, LinkedWriter
from .._relay import DirectReader, DirectSource, abort, direct_reader, direct_writer
from .._stream import DirectWriter
from .._util import close_now, implements, send_eof_now

#: The relay's logger: a connection a fault closed is said where relays are.
log = logging.getLogger("pytunnel.relay")

__all__ = ["DirectionFaults", "Faults", "FaultyStream"]

Direction = Literal["out", "in", "both"]


class _Activity:
    """Where :class:`DirectionFaults` keeps its ``active`` answer (a slot outside attrs'
    fields, so that ``attrs.fields`` lists the faults only)."""

    __slots__ = ("_active",)
    _active: bool


@attrs.define
class DirectionFaults(_Activity):
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

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "_active", self._any())

    def __setattr__(self, name: str, value: object) -> None:
        # every assignment (through Faults.set or directly) refreshes the answer, so the
        # direct writers, which ask on every write, read a slot instead of testing seven
        # fields through a property
        object.__setattr__(self, name, value)
        try:
            self._active  # noqa: B018 - unset only while attrs' __init__ assigns the fields
        except AttributeError:
            return
        object.__setattr__(self, "_active", self._any())

    def _any(self) -> bool:
        return bool(
            self.latency
            or self.jitter
            or self.bandwidth is not None
            or self.blackhole
            or self.close_after is not None
            or self.slice_size is not None
            or self.slice_delay
        )

    @property
    def active(self) -> bool:
        """Whether any fault differs from its default."""
        return self._active


class Faults:
    """The faults of one forward, settable and clearable at runtime."""

    def __init__(self) -> None:
        self.out = DirectionFaults()
        self.in_ = DirectionFaults()
        self._links: set[Link] = set()

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
        """Reset every connection set up by :meth:`wrap` and still open (RST to both ends);
        returns how many."""
        links = list(self._links)
        for link in links:
            link.end(reset=True)
        return len(links)

    def wrap(
        self,
        accepted: trio.abc.HalfCloseableStream,
        toward_target: trio.abc.HalfCloseableStream,
        name: str = "relay",
    ) -> tuple[FaultyStream, FaultyStream]:
        """Wrap the two ends of one relayed connection: "out" faults apply to what is sent
        towards the target, "in" faults to what is sent back. The two share their fate: a
        ``close_after`` closes both, :meth:`reset_connections` resets both. ``name`` is the
        connection's name in the log line that says a fault closed it."""
        link = Link(self._links.discard, name)
        self._links.add(link)
        return (
            FaultyStream(accepted, self, "in", _link=link),
            FaultyStream(toward_target, self, "out", _link=link),
        )

    def _sides(self, direction: Direction) -> list[DirectionFaults]:
        if direction not in ("out", "in", "both"):
            raise ValueError(f"direction must be 'out', 'in' or 'both', not {direction!r}")
        return [s for d, s in (("out", self.out), ("in", self.in_)) if direction in (d, "both")]

    def side(self, outbound: bool) -> DirectionFaults:
        return self.out if outbound else self.in_


@contextlib.contextmanager
def _guard(link: Link, *, cuttable: bool = True) -> Iterator[trio.CancelScope]:
    """An operation in flight on a wrapped end, which the link's end interrupts (a cut only
    when ``cuttable``: a half-close is how the cut reaches the peers)."""
    with trio.CancelScope() as scope:
        pending = link.pending
        if pending is None:
            pending = link.pending = {}
        pending[scope] = cuttable
        try:
            yield scope
        except trio.ClosedResourceError:
            # the end's wake-up of a reader on the same socket reached this operation
            # first: it was interrupted on purpose, as its cancelled scope says
            if not scope.cancel_called:
                raise
        finally:
            del pending[scope]
            if not pending:
                link.pending = None


class FaultyStream(trio.abc.HalfCloseableStream):
    """``stream`` with one direction of ``faults`` applied to what is sent into it.

    ``direction`` is ``"out"`` for the stream towards the target, ``"in"`` for the one back to
    the side that accepted the connection. Receiving is untouched (the other end's wrapper
    applies the other direction). Prefer :meth:`Faults.wrap`, which links the two ends of a
    connection so that ``close_after`` and :meth:`Faults.reset_connections` act on both.
    """

    # two per wrapped connection: no per-instance dict
    __slots__ = ("_faults", "_link", "_outbound", "stream")

    def __init__(
        self,
        stream: trio.abc.HalfCloseableStream,
        faults: Faults,
        direction: Literal["out", "in"],
        *,
        _link: Link | None = None,
    ) -> None:
        if direction not in ("out", "in"):
            raise ValueError(f"direction must be 'out' or 'in', not {direction!r}")
        self.stream = stream
        self._faults = faults
        self._outbound = direction == "out"
        self._link = _link if _link is not None else Link(lambda link: None)

    @property
    def _sent(self) -> int:
        """Bytes delivered into ``stream`` so far (what ``close_after`` counts), kept by the
        link, where the direct writers count them too."""
        return self._link.sent(self._outbound)

    @property
    def paced(self) -> bool:
        """True while faults apply to sends: their delays are the test's, not idleness."""
        return self._faults.side(self._outbound).active

    def reset(self, code: int, message: str) -> None:
        """Abort the wrapped stream (RST on TCP, Reset on a mux stream)."""
        abort(self.stream, code, message)

    def direct_writer(self) -> DirectWriter | None:
        """The wrapped stream's direct writer, taking nothing while a fault is set for this
        direction or the connection is cut or reset: then every byte goes through
        ``send_all``, which applies them (and counts for ``close_after`` as before).

        Asked on every write, so each check is a slot read; a plain socket's write is done
        here, not through the socket's own writer (one call fewer per chunk)."""
        stream = self.stream
        if isinstance(stream, trio.SocketStream) and os.name == "posix":
            sock = raw_socket(stream.socket)
            return LinkedWriter(sock, None, self._link, self._faults, self._outbound)
        inner = direct_writer(stream)
        if inner is None:
            return None
        return LinkedWriter(None, inner, self._link, self._faults, self._outbound)

    def direct_reader(self) -> DirectReader | None:
        """The wrapped stream's direct reader, with what ``receive_some`` adds: EOF once the
        connection is cut, ``BrokenResourceError`` once it is reset, and a wait that either
        interrupts (faults apply to sends only, so nothing else is in the way)."""
        inner = direct_reader(self.stream)
        return None if inner is None else LinkedReader(inner, self._link)

    def deliver_directly(
        self, writer: DirectWriter | None, wake: Callable[[], None] | None = None
    ) -> bool:
        """Hand ``writer`` (and ``wake``) to the wrapped stream if it delivers directly,
        stopped once the connection is cut or reset (``receive_some`` then ends or raises
        instead); whether it does."""
        if not implements(self.stream, DirectSource):
            return False
        stream = cast(DirectSource, self.stream)
        if writer is None:
            return stream.deliver_directly(None)
        return stream.deliver_directly(DeliveryGate(writer, self._link), wake)

    def _check(self) -> None:
        if self._link.reset:
            raise trio.BrokenResourceError("connection reset by an injected fault")

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        self._check()
        if not self._link.cut:
            with _guard(self._link):
                return await self.stream.receive_some(max_bytes)
            self._check()
        await trio.lowlevel.checkpoint()
        return b""

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self._check()
        if self._link.cut:  # the connection is closing: what is sent now is dropped
            await trio.lowlevel.checkpoint()
            return
        cut = False
        side = self._faults.side(self._outbound)
        with _guard(self._link):
            cut = await self._send(data, side)
        if cut:
            log.debug("%s: closed after %d bytes", self._link.name, side.close_after)
            self._link.end(reset=False)
        self._check()

    async def _send(self, data: bytes | bytearray | memoryview, faults: DirectionFaults) -> bool:
        """Send ``data`` through ``faults``; True once ``close_after`` is reached."""
        if not faults.active:
            await self.stream.send_all(data)
            self._link.count(self._outbound, len(data))
            return False
        if faults.blackhole:
            return False
        if faults.close_after is not None and self._sent + len(data) >= faults.close_after:
            allowed = max(0, faults.close_after - self._sent)
            if allowed:
                await self.stream.send_all(data[:allowed])
                self._link.count(self._outbound, allowed)
            return True
        if faults.latency or faults.jitter:
            delay = faults.latency + random.uniform(-faults.jitter, faults.jitter)
            await trio.sleep(max(0.0, delay))
        size = faults.slice_size or len(data)
        for start in range(0, len(data), size):
            piece = data[start : start + size]
            if faults.bandwidth:
                await trio.sleep(len(piece) / faults.bandwidth)
            await self.stream.send_all(piece)
            self._link.count(self._outbound, len(piece))
            if faults.slice_size and faults.slice_delay and start + size < len(data):
                await trio.sleep(faults.slice_delay)
        return False

    async def wait_send_all_might_not_block(self) -> None:
        self._check()
        with _guard(self._link):
            await self.stream.wait_send_all_might_not_block()
        self._check()

    async def send_eof(self) -> None:
        self._check()
        with _guard(self._link, cuttable=False):
            await self.stream.send_eof()
        self._check()

    def send_eof_now(self) -> bool:
        """:meth:`send_eof` without a checkpoint, when the wrapped stream allows it (then it
        does not wait either, so there is nothing for a reset to interrupt)."""
        self._check()
        return send_eof_now(self.stream)

    async def aclose(self) -> None:
        self._link.close()
        await self.stream.aclose()

    def close_now(self) -> bool:
        """:meth:`aclose` without a checkpoint, when the wrapped stream allows it."""
        self._link.close()
        return close_now(self.stream)
