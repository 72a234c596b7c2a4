"""What every forward is: the :class:`Forward` status machine, its kinds and statuses.

A forward is declared on a tunnel and outlives any one connection of it; its status says
where it is (docs/resilience.md has the transitions). A forward reaches its tunnel only through
the :class:`~pytunnel._link.Link` it is given: it never sees the supervisor, the server, or
another forward.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

import trio

from .._dial import format_target
from .._events import EventKind, TunnelEvent
from .._ratelimit import LimitedStream, TokenBucket
from .._relay import RelayStats, relay
from ..errors import ForwardError
from ..testing.faults import Faults

if TYPE_CHECKING:
    from .._link import Link
    from ..session import Session

__all__ = ["FINAL", "Forward", "ForwardKind", "ForwardStatus"]

log = logging.getLogger("pytunnel.client")


class ForwardStatus(str, enum.Enum):
    """Where a forward is in its life. See docs/resilience.md for the transitions.

    A ``str`` enum: a status compares equal to its value (``"active"``) and prints as it, so
    logs, JSON and the sync API carry the same value as the enum.
    """

    STARTING = "starting"  #: being set up
    ACTIVE = "active"  #: listening and relaying
    SUSPENDED = "suspended"  #: the tunnel connection is down; restored on reconnect
    OFFLINE = "offline"  #: health probes find the target down; the public port refuses
    STOPPED = "stopped"  #: closed by the user, or the tunnel was closed
    ERROR = "error"  #: ended by a failure; ``Forward.error`` says which

    def __str__(self) -> str:
        return self.value


class ForwardKind(str, enum.Enum):
    """What a forward does; the value is the phrase logs and the CLI print."""

    LOCAL = "local forward"  #: ``-L``: listens here, dials at the server
    DYNAMIC = "dynamic forward"  #: ``-D``: a SOCKS server here, dials at the server
    REMOTE = "remote forward"  #: ``-R``: listens at the server, dials here
    LOCAL_UDP = "local udp forward"  #: ``-L`` for UDP datagrams
    REMOTE_UDP = "remote udp forward"  #: ``-R`` for UDP datagrams
    NAME = "name route"  #: ``-R name:80|443:...``: a host name on the server's shared port

    def __str__(self) -> str:
        return self.value

    @property
    def udp(self) -> bool:
        """Whether it carries datagrams rather than a byte stream."""
        return self in (ForwardKind.LOCAL_UDP, ForwardKind.REMOTE_UDP)

    @property
    def remote(self) -> bool:
        """Whether it listens at the server (``-R``)."""
        return self in (ForwardKind.REMOTE, ForwardKind.REMOTE_UDP, ForwardKind.NAME)


#: The statuses a forward never leaves.
FINAL = (ForwardStatus.STOPPED, ForwardStatus.ERROR)


class Forward:
    """A forward declared on a tunnel: where it listens, where it leads, how it is doing."""

    kind: ForwardKind

    def __init__(self, link: Link, target_host: str, target_port: int) -> None:
        self._link = link
        #: Where connections are relayed to.
        self.target_host = target_host
        self.target_port = target_port
        #: Where it listens (the real port when 0 was asked for).
        self.listen_host = ""
        self.listen_port = 0
        self.status = ForwardStatus.STARTING
        #: Why the status last changed (an English sentence).
        self.reason = ""
        #: The failure that ended the forward, when ``status`` is ``ERROR`` (an exception, as
        #: ``Tunnel.failure`` is; ``reason`` has the sentence).
        self.error: BaseException | None = None
        #: Wall-clock time of the last status change.
        self.changed_at = time.time()
        #: Live counters: bytes each way, active and total connections, errors by category.
        self.stats = RelayStats()
        #: Fault injection for tests (latency, bandwidth, blackhole, resets...), per direction.
        self.faults = Faults()
        #: ``(name, secret)`` of the load-balanced group it belongs to (remote kinds only).
        self.group: tuple[str, bytes] | None = None
        #: Bandwidth limit in bytes per second, each direction, shared by all connections
        #: (``None``: unlimited); see :meth:`set_limit`.
        self.limit: float | None = None
        self._buckets: tuple[TokenBucket, TokenBucket] | None = None
        self._cancel_scope = trio.CancelScope()
        self._done = trio.Event()
        self._changed = trio.lowlevel.ParkingLot()
        #: Set once none of the forward's tasks runs any more.
        self._finished = trio.Event()
        self._finished.set()

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} {format_target(*self.address)} -> {self.target} "
            f"{self.status.value}>"
        )

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` it listens on."""
        return self.listen_host, self.listen_port

    @property
    def target(self) -> str:
        return format_target(self.target_host, self.target_port)

    async def aclose(self) -> None:
        """Stop this forward: stop listening and end its relayed connections."""
        self._set_status(ForwardStatus.STOPPED, "closed by the user")
        await self._finished.wait()

    async def wait_closed(self) -> None:
        """Until the forward has stopped or failed for good."""
        await self._done.wait()

    async def wait_status(self, *statuses: ForwardStatus) -> ForwardStatus:
        """Until the forward is in one of ``statuses`` (returned at once if it already is)."""
        while self.status not in statuses:
            await self._changed.park()
        await trio.lowlevel.checkpoint()
        return self.status

    def _fail(self, error: BaseException, reason: str) -> None:
        """End the forward for good because of ``error``."""
        self._set_status(ForwardStatus.ERROR, reason, error)

    def _set_status(
        self, new: ForwardStatus, reason: str, error: BaseException | None = None
    ) -> None:
        old = self.status
        if old == new or old in FINAL:
            return
        self.status = new
        self.reason = reason
        self.changed_at = time.time()
        if new is ForwardStatus.ERROR:
            self.error = error if error is not None else ForwardError(reason)
        level = (
            logging.WARNING
            if new in (ForwardStatus.ERROR, ForwardStatus.OFFLINE)
            else (logging.INFO)
        )
        log.log(
            level,
            "%s %s -> %s: %s -> %s (%s)",
            self.kind,
            format_target(*self.address),
            self.target,
            old.value,
            new.value,
            reason,
        )
        self._link.emit(TunnelEvent(EventKind.STATUS, reason, self.changed_at, self, old, new))
        self._changed.unpark_all()
        if new in FINAL:
            self._link.forget(self)
            self._cancel()
            self._done.set()

    def _cancel(self) -> None:
        self._cancel_scope.cancel()

    # ------------------------------------------------- called by the tunnel's supervisor

    def on_link_up(self, session: Session, nursery: trio.Nursery) -> None:
        """The tunnel has a (new) session, whose tasks run in ``nursery``.

        Called by the tunnel; not for applications. A local forward kept listening through
        the outage and is active again; a remote forward registers anew (``RemoteForward``).
        """
        if self.status is ForwardStatus.SUSPENDED:
            self._set_status(ForwardStatus.ACTIVE, "link restored")

    def on_link_down(self) -> None:
        """The tunnel lost its session. Called by the tunnel; not for applications."""
        if self.status in (ForwardStatus.ACTIVE, ForwardStatus.OFFLINE):
            self._set_status(ForwardStatus.SUSPENDED, "tunnel connection lost")

    def end(self, failure: BaseException | None) -> None:
        """The tunnel has ended, by ``failure`` if it gave up. Called by the tunnel."""
        if failure is not None:
            self._fail(failure, f"tunnel ended: {failure}")
        self._set_status(ForwardStatus.STOPPED, "tunnel closed")

    def set_limit(self, rate: float | None) -> None:
        """Limit the forward to ``rate`` bytes per second in each direction, all of its
        connections together (``None``: no limit). A new rate applies at once to every
        connection already limited; the first limit, to the connections opened after it."""
        if rate is None:
            self.limit = self._buckets = None
            return
        if self._buckets is None:
            self._buckets = (TokenBucket(rate), TokenBucket(rate))
        else:
            for bucket in self._buckets:
                bucket.rate = rate
        self.limit = float(rate)

    def _relay(
        self, accepted: trio.abc.HalfCloseableStream, toward_target: trio.abc.HalfCloseableStream
    ) -> Coroutine[Any, Any, None]:
        """Relay one connection of this forward, counted in its stats, through its faults
        and within its limit: the relay's coroutine, to be awaited (no frame of this wrapper
        stays parked above each idle relay)."""
        name = f"{self.kind} {self.listen_port}->{self.target}"
        accepted, toward_target = self.faults.wrap(accepted, toward_target, name)
        if self._buckets is not None:
            out_bucket, in_bucket = self._buckets
            accepted = LimitedStream(accepted, in_bucket)
            toward_target = LimitedStream(toward_target, out_bucket)
        return relay(
            accepted,
            toward_target,
            idle_timeout=self._link.config.idle_timeout,
            stats=self.stats,
            name=name,
        )
