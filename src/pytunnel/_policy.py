"""Server-side policy: which ports a client may listen on, which targets it may open.

Patterns follow OpenSSH's ``PermitOpen``: ``host:port`` where ``host`` may use shell wildcards
(matched case-insensitively against the name the client asked for, before any DNS) and
``port`` is a number, a range ``a-b`` or ``*``; ``any`` allows everything and ``none`` nothing.
The policy is enforced by the server on every request, whatever the client claims.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence

import attrs

__all__ = ["PermitOpen", "PortRange", "parse_port_ranges"]


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


@attrs.frozen
class _Pattern:
    host: str
    ports: PortRange | None  # None: any port

    def matches(self, host: str, port: int) -> bool:
        if self.ports is not None and port not in self.ports:
            return False
        return fnmatch.fnmatchcase(host.lower().strip("[]"), self.host)


def _parse_pattern(text: str) -> _Pattern:
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port:
        raise ValueError(f"bad permit-open pattern {text!r}: expected HOST:PORT")
    return _Pattern(host.lower().strip("[]"), None if port == "*" else _parse_range(port))


@attrs.frozen
class PermitOpen:
    """The set of targets a server lets clients open. Default: anything."""

    patterns: tuple[_Pattern, ...] | None = None  # None: any

    @classmethod
    def parse(cls, specs: Iterable[str] | str | None) -> PermitOpen:
        """Build from ``--permit-open`` values; no values (or ``any``) allows everything."""
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

    def allows(self, host: str, port: int) -> bool:
        if self.patterns is None:
            return True
        return any(p.matches(host, port) for p in self.patterns)
