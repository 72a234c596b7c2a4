"""The client's link to its server, as the forwards and the supervisor share it.

A tunnel has one :class:`Link`: the current session (or none during an outage), the forwards
declared on it, the remote forwards by control-stream id (where incoming streams go), and the
event hub. The supervisor (``_supervisor.py``) sets and clears the session; forwards
(``forwards/``) open streams on it, wait for it and report through it. Neither reaches into
the other: this object is the whole interface between them. It does no I/O of its own.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import trio

from ._events import EventHub, TunnelEvent
from .errors import SessionClosedError
from .protocol import routes

if TYPE_CHECKING:
    from ._client_config import ClientConfig
    from .forwards import Forward, RemoteForward
    from .session import MuxStream, Session, StreamSlot

__all__ = ["Link"]


class Link:
    """The shared state of one tunnel's connection (see the module docstring)."""

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        #: The current session, ``None`` while disconnected.
        self.session: Session | None = None
        #: The nursery of the current session: remote forwards' tasks die with it.
        self.session_nursery: trio.Nursery | None = None
        #: The tunnel's own nursery (local forwards' tasks), ``None`` before and after.
        self.nursery: trio.Nursery | None = None
        #: Set when the tunnel is being closed: no new forward, no new session.
        self.closing = False
        self.events = EventHub()
        self._forwards: set[Forward] = set()
        self._remote: dict[int, RemoteForward] = {}
        #: Woken whenever a session starts or ends (see wait_connected).
        self._changed = trio.lowlevel.ParkingLot()

    # ------------------------------------------------------------------ the session

    @property
    def connected(self) -> bool:
        return self.session is not None and not self.session.closed

    def link_up(self, session: Session, nursery: trio.Nursery) -> None:
        self.session = session
        self.session_nursery = nursery
        self._changed.unpark_all()

    def link_down(self) -> None:
        self.session = None
        self.session_nursery = None
        self._changed.unpark_all()

    async def wait_connected(self, timeout: float = math.inf) -> bool:
        """Until the link is up (True) or ``timeout`` passed (False)."""
        with trio.move_on_after(timeout):
            while not self.connected:
                await self._changed.park()
        return self.connected

    def require_nursery(self) -> trio.Nursery:
        """The tunnel's nursery; ``SessionClosedError`` once the tunnel is closing."""
        if self.nursery is None or self.closing:
            raise SessionClosedError("the tunnel is closed")
        return self.nursery

    async def current_session(self) -> Session:
        """The session, waiting up to ``outage_wait`` for one during an outage."""
        self.require_nursery()
        if not self.connected:
            await self.wait_connected(self.config.outage_wait)
        session = self.session
        if session is None or session.closed:
            raise SessionClosedError("the tunnel is not connected")
        return session

    async def open(
        self,
        host: str,
        port: int,
        route: int,
        *,
        slot: StreamSlot | None = None,
        early: bool = False,
    ) -> MuxStream:
        """Open a stream on the current session; ``slot`` (reserved by a listener) is used if
        it belongs to that session, else given back (the link changed since it was reserved).
        ``early``: as :meth:`Session.open_stream`'s (return before the server's answer)."""
        session = await self.current_session()
        if slot is not None and (slot.session is not session or not slot.held):
            slot.release()
            slot = None
        return await session.open_stream(
            host, port, tag=route, datagrams=route == routes.UDP_CONNECT, slot=slot, early=early
        )

    # ------------------------------------------------------------------ forwards and events

    @property
    def forwards(self) -> list[Forward]:
        return list(self._forwards)

    def add(self, forward: Forward) -> None:
        self._forwards.add(forward)

    def forget(self, forward: Forward) -> None:
        """The forward has ended for good (or never started)."""
        self._forwards.discard(forward)

    def route_to(self, control_id: int, forward: RemoteForward) -> None:
        """Incoming streams tagged ``control_id`` belong to ``forward`` from now on."""
        self._remote[control_id] = forward

    def unroute(self, control_id: int) -> None:
        self._remote.pop(control_id, None)

    def remote_forward(self, control_id: int) -> RemoteForward | None:
        """The remote forward whose control stream is ``control_id``, if it is registered."""
        return self._remote.get(control_id)

    def emit(self, event: TunnelEvent) -> None:
        self.events.emit(event)
