"""``-L``: a listener here whose connections are relayed to a target dialled by the server.

Also the start of every listening forward: :class:`DynamicForward` (SOCKS) and the UDP local
forward reuse its life cycle (listen, report, stop) and replace what a connection does.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

import trio

from .._ingress import carry_over_stream, serve_ingress
from .._listen import bind, bound_port
from .._util import Episodes, aclose_all
from ..errors import DialError, SessionClosedError, TunnelError
from ..protocol import routes
from ._base import Forward, ForwardKind, ForwardStatus

if TYPE_CHECKING:
    from .._link import Link
    from ..session import StreamSlot

__all__ = ["LocalForward"]

log = logging.getLogger("pytunnel.client")


class LocalForward(Forward):
    """``-L``: the client listens; each connection is relayed to the target via the server.

    The listening socket stays open through an outage; a connection made then waits up to
    ``outage_wait`` for the link and is closed cleanly if it does not come back.
    """

    kind = ForwardKind.LOCAL

    def __init__(self, link: Link, target_host: str, target_port: int) -> None:
        super().__init__(link, target_host, target_port)
        #: Whether the listeners wait for a stream slot (one log line per episode).
        self._stream_cap: Episodes[None] = Episodes()

    async def start(self, host: str, port: int) -> None:
        """Listen on ``host:port`` (0: any free port) in the tunnel's nursery; a bind failure
        (``AddressInUseError``, ``PermissionDeniedError``) is raised and leaves nothing."""
        nursery = self._link.require_nursery()
        self._link.add(self)
        try:
            await nursery.start(self._run, host, port)
        except BaseException:
            self._link.forget(self)
            raise

    async def _run(
        self, host: str, port: int, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """The forward's life: listen (``_listen``), report the status, end as stopped."""
        self._finished = trio.Event()
        try:
            with self._cancel_scope:
                await self._listen(host, port, task_status)
        except OSError as exc:
            self._fail(exc, f"listener failed: {exc}")
        finally:
            self._set_status(ForwardStatus.STOPPED, "forward ended")
            self._finished.set()

    def _listening(self, host: str, port: int, task_status: trio.TaskStatus[None]) -> None:
        self.listen_host, self.listen_port = host, port
        if self._link.connected:
            self._set_status(ForwardStatus.ACTIVE, "listening")
        else:
            self._set_status(ForwardStatus.SUSPENDED, "listening; link down")
        task_status.started()

    async def _listen(self, host: str, port: int, task_status: trio.TaskStatus[None]) -> None:
        listeners = await bind(host, port)
        try:
            async with trio.open_nursery() as nursery:
                for listener in listeners:
                    nursery.start_soon(self._accept_loop, listener, nursery)
                self._listening(host, bound_port(listeners), task_status)
        finally:
            await aclose_all(*listeners)

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        # a connection waiting first, then a stream slot: at the session's cap the listener
        # stops accepting and the kernel's backlog holds the rest, rather than accepting
        # connections to reset them; an idle listener holds no slot
        await serve_ingress(listener, self._reserve_slot, self._handle, _release, nursery)

    async def _reserve_slot(self) -> StreamSlot | None:
        """A slot of the current session, waiting while it is at its stream cap; ``None``
        while there is no link (connections then wait for one, as before).

        Said once per episode: the episode ends when half the slots are free again, so a
        listener working through its backlog at the cap does not log once per connection.
        """
        session = self._link.session
        if session is None or session.closed:
            return None
        free, cap = session.free_stream_slots, session.config.max_streams
        if free <= 0:
            if self._stream_cap.refuse(None):
                log.warning(
                    "%s %s: the session's limit of %d streams is reached; "
                    "not accepting connections until some close",
                    self.kind,
                    self.listen_port,
                    cap,
                )
        elif free >= max(1, cap // 2) and self._stream_cap.end(None):
            log.info("%s %s: below the stream limit again", self.kind, self.listen_port)
        try:
            return await session.wait_stream_slot()
        except SessionClosedError:
            return None

    def _handle(
        self, conn: trio.SocketStream, slot: StreamSlot | None = None
    ) -> Coroutine[Any, Any, None]:
        # carry_over_stream's coroutine itself: no frame of this method parked above the relay
        return carry_over_stream(
            conn,
            # early data: the connection's first bytes go with the Open, while the server dials
            functools.partial(
                self._link.open,
                self.target_host,
                self.target_port,
                routes.CONNECT,
                slot=slot,
                early=True,
            ),
            self._relay,
            self._open_failed,
        )

    def _open_failed(self, exc: TunnelError | OSError) -> None:
        self.stats.count_failure(exc)
        if isinstance(exc, DialError):
            log.warning(
                "[%s] local forward %s: the server could not reach the target: %s",
                exc.category,
                self.listen_port,
                exc.message,
            )
        else:
            log.warning("local forward %s: connection dropped: %s", self.listen_port, exc)


def _release(slot: StreamSlot | None) -> None:
    if slot is not None:
        slot.release()
