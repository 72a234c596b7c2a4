"""``-R``: a port at the server whose connections are relayed to a target dialled here.

A remote forward is registered on each session (asking, after a reconnect, for the port it
had), follows its control stream to learn when the server ends it, and probes its target so
the server refuses public connections while the target is down instead of accepting them
into a black hole.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import math
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import trio

from .._control import ControlChannel
from .._dial import dial, format_target
from .._egress import serve_egress
from .._events import EventKind, TunnelEvent
from ..errors import (
    AddressInUseError,
    ClusterUnavailableError,
    DialError,
    DialFailure,
    ErrorCode,
    ForwardError,
    NodeUnstableError,
    SessionClosedError,
    StreamResetError,
    TunnelError,
    refusal_error,
)
from ..protocol import routes
from ..protocol.control import ControlRole
from ..protocol.messages import Bound, ForwardState, Join, group_proof, truncate_text
from ..protocol.proxy import ProxyVersion, encode_header, encode_unknown
from ..session import IncomingStream, wait_stream_end
from ._base import FINAL, Forward, ForwardKind, ForwardStatus

if TYPE_CHECKING:
    from .._link import Link
    from ..session import Session

__all__ = ["RemoteForward", "StreamHandler"]

log = logging.getLogger("pytunnel.client")

#: What a remote forward with no target does with each public connection: it gets the
#: tunnel's stream itself (no local port, no dial) and owns it until it returns.
StreamHandler = Callable[[trio.abc.HalfCloseableStream], Awaitable[None]]


class RemoteForward(Forward):
    """``-R``: the server listens; each connection there is relayed to the target here.

    Registered again after every reconnect, asking for the port it had, and health-probed:
    when its target stops answering, the server is told to refuse connections instead of
    accepting them into a black hole.
    """

    kind = ForwardKind.REMOTE
    _listen_route = routes.LISTEN

    def __init__(
        self,
        link: Link,
        target_host: str,
        target_port: int,
        remote_host: str,
        remote_port: int,
        connect_timeout: float,
        *,
        proxy_protocol: ProxyVersion | None = None,
        group: tuple[str, bytes] | None = None,
        handler: StreamHandler | None = None,
    ) -> None:
        super().__init__(link, target_host, target_port)
        #: ``(name, secret)`` of the load-balanced group this forward is a member of: the
        #: server spreads the public connections across the group's live members.
        self.group = group
        #: Set: each public connection's stream is handed to it instead of relayed to a
        #: dialled target (and there is no target to health-probe).
        self.handler = handler
        self.connect_timeout = connect_timeout
        #: ``"v1"`` or ``"v2"``: each connection to the target starts with a PROXY protocol
        #: header naming the public peer, so the service sees who really connected.
        self.proxy_protocol = proxy_protocol
        self._remote_host = remote_host
        self._remote_port = remote_port
        #: Where incoming streams go while registered; ``None`` (or closed): they are refused.
        self._incoming: trio.MemorySendChannel[IncomingStream] | None = None
        #: Scope of the current registration; a new one per session.
        self._attach_scope = trio.CancelScope()
        #: Why health probes took the forward offline (kept across reconnections).
        self._offline_reason: str | None = None

    def _cancel(self) -> None:
        self._attach_scope.cancel()

    def on_link_up(self, session: Session, nursery: trio.Nursery) -> None:
        """Register again on the new session (called by the tunnel's supervisor)."""
        nursery.start_soon(self._reattach, session)

    async def start(self) -> None:
        """Register on the current session; the first registration's refusal is raised
        (``AddressInUseError``, ``PortNotAllowedError``, ...) and leaves nothing behind."""
        session = await self._link.current_session()
        nursery = self._link.session_nursery
        if nursery is None:  # pragma: no cover - set whenever a session is current
            raise SessionClosedError("the tunnel is not connected")
        self._link.add(self)
        try:
            await nursery.start(self._attach, session)
        except BaseException:
            self._link.forget(self)
            raise

    async def _attach(
        self, session: Session, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Register on ``session`` and serve until the forward or the session ends."""
        if self.status in FINAL:
            return
        self._attach_scope = trio.CancelScope()
        self._finished = trio.Event()
        try:
            await self._serve_attached(session, task_status)
        finally:
            self._finished.set()

    async def _serve_attached(self, session: Session, task_status: trio.TaskStatus[None]) -> None:
        with self._attach_scope:
            route = self._listen_route
            if self.group is not None:
                route = routes.NAME_GROUP if route == routes.NAME else routes.LISTEN_GROUP
            control = await session.open_stream(self._remote_host, self._remote_port, tag=route)
            link = self._link
            try:
                channel = ControlChannel(
                    control, ControlRole.CLIENT, grouped=self.group is not None
                )
                if self.group is not None:
                    name, key = self.group
                    await channel.send(Join(name, group_proof(name, key)))
                bound = await _receive_bound(
                    channel, format_target(self._remote_host, self._remote_port)
                )
                self.listen_host, self.listen_port = bound.host, bound.port
                self._remember(bound)
                # unbounded, as the session's stream limit already bounds incoming streams
                send, receive = trio.open_memory_channel[IncomingStream](math.inf)
                async with trio.open_nursery() as nursery:
                    self._incoming = send
                    link.route_to(control.stream_id, self)
                    nursery.start_soon(self._start_handlers, receive, nursery)
                    if self._offline_reason is not None:
                        # still down when we lost the link: keep the public port refusing
                        # rather than accepting into a black hole until a probe succeeds
                        await _tell(channel, ForwardState(False, self._offline_reason))
                        self._set_status(ForwardStatus.OFFLINE, self._offline_reason)
                    else:
                        self._set_status(ForwardStatus.ACTIVE, "registered at the server")
                    task_status.started()
                    if (
                        link.config.probe_interval > 0
                        and self._listen_route != routes.UDP_LISTEN
                        and self.handler is None
                    ):
                        nursery.start_soon(self._probe_loop, channel)
                    # errors are handled here, inside the nursery, so they are not wrapped
                    self._follow_server(await wait_stream_end(control), session)
                    nursery.cancel_scope.cancel()
            finally:
                self._incoming = None
                link.unroute(control.stream_id)
                await trio.aclose_forcefully(control)

    def _remember(self, bound: Bound) -> None:
        """After a reconnect, ask for the same port (the real one, when 0 was asked for)."""
        self._remote_port = bound.port

    def _follow_server(self, end: BaseException | None, session: Session) -> None:
        """Why the control stream ended decides what the forward becomes."""
        cause = end.__cause__ if end is not None else None
        if isinstance(cause, StreamResetError) and cause.code != ErrorCode.GOING_AWAY:
            self._fail(cause, f"the server ended the forward: {cause}")
        elif end is None and not session.closed:
            self._fail(
                ForwardError("the server closed the forward"), "the server closed the forward"
            )
        else:  # the session ended, or the server is shutting down
            self._set_status(ForwardStatus.SUSPENDED, "tunnel connection lost")

    async def _reattach(self, session: Session) -> None:
        """After a reconnect: register again, asking for the port the forward had.

        A port in use by another owner may be released (a client that has not yet been
        dropped, a program that exits), and a cluster's engine out of reach comes back by
        itself, so the forward stays suspended, says why, and asks again with the reconnect
        backoff for as long as this session lives. Any other refusal (the port is not
        allowed, the forward limit) cannot be fixed by waiting: it is final.
        """
        attempt = 0
        while True:
            try:
                await self._attach(session)
                return
            except SessionClosedError:
                return  # lost the link again; stays suspended
            except (AddressInUseError, ClusterUnavailableError) as exc:
                attempt += 1
                delay = self._link.config.backoff(attempt)
                self._explain(f"could not be restored: {exc}; retrying in {delay:.1f} s")
            except TunnelError as exc:
                self._fail(exc, f"could not be restored: {exc}")
                return
            if self.status in FINAL:
                return
            self._attach_scope = trio.CancelScope()  # aclose() cancels the wait
            with self._attach_scope:
                await trio.sleep(delay)

    def _explain(self, reason: str) -> None:
        """A new reason for the current status (which does not change)."""
        self.reason = reason
        log.warning("%s %s -> %s: %s", self.kind, format_target(*self.address), self.target, reason)

    def dispatch(self, incoming: IncomingStream) -> None:
        """Hand an incoming stream to the forward, or refuse it if the forward is closing.

        The stream goes through a channel that the forward's own task drains, so a handler is
        only ever started in the forward's nursery by a task of that nursery (which is
        therefore still open), whatever state the forward is in.
        """
        try:
            if self._incoming is None:
                raise trio.ClosedResourceError
            self._incoming.send_nowait(incoming)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.WouldBlock):
            incoming.refuse(ErrorCode.FORWARD_FAILED, "forward is closing")

    async def _start_handlers(
        self, receive: trio.MemoryReceiveChannel[IncomingStream], nursery: trio.Nursery
    ) -> None:
        try:
            async for incoming in receive:
                nursery.start_soon(self._answer, incoming)
        finally:
            # refuse what is queued and close, with no checkpoint in between: from now on
            # _dispatch finds the channel broken and refuses by itself
            while True:
                try:
                    incoming = receive.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
                incoming.refuse(ErrorCode.FORWARD_FAILED, "forward is closing")
            receive.close()

    async def _answer(self, incoming: IncomingStream) -> None:
        """Run the handler; a stream it had not answered when cancelled is refused."""
        try:
            await self._handle(incoming)
        finally:
            if not incoming.answered:
                incoming.refuse(ErrorCode.FORWARD_FAILED, "forward is closing")

    async def _handle(self, incoming: IncomingStream) -> None:
        if self.handler is not None:
            await self._hand_over(incoming, self.handler)
            return
        # the server may give up on the public connection, cancelling the dial
        await serve_egress(
            incoming,
            functools.partial(self._connect_target, incoming),
            self._relay,
            self.stats.count_failure,
        )

    async def _hand_over(self, incoming: IncomingStream, handler: StreamHandler) -> None:
        """Accept the public connection's stream and let ``handler`` serve it; its failure
        ends that one connection (logged), never the forward."""
        try:
            stream = incoming.accept()
        except SessionClosedError:
            return
        self.stats.active_connections += 1
        self.stats.total_connections += 1
        try:
            await handler(stream)
        except Exception:
            log.exception("%s %s: the stream handler failed", self.kind, self.listen_port)
        finally:
            self.stats.active_connections -= 1
            await trio.aclose_forcefully(stream)

    async def _connect_target(self, incoming: IncomingStream) -> trio.SocketStream:
        """Dial the target; with ``proxy_protocol``, announce the public peer to it first."""
        target = await dial(self.target_host, self.target_port, timeout=self.connect_timeout)
        if self.proxy_protocol is None:
            return target
        try:
            # the public peer is what the server saw (the stream's Open names it); the
            # destination is the public listener
            header = encode_header(
                self.proxy_protocol, (incoming.host, incoming.port), _ip_or_any(self.address)
            )
        except ValueError:
            header = encode_unknown(self.proxy_protocol)
        try:
            await target.send_all(header)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            await trio.aclose_forcefully(target)
            reason = f"reset before the PROXY header was sent ({exc})"
            raise NodeUnstableError(
                f"dial {self.target} failed: {reason}",
                target=self.target,
                failure=DialFailure.RESET,
                reason=reason,
            ) from None
        return target

    async def _probe_loop(self, channel: ControlChannel) -> None:
        """TCP-connect the target every ``probe_interval``; after ``probe_failures`` failures
        in a row take the forward offline, and bring it back at the first success."""
        config = self._link.config
        failures = config.probe_failures if self._offline_reason is not None else 0
        while True:
            await trio.sleep(config.probe_interval)
            try:
                sock = await dial(
                    self.target_host,
                    self.target_port,
                    timeout=self.connect_timeout,
                    logger=log,
                    level=logging.DEBUG,
                )
            except DialError as exc:
                failures += 1
                self._link.emit(TunnelEvent(EventKind.PROBE_FAILED, exc.message, forward=self))
                if failures >= config.probe_failures and self._offline_reason is None:
                    reason = truncate_text(f"{failures} health probes failed: {exc.message}")
                    self._offline_reason = reason
                    if not await _tell(channel, ForwardState(False, reason)):
                        return
                    self._set_status(ForwardStatus.OFFLINE, reason)
                continue
            await trio.aclose_forcefully(sock)
            if failures:
                self._link.emit(
                    TunnelEvent(
                        EventKind.PROBE_OK,
                        f"target reachable after {failures} failures",
                        forward=self,
                    )
                )
            failures = 0
            if self._offline_reason is not None:
                self._offline_reason = None
                if not await _tell(channel, ForwardState(True, "target reachable")):
                    return
                self._set_status(ForwardStatus.ACTIVE, "target reachable again")


def _ip_or_any(address: tuple[str, int]) -> tuple[str, int]:
    """``address`` if its host is an IP literal, else the unspecified address (which PROXY
    protocol readers take as "not known") with the same port."""
    try:
        ipaddress.ip_address(address[0].strip("[]"))
    except ValueError:
        return "0.0.0.0", address[1]
    return address[0].strip("[]"), address[1]


async def _tell(channel: ControlChannel, message: ForwardState) -> bool:
    """Send on the control stream; False if it is gone (the forward is ending anyway)."""
    try:
        await channel.send(message)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return False
    return True


async def _receive_bound(channel: ControlChannel, address: str) -> Bound:
    """Where the server listens for this forward, or why it will not (a group member's
    refusal comes as a reset carrying the refusal's code, raised as its own error)."""
    try:
        return await channel.receive_bound()
    except trio.BrokenResourceError as exc:
        cause = exc.__cause__
        if isinstance(cause, StreamResetError):
            if ErrorCode.FORWARD_FAILED <= cause.code < ErrorCode.FORWARD_FAILED + 100:
                raise refusal_error(cause.code, cause.message, target=address) from None
            raise ForwardError(f"the server withdrew the forward: {cause}") from None
        raise SessionClosedError("the tunnel connection was lost") from exc
