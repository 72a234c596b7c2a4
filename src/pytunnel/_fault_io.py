"""The fault wrapper's per-message paths: what :mod:`pytunnel.testing.faults` runs per chunk.

Every forward's relays are wrapped by its :class:`~pytunnel.testing.Faults` (they can be set
on connections already open), so with no fault set the wrapper still sits on each message's
way: a read, a wait and a write or two per message and side. Written as Python closures,
those were a fifth of what the client spent per round trip beyond a bare trio relay; here
they are classes that mypyc compiles (``pytunnel._build.HOT_MODULES``), with the same
behaviour in the pure-Python build. The policy (which fault, when) stays in
:mod:`pytunnel.testing.faults`; this module only answers, per call, "is this connection
ended, is a fault set for this direction", and counts what it sent.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import trio

from ._direct import DirectReader, HasFileno, SocketReader, write_now
from ._stream import DirectWriter

__all__ = ["DeliveryGate", "Link", "LinkedReader", "LinkedWriter"]


class _Side(Protocol):
    """One direction's faults (:class:`pytunnel.testing.faults.DirectionFaults`)."""

    @property
    def _active(self) -> bool: ...


class Sides(Protocol):
    """Both directions' faults (:class:`pytunnel.testing.faults.Faults`): read on every
    write, since a test may set or replace them at any time."""

    @property
    def out(self) -> _Side: ...

    @property
    def in_(self) -> _Side: ...


class Link:
    """What the wrapped ends of one connection share: whether a fault ended it, the
    operations in flight that the end must interrupt, and what each end sent."""

    def __init__(self, on_close: Callable[[Link], None], name: str = "relay") -> None:
        self._on_close = on_close
        self.name = name
        #: ``close_after`` fired: both ends read EOF and drop what is sent, so the relay
        #: carries the close across like any EOF, cleanly.
        self.cut = False
        #: :meth:`Faults.reset_connections`: every operation raises ``BrokenResourceError``.
        self.reset = False
        #: ``cut or reset``, in one attribute: the direct paths ask it on every write.
        self.ended = False
        #: In-flight operations, each with whether a cut interrupts it (a half-close does not:
        #: it is how the cut reaches the peers). Created on first use, dropped when empty
        #: again: most links of idle relays never have one.
        self.pending: dict[trio.CancelScope, bool] | None = None
        #: Direct readers waiting right now, each with the descriptor it waits on (the idle
        #: relay's own reader, most of the time: one entry).
        self.waiting: list[tuple[int, DirectReader]] = []
        #: Bytes delivered into each wrapped stream so far (what ``close_after`` counts):
        #: towards the target, and back.
        self.sent_out = 0
        self.sent_in = 0

    def end(self, *, reset: bool) -> None:
        if reset:
            self.reset = True
        else:
            self.cut = True
        self.ended = True
        pending = self.pending
        if pending is not None:
            for scope, cuttable in list(pending.items()):
                if reset or cuttable:
                    scope.cancel()
        for fd, reader in self.waiting:
            # wakes every wait on the descriptor, this reader's and a guarded send's (whose
            # guard takes it as the cancellation it also got); the socket itself is left
            # alone: the relay still carries the end across and closes it. Only while the
            # reader's socket still has that descriptor: one closed since (its reader woken,
            # not yet run) may have given the number to an unrelated socket
            if reader.fileno() == fd:
                trio.lowlevel.notify_closing(fd)

    def close(self) -> None:
        self._on_close(self)

    def count(self, outbound: bool, sent: int) -> None:
        if outbound:
            self.sent_out += sent
        else:
            self.sent_in += sent

    def sent(self, outbound: bool) -> int:
        return self.sent_out if outbound else self.sent_in


class LinkedReader:
    """A direct reader of a wrapped stream that ends as ``FaultyStream.receive_some`` does
    when its link is cut (EOF) or reset (``BrokenResourceError``)."""

    def __init__(self, inner: DirectReader, link: Link) -> None:
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
        inner = self._inner
        fd = inner.fileno()
        if fd < 0:  # closed here: the inner wait says so
            await inner.wait()
            return
        waiting = link.waiting
        entry = (fd, inner)
        waiting.append(entry)
        try:
            if type(inner) is SocketReader:
                # its wait, called here: one coroutine fewer parked per idle relay
                await trio.lowlevel.wait_readable(fd)
            else:
                await inner.wait()
        except trio.ClosedResourceError:
            if not link.ended:  # closed for another reason
                raise
        finally:
            waiting.remove(entry)


class LinkedWriter:
    """``FaultyStream.direct_writer``: a plain socket's write done here (``sock``), or the
    wrapped stream's own direct writer (``inner``: a mux stream's), taking nothing while a
    fault is set for this direction or the connection ended (then every byte goes through
    ``send_all``, which applies them)."""

    def __init__(
        self,
        sock: HasFileno | None,
        inner: DirectWriter | None,
        link: Link,
        faults: Sides,
        outbound: bool,
    ) -> None:
        self._sock = sock
        self._inner = inner
        self._link = link
        self._faults = faults
        self._outbound = outbound

    def __call__(self, data: bytes | bytearray | memoryview) -> int:
        link = self._link
        if link.ended:
            return 0
        faults = self._faults
        if (faults.out if self._outbound else faults.in_)._active:
            return 0
        sock = self._sock
        if sock is None:
            assert self._inner is not None
            sent = self._inner(data)
        else:
            sent = write_now(sock, data)
        link.count(self._outbound, sent)
        return sent


class DeliveryGate:
    """The writer ``FaultyStream.deliver_directly`` hands on: ``writer``, stopped once the
    connection is cut or reset (``receive_some`` then ends or raises instead)."""

    def __init__(self, writer: DirectWriter, link: Link) -> None:
        self._writer = writer
        self._link = link

    def __call__(self, data: bytes | bytearray | memoryview) -> int:
        return 0 if self._link.ended else self._writer(data)
