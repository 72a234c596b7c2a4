"""``--permit-open`` and ``--allow-ports``: what each pattern kind matches, and that the address
checked is the address dialled."""

from __future__ import annotations

import functools
import logging
import socket

import pytest
import trio
from helpers import TOKEN

import pytunnel
from pytunnel._dial import dial_permitted
from pytunnel._policy import PermitOpen, PortRange, parse_port_ranges

pytestmark = pytest.mark.timeout(60)


class _Resolver(trio.abc.HostnameResolver):
    """Answers from a table, standing in for DNS (nip.io, a rebinding server) without network.

    Each name maps to the list of answers to give, one per lookup (the last one repeats);
    other names go to the system resolver (``localhost`` from /etc/hosts)."""

    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers
        self.lookups: list[str] = []

    async def getaddrinfo(
        self,
        host: bytes | None,
        port: bytes | str | int | None,
        family: int = 0,
        type: int = 0,
        proto: int = 0,
        flags: int = 0,
    ) -> list[
        tuple[
            socket.AddressFamily,
            socket.SocketKind,
            int,
            str,
            tuple[str, int] | tuple[str, int, int, int] | tuple[int, bytes],
        ]
    ]:
        name = (host or b"").decode()
        self.lookups.append(name)
        if name not in self.answers:
            return await trio.to_thread.run_sync(
                socket.getaddrinfo, name, port, family, type, proto, flags
            )
        queue = self.answers[name]
        address = queue.pop(0) if len(queue) > 1 else queue[0]
        assert isinstance(port, (int, bytes, str))
        return [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, int(port)))  # type: ignore[arg-type]
        ]

    async def getnameinfo(
        self, sockaddr: tuple[str, int] | tuple[str, int, int, int], flags: int
    ) -> tuple[str, str]:  # pragma: no cover - never asked
        raise OSError("not supported")


def _install(answers: dict[str, list[str]]) -> _Resolver:
    resolver = _Resolver(answers)
    trio.socket.set_custom_hostname_resolver(resolver)
    return resolver


# ----------------------------------------------------------------- pattern kinds, no DNS


def test_name_wildcards_match_the_requested_name() -> None:
    policy = PermitOpen.parse(["*.example.com:443", "db?.internal:5432"])
    assert policy.allows("api.example.com", 443)
    assert policy.allows("API.Example.COM", 443)  # case-insensitive, like OpenSSH
    assert policy.allows("db1.internal", 5432)
    assert not policy.allows("example.com", 443)
    assert not policy.allows("api.example.com.evil.net", 443)
    assert not policy.allows("db12.internal", 5432)
    assert not policy.allows("api.example.com", 80)


def test_ip_wildcards_never_match_a_name() -> None:
    """``10.0.0.*`` allowed ``10.0.0.127.0.0.1.nip.io`` (which resolves to 127.0.0.1) when
    patterns were matched against the unresolved name."""
    policy = PermitOpen.parse("10.0.0.*:5432")
    assert policy.allows("10.0.0.7", 5432)
    assert not policy.allows("10.0.0.127.0.0.1.nip.io", 5432)
    assert not policy.allows_name("10.0.0.127.0.0.1.nip.io", 5432)
    assert policy.allows_address("10.0.0.250", 5432)
    assert not policy.allows_address("127.0.0.1", 5432)
    assert not policy.allows_address("10.0.1.1", 5432)
    assert policy.needs_address(5432)
    assert not policy.needs_address(5433)


def test_cidr_and_literal_patterns_match_addresses() -> None:
    policy = PermitOpen.parse(["10.0.0.0/24:5432", "192.168.1.10:22", "[fd00::/8]:*", "[::1]:80"])
    assert policy.allows_address("10.0.0.255", 5432)
    assert not policy.allows_address("10.0.1.0", 5432)
    assert policy.allows_address("192.168.1.10", 22)
    assert not policy.allows_address("192.168.1.100", 22)
    assert policy.allows_address("fd12:3456::1", 9999)
    assert not policy.allows_address("fe80::1", 9999)
    assert policy.allows("[::1]", 80)
    assert policy.allows("0:0:0:0:0:0:0:1", 80)  # the same address, spelled out
    assert not policy.allows("::2", 80)
    # an IPv4 address in IPv6 clothing is still that IPv4 address for a wildcard
    assert PermitOpen.parse("127.0.0.*:1").allows_address("::ffff:127.0.0.1", 1)


def test_a_lone_star_is_a_name_pattern_matching_everything() -> None:
    policy = PermitOpen.parse("*:443")
    assert policy.allows("anything.example", 443)
    assert policy.allows("127.0.0.1", 443)
    assert not policy.allows("anything.example", 444)
    assert not policy.needs_address(443)


def test_port_ranges_and_any_port() -> None:
    policy = PermitOpen.parse(["db.internal:5432-5434", "cache.internal:*"])
    assert policy.allows("db.internal", 5432)
    assert policy.allows("db.internal", 5434)
    assert not policy.allows("db.internal", 5431)
    assert not policy.allows("db.internal", 5435)
    assert policy.allows("cache.internal", 1)
    assert policy.allows("cache.internal", 65535)


@pytest.mark.parametrize(
    ("specs", "host", "allowed"),
    [
        (None, "x", True),
        ([], "x", True),
        ("any", "x", True),
        (["db:1", "any"], "x", True),
        ("none", "x", False),
        (["none", "x:1"], "x", False),
        ("x:1 y:1", "y", True),  # several patterns in one value
    ],
)
def test_any_and_none(specs: list[str] | str | None, host: str, allowed: bool) -> None:
    assert PermitOpen.parse(specs).allows(host, 1) is allowed


@pytest.mark.parametrize(
    "spec",
    ["nohost", ":80", "host:", "host:0", "host:9-1", "host:70000", "10.0.0.0/33:80", "[]:80"],
)
def test_bad_patterns_are_value_errors(spec: str) -> None:
    with pytest.raises(ValueError, match="bad"):
        PermitOpen.parse(spec)


def test_port_range_lists() -> None:
    assert parse_port_ranges("8000, 9000-9100,") == (PortRange(8000, 8000), PortRange(9000, 9100))
    for bad in ["", ",", "x", "5-", "0", "2-1", "65536"]:
        with pytest.raises(ValueError, match="port range"):
            parse_port_ranges(bad)


# ----------------------------------------------------------------- resolution and dialling


async def _accepting(nursery: trio.Nursery, host: str) -> tuple[int, list[str]]:
    """A listener on ``host`` that records the local address of each connection it gets."""
    seen: list[str] = []

    async def handler(stream: trio.SocketStream) -> None:
        seen.append(stream.socket.getsockname()[0])
        await stream.aclose()

    listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host=host))
    return int(listeners[0].socket.getsockname()[1]), seen


async def test_a_name_is_checked_by_its_resolved_address(nursery: trio.Nursery) -> None:
    port, _ = await _accepting(nursery, "127.0.0.1")
    resolver = _install({"10.0.0.127.0.0.1.nip.io": ["127.0.0.1"]})
    with pytest.raises(pytunnel.TargetForbiddenError):
        await dial_permitted(PermitOpen.parse(f"10.0.0.*:{port}"), "10.0.0.127.0.0.1.nip.io", port)
    # localhost (from /etc/hosts) resolves into 127.0.0.0/8: allowed by the address
    sock = await dial_permitted(PermitOpen.parse(f"127.0.0.0/8:{port}"), "localhost", port)
    await sock.aclose()
    assert "localhost" in resolver.lookups


async def test_the_checked_address_is_the_dialled_address(nursery: trio.Nursery) -> None:
    """DNS rebinding: the first answer passes the check, a second lookup would answer
    something else. The dial goes to the first answer and there is no second lookup."""
    port, seen = await _accepting(nursery, "127.0.0.1")
    resolver = _install({"rebind.test": ["127.0.0.1", "127.0.0.2"]})
    sock = await dial_permitted(PermitOpen.parse(f"127.0.0.1:{port}"), "rebind.test", port)
    await sock.aclose()
    assert resolver.lookups == ["rebind.test"]
    with trio.fail_after(5):
        while not seen:
            await trio.sleep(0.01)
    assert seen == ["127.0.0.1"]


async def test_an_unresolvable_name_is_forbidden_not_dialled() -> None:
    _install({})
    with pytest.raises(pytunnel.TargetForbiddenError, match="not permitted"):
        await dial_permitted(PermitOpen.parse("10.0.0.0/8:80"), "no-such-host.invalid", 80)


async def test_a_port_no_pattern_covers_is_forbidden_without_dns() -> None:
    resolver = _install({})
    with pytest.raises(pytunnel.TargetForbiddenError):
        await dial_permitted(PermitOpen.parse("10.0.0.0/8:80"), "db.internal", 81)
    assert resolver.lookups == []


async def test_dial_failures_keep_their_typing_after_the_check(nursery: trio.Nursery) -> None:
    from helpers import closed_port

    port = closed_port()
    with pytest.raises(pytunnel.NodeUnstableError, match="refused"):
        await dial_permitted(PermitOpen.parse(f"127.0.0.0/8:{port}"), "localhost", port)

    async def slow(*_: object) -> list[str]:
        await trio.sleep_forever()
        raise AssertionError  # pragma: no cover

    class _Slow(_Resolver):
        getaddrinfo = slow  # type: ignore[assignment]

    trio.socket.set_custom_hostname_resolver(_Slow({}))
    with pytest.raises(pytunnel.NodeTimeoutError, match="timed out"):
        await dial_permitted(
            PermitOpen.parse("127.0.0.0/8:80"), "slow.test", 80, timeout=0.2, level=logging.DEBUG
        )


# ----------------------------------------------------------------- through a real server


async def test_server_permit_open_wildcards_apply_to_resolved_addresses(
    nursery: trio.Nursery, echo_port: int
) -> None:
    """A real server and client: an IP wildcard refuses a name that resolves outside it and
    admits one that resolves inside it; a name wildcard admits names."""
    # the nip.io-style name points outside the allowed addresses (where nothing listens)
    _install({"10.0.0.127.0.0.2.nip.io": ["127.0.0.2"], "inside.test": ["127.0.0.1"]})
    server = await nursery.start(
        functools.partial(
            pytunnel.serve,
            0,
            token=TOKEN,
            permit_open=[f"10.0.0.*:{echo_port}", f"127.0.0.1:{echo_port}", "*.example:1-2"],
        )
    )
    tunnel = await pytunnel.connect_tunnel(nursery, server.address, token=TOKEN)

    async def echo(host: str) -> bytes:
        stream = await tunnel.open_stream(host, echo_port)
        await stream.send_all(b"ping")
        data = await stream.receive_some()
        await stream.aclose()
        return data

    assert await echo("localhost") == b"ping"
    assert await echo("inside.test") == b"ping"
    assert await echo("127.0.0.1") == b"ping"
    with pytest.raises(pytunnel.TargetForbiddenError):
        await tunnel.open_stream("10.0.0.127.0.0.2.nip.io", echo_port)
    with pytest.raises(pytunnel.TargetForbiddenError):
        await tunnel.open_stream("localhost", echo_port + 1 if echo_port < 65535 else 1)
    with pytest.raises(pytunnel.NodeUnstableError):  # allowed by name, then dialled
        await tunnel.open_stream("a.example", 1)


def test_an_ipv4_mapped_address_matches_literal_network_and_wildcard_patterns_alike() -> None:
    """``::ffff:10.0.0.5`` is the host 10.0.0.5: every kind of IPv4 pattern treats it so."""
    for pattern in ("10.0.0.5:5432", "10.0.0.0/24:5432", "10.0.0.*:5432"):
        policy = PermitOpen.parse(pattern)
        assert policy.allows_address("::ffff:10.0.0.5", 5432), pattern
        assert not policy.allows_address("::ffff:10.0.1.5", 5432), pattern
    assert PermitOpen.parse("[::ffff:10.0.0.5]:5432").allows_address("::ffff:10.0.0.5", 5432)
