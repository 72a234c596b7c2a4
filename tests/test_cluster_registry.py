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


G = "@group/" + "1" * 32
OTHER_GROUP = "@group/" + "2" * 32


async def test_a_group_holds_its_key_while_one_member_is_left_anywhere(
    pair: tuple[Registry, Registry],
) -> None:
    """Members on two nodes join one group's hold on a key; neither a client nor another
    group gets it; the first to leave leaves it held, the last gives it back."""
    a, b = pair
    seen: list[Change] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(functools.partial(b.watch, "groups/", seen.append))
        assert await a.join_group("tcp/8080", G, "a/1") == G
        assert await b.join_group("tcp/8080", G, "b/1") == G
        assert await b.claim("tcp/8080", "b/x") == G
        assert await b.join_group("tcp/8080", OTHER_GROUP, "b/2") == G
        assert await a.leave_group("tcp/8080", G, "a/1") is False
        assert await a.clear_group("tcp/8080", G) is False  # a member is left
        assert await a.lookup("tcp/8080") == G
        assert await b.leave_group("tcp/8080", G, "b/1") is True
        assert await a.lookup("tcp/8080") is None
        assert await b.leave_group("tcp/8080", G, "b/1") is False  # twice: nothing changes
        assert await b.claim("tcp/8080", "b/x") == "b/x"
        expected = [
            Change("groups/tcp/8080/a/1", G),
            Change("groups/tcp/8080/b/1", G),
            Change("groups/tcp/8080/a/1", None),
            Change("groups/tcp/8080/b/1", None),
        ]
        await wait_until(lambda: len(seen) >= 4, what=lambda: f"seen {seen}")
        nursery.cancel_scope.cancel()
    assert seen == expected
    assert await a.entries("groups/") == {}


async def test_members_racing_to_form_a_group_on_two_nodes_form_one(
    pair: tuple[Registry, Registry],
) -> None:
    a, b = pair
    for round_ in range(20):
        key = f"tcp/{9100 + round_}"
        results: dict[str, str] = {}

        async def join(
            registry: Registry, member: str, key: str = key, results: dict[str, str] = results
        ) -> None:
            results[member] = await registry.join_group(key, G, member)

        with trio.fail_after(20):  # a hang detector
            async with trio.open_nursery() as racers:
                racers.start_soon(join, a, "a/1")
                racers.start_soon(join, b, "b/1")
        assert results == {"a/1": G, "b/1": G}
        assert set(await a.entries(f"groups/{key}/")) == {
            f"groups/{key}/a/1",
            f"groups/{key}/b/1",
        }


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


async def test_a_watch_broken_again_before_its_backlog_arrives_resumes_from_it(
    nursery: trio.Nursery,
) -> None:
    """A watch opened again from revision R answers "created" with the store's current
    revision before it sends the changes since R; cut again before they arrive, the next
    watch must still start at R, not after the current revision (those changes would be
    lost, and a port would never be mirrored). No real etcd can be made to break at that
    moment, so a scripted gateway on loopback plays the three watches."""
    import base64
    import json

    import h11

    def b64(text: str) -> str:
        return base64.b64encode(text.encode()).decode()

    def created(revision: int) -> bytes:
        return json.dumps(
            {"result": {"header": {"revision": str(revision)}, "created": True}}
        ).encode()

    def put(key: str, value: str, revision: int) -> bytes:
        kv = {"key": b64("/pytunnel/" + key), "value": b64(value), "mod_revision": str(revision)}
        event = {"header": {"revision": str(revision)}, "events": [{"kv": kv}]}
        return json.dumps({"result": event}).encode()

    scripts = [
        [created(10), put("tcp/1", "a/s1", 11)],  # then cut
        [created(50)],  # resumed at 12, cut before the backlog 12..50 arrives
        [created(50), put("tcp/2", "b/s1", 12)],  # must resume at 12 again: then kept open
    ]
    asked: list[str | None] = []
    done = trio.Event()

    async def gateway(stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        body = b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some())
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
        asked.append(json.loads(body)["create_request"].get("start_revision"))
        lines = scripts[min(len(asked), len(scripts)) - 1]
        head = h11.Response(
            status_code=200,
            headers=[("content-type", "application/json"), ("connection", "close")],
        )
        await stream.send_all(conn.send(head) or b"")
        for line in lines:
            await stream.send_all(conn.send(h11.Data(data=line + b"\n")) or b"")
        if len(asked) >= len(scripts):
            await done.wait()
        await stream.aclose()

    listeners = await nursery.start(functools.partial(trio.serve_tcp, gateway, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    registry = EtcdRegistry(f"http://127.0.0.1:{port}", "n1", retry_interval=0.05)
    seen: list[Change] = []
    try:
        with trio.fail_after(20):
            await nursery.start(functools.partial(registry.watch, "tcp/", seen.append))
            await wait_until(lambda: len(seen) == 2, seconds=15, what=lambda: f"{seen} {asked}")
        assert asked == [None, "12", "12"]
        assert seen == [Change("tcp/1", "a/s1"), Change("tcp/2", "b/s1")]
    finally:
        done.set()
        await registry.aclose()


async def test_an_offline_member_holds_the_key_and_leaves_from_either_state(
    pair: tuple[Registry, Registry],
) -> None:
    """A member's key says whether it is online (one change each time it flips); an
    offline member still holds the group's key; it leaves from either state; a member that
    left is not written back."""
    a, b = pair
    seen: list[Change] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(functools.partial(b.watch, "groups/", seen.append))
        assert await a.join_group("tcp/8080", G, "a/1") == G
        assert await b.join_group("tcp/8080", G, "b/1") == G
        assert await a.set_member_online("tcp/8080", G, "a/1", False) is True
        assert await b.set_member_online("tcp/8080", G, "b/1", False) is True
        assert await a.claim("tcp/8080", "a/x") == G  # offline members still hold it
        assert await a.clear_group("tcp/8080", G) is False
        assert await b.set_member_online("tcp/8080", G, "b/1", True) is True
        assert await a.leave_group("tcp/8080", G, "a/1") is False  # offline
        assert await a.set_member_online("tcp/8080", G, "a/1", True) is False  # left
        assert await b.leave_group("tcp/8080", G, "b/1") is True  # online, the last
        assert await a.lookup("tcp/8080") is None
        assert await a.entries("groups/") == {}
        expected = [
            Change("groups/tcp/8080/a/1", G),
            Change("groups/tcp/8080/b/1", G),
            Change("groups/tcp/8080/a/1", G + " offline"),
            Change("groups/tcp/8080/b/1", G + " offline"),
            Change("groups/tcp/8080/b/1", G),
            Change("groups/tcp/8080/a/1", None),
            Change("groups/tcp/8080/b/1", None),
        ]
        await wait_until(lambda: len(seen) >= len(expected), what=lambda: f"seen {seen}")
        nursery.cancel_scope.cancel()
    assert seen == expected
