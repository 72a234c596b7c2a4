"""``connect``'s transport options: proxy, WebSocket headers and keepalive, ``--stdio``.

Parses them into the library's ``ClientConfig`` fields and runs the ``--stdio`` relay; the
transports themselves are the library's (``pytunnel.transports``).
"""

from __future__ import annotations

import urllib.parse

import attrs
import click

import pytunnel
from pytunnel.transports.stdio import relay_stdio
from pytunnel.transports.stdio import take_stdio as take_stdio

from ._options import parsed, stack

_CLIENT = attrs.fields(pytunnel.ClientConfig)

#: ``--proxy none``: ignore the environment's proxies too.
NO_PROXY = "none"


def _header(values: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """``Name: value`` pairs of ``--header``, checked as the config checks them."""
    pairs = []
    for value in values:
        name, sep, rest = value.partition(":")
        if not sep or not name.strip():
            raise ValueError(f"expected 'Name: value', not {value!r}")
        pairs.append((name.strip(), rest.strip()))
    pytunnel.ClientConfig(token="-", ws_headers=tuple(pairs))  # the config's own checks
    return tuple(pairs)


def _stdio_target(value: str | None) -> tuple[str, int] | None:
    return None if value is None else pytunnel.parse_host_port(value, allow_zero=False)


transport_options = stack(
    click.option(
        "--proxy",
        metavar="URL",
        help="Reach the server through this proxy: http://[USER:PASS@]HOST:PORT (HTTP "
        "CONNECT) or socks5://, socks5h://. Default: HTTPS_PROXY (HTTP_PROXY for ws://), "
        "else ALL_PROXY, unless NO_PROXY exempts the server; 'none': never a proxy.",
    ),
    click.option(
        "--header",
        multiple=True,
        metavar="'NAME: VALUE'",
        callback=parsed(_header),
        help="Extra header of the WebSocket upgrade (ws:// and wss:// servers), for gateways "
        "that want one ('Authorization: Bearer ...'). Repeatable.",
    ),
    click.option(
        "--host-header",
        metavar="NAME",
        help="Host header of the WebSocket upgrade, when the gateway routes on another name "
        "than the one connected to.",
    ),
    click.option(
        "--ws-ping-interval",
        metavar="SECONDS",
        type=click.FloatRange(min=0),
        default=_CLIENT.ws_ping_interval.default,
        help="Ping over the WebSocket after this many seconds without receiving anything "
        "(0: never), so proxies that drop idle WebSockets never see one idle.",
    ),
    click.option(
        "--stdio",
        metavar="HOST:PORT",
        callback=parsed(_stdio_target),
        help="Carry one connection to HOST:PORT (dialled by the server) over stdin/stdout, "
        "then exit: for ssh -o ProxyCommand='pytunnel connect SERVER --stdio %h:%p'.",
    ),
)


def _server_host(server: str | tuple[str, int]) -> tuple[str, bool]:
    """The server's host, and whether its connection is secure-by-scheme (raw, wss://)."""
    if isinstance(server, str):
        parts = urllib.parse.urlsplit(server)
        return parts.hostname or "", parts.scheme != "ws"
    return server[0], True


def resolve_proxy(option: str | None, server: str | tuple[str, int]) -> str | None:
    """The proxy to use: ``--proxy`` (``none``: no proxy at all), else the environment's."""
    if option is not None:
        return None if option.lower() == NO_PROXY else option
    host, secure = _server_host(server)
    return pytunnel.transports.proxy_from_environment(host, secure=secure)


async def run_stdio(tunnel: pytunnel.Tunnel, target: tuple[str, int], fds: tuple[int, int]) -> None:
    """Open one stream to ``target`` and relay stdin/stdout to it until it ends."""
    stream = await tunnel.open_stream(*target)
    await relay_stdio(stream, *fds, idle_timeout=tunnel.config.idle_timeout)
