"""The registry contract (``pytunnel.cluster``), run against both implementations: the
in-process one and a real etcd on loopback."""

from __future__ import annotations

import functools
import shutil
from collections.abc import AsyncIterator

import pytest
import trio
from helpers import EtcdServer, wait_until

from pytunnel.cluster import Change, EtcdRegistry, LocalRegistry, Registry, parse_etcd_url

ETCD = shutil.which("etcd")
needs_etcd = pytest.mark.skipif(
    ETCD is None, reason="etcd is not installed (.ci/run installs etcd-server)"
)


async def _started(nursery: trio.Nursery, registry: Registry) -> Registry:
    await nursery.start(registry.run)
    return registry


@pytest.fixture(params=["local", pytest.param("etcd", marks=needs_etcd)])
async def pair(
    request: pytest.FixtureRequest, nursery: trio.Nursery, tmp_path: object
) -> AsyncIterator[tuple[Registry, Registry]]:
    """Two nodes' registries on one engine (the same object for the in-process one, which is
    a single node by definition)."""
    if request.param == "local":
        local = LocalRegistry("a", "127.0.0.1:7000")
        await nursery.start(local.run)
        yield local, local
        return
    server = EtcdServer(str(tmp_path) + "/etcd")
    await server.start()
    try:
        a = await _started(nursery, EtcdRegistry(server.endpoint, "a", "127.0.0.1:7000"))
        b = await _started(nursery, EtcdRegistry(server.endpoint, "b", "127.0.0.1:7001"))
        yield a, b
        nursery.cancel_scope.cancel()
    finally:
        await server.kill()


async def test_a_claim_has_one_owner_until_released(pair: tuple[Registry, Registry]) -> None:
    a, b = pair
    assert await a.claim("tcp/8080", "a/1") == "a/1"
    assert await b.claim("tcp/8080", "b/1") == "a/1"  # refused: the holder is told
    assert await a.claim("tcp/8080", "a/1") == "a/1"  # the owner again: still its own
    assert await a.lookup("tcp/8080") == "a/1"
    assert await b.release("tcp/8080", "b/1") is False  # not the owner: nothing changes
    assert await b.lookup("tcp/8080") == "a/1"
    assert await a.release("tcp/8080", "a/1") is True
    assert await a.lookup("tcp/8080") is None
    assert await b.claim("tcp/8080", "b/1") == "b/1"
    assert a.available
    assert b.available


async def test_replace_takes_a_key_from_its_holder(pair: tuple[Registry, Registry]) -> None:
    a, b = pair
    seen: list[Change] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(functools.partial(a.watch, "clients/", seen.append))
        assert await a.replace("clients/laptop", "a/1") is None
        assert await b.replace("clients/laptop", "b/7") == "a/1"
        assert await a.release("clients/laptop", "a/1") is False  # the old one leaves late
        assert await a.lookup("clients/laptop") == "b/7"
        await wait_until(lambda: len(seen) >= 2, what=lambda: f"seen {seen}")
        nursery.cancel_scope.cancel()
    assert seen == [Change("clients/laptop", "a/1"), Change("clients/laptop", "b/7")]


async def test_racing_claims_have_exactly_one_winner(pair: tuple[Registry, Registry]) -> None:
    a, b = pair
    for round_ in range(40):
        key = f"tcp/{9000 + round_}"
        results: dict[str, str] = {}

        async def claim(
            registry: Registry, owner: str, key: str = key, results: dict[str, str] = results
        ) -> None:
            results[owner] = await registry.claim(key, owner)

        with trio.fail_after(20):  # a hang detector
            async with trio.open_nursery() as racers:
                racers.start_soon(claim, a, "a/x")
                racers.start_soon(claim, b, "b/x")
        winners = {owner for owner, holder in results.items() if holder == owner}
        assert len(winners) == 1, results
        assert set(results.values()) == winners  # the loser is told the winner
        assert await a.lookup(key) == winners.pop()


async def test_watch_sees_claims_and_releases_in_order(pair: tuple[Registry, Registry]) -> None:
    a, b = pair
    seen: list[Change] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(functools.partial(b.watch, "http/", seen.append))
        await a.claim("http/app.example.com", "a/1")
        await a.claim("tcp/1234", "a/1")  # outside the prefix: not seen
        await a.release("http/app.example.com", "a/1")
        await b.claim("http/app.example.com", "b/2")
        expected = [
            Change("http/app.example.com", "a/1"),
            Change("http/app.example.com", None),
            Change("http/app.example.com", "b/2"),
        ]
        await wait_until(lambda: len(seen) >= 3, what=lambda: f"seen {seen}")
        nursery.cancel_scope.cancel()
    assert seen == expected


async def test_nodes_lists_every_member(pair: tuple[Registry, Registry]) -> None:
    a, b = pair
    nodes = await a.nodes()
    assert nodes[a.node_id] == "127.0.0.1:7000"
    assert nodes[b.node_id] in ("127.0.0.1:7000", "127.0.0.1:7001")
    assert await b.nodes() == nodes


async def test_the_local_registry_is_always_available_and_never_loses() -> None:
    registry = LocalRegistry()
    lost: list[tuple[str, str]] = []
    registry.on_lost(lambda key, owner: lost.append((key, owner)))
    assert registry.available
    assert await registry.claim("clients/x", "local/1") == "local/1"
    assert await registry.nodes() == {"local": ""}
    assert await registry.entries() == {"clients/x": "local/1", "nodes/local": ""}
    assert await registry.entries("clients/") == {"clients/x": "local/1"}
    assert lost == []


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("etcd://127.0.0.1:2379", (("http://127.0.0.1:2379",), "/pytunnel/")),
        ("etcd://etcd.internal", (("http://etcd.internal:2379",), "/pytunnel/")),
        ("etcd://[::1]:23790/edge/eu/", (("http://[::1]:23790",), "/edge/eu/")),
        (
            "etcd://10.0.0.1:2379,10.0.0.2,[::1]:3/x",
            (("http://10.0.0.1:2379", "http://10.0.0.2:2379", "http://[::1]:3"), "/x/"),
        ),
    ],
)
def test_cluster_urls(url: str, expected: tuple[tuple[str, ...], str]) -> None:
    assert parse_etcd_url(url) == expected


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379",
        "etcd://",
        "etcd://h:notaport",
        "etcd://h:1?x=1",
        "h:1",
        "etcd://h:1,,h:2",
        "etcd://user:pw@h:1",
    ],
)
def test_bad_cluster_urls_are_one_clear_error(url: str) -> None:
    with pytest.raises(ValueError, match="etcd://HOST:PORT"):
        parse_etcd_url(url)


@pytest.mark.parametrize("node_id", ["", "a/b", "line\nbreak"])
def test_bad_node_ids_are_refused(node_id: str) -> None:
    with pytest.raises(ValueError, match="node id"):
        EtcdRegistry("http://127.0.0.1:1", node_id)
