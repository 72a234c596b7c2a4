"""Tunnel events and their subscribers: what happened, delivered without ever blocking.

The tunnel and its forwards report through :class:`EventHub.emit`, which never waits: a
subscriber that does not read loses events (counted), one that was dropped is forgotten, and
the number of subscribers is bounded. This module knows nothing of sessions or forwards beyond
the type of the object an event is about.
"""

from __future__ import annotations

import enum
import logging
import time
import weakref
from typing import TYPE_CHECKING

import attrs
import trio

if TYPE_CHECKING:
    from .forwards import Forward, ForwardStatus

__all__ = ["EventHub", "EventKind", "TunnelEvent"]

log = logging.getLogger("pytunnel.client")


class EventKind(enum.Enum):
    """What a :class:`TunnelEvent` reports."""

    STATUS = "status"  #: a forward changed status (``forward``, ``old``, ``new``)
    CONNECTED = "connected"  #: the link is up (first connection or reconnection)
    DISCONNECTED = "disconnected"  #: the link was lost
    RECONNECT_ATTEMPT = "reconnect_attempt"  #: waiting before reconnection attempt N
    RECONNECT_FAILED = "reconnect_failed"  #: an attempt failed (``message`` says why)
    HEARTBEAT_LOST = "heartbeat_lost"  #: a ping went unanswered: the link is dead
    PROBE_FAILED = "probe_failed"  #: a health probe of ``forward``'s target failed
    PROBE_OK = "probe_ok"  #: a health probe succeeded after failures


@attrs.frozen
class TunnelEvent:
    """Something happened to the tunnel or one of its forwards. ``time`` is wall-clock."""

    kind: EventKind
    message: str
    time: float = attrs.field(factory=time.time)
    forward: Forward | None = None
    old: ForwardStatus | None = None
    new: ForwardStatus | None = None


class EventHub:
    """The subscribers of one tunnel.

    Each subscriber is a bounded memory channel; its send side is kept with a weak reference
    to the receive side, so a receiver dropped without being closed is noticed and let go.
    """

    def __init__(self, max_subscribers: int = 1024) -> None:
        #: Subscribers kept at once; beyond it the oldest is unsubscribed.
        self.max_subscribers = max_subscribers
        self._subscribers: dict[
            trio.MemorySendChannel[TunnelEvent], weakref.ref[trio.MemoryReceiveChannel[TunnelEvent]]
        ] = {}
        self._closed = False
        #: Events not delivered because a subscriber's buffer was full.
        self.dropped_events = 0
        #: Subscribers unsubscribed because there were more than ``max_subscribers``.
        self.dropped_subscribers = 0

    @property
    def subscriber_count(self) -> int:
        """Subscribers kept right now (abandoned ones are forgotten at the next event)."""
        return len(self._subscribers)

    def subscribe(self, buffer: int) -> trio.MemoryReceiveChannel[TunnelEvent]:
        """A new subscriber with room for ``buffer`` unread events; ends at :meth:`close`."""
        send, receive = trio.open_memory_channel[TunnelEvent](buffer)
        if self._closed:
            send.close()  # nothing more will happen: the iterator ends at once
            return receive
        self.forget_abandoned()
        while len(self._subscribers) >= self.max_subscribers:
            oldest = next(iter(self._subscribers))
            del self._subscribers[oldest]
            oldest.close()
            self.dropped_subscribers += 1
            if self.dropped_subscribers == 1:  # once: a leaking caller would flood the log
                log.warning(
                    "more than %d event subscribers: the oldest are being unsubscribed",
                    self.max_subscribers,
                )
        self._subscribers[send] = weakref.ref(receive)
        return receive

    def forget_abandoned(self) -> None:
        """Let go of subscribers whose receiver was closed or garbage-collected."""
        for channel, receiver in list(self._subscribers.items()):
            if receiver() is None or channel.statistics().open_receive_channels == 0:
                del self._subscribers[channel]
                channel.close()

    def emit(self, event: TunnelEvent) -> None:
        """Deliver ``event`` to every subscriber that has room; never blocks."""
        self.forget_abandoned()
        for channel in list(self._subscribers):
            try:
                channel.send_nowait(event)
            except trio.WouldBlock:
                self.dropped_events += 1
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._subscribers.pop(channel, None)

    def close(self) -> None:
        """End every subscriber's iterator; later subscribers end at once."""
        self._closed = True
        for channel in self._subscribers:
            channel.close()
