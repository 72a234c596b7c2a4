"""UDP forwarding: datagrams over the multiplexed session, one stream per association.

An *association* is one (source address, target) pair, as in NAT tables: the listening side
keeps a table of them, each with an idle expiry and a cap on how many exist; each is carried
by one mux stream whose datagrams travel as ``Datagram`` messages, boundaries kept.

No task per packet, so a burst of datagrams costs no tasks: the listening side has one receive
loop per forward plus one task per association; the dialing side two tasks per association.
Every queue is bounded and drops (counting) when full: dropping is UDP's contract, stalling
the TCP streams that share the session is not. Before that, each side pushes back where it
costs nobody else: a socket is read only while the session's write buffer has room for a
batch (the datagrams wait in the socket's receive buffer meanwhile), and a full send buffer
is waited for (``send_batch``) while the stream's queue takes what arrives.
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from typing import Protocol

import attrs
import trio

from ._dial import format_target
from ._listen import UDP_SOCKET_BUFFER, kernel_drops, receive_batch, send_batch, udp_socket_for
from ._relay import RelayStats
from ._util import aclose_all
from .errors import NodeUnstableError, printable
from .protocol.messages import MAX_DATAGRAM
from .session import MuxStream

__all__ = [
    "DEFAULT_MAX_ASSOCIATIONS",
    "DEFAULT_REFUSAL_MEMORY",
    "DEFAULT_UDP_IDLE_TIMEOUT",
    "Room",
    "READ_BYTES",
    "SESSION_ROOM",
    "UDP_QUEUE",
    "UDP_QUEUE_BYTES",
    "UDP_SOCKET_BUFFER",
    "pump_datagrams",
    "relay_association",
    "serve_associations",
    "udp_connect",
]

log = logging.getLogger("pytunnel.udp")

#: An association with no datagram either way for this long is closed.
DEFAULT_UDP_IDLE_TIMEOUT = 60.0
#: Associations one UDP forward keeps at once; a new source beyond it evicts the least
#: recently used association.
DEFAULT_MAX_ASSOCIATIONS = 1024
#: A source whose association was refused is not retried for this long: its datagrams are
#: dropped instead of each opening a stream that would be refused again.
DEFAULT_REFUSAL_MEMORY = 5.0
#: Datagrams held for an association whose stream is still opening.
_PENDING_LIMIT = 16
#: Datagrams an association's stream queues for its relay task (the stream's default is
#: 256). The session's reader delivers up to 256 datagrams per scheduler pass and the relay
#: takes the queue once every two passes (its receive and its send each end in a
#: checkpoint), so with a backlog on the transport 256 overflowed by design; 1024 also
#: rides out a send buffer that is full for a while (``send_batch`` waits then).
UDP_QUEUE = 1024
#: Bytes of datagrams that queue holds (the stream's default is 512 KiB): 1024 full-size
#: Ethernet datagrams (1,472 bytes of UDP payload, 1.5 MiB) fit with room to spare, and so
#: do eight of the session reader's 256 KiB reads, while datagrams near 64 KiB can no longer
#: make one association hold 64 MiB. Past it a datagram is dropped (counted) as at the count,
#: unless the queue is empty.
UDP_QUEUE_BYTES = 2 * 1024 * 1024
#: Bytes of datagrams one read takes at most (the last one may go past it), and, with the
#: largest datagram, the room in the session's write buffer a read waits for: datagrams are
#: read only once they fit, so while the transport is slow they wait in the socket's
#: receive buffer (megabytes) instead of being dropped at the session's high-water mark.
READ_BYTES = 96 * 1024  # more than 64 datagrams of 1,400 bytes: the count limits those
SESSION_ROOM = READ_BYTES + MAX_DATAGRAM
_RECV_SIZE = 65536
#: A forward's count of the kernel's drops on its socket is brought up to date at most this
#: often while datagrams arrive, and this often while it waits for room in the session:
#: one ``getsockopt`` per read would cost about a tenth of what a datagram costs.
_DROPS_REFRESH = 0.5
_DROPS_CHECK = 0.1
#: A read this long hit ``receive_batch``'s limit: a backlog, after which drops are counted.
_FULL_READ = 64


Address = tuple[str, int]


class Room(Protocol):
    """What a UDP forward needs of the session it writes to (``Session`` is one)."""

    @property
    def closed(self) -> bool: ...

    def has_room(self, size: int) -> bool: ...

    async def wait_for_room(self, size: int) -> None: ...


def _no_room(room: Callable[[], Room | None]) -> bool:
    """Whether the current session (``room()``) has no room for a read's batch now: the
    cheap check made before every read, so the coroutine below runs only when it waits."""
    session = room()
    return session is not None and not session.has_room(SESSION_ROOM) and not session.closed


async def _wait_for_room(room: Callable[[], Room | None], refresh: Callable[[], None]) -> None:
    """Return once the current session (``room()``) can take a read's batch, or there is no
    open session (what is read then is dropped, as its absence dictates); ``refresh`` runs
    every ``_DROPS_REFRESH`` seconds of waiting."""
    while (session := room()) is not None and not session.closed:
        if session.has_room(SESSION_ROOM):
            return
        with trio.move_on_after(_DROPS_REFRESH):
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await session.wait_for_room(SESSION_ROOM)
        refresh()


def _association_queue(stream: MuxStream) -> None:
    """Give ``stream`` an association's queue (``UDP_QUEUE`` datagrams, ``UDP_QUEUE_BYTES``
    bytes), unless it has a larger one."""
    stream.datagram_queue = max(stream.datagram_queue, UDP_QUEUE)
    stream.datagram_queue_bytes = max(stream.datagram_queue_bytes, UDP_QUEUE_BYTES)


class _KernelDrops:
    """The kernel's drops on one socket since the last look (:func:`kernel_drops`), looked
    up after a full read (a backlog, the only time it drops) or once ``_DROPS_CHECK`` has
    passed: one ``getsockopt`` per read would cost about a tenth of a datagram."""

    __slots__ = ("_next", "_seen", "_sock")

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self._sock = sock
        self._seen = kernel_drops(sock)
        self._next = trio.current_time() + _DROPS_CHECK

    def due(self, read: int) -> bool:
        """Whether a read of ``read`` datagrams calls for a look."""
        return read >= _FULL_READ or trio.current_time() >= self._next

    def take(self) -> int:
        """The drops since the last look (0 once the socket is closed)."""
        if self._sock.fileno() < 0:
            return 0
        now = kernel_drops(self._sock)
        new, self._seen = now - self._seen, now
        self._next = trio.current_time() + _DROPS_CHECK
        return new


class _QueueDrops:
    """The part of a stream drop count (``MuxStream.datagrams_dropped``, or the sum of
    several) not yet added to a forward's: the count only grows, so what is new since the
    last look is the count less what was seen then."""

    __slots__ = ("_seen",)

    def __init__(self) -> None:
        self._seen = 0

    def take(self, dropped: int) -> int:
        """What of ``dropped`` (the count now) is new since the last call."""
        new, self._seen = dropped - self._seen, dropped
        return new


@attrs.define
class _Drops:
    """Why one association's datagrams were dropped on this side: logged (at debug) when it
    ends. The stream's own count holds the rest: its full queue, on top of ``session``."""

    #: No room for them in the session's write buffer.
    session: int = 0
    #: ``sendto`` failed, or the socket's send buffer stayed full for ``SEND_WAIT_LIMIT``.
    send: int = 0
    #: The kernel's, on the association's own socket (its receive buffer full).
    kernel: int = 0

    def report(self, stream: MuxStream, what: str) -> None:
        queue = max(0, stream.datagrams_dropped - self.session)
        total = queue + self.session + self.send + self.kernel
        if total:
            log.debug(
                "%s: %d datagrams dropped (queue full %d, no room in the session %d, "
                "send failed %d, by the kernel %d)",
                what,
                total,
                queue,
                self.session,
                self.send,
                self.kernel,
            )


def _admit_always() -> bool:
    return True


def _nothing() -> None:
    pass


@attrs.define(eq=False)
class _Association:
    address: Address
    pending: deque[bytes] = attrs.field(factory=deque)
    stream: MuxStream | None = None
    #: Covers the whole association, opening included, so eviction can end it at any point;
    #: its deadline is the idle expiry once the stream is open.
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    #: Whether its slot of the owner's stream budget was given back (exactly once).
    released: bool = False
    #: The stream's drops not yet added to the forward's count.
    queue_drops: _QueueDrops = attrs.field(factory=_QueueDrops)
    drops: _Drops = attrs.field(factory=_Drops)

    def release(self, release: Callable[[], None]) -> None:
        if not self.released:
            self.released = True
            release()


@attrs.define(eq=False)
class _Table:
    """The associations of one forward, least recently used first, and the sources refused
    lately (oldest first; both bounded by ``max_associations``)."""

    idle_timeout: float
    max_associations: int
    refusal_memory: float
    associations: OrderedDict[Address, _Association] = attrs.field(factory=OrderedDict)
    refused: OrderedDict[Address, float] = attrs.field(factory=OrderedDict)

    def touch(self, association: _Association) -> None:
        """Mark activity: the association becomes the most recently used and, once open,
        its idle expiry restarts."""
        if self.associations.get(association.address) is association:
            self.associations.move_to_end(association.address)
        if association.stream is not None:
            association.scope.deadline = trio.current_time() + self.idle_timeout

    def evict_oldest(self) -> _Association:
        """Make room for a new source by ending the least recently used association, so
        sources that stopped talking (or never could, being spoofed) cannot keep the
        table full for an idle timeout each."""
        _, association = self.associations.popitem(last=False)
        association.scope.cancel()
        return association

    def remove(self, association: _Association) -> None:
        if self.associations.get(association.address) is association:
            del self.associations[association.address]

    def refuse(self, address: Address) -> None:
        if self.refusal_memory <= 0:
            return
        self.refused.pop(address, None)
        self.refused[address] = trio.current_time() + self.refusal_memory
        while len(self.refused) > self.max_associations:
            self.refused.popitem(last=False)

    def is_refused(self, address: Address) -> bool:
        now = trio.current_time()
        while self.refused:  # expiries are in insertion order: drop the stale ones first
            oldest, expiry = next(iter(self.refused.items()))
            if expiry > now:
                break
            del self.refused[oldest]
        return address in self.refused


async def serve_associations(
    sock: trio.socket.SocketType,
    open_association: Callable[[Address], Awaitable[MuxStream]],
    *,
    idle_timeout: float = DEFAULT_UDP_IDLE_TIMEOUT,
    max_associations: int = DEFAULT_MAX_ASSOCIATIONS,
    refusal_memory: float = DEFAULT_REFUSAL_MEMORY,
    admit: Callable[[], bool] = _admit_always,
    release: Callable[[], None] = _nothing,
    room: Callable[[], Room | None] | None = None,
    stats: RelayStats,
    name: str,
) -> None:
    """The listening side of a UDP forward: read ``sock`` forever, route each datagram to its
    source's association (opening one, through ``open_association``, for a new source).

    ``admit`` takes a slot of the owner's stream budget for a new association (False: the
    source is refused); ``release`` gives it back when that association ends. A refused
    source is remembered for ``refusal_memory`` seconds, during which its datagrams are
    dropped without opening anything.

    ``room``, if given, returns the session the associations write to (``None`` while there
    is none): the socket is read only once that session's write buffer has room for a read's
    batch (:data:`SESSION_ROOM`), so datagrams wait in the socket's receive buffer while the
    session is backed up. Without an open session the read goes ahead and what cannot be
    sent is dropped.
    """
    table = _Table(idle_timeout, max_associations, refusal_memory)
    # what the kernel dropped on the socket (its buffer full while we waited for room, or
    # were slow) is counted with the rest
    kernel = _KernelDrops(sock)

    def count_kernel_drops() -> None:
        stats.datagrams_dropped += kernel.take()

    async with trio.open_nursery() as nursery:
        while True:
            if room is not None and _no_room(room):
                # what the kernel drops while we wait shows in the count meanwhile
                await _wait_for_room(room, count_kernel_drops)
            # every datagram already waiting in one pass through the scheduler (ICMP errors
            # reported on the socket are skipped there), then one write per association
            outgoing: dict[_Association, list[bytes]] = {}
            received = await receive_batch(sock, _RECV_SIZE, READ_BYTES)
            # a full read means a backlog, the only time the kernel drops: count at once
            if kernel.due(len(received)):
                count_kernel_drops()
            for data, raw_address in received:
                address: Address = (str(raw_address[0]), int(raw_address[1]))
                association = table.associations.get(address)
                if association is None:
                    if table.is_refused(address):
                        stats.datagrams_dropped += 1
                        continue
                    admitted = admit()
                    if not admitted and table.associations:
                        # the budget is spent: this forward's least recently used association
                        # makes way (its slot given back now, not when its task gets to run), so
                        # sources that went quiet (or were spoofed) cannot lock live ones out
                        evicted = table.evict_oldest()
                        evicted.release(release)
                        log.debug(
                            "%s: association for %s evicted (stream budget spent)",
                            name,
                            format_target(*evicted.address),
                        )
                        admitted = admit()
                    if not admitted:
                        stats.count_error("REFUSED")
                        stats.datagrams_dropped += 1
                        table.refuse(address)
                        continue
                    if len(table.associations) >= max_associations:
                        evicted = table.evict_oldest()
                        log.debug(
                            "%s: association for %s evicted (table full)",
                            name,
                            format_target(*evicted.address),
                        )
                    association = table.associations[address] = _Association(address)
                    nursery.start_soon(
                        _run_association,
                        sock,
                        association,
                        table,
                        open_association,
                        release,
                        stats,
                        name,
                    )
                if association.stream is None:
                    if len(association.pending) < _PENDING_LIMIT:
                        association.pending.append(data)
                    else:
                        stats.datagrams_dropped += 1
                else:
                    batch = outgoing.get(association)
                    if batch is None:
                        outgoing[association] = [data]
                    else:
                        batch.append(data)
            for association, batch in outgoing.items():
                if association.stream is not None and _forward(
                    association, association.stream, batch, stats
                ):
                    table.touch(association)


def _forward(
    association: _Association, stream: MuxStream, batch: list[bytes], stats: RelayStats
) -> bool:
    """Send ``batch`` on ``stream`` in as few frames as the peer takes, counting what is
    sent and what is dropped (a stream that has ended counts neither); whether any went."""
    try:
        sent, size = stream.send_datagrams(batch)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return False
    association.drops.session += len(batch) - sent
    _count_drops(association, stream, stats)
    stats.bytes_out += size
    return sent > 0


def _count_drops(association: _Association, stream: MuxStream, stats: RelayStats) -> None:
    """Add the datagrams ``stream`` dropped since the last call to the forward's count: those
    the session's write buffer had no room for, and replies its full queue turned away."""
    stats.datagrams_dropped += association.queue_drops.take(stream.datagrams_dropped)


async def _run_association(
    sock: trio.socket.SocketType,
    association: _Association,
    table: _Table,
    open_association: Callable[[Address], Awaitable[MuxStream]],
    release: Callable[[], None],
    stats: RelayStats,
    name: str,
) -> None:
    stats.active_connections += 1
    stats.total_connections += 1
    stream: MuxStream | None = None
    try:
        with association.scope:
            try:
                stream = await open_association(association.address)
            except Exception as exc:
                table.refuse(association.address)
                stats.datagrams_dropped += len(association.pending)
                association.pending.clear()
                stats.count_failure(exc)
                log.info(
                    "%s: association for %s refused: %s",
                    name,
                    format_target(*association.address),
                    exc,
                )
                return
            association.stream = stream
            _association_queue(stream)
            table.touch(association)
            if association.pending:
                pending = list(association.pending)
                association.pending.clear()
                _forward(association, stream, pending, stats)
            while True:
                try:
                    batch = await stream.receive_datagrams()
                except (trio.EndOfChannel, trio.BrokenResourceError, trio.ClosedResourceError):
                    break
                sent, size = await send_batch(sock, batch, association.address)
                stats.datagrams_dropped += len(batch) - sent
                association.drops.send += len(batch) - sent
                _count_drops(association, stream, stats)
                if sent:
                    stats.bytes_in += size
                    table.touch(association)
    finally:
        table.remove(association)
        stats.active_connections -= 1
        association.release(release)
        if stream is not None:
            _count_drops(association, stream, stats)
            association.drops.report(
                stream, f"{name}: association for {format_target(*association.address)}"
            )
            await trio.aclose_forcefully(stream)


async def udp_connect(
    host: str, port: int, *, buffer: int = UDP_SOCKET_BUFFER
) -> trio.socket.SocketType:
    """A UDP socket connected to ``host:port`` (DNS at this side), with ``buffer`` bytes of
    socket buffers asked for; ``NodeUnstableError`` if the name does not resolve. (UDP has
    no handshake, so there is no dial timeout.)"""
    target = format_target(host, port)
    try:
        sock, sockaddr = await udp_socket_for(host, port, buffer=buffer)
    except (OSError, ValueError) as exc:
        error = NodeUnstableError(f"udp target {target}: {exc}", target=target)
        log.warning("[%s] %s", error.category, error.message)
        raise error from None
    try:
        await sock.connect(sockaddr)
    except OSError as exc:
        sock.close()
        error = NodeUnstableError(f"udp target {target}: {exc}", target=target)
        log.warning("[%s] %s", error.category, error.message)
        raise error from None
    return sock


async def relay_association(
    stream: MuxStream,
    sock: trio.socket.SocketType,
    *,
    idle_timeout: float = DEFAULT_UDP_IDLE_TIMEOUT,
    stats: RelayStats | None = None,
    room: Callable[[], Room | None] | None = None,
) -> None:
    """The dialing side of one association: stream datagrams to ``sock`` and back, until the
    peer closes the stream or nothing moves for ``idle_timeout``.

    ``stats.datagrams_dropped`` counts every datagram lost on this side: those the stream's
    full queue turned away, those ``sock`` could not send (its buffer full for
    ``SEND_WAIT_LIMIT``, an error), and replies the session had no room for.
    ``room`` is as for :func:`serve_associations`: replies are read from ``sock`` only once
    the session can take a batch of them."""
    _association_queue(stream)
    if stats is not None:
        stats.active_connections += 1
        stats.total_connections += 1
    queue = _QueueDrops()  # the stream's drops not yet added to ``stats``
    kernel = _KernelDrops(sock)  # the kernel's drops of replies on ``sock``
    drops = _Drops()

    def count_kernel_drops() -> None:
        new = kernel.take()
        drops.kernel += new
        count_drops(new)

    def count_drops(also: int = 0) -> None:
        if stats is not None:
            stats.datagrams_dropped += queue.take(stream.datagrams_dropped) + also

    try:
        with trio.CancelScope(deadline=trio.current_time() + idle_timeout) as scope:

            async def outbound() -> None:
                while True:
                    try:
                        batch = await stream.receive_datagrams()
                    except (trio.EndOfChannel, trio.BrokenResourceError, trio.ClosedResourceError):
                        scope.cancel()
                        return
                    # a send that fails (e.g. an ICMP "port unreachable" from an earlier one)
                    # drops that datagram only
                    sent, size = await send_batch(sock, batch)
                    if sent:
                        scope.deadline = trio.current_time() + idle_timeout
                    drops.send += len(batch) - sent
                    count_drops(len(batch) - sent)
                    if stats is not None:
                        stats.bytes_out += size

            async def inbound() -> None:
                while True:
                    if room is not None and _no_room(room):
                        await _wait_for_room(room, _nothing)
                    try:
                        batch = await receive_batch(sock, _RECV_SIZE, READ_BYTES)
                    except OSError:  # other ICMP errors surface here on connected sockets
                        continue
                    if kernel.due(len(batch)):
                        count_kernel_drops()
                    payloads = [data for data, _ in batch if len(data) <= MAX_DATAGRAM]
                    try:
                        sent, size = stream.send_datagrams(payloads)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        scope.cancel()
                        return
                    drops.session += len(payloads) - sent
                    drops.send += len(batch) - len(payloads)  # too large for a datagram stream
                    count_drops(len(batch) - len(payloads))
                    if stats is not None:
                        stats.bytes_in += size
                    scope.deadline = trio.current_time() + idle_timeout

            async with trio.open_nursery() as nursery:
                nursery.start_soon(outbound)
                nursery.start_soon(inbound)
    finally:
        count_kernel_drops()
        drops.report(
            stream, f"udp association {printable(format_target(stream.host, stream.port))}"
        )
        if stats is not None:
            stats.active_connections -= 1
        sock.close()
        await aclose_all(stream)


async def pump_datagrams(
    a: MuxStream,
    b: MuxStream,
    *,
    idle_timeout: float = DEFAULT_UDP_IDLE_TIMEOUT,
    stats: RelayStats | None = None,
) -> None:
    """Carry datagrams between two datagram streams (a node link's association and the
    client's) both ways until either ends or nothing moves for ``idle_timeout``; then close
    both. A datagram the far side has no room for is dropped (counted), as UDP would, and so
    is one a full queue turned away (each stream's own count, added up)."""
    _association_queue(a)
    _association_queue(b)
    if stats is not None:
        stats.active_connections += 1
        stats.total_connections += 1
    queue = _QueueDrops()  # the streams' drops not yet added to ``stats``

    def count_drops() -> None:
        if stats is not None:
            stats.datagrams_dropped += queue.take(a.datagrams_dropped + b.datagrams_dropped)

    try:
        with trio.CancelScope(deadline=trio.current_time() + idle_timeout) as scope:

            async def pump(source: MuxStream, sink: MuxStream, outbound: bool) -> None:
                while True:
                    try:
                        batch = await source.receive_datagrams()
                    except (trio.EndOfChannel, trio.BrokenResourceError, trio.ClosedResourceError):
                        scope.cancel()
                        return
                    scope.deadline = trio.current_time() + idle_timeout
                    try:
                        _, size = sink.send_datagrams(batch)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        scope.cancel()
                        return
                    if stats is None:
                        continue
                    count_drops()
                    if outbound:
                        stats.bytes_out += size
                    else:
                        stats.bytes_in += size

            async with trio.open_nursery() as nursery:
                nursery.start_soon(pump, a, b, True)
                nursery.start_soon(pump, b, a, False)
    finally:
        count_drops()
        if stats is not None:
            stats.active_connections -= 1
        await trio.aclose_forcefully(a)
        await trio.aclose_forcefully(b)
