"""UDP forwards: ``-L .../udp`` and ``-R .../udp``, one association per source address.

The association tables and relays are in ``_udp.py``; these classes only say which side
listens and which dials, reusing the TCP forwards' life cycles.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import trio

from .._egress import serve_egress
from .._listen import bind_udp
from .._udp import relay_association, serve_associations, udp_connect
from ..protocol import routes
from ._base import ForwardKind
from .local import LocalForward
from .remote import RemoteForward

if TYPE_CHECKING:
    from ..session import IncomingStream, MuxStream, Session

__all__ = ["UdpLocalForward", "UdpRemoteForward"]


class UdpLocalForward(LocalForward):
    """``-L port:host:hostport/udp``: datagrams to the local UDP port reach the target from
    the server; replies come back to each source. One association per source address."""

    kind = ForwardKind.LOCAL_UDP

    async def _listen(self, host: str, port: int, task_status: trio.TaskStatus[None]) -> None:
        with await bind_udp(host, port, buffer=self._link.config.udp_socket_buffer) as sock:
            self._listening(host, int(sock.getsockname()[1]), task_status)
            await serve_associations(
                sock,
                self._open_association,
                idle_timeout=self._link.config.udp_idle_timeout,
                max_associations=self._link.config.max_udp_associations,
                room=self._session,
                stats=self.stats,
                name=f"{self.kind} {self.listen_port}",
            )

    def _session(self) -> Session | None:
        return self._link.session

    async def _open_association(self, source: tuple[str, int]) -> MuxStream:
        # a refusal is counted (by category) where associations are run: _udp._run_association
        return await self._link.open(self.target_host, self.target_port, routes.UDP_CONNECT)


class UdpRemoteForward(RemoteForward):
    """``-R port:host:hostport/udp``: the server listens on a UDP port; each source address
    there becomes an association relayed to the target, dialled here."""

    kind = ForwardKind.REMOTE_UDP
    _listen_route = routes.UDP_LISTEN

    def _session(self) -> Session | None:
        return self._link.session

    async def _handle(self, incoming: IncomingStream) -> None:
        await serve_egress(
            incoming,
            functools.partial(
                udp_connect,
                self.target_host,
                self.target_port,
                buffer=self._link.config.udp_socket_buffer,
            ),
            functools.partial(
                relay_association,
                idle_timeout=self._link.config.udp_idle_timeout,
                stats=self.stats,
                room=self._session,
            ),
            self.stats.count_failure,
        )
