"""Parsing OpenSSH-style forward specifications: ``[bind_address:]port:host:hostport``."""

from __future__ import annotations

import ipaddress

import attrs

from .errors import InvalidTargetError
from .protocol.messages import MAX_HOST

__all__ = ["ForwardSpec", "check_target", "parse_forward_spec", "parse_host_port"]


def check_target(host: str, port: int, *, allow_port_zero: bool = False) -> None:
    """Raise :class:`InvalidTargetError` for a target no ``Open`` can carry.

    Checked where a target is declared (a forward, a spec, ``open_stream``) so that a bad one
    is one clear error for its own caller, never an exception escaping into a session or a
    forward's accept loop on its first connection.
    """
    try:
        size = len(host.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidTargetError(f"host {host!r} is not valid text", target=host) from None
    if size > MAX_HOST:
        raise InvalidTargetError(
            f"host {host[:32]!r}... is {size} bytes long; at most {MAX_HOST} are allowed",
            target=host[:64],
        )
    low = 0 if allow_port_zero else 1
    if isinstance(port, bool) or not isinstance(port, int) or not low <= port <= 65535:
        raise InvalidTargetError(f"port {port!r} is out of range {low}-65535", target=host)


@attrs.frozen
class ForwardSpec:
    """One ``-L``/``-R`` argument. ``bind_host`` is ``None`` when not given."""

    bind_host: str | None
    bind_port: int
    target_host: str
    target_port: int
    protocol: str = "tcp"

    @property
    def name_route(self) -> bool:
        """Whether this ``-R`` names a host on the server's shared HTTP or HTTPS port, as
        sish reads OpenSSH's syntax: ``app:80:127.0.0.1:3000`` routes HTTP for ``app`` (under
        the server's domain) to port 3000 here, ``shop.example.org:443:...`` routes TLS by
        its server name. The bind address is then a host name, not an IP address or
        ``localhost``, and the port is 80 (HTTP) or 443 (HTTPS), whatever ports the shared
        listeners really use."""
        host = self.bind_host
        if host is None or self.protocol != "tcp" or self.bind_port not in (80, 443):
            return False
        if host.lower() in ("localhost", "*") or ":" in host:
            return False
        try:
            ipaddress.ip_address(host)
        except ValueError:
            return True
        return False


def _split(spec: str) -> list[str]:
    """Split on ``:`` outside ``[...]`` (IPv6 literals), dropping the brackets."""
    parts: list[str] = []
    current = ""
    depth = 0
    for char in spec:
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        elif char == ":" and depth == 0:
            parts.append(current)
            current = ""
            continue
        current += char
    if depth != 0:
        raise ValueError(f"unbalanced brackets in {spec!r}")
    parts.append(current)
    return [p.removeprefix("[").removesuffix("]") for p in parts]


def _port(text: str, what: str, spec: str, *, allow_zero: bool) -> int:
    if not text.isdigit():
        raise ValueError(f"{what} {text!r} in {spec!r} is not a number")
    port = int(text)
    low = 0 if allow_zero else 1
    if not low <= port <= 65535:
        raise ValueError(f"{what} {port} in {spec!r} is out of range {low}-65535")
    return port


def parse_forward_spec(spec: str) -> ForwardSpec:
    """``"8080:localhost:80"`` or ``"0.0.0.0:8080:[::1]:80"`` -> :class:`ForwardSpec`.

    Port 0 is allowed for the listening side (any free port). Raises ``ValueError`` with a
    message naming the offending part.
    """
    body, slash, suffix = spec.rpartition("/")
    protocol = "tcp"
    if slash:
        protocol = suffix.lower()
        if protocol not in ("tcp", "udp"):
            raise ValueError(f"unknown protocol {suffix!r} in {spec!r} (expected /tcp or /udp)")
        spec = body
    parts = _split(spec)
    if len(parts) == 3:
        bind_host, (port, host, hostport) = None, parts
    elif len(parts) == 4:
        bind_host, port, host, hostport = parts
    else:
        raise ValueError(f"expected [bind_address:]port:host:hostport, got {spec!r}")
    if not host:
        raise ValueError(f"missing target host in {spec!r}")
    target_port = _port(hostport, "target port", spec, allow_zero=False)
    check_target(host, target_port)
    return ForwardSpec(
        bind_host or None,
        _port(port, "port", spec, allow_zero=True),
        host,
        target_port,
        protocol,
    )


def parse_host_port(
    address: str | tuple[str, int],
    *,
    default_host: str = "127.0.0.1",
    allow_zero: bool = True,
) -> tuple[str, int]:
    """``"host:port"``, ``"[::1]:7000"``, ``":7000"`` or ``"7000"`` -> ``(host, port)``.

    The one parser for every address a user writes (the command line's ``--listen``, ``-D``
    and server argument, and the address a client connects to), so that all of them accept
    the same forms. A ``(host, port)`` tuple passes through the same checks.

    Args:
      address: the text, or a ``(host, port)`` tuple already split.
      default_host: the host when the text names none (``"7000"``, ``":7000"``, ``("", 7000)``).
      allow_zero: accept port 0 ("any free port"): right for an address to listen on, wrong
        for one to connect to.

    Raises:
      ValueError: naming the bad part. An IPv6 address without brackets is refused, not
        guessed at: ``::1:7000`` is itself a valid IPv6 address.
    """
    low = 0 if allow_zero else 1
    if isinstance(address, tuple):
        host, port = address
        if isinstance(port, bool) or not isinstance(port, int) or not low <= port <= 65535:
            raise ValueError(f"port {port!r} in {address!r} is out of range {low}-65535")
        return host or default_host, port
    parts = _split(address)
    if len(parts) == 1:
        return default_host, _port(parts[0], "port", address, allow_zero=allow_zero)
    if len(parts) != 2:
        raise ValueError(
            f"expected HOST:PORT, got {address!r} (an IPv6 address goes in brackets: [::1]:7000)"
        )
    return parts[0] or default_host, _port(parts[1], "port", address, allow_zero=allow_zero)
