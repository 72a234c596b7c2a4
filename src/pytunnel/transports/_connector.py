"""From the address a client is given to a connector that opens its transport each time.

``host:port`` is the raw tunnel (TLS on top of it is the supervisor's, end to end with the
server); ``ws://`` and ``wss://`` URLs are the WebSocket transport. Either may go through a
proxy. The TLS options of the client describe the first TLS layer on the way: for ``wss://``
that is the WebSocket's own (the one a TLS-terminating reverse proxy presents, which the
client trusts by CA or pins), so the supervisor adds none; otherwise it is the tunnel's.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Sequence

import attrs
import trio

from .._client_config import ClientConfig
from .._dial import format_target
from .._spec import parse_host_port
from .._supervisor import Connector
from .._tls import client_tls_context, tls_connect
from ..errors import ConnectError, TLSError, TunnelError
from .proxy import ProxyURL, connect_via_proxy, parse_proxy_url
from .websocket import WebSocketURL, connect_websocket, parse_websocket_url

__all__ = ["DirectConnector", "ServerTransport", "server_transport", "servers_transport"]

#: The connector of a direct TCP connection to ``host:port`` within a timeout (the client's
#: ``tcp_connector``, with its "cannot reach tunnel server" errors).
DirectConnector = Callable[[str, int, float], Connector]


@attrs.frozen
class ServerTransport:
    """How a tunnel reaches its server."""

    connector: Connector
    #: The host connected to (the default name its certificate must carry); with several
    #: servers, that of the one the last connection reached.
    server_host: Callable[[], str]
    #: Whether the connector's stream already is the TLS layer the config describes.
    carries_tls: bool
    #: The server the last connection reached, as the user wrote it.
    current: Callable[[], str]
    #: Called when that connection failed its TLS or handshake: with several servers, the
    #: next connection starts with the one after it, and the answer says whether to make it
    #: at once (false once every server of the round was passed over: back off instead).
    passed_over: Callable[[], bool] = lambda: False


#: Seconds each server has to answer before the next one is tried too (RFC 8305's
#: "connection attempt delay"): a dead server costs this, not a whole connect timeout.
ATTEMPT_DELAY = 0.25

Address = str | tuple[str, int]


def _label(address: Address) -> str:
    return address if isinstance(address, str) else format_target(*address)


def servers_transport(
    addresses: Sequence[Address], config: ClientConfig, *, direct: DirectConnector
) -> ServerTransport:
    """The transport to the first of ``addresses`` that answers, tried in order with
    :data:`ATTEMPT_DELAY` between starts (happy eyeballs across servers), anew at every
    reconnection. One address is :func:`server_transport`."""
    if not addresses:
        raise ValueError("no server address given")
    transports = [server_transport(address, config, direct=direct) for address in addresses]
    if len(transports) == 1:
        return transports[0]
    if len({t.carries_tls for t in transports}) != 1:
        raise ValueError("wss:// servers cannot be mixed with ws:// or host:port ones")
    labels = [_label(address) for address in addresses]
    count = len(transports)
    #: The server the last connection reached, and where the next round of attempts starts.
    chosen, start = [0], [0]

    async def connect() -> trio.abc.Stream:
        order = [(start[0] + step) % count for step in range(count)]
        index, stream = await _first_to_answer(
            [transports[i].connector for i in order], [labels[i] for i in order]
        )
        chosen[0] = order[index]
        return stream

    #: Servers passed over since the last time every one was (a round of refusals).
    refused = [0]

    def passed_over() -> bool:
        start[0] = (chosen[0] + 1) % count
        refused[0] = (refused[0] + 1) % count
        return refused[0] != 0

    return ServerTransport(
        connect,
        lambda: transports[chosen[0]].server_host(),
        transports[0].carries_tls,
        lambda: labels[chosen[0]],
        passed_over,
    )


async def _first_to_answer(
    connectors: list[Connector], labels: list[str]
) -> tuple[int, trio.abc.Stream]:
    """Start the connectors one after another, each :data:`ATTEMPT_DELAY` after the last
    (or at once when the last failed); the first stream wins, the others are cancelled (or
    closed, if they connected too). ``ConnectError`` naming every failure if none does."""
    winner: list[tuple[int, trio.abc.Stream]] = []
    errors: dict[int, BaseException] = {}
    try:
        await _race(connectors, winner, errors)
    except BaseException:
        for _, stream in winner:  # cancelled from outside after a winner: not ours to keep
            await trio.aclose_forcefully(stream)
        raise
    if winner:
        return winner[0]
    reasons = "; ".join(f"{labels[i]}: {errors[i]}" for i in sorted(errors))
    raise ConnectError(f"cannot reach any of {len(labels)} tunnel servers ({reasons})")


async def _race(
    connectors: list[Connector],
    winner: list[tuple[int, trio.abc.Stream]],
    errors: dict[int, BaseException],
) -> None:
    async with trio.open_nursery() as nursery:

        async def attempt(index: int, failed: trio.Event) -> None:
            try:
                stream = await connectors[index]()
            except (TunnelError, OSError) as exc:
                errors[index] = exc
                failed.set()
                return
            if winner:
                await trio.aclose_forcefully(stream)
                return
            winner.append((index, stream))
            nursery.cancel_scope.cancel()

        for index in range(len(connectors)):
            failed = trio.Event()
            nursery.start_soon(attempt, index, failed)
            with trio.move_on_after(ATTEMPT_DELAY):
                await failed.wait()


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
        return ServerTransport(
            _websocket_connector(url, config, opener),
            lambda: url.host,
            url.secure,
            lambda: address,
        )
    host, port = parse_host_port(address, allow_zero=False)
    label = format_target(host, port)
    return ServerTransport(
        _tcp_opener(host, port, config, proxy, direct), lambda: host, False, lambda: label
    )


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
