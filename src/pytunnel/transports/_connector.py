"""From the address a client is given to a connector that opens its transport each time.

``host:port`` is the raw tunnel (TLS on top of it is the supervisor's, end to end with the
server); ``ws://`` and ``wss://`` URLs are the WebSocket transport. Either may go through a
proxy. The TLS options of the client describe the first TLS layer on the way: for ``wss://``
that is the WebSocket's own (the one a TLS-terminating reverse proxy presents, which the
client trusts by CA or pins), so the supervisor adds none; otherwise it is the tunnel's.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable

import attrs
import trio

from .._client_config import ClientConfig
from .._spec import parse_host_port
from .._supervisor import Connector
from .._tls import client_tls_context, tls_connect
from ..errors import TLSError
from .proxy import ProxyURL, connect_via_proxy, parse_proxy_url
from .websocket import WebSocketURL, connect_websocket, parse_websocket_url

__all__ = ["DirectConnector", "ServerTransport", "server_transport"]

#: The connector of a direct TCP connection to ``host:port`` within a timeout (the client's
#: ``tcp_connector``, with its "cannot reach tunnel server" errors).
DirectConnector = Callable[[str, int, float], Connector]


@attrs.frozen
class ServerTransport:
    """How a tunnel reaches its server."""

    connector: Connector
    #: The host connected to (the default name its certificate must carry).
    server_host: str
    #: Whether the connector's stream already is the TLS layer the config describes.
    carries_tls: bool


def _is_url(address: str | tuple[str, int]) -> bool:
    return isinstance(address, str) and "://" in address


def server_transport(
    address: str | tuple[str, int], config: ClientConfig, *, direct: DirectConnector
) -> ServerTransport:
    """The transport to ``address`` (``host:port``, ``(host, port)``, ``ws://``/``wss://``
    URL) with ``config``'s proxy and WebSocket options; ``direct`` reaches a host when there
    is no proxy. ``ValueError`` for a bad address."""
    proxy = None if config.proxy is None else parse_proxy_url(config.proxy)
    if _is_url(address):
        assert isinstance(address, str)
        url = parse_websocket_url(address)
        opener = _tcp_opener(url.host, url.port, config, proxy, direct)
        return ServerTransport(_websocket_connector(url, config, opener), url.host, url.secure)
    host, port = parse_host_port(address, allow_zero=False)
    return ServerTransport(_tcp_opener(host, port, config, proxy, direct), host, False)


def _tcp_opener(
    host: str, port: int, config: ClientConfig, proxy: ProxyURL | None, direct: DirectConnector
) -> Connector:
    """A TCP connection to ``host:port``, through ``proxy`` if there is one."""
    if proxy is None:
        return direct(host, port, config.connect_timeout)

    async def through_proxy() -> trio.abc.Stream:
        return await connect_via_proxy(proxy, host, port, timeout=config.connect_timeout)

    return through_proxy


def _websocket_connector(url: WebSocketURL, config: ClientConfig, opener: Connector) -> Connector:
    #: built off the loop for the first connection, reused for every reconnection
    context: list[ssl.SSLContext] = [] if config.tls is None else [config.tls]

    async def connect() -> trio.abc.Stream:
        stream = await opener()
        if url.secure:
            if not context:
                try:
                    context.append(
                        await client_tls_context(pinned=config.tls_fingerprint is not None)
                    )
                except BaseException:
                    await trio.aclose_forcefully(stream)
                    raise
            try:
                stream = await tls_connect(
                    stream,
                    context[0],
                    server_hostname=config.tls_server_hostname or url.host,
                    fingerprint=config.tls_fingerprint,
                    timeout=config.handshake_timeout,
                )
            except TLSError as exc:
                raise TLSError(f"{url}: {exc.message}") from None
        return await connect_websocket(
            stream,
            url,
            host_header=config.ws_host,
            headers=config.ws_headers,
            timeout=config.handshake_timeout,
            ping_interval=config.ws_ping_interval,
        )

    return connect
