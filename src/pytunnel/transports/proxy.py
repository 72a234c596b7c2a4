"""Reaching the server through a proxy: HTTP CONNECT (with basic auth) and SOCKS5.

The proxy only carries bytes: whatever runs over the connection it opens (the raw tunnel, TLS,
a WebSocket) is the same as over a direct connection. The CONNECT exchange is HTTP/1.1, so h11
writes the request and reads the answer (including a proxy that answers with a body, or reads
ahead: bytes past the answer are given back to the stream); SOCKS5 is python-socks' trio client.

Every failure is one :class:`~pytunnel.errors.ProxyError` naming the proxy (never its
password): unreachable, refused (407, 403, a SOCKS reply), or stalled past the timeout.

Proxies from the environment follow the usual conventions (``urllib.request``'s reading of
``HTTPS_PROXY`` / ``HTTP_PROXY`` / ``ALL_PROXY`` and ``NO_PROXY``, lower or upper case).
"""

from __future__ import annotations

import base64
import logging
import os
import socket
import urllib.parse
import urllib.request
from collections.abc import Mapping

import attrs
import h11
import python_socks
import trio
from python_socks import ProxyType
from python_socks.async_.trio import Proxy as SocksProxy

from .._dial import describe_os_error, dial, format_target
from ..errors import DialError, ProxyError, printable
from ._prefixed import PrefixedStream

__all__ = [
    "ProxyURL",
    "connect_via_proxy",
    "parse_proxy_url",
    "proxy_from_environment",
]

log = logging.getLogger("pytunnel.proxy")

_SCHEMES = {"http": 8080, "socks5": 1080, "socks5h": 1080}
#: Bytes read at a time from a proxy's answer; h11 bounds what it buffers of the head itself.
_RECEIVE_SIZE = 16 * 1024


@attrs.frozen
class ProxyURL:
    """A proxy: ``http://[user:password@]host[:port]`` or ``socks5[h]://...``.

    ``str()`` names it without the password, as every message and log line does.
    """

    scheme: str
    host: str
    port: int
    username: str | None = None
    password: str | None = attrs.field(default=None, repr=False)

    def __str__(self) -> str:
        user = f"{self.username}@" if self.username else ""
        return f"{self.scheme}://{user}{format_target(self.host, self.port)}"


def parse_proxy_url(text: str) -> ProxyURL:
    """Parse a proxy URL; ``ValueError`` naming what is wrong (never echoing a password)."""
    try:
        parts = urllib.parse.urlsplit(text if "://" in text else "http://" + text)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"bad proxy URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in _SCHEMES:
        raise ValueError(
            f"bad proxy URL: unsupported scheme {scheme!r} (http://, socks5:// or socks5h://)"
        )
    if not parts.hostname:
        raise ValueError("bad proxy URL: no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError("bad proxy URL: a proxy URL has no path")
    unquote = urllib.parse.unquote
    return ProxyURL(
        scheme=scheme,
        host=parts.hostname,
        port=port if port is not None else _SCHEMES[scheme],
        username=None if parts.username is None else unquote(parts.username),
        password=None if parts.password is None else unquote(parts.password),
    )


def proxy_from_environment(
    host: str, *, secure: bool = True, environ: Mapping[str, str] | None = None
) -> str | None:
    """The proxy the environment names for a connection to ``host``, or ``None``.

    ``secure`` (wss:// and raw tunnels): ``HTTPS_PROXY``, else ``ALL_PROXY``; otherwise
    (ws://): ``HTTP_PROXY``, else ``ALL_PROXY``. ``NO_PROXY`` exempts hosts, as curl and
    urllib read it (``*``, names and domain suffixes, with or without ports)."""
    env = os.environ if environ is None else environ
    proxies = {}
    for name, value in env.items():
        lowered = name.lower()
        if value and lowered.endswith("_proxy"):
            # the lowercase spelling wins, as in urllib
            key = lowered[: -len("_proxy")]
            if name == lowered or key not in proxies:
                proxies[key] = value
    no_proxy = proxies.pop("no", "")
    if no_proxy and _bypassed(host, no_proxy):
        return None
    return proxies.get("https" if secure else "http") or proxies.get("all")


def _bypassed(host: str, no_proxy: str) -> bool:
    # urllib's matcher reads NO_PROXY from the environment it is given (a mapping), which is
    # what lets a caller pass its own instead of the process's
    bypass = urllib.request.proxy_bypass_environment  # type: ignore[attr-defined]
    return bool(bypass(host, {"no": no_proxy}))


async def connect_via_proxy(
    proxy: ProxyURL, host: str, port: int, *, timeout: float
) -> trio.abc.Stream:
    """A connection to ``host:port`` through ``proxy``, the whole set-up within ``timeout``.

    Raises:
      ProxyError: the proxy cannot be reached, refuses (``status``: the HTTP status, or
        the SOCKS reply code), or does not answer in time.
    """
    if proxy.scheme == "http":
        return await _http_connect(proxy, host, port, timeout)
    return await _socks_connect(proxy, host, port, timeout)


async def _reach(proxy: ProxyURL, timeout: float) -> trio.SocketStream:
    try:
        return await dial(proxy.host, proxy.port, timeout=timeout, level=logging.DEBUG)
    except DialError as exc:
        raise ProxyError(
            f"cannot reach the proxy {proxy}: {exc.reason}", proxy=str(proxy)
        ) from None


def _basic_auth(proxy: ProxyURL) -> str:
    credentials = f"{proxy.username or ''}:{proxy.password or ''}".encode()
    return "Basic " + base64.b64encode(credentials).decode("ascii")


async def _http_connect(proxy: ProxyURL, host: str, port: int, timeout: float) -> trio.abc.Stream:
    target = format_target(host, port)
    deadline = trio.current_time() + timeout
    stream = await _reach(proxy, timeout)
    headers = [("Host", target), ("User-Agent", "pytunnel")]
    if proxy.username is not None:
        headers.append(("Proxy-Authorization", _basic_auth(proxy)))
    connection = h11.Connection(h11.CLIENT)
    try:
        with trio.fail_at(deadline):
            await stream.send_all(
                connection.send(h11.Request(method="CONNECT", target=target, headers=headers))
                + (connection.send(h11.EndOfMessage()) or b"")
            )
            response = await _read_response(stream, connection, proxy)
    except trio.TooSlowError:
        await trio.aclose_forcefully(stream)
        raise ProxyError(
            f"the proxy {proxy} did not answer the CONNECT to {target} within {timeout:g} s",
            proxy=str(proxy),
        ) from None
    except (trio.BrokenResourceError, OSError) as exc:
        await trio.aclose_forcefully(stream)
        raise ProxyError(
            f"the connection to the proxy {proxy} broke during the CONNECT: "
            f"{describe_os_error(exc)}",
            proxy=str(proxy),
        ) from None
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    status = response.status_code
    if not 200 <= status < 300:
        await trio.aclose_forcefully(stream)
        reason = printable(response.reason.decode("latin-1"))
        if status in (401, 407):  # tinyproxy answers a forward proxy's 407 as 401
            hint = (
                "it rejected the credentials"
                if proxy.username is not None
                else "it requires authentication (user:password@ in the proxy URL)"
            )
        else:
            hint = f"it answered {status} {reason}".rstrip()
        raise ProxyError(
            f"the proxy {proxy} refused the CONNECT to {target}: {hint}",
            proxy=str(proxy),
            status=status,
        )
    log.debug("CONNECT %s through %s: %d", target, proxy, status)
    trailing, _closed = connection.trailing_data
    return PrefixedStream(trailing, stream) if trailing else stream


async def _read_response(
    stream: trio.abc.Stream, connection: h11.Connection, proxy: ProxyURL
) -> h11.Response:
    while True:
        try:
            event = connection.next_event()
        except h11.RemoteProtocolError as exc:
            raise ProxyError(
                f"the proxy {proxy} answered the CONNECT with something that is not HTTP "
                f"({printable(str(exc))})",
                proxy=str(proxy),
            ) from None
        if event is h11.NEED_DATA:
            data = await stream.receive_some(_RECEIVE_SIZE)
            if not data:
                raise ProxyError(
                    f"the proxy {proxy} closed the connection instead of answering the CONNECT",
                    proxy=str(proxy),
                )
            connection.receive_data(bytes(data))
            continue
        if isinstance(event, h11.Response):
            return event
        # InformationalResponse (100 Continue...): the answer is still to come


async def _socks_connect(proxy: ProxyURL, host: str, port: int, timeout: float) -> trio.abc.Stream:
    target = format_target(host, port)
    client = SocksProxy(
        ProxyType.SOCKS5,
        proxy.host,
        proxy.port,
        proxy.username,
        proxy.password,
        rdns=proxy.scheme == "socks5h",
    )
    try:
        sock = await client.connect(host, port, timeout=timeout)
    except python_socks.ProxyTimeoutError:
        raise ProxyError(
            f"the SOCKS proxy {proxy} did not connect to {target} within {timeout:g} s",
            proxy=str(proxy),
        ) from None
    except python_socks.ProxyConnectionError as exc:
        raise ProxyError(
            f"cannot reach the proxy {proxy}: {describe_os_error(exc)}", proxy=str(proxy)
        ) from None
    except python_socks.ProxyError as exc:
        code = getattr(exc, "error_code", None)
        raise ProxyError(
            f"the SOCKS proxy {proxy} refused the connection to {target}: {printable(str(exc))}",
            proxy=str(proxy),
            status=code if isinstance(code, int) else None,
        ) from None
    except (OSError, socket.gaierror) as exc:
        raise ProxyError(
            f"the SOCKS proxy {proxy} failed: {describe_os_error(exc)}", proxy=str(proxy)
        ) from None
    return trio.SocketStream(sock)
