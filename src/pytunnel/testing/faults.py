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

from .._direct import SocketReader, raw_socket
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
        self._links: set[_Link] = set()

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
        link = _Link(self._links.discard, name)
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


class _Link:
    """What the wrapped ends of one connection share: whether a fault ended it, and the
    operations in flight that the end must interrupt."""

    # one per wrapped connection, thousands of idle ones: no per-instance dict
    __slots__ = ("_on_close", "_pending", "_waiting", "cut", "ended", "name", "reset")

    def __init__(self, on_close: Callable[[_Link], None], name: str = "relay") -> None:
        self._on_close = on_close
        self.name = name
        #: ``close_after`` fired: both ends read EOF and drop what is sent, so the relay
        #: carries the close across like any EOF, cleanly.
        self.cut = False
        #: :meth:`Faults.reset_connections`: every operation raises ``BrokenResourceError``.
        self.reset = False
        #: ``cut or reset``, in one slot: the direct paths ask it on every write.
        self.ended = False
        #: In-flight operations, each with whether a cut interrupts it (a half-close does not:
        #: it is how the cut reaches the peers). Created on first use, dropped when empty
        #: again: most links of idle relays never have one.
        self._pending: dict[trio.CancelScope, bool] | None = None
        #: Direct readers waiting right now, each with the descriptor it waits on (the idle
        #: relay's own reader, most of the time: one entry).
        self._waiting: list[tuple[int, DirectReader]] = []

    @contextlib.contextmanager
    def guard(self, *, cuttable: bool = True) -> Iterator[trio.CancelScope]:
        with trio.CancelScope() as scope:
            pending = self._pending
            if pending is None:
                pending = self._pending = {}
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
                    self._pending = None

    def end(self, *, reset: bool) -> None:
        if reset:
            self.reset = True
        else:
            self.cut = True
        self.ended = True
        for scope, cuttable in list((self._pending or {}).items()):
            if reset or cuttable:
                scope.cancel()
        for fd, reader in self._waiting:
            # wakes every wait on the descriptor, this reader's and a guarded send's (whose
            # guard takes it as the cancellation it also got); the socket itself is left
            # alone: the relay still carries the end across and closes it. Only while the
            # reader's socket still has that descriptor: one closed since (its reader woken,
            # not yet run) may have given the number to an unrelated socket
            if reader.fileno() == fd:
                trio.lowlevel.notify_closing(fd)

    def close(self) -> None:
        self._on_close(self)


class _LinkedReader:
    """A direct reader of a wrapped stream that ends as :meth:`FaultyStream.receive_some`
    does when its link is cut (EOF) or reset (``BrokenResourceError``)."""

    __slots__ = ("_inner", "_link")

    def __init__(self, inner: DirectReader, link: _Link) -> None:
        self._inner = inner
        self._link = link

    def receive_nowait(self, max_bytes: int) -> bytes | None:
        link = self._link
        if link.ended:
            if link.reset:
                raise trio.BrokenResourceError("connection reset by an injected fault")
            return b""
        return self._inner.receive_nowait(max_bytes)

    def fileno(self) -> int:
        return self._inner.fileno()

    async def wait(self) -> None:
        link = self._link
        if link.ended:  # receive_nowait answers at once
            await trio.lowlevel.checkpoint()
            return
        fd = self._inner.fileno()
        if fd < 0:  # closed here: the inner wait says so
            await self._inner.wait()
            return
        waiting = link._waiting
        inner = self._inner
        entry = (fd, inner)
        waiting.append(entry)
        try:
            if type(inner) is SocketReader:
                # its wait, called here: one coroutine frame fewer parked per idle relay
                await trio.lowlevel.wait_readable(fd)
            else:
                await inner.wait()
        except trio.ClosedResourceError:
            if not link.ended:  # closed for another reason
                raise
        finally:
            waiting.remove(entry)


class FaultyStream(trio.abc.HalfCloseableStream):
    """``stream`` with one direction of ``faults`` applied to what is sent into it.

    ``direction`` is ``"out"`` for the stream towards the target, ``"in"`` for the one back to
    the side that accepted the connection. Receiving is untouched (the other end's wrapper
    applies the other direction). Prefer :meth:`Faults.wrap`, which links the two ends of a
    connection so that ``close_after`` and :meth:`Faults.reset_connections` act on both.
    """

    # two per wrapped connection: no per-instance dict
    __slots__ = ("_faults", "_link", "_outbound", "_sent", "stream")

    def __init__(
        self,
        stream: trio.abc.HalfCloseableStream,
        faults: Faults,
        direction: Literal["out", "in"],
        *,
        _link: _Link | None = None,
    ) -> None:
        if direction not in ("out", "in"):
            raise ValueError(f"direction must be 'out' or 'in', not {direction!r}")
        self.stream = stream
        self._faults = faults
        self._outbound = direction == "out"
        self._link = _link if _link is not None else _Link(lambda link: None)
        #: Bytes delivered into ``stream`` so far (what ``close_after`` counts).
        self._sent = 0

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
        link = self._link
        faults = self._faults
        outbound = self._outbound
        if isinstance(stream, trio.SocketStream) and os.name == "posix":
            sock = raw_socket(stream.socket)

            def write(data: bytes | bytearray | memoryview) -> int:
                if link.ended or (faults.out if outbound else faults.in_)._active:
                    return 0
                fd = sock.fileno()  # -1 once closed: never a descriptor reused by another
                if fd < 0:
                    return 0
                try:
                    sent = os.write(fd, data)
                except OSError:  # BlockingIOError included
                    return 0
                self._sent += sent
                return sent

            return write
        inner = direct_writer(stream)
        if inner is None:
            return None

        def write_inner(data: bytes | bytearray | memoryview) -> int:
            if link.ended or (faults.out if outbound else faults.in_)._active:
                return 0
            sent = inner(data)
            self._sent += sent
            return sent

        return write_inner

    def direct_reader(self) -> DirectReader | None:
        """The wrapped stream's direct reader, with what ``receive_some`` adds: EOF once the
        connection is cut, ``BrokenResourceError`` once it is reset, and a wait that either
        interrupts (faults apply to sends only, so nothing else is in the way)."""
        inner = direct_reader(self.stream)
        return None if inner is None else _LinkedReader(inner, self._link)

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
        link = self._link

        def write(data: bytes | bytearray | memoryview) -> int:
            return 0 if link.ended else writer(data)

        return stream.deliver_directly(write, wake)

    def _check(self) -> None:
        if self._link.reset:
            raise trio.BrokenResourceError("connection reset by an injected fault")

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        self._check()
        if not self._link.cut:
            with self._link.guard():
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
        with self._link.guard():
            cut = await self._send(data, side)
        if cut:
            log.debug("%s: closed after %d bytes", self._link.name, side.close_after)
            self._link.end(reset=False)
        self._check()

    async def _send(self, data: bytes | bytearray | memoryview, faults: DirectionFaults) -> bool:
        """Send ``data`` through ``faults``; True once ``close_after`` is reached."""
        if not faults.active:
            await self.stream.send_all(data)
            self._sent += len(data)
            return False
        if faults.blackhole:
            return False
        if faults.close_after is not None and self._sent + len(data) >= faults.close_after:
            allowed = max(0, faults.close_after - self._sent)
            if allowed:
                await self.stream.send_all(data[:allowed])
                self._sent += allowed
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
            self._sent += len(piece)
            if faults.slice_size and faults.slice_delay and start + size < len(data):
                await trio.sleep(faults.slice_delay)
        return False

    async def wait_send_all_might_not_block(self) -> None:
        self._check()
        with self._link.guard():
            await self.stream.wait_send_all_might_not_block()
        self._check()

    async def send_eof(self) -> None:
        self._check()
        with self._link.guard(cuttable=False):
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
