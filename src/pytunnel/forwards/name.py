"""``-R app:80:host:port``: a host name on the server's shared HTTP or HTTPS port.

The server reads the name of each connection on its shared listener (the request's ``Host``
for HTTP, the ClientHello's server name for TLS) and opens a stream of this forward for the
connections whose name it holds; from there on it is a remote forward like any other: the
target is dialled here and the bytes are relayed untouched (for TLS, the service here holds
the certificate and the server never sees the plain text).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import trio

from .._egress import serve_egress
from .._http_rewrite import HttpRouteOptions, RequestRewriter
from ..protocol import routes
from ..protocol.messages import Bound
from ..protocol.proxy import ProxyVersion
from ._base import ForwardKind
from .remote import RemoteForward

if TYPE_CHECKING:
    from .._link import Link
    from ..session import IncomingStream, MuxStream

# HttpRouteOptions is public here: callers check an HTTP route's options with it before
# declaring the route (the CLI's config tables, at check-config time).
__all__ = ["HttpRouteOptions", "NameForward"]


class NameForward(RemoteForward):
    """A name route: ``name`` on the server's shared HTTP listener, or with ``tls`` its
    shared HTTPS listener, relayed to the target here.

    ``address`` is the full name the server gave (``app`` becomes ``app.<its domain>``) and
    the shared listener's real port. Restored after a reconnect under the same name.
    """

    kind = ForwardKind.NAME
    _listen_route = routes.NAME

    def __init__(
        self,
        link: Link,
        target_host: str,
        target_port: int,
        name: str,
        connect_timeout: float,
        *,
        tls: bool = False,
        proxy_protocol: ProxyVersion | None = None,
        http: HttpRouteOptions | None = None,
        group: tuple[str, bytes] | None = None,
    ) -> None:
        super().__init__(
            link,
            target_host,
            target_port,
            name,
            routes.NAME_TLS if tls else routes.NAME_HTTP,
            connect_timeout,
            proxy_protocol=proxy_protocol,
            group=group,
        )
        self.name = name
        self.tls = tls
        #: What is changed in each HTTP request (HTTP routes only); ``None``: nothing.
        self.http = http if http is not None and http.active else None

    @property
    def url(self) -> str:
        """Where the public reaches it (once registered): ``http://app.example.com:8080``."""
        scheme = "https" if self.tls else "http"
        default = routes.NAME_TLS if self.tls else routes.NAME_HTTP
        port = "" if self.listen_port in (default, 0) else f":{self.listen_port}"
        return f"{scheme}://{self.listen_host or self.name}{port}"

    async def _handle(self, incoming: IncomingStream) -> None:
        if self.http is None:
            await super()._handle(incoming)
            return
        options, peer = self.http, (incoming.host, incoming.port)

        async def relay(accepted: MuxStream, target: trio.SocketStream) -> None:
            await self._relay(RequestRewriter(accepted, options, peer), target)

        await serve_egress(
            incoming,
            functools.partial(self._connect_target, incoming),
            relay,
            self.stats.count_failure,
        )

    def _remember(self, bound: Bound) -> None:
        # a reconnect asks for the full name the server gave, on the same listener
        self._remote_host = bound.host
