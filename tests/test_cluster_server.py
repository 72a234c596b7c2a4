"""Servers as nodes of one cluster (``serve(cluster=...)``) on a real etcd: ports and names
owned cluster-wide, client takeover across nodes, engine loss and return.

Each node's public host is its own loopback address (127.0.0.1, 127.0.0.2), so two nodes
could both bind a port: only the cluster's claim can refuse the second one.
"""

from __future__ import annotations

import functools
import socket

import pytest
import trio
import trio.testing
from helpers import (
    TOKEN,
    EtcdServer,
    LinkProxy,
    closed_port,
    needs_etcd,
    send_and_read_all,
    start_link_proxy,
    wait_until,
)

import pytunnel
from pytunnel.cluster import EtcdRegistry
from pytunnel.errors import ClusterUnavailableError, ErrorCode

pytestmark = needs_etcd

FAST = {"backoff_initial": 0.2, "backoff_jitter": 0.0}


async def _node(
    nursery: trio.Nursery, etcd: EtcdServer, name: str, public_host: str, **options: object
) -> pytunnel.TunnelServer:
    registry = EtcdRegistry(etcd.endpoint, name, lease_ttl=3, request_timeout=1.0)
    server: pytunnel.TunnelServer = await nursery.start(
        functools.partial(
            pytunnel.serve,
            0,
            token=TOKEN,
            public_host=public_host,
            cluster=registry,
            **options,  # type: ignore[arg-type]
        )
    )
    return server


async def _echo(address: tuple[str, int], payload: bytes = b"ping") -> bytes:
    return await send_and_read_all(address, payload)


async def test_two_clients_on_two_nodes_racing_for_a_port_one_wins(
    nursery: trio.Nursery, etcd: EtcdServer, echo_port: int
) -> None:
    a = await _node(nursery, etcd, "a", "127.0.0.1")
    b = await _node(nursery, etcd, "b", "127.0.0.2")
    ta = await pytunnel.connect_tunnel(nursery, a.address, token=TOKEN)
    tb = await pytunnel.connect_tunnel(nursery, b.address, token=TOKEN)
    for round_ in range(10):
        port = _free_port_on_both()
        outcomes: dict[str, object] = {}

        async def forward(
            name: str, tunnel: pytunnel.Tunnel, port: int = port, out: dict[str, object] = outcomes
        ) -> None:
            try:
                out[name] = await tunnel.forward_remote("127.0.0.1", echo_port, remote_port=port)
            except pytunnel.ForwardError as exc:
                out[name] = exc

        with trio.fail_after(20):  # a hang detector
            async with trio.open_nursery() as racers:
                racers.start_soon(forward, "a", ta)
                racers.start_soon(forward, "b", tb)
        errors = [o for o in outcomes.values() if isinstance(o, Exception)]
        winners = [(k, o) for k, o in outcomes.items() if not isinstance(o, Exception)]
        assert len(winners) == 1, (round_, outcomes)
        assert len(errors) == 1
        error = errors[0]
        assert isinstance(error, pytunnel.AddressInUseError)
        assert error.code == ErrorCode.ADDRESS_IN_USE
        assert "held by another client of the cluster" in error.message
        name, remote = winners[0]
        host = "127.0.0.1" if name == "a" else "127.0.0.2"
        assert await _echo((host, port)) == b"ping"
        # released when the forward ends: the other node's client gets it now
        assert isinstance(remote, pytunnel.RemoteForward)
        await remote.aclose()
        await _until_released(a, f"tcp/{port}")
        loser = tb if name == "a" else ta
        again = await loser.forward_remote("127.0.0.1", echo_port, remote_port=port)
        await again.aclose()


async def test_port_0_gets_a_port_nobody_holds_in_the_cluster(
    nursery: trio.Nursery, etcd: EtcdServer, echo_port: int
) -> None:
    """Port 0 in an allowed range: a port another node's client holds is bound here (it is
    free on this host) but not claimed, so another one is taken; with every port of the
    range held elsewhere the forward is refused."""
    taken, free = _free_port_on_both(), _free_port_on_both()
    allowed = f"{taken},{free}"
    a = await _node(nursery, etcd, "a", "127.0.0.1", allow_ports=allowed)
    b = await _node(nursery, etcd, "b", "127.0.0.2", allow_ports=allowed)
    ta = await pytunnel.connect_tunnel(nursery, a.address, token=TOKEN)
    tb = await pytunnel.connect_tunnel(nursery, b.address, token=TOKEN)
    await ta.forward_remote("127.0.0.1", echo_port, remote_port=taken)
    for _ in range(5):  # the range is sampled at random: either order of the two
        chosen = await tb.forward_remote("127.0.0.1", echo_port)
        assert chosen.listen_port == free
        assert await _echo(("127.0.0.2", free)) == b"ping"
        await chosen.aclose()
        await _until_released(b, f"tcp/{free}")
    await ta.forward_remote("127.0.0.1", echo_port, remote_port=free)
    with pytest.raises(pytunnel.AddressInUseError, match="no port free across the cluster"):
        await tb.forward_remote("127.0.0.1", echo_port)
    # and without a range, port 0 is the kernel's choice, claimed as it is
    c = await _node(nursery, etcd, "c", "127.0.0.2")
    tc = await pytunnel.connect_tunnel(nursery, c.address, token=TOKEN)
    anywhere = await tc.forward_remote("127.0.0.1", echo_port)
    assert c.cluster is not None
    assert (await c.cluster.lookup(f"tcp/{anywhere.listen_port}") or "").startswith("c/")


async def test_a_udp_port_belongs_to_one_client_across_nodes(
    nursery: trio.Nursery, etcd: EtcdServer
) -> None:
    a = await _node(nursery, etcd, "a", "127.0.0.1")
    b = await _node(nursery, etcd, "b", "127.0.0.2")
    ta = await pytunnel.connect_tunnel(nursery, a.address, token=TOKEN)
    tb = await pytunnel.connect_tunnel(nursery, b.address, token=TOKEN)
    port = _free_port_on_both(socket.SOCK_DGRAM)
    held = await ta.forward_remote("127.0.0.1", 9, remote_port=port, protocol="udp")
    with pytest.raises(pytunnel.AddressInUseError, match=rf"udp port {port} is held .*\(node a\)"):
        await tb.forward_remote("127.0.0.1", 9, remote_port=port, protocol="udp")
    # a TCP port of the same number is another address
    tcp = await tb.forward_remote("127.0.0.1", 9, remote_port=port)
    await tcp.aclose()
    await held.aclose()
    await _until_released(a, f"udp/{port}")
    moved = await tb.forward_remote("127.0.0.1", 9, remote_port=port, protocol="udp")
    assert moved.listen_port == port


async def test_a_load_balanced_group_spans_nodes(
    nursery: trio.Nursery, etcd: EtcdServer, echo_port: int
) -> None:
    """Members of one group on node A form it together (racing to form it: one forms, the
    other joins) and a member on node B joins it; the port is the group's across the
    cluster, so neither a plain forward nor a member of another group gets it on either
    node, until the group's last member anywhere leaves. Without a cluster secret each node
    serves its own members."""
    a = await _node(nursery, etcd, "a", "127.0.0.1")
    b = await _node(nursery, etcd, "b", "127.0.0.2")
    first = await pytunnel.connect_tunnel(nursery, a.address, token=TOKEN)
    second = await pytunnel.connect_tunnel(nursery, a.address, token=TOKEN)
    elsewhere = await pytunnel.connect_tunnel(nursery, b.address, token=TOKEN)
    port = _free_port_on_both()
    members: list[pytunnel.RemoteForward] = []

    async def join(tunnel: pytunnel.Tunnel) -> None:
        members.append(
            await tunnel.forward_remote(
                "127.0.0.1", echo_port, remote_port=port, group="web", group_key="k"
            )
        )

    with trio.fail_after(20):  # a hang detector
        async with trio.open_nursery() as racers:
            racers.start_soon(join, first)
            racers.start_soon(join, second)
    assert len(members) == 2
    assert len(a.groups) == 1
    assert await _echo(("127.0.0.1", port)) == b"ping"
    for kwargs in ({}, {"group": "web", "group_key": "other"}, {"group": "api", "group_key": "k"}):
        # on a node with no member of the group: the cluster's refusal
        with pytest.raises(pytunnel.AddressInUseError, match="load-balanced group") as info:
            await elsewhere.forward_remote("127.0.0.1", echo_port, remote_port=port, **kwargs)
        assert info.value.code == ErrorCode.ADDRESS_IN_USE
        if kwargs:
            assert "another group name, or another group secret" in info.value.message
        else:
            assert "only its members can serve it" in info.value.message
    await join(elsewhere)
    on_b = members.pop()
    assert len(b.groups) == 1
    assert await _echo(("127.0.0.2", port)) == b"ping"
    # on a node of the group: refused by the group there, as on a server of its own
    with pytest.raises(pytunnel.GroupMismatchError):
        await first.forward_remote(
            "127.0.0.1", echo_port, remote_port=port, group="web", group_key="other"
        )
    for member in members:
        await member.aclose()
    assert a.cluster is not None
    assert await a.cluster.lookup(f"tcp/{port}") is not None  # B's member holds it
    with pytest.raises(pytunnel.AddressInUseError):
        await first.forward_remote("127.0.0.1", echo_port, remote_port=port)
    await on_b.aclose()
    await _until_released(a, f"tcp/{port}")
    moved = await first.forward_remote("127.0.0.1", echo_port, remote_port=port)
    assert await _echo(("127.0.0.1", port)) == b"ping"
    await moved.aclose()


async def test_a_name_belongs_to_one_client_across_nodes(
    nursery: trio.Nursery, etcd: EtcdServer, echo_port: int
) -> None:
    http = ("127.0.0.1", 0)
    a = await _node(nursery, etcd, "a", "127.0.0.1", http_listen=http, domain="example.test")
    b = await _node(nursery, etcd, "b", "127.0.0.2", http_listen=http, domain="example.test")
    ta = await pytunnel.connect_tunnel(nursery, a.address, token=TOKEN)
    tb = await pytunnel.connect_tunnel(nursery, b.address, token=TOKEN)
    route = await ta.forward_name("app", "127.0.0.1", echo_port)
    with pytest.raises(pytunnel.NameInUseError, match="node a") as info:
        await tb.forward_name("app", "127.0.0.1", echo_port)
    assert info.value.code == ErrorCode.NAME_IN_USE
    registry = b.cluster
    assert registry is not None
    assert await registry.lookup("http/app.example.test") is not None
    await route.aclose()
    await _until_released(b, "http/app.example.test")
    moved = await tb.forward_name("app", "127.0.0.1", echo_port)
    assert moved.status is pytunnel.ForwardStatus.ACTIVE


async def test_a_client_reconnecting_to_another_node_replaces_its_ghost_at_once(
    nursery: trio.Nursery, etcd: EtcdServer, echo_port: int
) -> None:
    """The client's side of its link to node A dies (A still sees a healthy, quiet session);
    it reconnects to node B with the same identity: A is told through the engine and drops
    the ghost (and its port) long before its heartbeat would, and B serves the forward."""
    a = await _node(nursery, etcd, "a", "127.0.0.1")
    b = await _node(nursery, etcd, "b", "127.0.0.2")
    proxy, listening = await start_link_proxy(nursery, a.address)
    tunnel = await pytunnel.connect_tunnel(nursery, [proxy.address, b.address], token=TOKEN, **FAST)
    port = _free_port_on_both()
    remote = await tunnel.forward_remote("127.0.0.1", echo_port, remote_port=port)
    assert await _echo(("127.0.0.1", port)) == b"ping"
    try:
        reset_at = trio.current_time()
        proxy.reset_client_side()
        listening.cancel()  # node A's address refuses from now on: the client reaches B
        await wait_until(lambda: b.session_count == 1, seconds=20)
        await wait_until(lambda: a.session_count == 0, seconds=20, what="the ghost stayed on A")
        dropped = trio.current_time() - reset_at
        assert proxy.ghosts  # ... although its connection to A is still open
        with trio.fail_after(20):
            status = await remote.wait_status(
                pytunnel.ForwardStatus.ACTIVE, pytunnel.ForwardStatus.ERROR
            )
        assert status is pytunnel.ForwardStatus.ACTIVE, remote.reason
        assert await _echo(("127.0.0.2", port)) == b"ping"
        moved = trio.current_time() - reset_at
        print(f"ghost dropped on A after {dropped:.2f} s, port served by B after {moved:.2f} s")
    finally:
        await tunnel.aclose()
        proxy.close()


async def test_engine_loss_keeps_relays_refuses_new_ports_and_recovers(
    nursery: trio.Nursery, etcd: EtcdServer, echo_port: int
) -> None:
    a = await _node(
        nursery, etcd, "a", "127.0.0.1", http_listen=("127.0.0.1", 0), domain="example.test"
    )
    tunnel = await pytunnel.connect_tunnel(nursery, a.address, token=TOKEN)
    live = await tunnel.forward_remote("127.0.0.1", echo_port, remote_port=_free_port_on_both())
    public = ("127.0.0.1", live.listen_port)
    assert await _echo(public) == b"ping"

    await etcd.kill()
    assert await _echo(public, b"still") == b"still"
    with trio.fail_after(20):
        with pytest.raises(ClusterUnavailableError) as info:
            await tunnel.forward_remote("127.0.0.1", echo_port, remote_port=_free_port_on_both())
        with pytest.raises(ClusterUnavailableError):
            await tunnel.forward_name("app", "127.0.0.1", echo_port)
        with pytest.raises(ClusterUnavailableError):
            await tunnel.forward_remote("127.0.0.1", 9, protocol="udp")
    assert info.value.code == ErrorCode.CLUSTER_UNAVAILABLE
    assert a.http_routes is not None
    assert a.http_routes.lookup("app.example.test") is None  # the refused route left nothing
    assert await _echo(public, b"after") == b"after"

    await etcd.start()
    registry = a.cluster
    assert registry is not None
    await wait_until(lambda: registry.available, seconds=20)
    with trio.fail_after(20):
        fresh = await tunnel.forward_remote(
            "127.0.0.1", echo_port, remote_port=_free_port_on_both()
        )
    assert await _echo(("127.0.0.1", fresh.listen_port)) == b"ping"
    assert await _echo(public) == b"ping"
    named = await tunnel.forward_name("app", "127.0.0.1", echo_port)
    assert named.status is pytunnel.ForwardStatus.ACTIVE


@pytest.mark.slow
async def test_a_forward_restored_while_the_engine_is_away_retries_until_it_is_back(
    nursery: trio.Nursery, etcd: EtcdServer, echo_port: int
) -> None:
    """The client reconnects while its node cannot reach the engine: restoring its port and
    its name meets CLUSTER_UNAVAILABLE, which passes, so both stay suspended and retry with
    the reconnect backoff, and are served again once the engine is back."""
    a = await _node(
        nursery, etcd, "a", "127.0.0.1", http_listen=("127.0.0.1", 0), domain="example.test"
    )
    proxy = LinkProxy(a.address)
    await proxy.start(nursery)
    tunnel = await pytunnel.connect_tunnel(
        nursery, proxy.address, token=TOKEN, backoff_max=0.5, **FAST
    )
    port = _free_port_on_both()
    remote = await tunnel.forward_remote("127.0.0.1", echo_port, remote_port=port)
    named = await tunnel.forward_name("app", "127.0.0.1", echo_port)
    try:
        await etcd.kill()
        proxy.cut()  # the client reconnects to a node that cannot claim anything now
        await wait_until(lambda: tunnel.reconnects >= 1, seconds=20)
        for forward in (remote, named):
            await wait_until(
                lambda f=forward: "CLUSTER_UNAVAILABLE" in (f.reason or ""),
                seconds=20,
                what=lambda f=forward: str(f.reason),
            )
            assert forward.status is pytunnel.ForwardStatus.SUSPENDED, forward.reason
            assert "retrying in" in (forward.reason or "")
        await trio.sleep(1.5)  # several retries refused: still suspended, not failed
        assert remote.status is pytunnel.ForwardStatus.SUSPENDED, remote.reason
        assert named.status is pytunnel.ForwardStatus.SUSPENDED, named.reason

        await etcd.start()
        with trio.fail_after(30):
            for forward in (remote, named):
                status = await forward.wait_status(
                    pytunnel.ForwardStatus.ACTIVE, pytunnel.ForwardStatus.ERROR
                )
                assert status is pytunnel.ForwardStatus.ACTIVE, forward.reason
        assert remote.listen_port == port
        assert await _echo(("127.0.0.1", port)) == b"ping"
        assert a.http_routes is not None
        assert a.http_routes.lookup("app.example.test") is not None
    finally:
        await tunnel.aclose()
        proxy.close()


async def test_a_node_partitioned_from_the_engine_but_not_from_its_clients(
    nursery: trio.Nursery, etcd: EtcdServer, echo_port: int
) -> None:
    """Node A loses the engine (its link to etcd is cut) but keeps its clients: it refuses
    new registrations and keeps relaying; once its lease has expired node B may give the
    port to another client; when A's link comes back, A finds the port lost and drops its
    client, which reconnects and is told the truth (the port is taken)."""
    link = LinkProxy(("127.0.0.1", etcd.client_port))
    await link.start(nursery)
    registry = EtcdRegistry(f"http://127.0.0.1:{link.port}", "a", lease_ttl=3, request_timeout=1.0)
    a: pytunnel.TunnelServer = await nursery.start(
        functools.partial(pytunnel.serve, 0, token=TOKEN, public_host="127.0.0.1", cluster=registry)
    )
    b = await _node(nursery, etcd, "b", "127.0.0.2")
    ta = await pytunnel.connect_tunnel(nursery, a.address, token=TOKEN, **FAST)
    tb = await pytunnel.connect_tunnel(nursery, b.address, token=TOKEN)
    port = _free_port_on_both()
    held = await ta.forward_remote("127.0.0.1", echo_port, remote_port=port)

    link.refusing = True
    link.cut()
    with trio.fail_after(20), pytest.raises(ClusterUnavailableError):
        await ta.forward_remote("127.0.0.1", echo_port, remote_port=_free_port_on_both())
    assert await _echo(("127.0.0.1", port), b"still here") == b"still here"
    await wait_until(lambda: not registry.available, seconds=20)
    with trio.fail_after(30):  # A's lease expires in etcd: B's client may have the port
        while True:
            try:
                taken = await tb.forward_remote("127.0.0.1", echo_port, remote_port=port)
                break
            except pytunnel.AddressInUseError:
                await trio.sleep(0.2)
    assert await _echo(("127.0.0.2", port)) == b"ping"

    sessions_before = a.session_count
    link.refusing = False  # healed: A joins again and learns it lost the port
    await wait_until(lambda: registry.available, seconds=20)
    lost = "held by another client of the cluster (node b)"
    await wait_until(lambda: ta.reconnects >= 1, seconds=20)
    await wait_until(lambda: lost in (held.reason or ""), seconds=20, what=lambda: held.reason)
    assert held.status is pytunnel.ForwardStatus.SUSPENDED  # and retrying, as on one server
    assert sessions_before == 1
    assert taken.status is pytunnel.ForwardStatus.ACTIVE


async def test_a_node_closing_with_clients_frees_everything_in_the_engine(
    etcd: EtcdServer, echo_port: int
) -> None:
    """Closing a node while its clients hold ports, names and identities ends cleanly
    (whichever of the releases and the lease's revocation comes first) and leaves nothing
    in the engine."""
    watcher = EtcdRegistry(etcd.endpoint, "watcher")
    async with trio.open_nursery() as nursery:
        await nursery.start(watcher.run)
        for _ in range(3):
            registry = EtcdRegistry(etcd.endpoint, "a", lease_ttl=60)
            async with (
                pytunnel.open_server(
                    token=TOKEN, cluster=registry, http_listen=("127.0.0.1", 0), domain="t.test"
                ) as server,
                trio.open_nursery() as clients,
            ):
                tunnel = await pytunnel.connect_tunnel(
                    clients, server.address, token=TOKEN, client_id="laptop"
                )
                await tunnel.forward_remote("127.0.0.1", echo_port)
                await tunnel.forward_name("app", "127.0.0.1", echo_port)
                assert await watcher.lookup("clients/laptop") is not None
                await server.aclose()  # the node goes first, its clients still there
                clients.cancel_scope.cancel()
            assert await watcher.lookup("clients/laptop") is None
            assert await watcher.lookup("http/app.t.test") is None
            assert list(await watcher.nodes()) == ["watcher"]
        nursery.cancel_scope.cancel()


async def test_a_node_that_cannot_reach_its_engine_does_not_start(nursery: trio.Nursery) -> None:
    registry = EtcdRegistry(f"http://127.0.0.1:{closed_port()}", "a")
    with trio.fail_after(20), pytest.raises(ClusterUnavailableError, match="unreachable"):
        await nursery.start(functools.partial(pytunnel.serve, 0, token=TOKEN, cluster=registry))


async def _until_released(node: pytunnel.TunnelServer, key: str) -> None:
    """Wait until nobody holds ``key``: the server gives it back once the forward has ended,
    after the client's ``aclose`` returned."""
    assert node.cluster is not None
    with trio.fail_after(20):  # a hang detector
        while await node.cluster.lookup(key) is not None:
            await trio.sleep(0.05)


def _free_port_on_both(kind: int = socket.SOCK_STREAM) -> int:
    """A port free on 127.0.0.1 and 127.0.0.2 alike (TCP, or UDP with ``SOCK_DGRAM``)."""
    while True:
        with socket.socket(type=kind) as one:
            one.bind(("127.0.0.1", 0))
            port = int(one.getsockname()[1])
            with socket.socket(type=kind) as two:
                try:
                    two.bind(("127.0.0.2", port))
                except OSError:
                    continue
                return port


async def test_a_server_over_a_stream_joins_the_cluster_as_serve_does(
    etcd: EtcdServer, echo_port: int
) -> None:
    """``wrap_server_stream`` with a cluster: joined before the session is served, its
    client's identity and port claimed cluster-wide (refused to a client of another node),
    everything given back when it closes."""
    watcher = EtcdRegistry(etcd.endpoint, "watcher")
    async with trio.open_nursery() as nursery:
        await nursery.start(watcher.run)
        other = await _node(nursery, etcd, "other", "127.0.0.2")
        a, b = trio.testing.memory_stream_pair()
        registry = EtcdRegistry(etcd.endpoint, "wrapped", lease_ttl=60)
        server = await pytunnel.wrap_server_stream(
            nursery, b, token=TOKEN, cluster=registry, public_host="127.0.0.1"
        )
        assert "wrapped" in await watcher.nodes()
        tunnel = await pytunnel.wrap_tunnel(nursery, a, token=TOKEN, client_id="laptop")
        forward = await tunnel.forward_remote("127.0.0.1", echo_port)
        port = forward.address[1]
        assert await _echo(forward.address) == b"ping"
        assert (await watcher.lookup("clients/laptop") or "").startswith("wrapped/")
        assert (await watcher.lookup(f"tcp/{port}") or "").startswith("wrapped/")
        rival = await pytunnel.connect_tunnel(nursery, other.address, token=TOKEN)
        with pytest.raises(pytunnel.ForwardError) as info:
            await rival.forward_remote("127.0.0.1", echo_port, remote_port=port)
        assert info.value.code == ErrorCode.ADDRESS_IN_USE
        with trio.fail_after(20):
            await server.aclose()
        assert await watcher.lookup(f"tcp/{port}") is None
        assert await watcher.lookup("clients/laptop") is None
        assert "wrapped" not in await watcher.nodes()
        nursery.cancel_scope.cancel()


async def test_a_server_over_a_stream_that_cannot_reach_its_engine_raises_at_once(
    nursery: trio.Nursery,
) -> None:
    _a, b = trio.testing.memory_stream_pair()
    registry = EtcdRegistry(f"http://127.0.0.1:{closed_port()}", "a")
    with trio.fail_after(20), pytest.raises(ClusterUnavailableError, match="unreachable"):
        await pytunnel.wrap_server_stream(nursery, b, token=TOKEN, cluster=registry)
