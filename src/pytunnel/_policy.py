"""Server-side policy: which ports a client may listen on, which targets it may open.

Patterns follow OpenSSH's ``PermitOpen``: ``host:port`` where ``port`` is a number, a range
``a-b`` or ``*``; ``any`` allows everything and ``none`` nothing. The host part is one of two
kinds, because a name and an address are different promises:

- an **IP pattern** (a literal ``10.0.0.5``, a wildcard ``10.0.0.*``, a network ``10.0.0.0/24``,
  IPv6 in brackets) matches the *address the connection will go to*. A requested name is
  resolved once, the resolved addresses are checked, and only an address that passed is
  dialled, so neither a crafted name (``10.0.0.127.0.0.1.nip.io``) nor a DNS answer that
  changes between check and dial (rebinding) reaches an address the pattern does not cover;
- a **name pattern** (``db.internal``, ``*.example.com``, ``*``) matches the requested name
  itself, case-insensitively and before any DNS: the administrator trusts that name wherever
  it points.

The policy is enforced by the server on every request, whatever the client claims.
"""

from __future__ import annotations

import fnmatch
import ipaddress
from collections.abc import Iterable, Sequence

import attrs

__all__ = ["PermitOpen", "PortRange", "parse_port_ranges"]

_IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_IPV4_WILDCARD_CHARS = frozenset("0123456789.*?[]!-")
_IPV6_WILDCARD_CHARS = frozenset("0123456789abcdef:.*?[]!-")


@attrs.frozen
class PortRange:
    """An inclusive range of ports."""

    low: int
    high: int

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and self.low <= port <= self.high


def _parse_range(text: str) -> PortRange:
    text = text.strip()
    low_text, sep, high_text = text.partition("-")
    try:
        low = int(low_text)
        high = int(high_text) if sep else low
    except ValueError:
        raise ValueError(f"bad port range {text!r}: expected PORT or LOW-HIGH") from None
    if not (1 <= low <= high <= 65535):
        raise ValueError(f"bad port range {text!r}: ports must be 1-65535, low <= high")
    return PortRange(low, high)


def parse_port_ranges(text: str) -> tuple[PortRange, ...]:
    """``"8000,9000-9100"`` -> two ranges. Raises ``ValueError`` with a clear message."""
    parts = [p for p in text.split(",") if p.strip()]
    if not parts:
        raise ValueError("empty port range")
    return tuple(_parse_range(p) for p in parts)


def ip_address(text: str) -> _IPAddress | None:
    """``text`` as an IP address (brackets and an IPv6 zone allowed), or ``None`` for a name."""
    try:
        return ipaddress.ip_address(text.strip("[]").partition("%")[0])
    except ValueError:
        return None


@attrs.frozen
class _Pattern:
    #: The lower-cased host pattern (for names: an ``fnmatch`` pattern).
    host: str
    ports: PortRange | None  # None: any port
    #: ``"name"``, or for IP patterns ``"address"``, ``"network"`` or ``"wildcard"``.
    kind: str = "name"
    network: _IPNetwork | None = None

    @property
    def is_ip(self) -> bool:
        return self.kind != "name"

    def covers_port(self, port: int) -> bool:
        return self.ports is None or port in self.ports

    def matches_name(self, host: str, port: int) -> bool:
        """A name pattern against the requested name (never an IP pattern: see the module)."""
        if self.is_ip or not self.covers_port(port):
            return False
        return fnmatch.fnmatchcase(host.lower().strip("[]"), self.host)

    def matches_address(self, address: _IPAddress, port: int) -> bool:
        """An IP pattern against an address the connection would go to."""
        if not self.is_ip or not self.covers_port(port):
            return False
        # an IPv4-mapped IPv6 address is the IPv4 host it maps to, for every kind of pattern
        mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
        candidates = (address,) if mapped is None else (address, mapped)
        if self.network is not None:
            return any(candidate in self.network for candidate in candidates)
        return fnmatch.fnmatchcase(candidates[-1].compressed, self.host)


def _parse_pattern(text: str) -> _Pattern:
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port:
        raise ValueError(f"bad permit-open pattern {text!r}: expected HOST:PORT")
    ports = None if port == "*" else _parse_range(port)
    host = host.lower().strip("[]")
    if not host:
        raise ValueError(f"bad permit-open pattern {text!r}: empty host")
    if "/" in host:
        try:
            network = ipaddress.ip_network(host, strict=False)
        except ValueError:
            raise ValueError(f"bad permit-open pattern {text!r}: bad network {host!r}") from None
        return _Pattern(host, ports, "network", network)
    literal = ip_address(host)
    if literal is not None:
        network = ipaddress.ip_network(literal)
        return _Pattern(literal.compressed, ports, "network", network)
    chars = set(host)
    if any(c.isdigit() for c in host) and (
        ("." in host and chars <= _IPV4_WILDCARD_CHARS)
        or (":" in host and chars <= _IPV6_WILDCARD_CHARS)
    ):
        return _Pattern(host, ports, "wildcard")
    return _Pattern(host, ports)


@attrs.frozen
class PermitOpen:
    """The set of targets a server lets clients open. Default: anything."""

    patterns: tuple[_Pattern, ...] | None = None  # None: any

    @classmethod
    def parse(cls, specs: Iterable[str] | str | None) -> PermitOpen:
        """Build from ``--permit-open`` values; no values (or ``any``) allows everything.
        Raises ``ValueError`` naming the first bad pattern."""
        if specs is None:
            return cls(None)
        if isinstance(specs, str):
            specs = [specs]
        items: Sequence[str] = [s for spec in specs for s in spec.split() if s]
        if not items or any(s == "any" for s in items):
            return cls(None)
        if any(s == "none" for s in items):
            return cls(())
        return cls(tuple(_parse_pattern(s) for s in items))

    def allows_name(self, host: str, port: int) -> bool:
        """Allowed by the requested name alone: no resolution needed (``any``, or a name
        pattern matches)."""
        if self.patterns is None:
            return True
        return any(p.matches_name(host, port) for p in self.patterns)

    def needs_address(self, port: int) -> bool:
        """Whether an IP pattern could allow ``port``: only then is resolving worth it."""
        return self.patterns is not None and any(
            p.is_ip and p.covers_port(port) for p in self.patterns
        )

    def allows_address(self, address: str, port: int) -> bool:
        """Whether an IP pattern allows connecting to ``address`` (an IP literal)."""
        parsed = ip_address(address)
        if parsed is None or self.patterns is None:
            return self.patterns is None
        return any(p.matches_address(parsed, port) for p in self.patterns)

    def allows(self, host: str, port: int) -> bool:
        """The decision without DNS: by name, or for an IP literal, by that address. A name
        that only an IP pattern could allow is refused here; :func:`pytunnel._dial.dial_permitted`
        resolves it and checks the address instead."""
        if self.allows_name(host, port):
            return True
        return ip_address(host) is not None and self.allows_address(host, port)
