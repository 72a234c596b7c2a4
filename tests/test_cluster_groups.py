"""Load-balanced groups across the nodes of a cluster, on a real etcd: members on any node,
public connections on any node spread over all of them, a dead node's members dropping out
with its lease, the group's port or name given back with its last member anywhere.

Each node's public host is its own loopback address (127.0.0.1, 127.0.0.2, 127.0.0.3), so
every node can listen on the group's port; the nodes share a cluster secret, so a node
reaches the members of the others over node links.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from helpers import (
    TOKEN,
    EtcdServer,
    LinkProxy,
    count_fds,
    count_tasks,
    describe_tasks,
    needs_etcd,
    send_and_read_all,
    tagged_service,
    wait_until,
)
from test_cluster_relay import SECRET
from test_cluster_relay import _node as _relay_node
from test_cluster_server import _free_port_on_both

import pytunnel
from pytunnel.cluster import Change, EtcdRegistry, is_group, parse_member_key
from pytunnel.errors import ClusterUnavailableError, ErrorCode

pytestmark = needs_etcd

PYTUNNEL = [sys.executable, "-m", "pytunnel"]
GROUP = {"group": "web", "group_key": "the group's key"}
HTTP = ("127.0.0.1", 0)


async def _ask(address: tuple[str, int], payload: bytes = b"who?") -> bytes:
    return await send_and_read_all(address, payload)


async def _served_by(address: tuple[str, int], count: int) -> Counter[bytes]:
    return Counter([await _ask(address) for _ in range(count)])


async def _members_on_a_and_b(
    nursery: trio.Nursery, a: pytunnel.TunnelServer, b: pytunnel.TunnelServer
) -> int:
    """A client on each of nodes ``a`` and ``b`` with one member of a group (answering
    ``A`` or ``B``) on a port free on both; returns the port."""
    on_a = await pytunnel.connect_tunnel(nursery, a.address, token=TOKEN)
    on_b = await pytunnel.connect_tunnel(nursery, b.address, token=TOKEN)
    port = _free_port_on_both()
    await on_a.forward_remote(
        "127.0.0.1", await tagged_service(nursery, b"A"), remote_port=port, **GROUP
    )
    await on_b.forward_remote(
        "127.0.0.1", await tagged_service(nursery, b"B"), remote_port=port, **GROUP
    )
    return port


async def _knows_members(node: pytunnel.TunnelServer, key: str, expected: dict[str, int]) -> None:
    links = node.node_links
    assert links is not None
    await wait_until(
        lambda: links.group_nodes(key) == expected,
        seconds=20,
        what=lambda: f"{node.cluster and node.cluster.node_id} sees {links.group_nodes(key)}",
    )


async def _until_served(address: tuple[str, int], payload: bytes) -> None:
    """Until a connection to ``address`` gets ``payload`` back (reset meanwhile: the node
    does not know the port's holder yet)."""
    with trio.fail_after(30):
        while True:
            try:
                if await _ask(address, payload) == payload:
                    return
            except (OSError, trio.BrokenResourceError):
                pass
            await trio.sleep(0.1)


async def _until_listening(address: tuple[str, int]) -> None:
    """Until something accepts connections at ``address``."""
    with trio.fail_after(30):
        while True:
            try:
                stream = await trio.open_tcp_stream(*address)
            except OSError:
                await trio.sleep(0.05)
                continue
            await stream.aclose()
            return


async def _until_released(node: pytunnel.TunnelServer, key: str) -> None:
    assert node.cluster is not None
    with trio.fail_after(30):  # a hang detector
        while await node.cluster.lookup(key) is not None:
            await trio.sleep(0.05)


async def test_public_connections_on_any_node_reach_the_members_on_every_node(
    nursery: trio.Nursery, etcd: EtcdServer
) -> None:
    """One member on node A, one on node B: connections to the port on A, on B, and on C
    (no member: it mirrors the port) are spread over both members, one by one; each node's
    own member is served directly, the other relayed over a node link."""
    a = await _relay_node(nursery, etcd, "a", "127.0.0.1")
    b = await _relay_node(nursery, etcd, "b", "127.0.0.2")
    c = await _relay_node(nursery, etcd, "c", "127.0.0.3")
    port = await _members_on_a_and_b(nursery, a, b)
    key = f"tcp/{port}"
    await _knows_members(a, key, {"b": 1})
    await _knows_members(b, key, {"a": 1})
    await _knows_members(c, key, {"a": 1, "b": 1})
    assert c.node_links is not None
    await wait_until(lambda: c.node_links is not None and port in c.node_links.mirrored_ports)
    for host in ("127.0.0.1", "127.0.0.2", "127.0.0.3"):
        served = await _served_by((host, port), 10)
        assert served == {b"A": 5, b"B": 5}, (host, served)
    assert a.node_links is not None
    assert b.node_links is not None
    assert a.node_links.stats.streams_out == 5  # A's share for B
    assert b.node_links.stats.streams_out == 5
    assert c.node_links.stats.streams_out == 10  # all relayed: C has no member
    assert a.node_links.stats.streams_in == 10  # B's and C's shares for A
    await wait_until(lambda: a.active_streams == b.active_streams == c.active_streams == 0)


class _Switchable:
    """A service answering ``tag`` (as :func:`_tagged`) on a fixed port that can be taken
    down (its listener closed: connections refused, so a health probe fails) and back."""

    def __init__(self, nursery: trio.Nursery, tag: bytes) -> None:
        self._nursery = nursery
        self._tag = tag
        self._scope = trio.CancelScope()
        self.port = 0

    async def up(self) -> None:
        async def answer(stream: trio.SocketStream) -> None:
            while await stream.receive_some():
                pass
            await stream.send_all(self._tag)

        self._scope = trio.CancelScope()

        async def serve(task_status: trio.TaskStatus[int]) -> None:
            with self._scope:
                listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
                task_status.started(int(listeners[0].socket.getsockname()[1]))
                await trio.serve_listeners(answer, listeners)

        self.port = await self._nursery.start(serve)

    def down(self) -> None:
        self._scope.cancel()


async def test_a_node_whose_members_are_all_offline_gets_no_turn(
    nursery: trio.Nursery, etcd: EtcdServer
) -> None:
    """B's only member's target goes down (its probes mark it offline): A learns it from
    its watch, so every connection to the port on A, and on B too, reaches A's member, none
    reset; the group keeps its key meanwhile. B's member back online, B gets its turns
    again. Each change of B's member is one engine write."""
    a = await _relay_node(nursery, etcd, "a", "127.0.0.1")
    b = await _relay_node(nursery, etcd, "b", "127.0.0.2")
    assert a.cluster is not None
    changes: list[Change] = []
    await nursery.start(functools.partial(a.cluster.watch, "groups/", changes.append))
    on_a = await pytunnel.connect_tunnel(nursery, a.address, token=TOKEN)
    on_b = await pytunnel.connect_tunnel(
        nursery, b.address, token=TOKEN, probe_interval=0.05, probe_failures=2
    )
    target = _Switchable(nursery, b"B")
    await target.up()
    port = _free_port_on_both()
    key = f"tcp/{port}"
    await on_a.forward_remote(
        "127.0.0.1", await tagged_service(nursery, b"A"), remote_port=port, **GROUP
    )
    member = await on_b.forward_remote("127.0.0.1", target.port, remote_port=port, **GROUP)
    await _knows_members(a, key, {"b": 1})
    await _knows_members(b, key, {"a": 1})
    group = await a.cluster.lookup(key)
    assert group is not None
    assert is_group(group)

    target.down()
    with trio.fail_after(20):
        await member.wait_status(pytunnel.ForwardStatus.OFFLINE)
    await _knows_members(a, key, {})
    for host in ("127.0.0.1", "127.0.0.2"):
        served = await _served_by((host, port), 6)  # a reset would raise
        assert served == {b"A": 6}, (host, served)
    assert a.node_links is not None
    assert b.node_links is not None
    assert a.node_links.stats.streams_out == 0  # none of A's went to B
    assert b.node_links.stats.streams_out == 6  # B's own, all to A's member
    assert await a.cluster.lookup(key) == group  # offline members still hold it

    await target.up()
    with trio.fail_after(20):
        await member.wait_status(pytunnel.ForwardStatus.ACTIVE)
    await _knows_members(a, key, {"b": 1})
    assert await _served_by(("127.0.0.1", port), 10) == {b"A": 5, b"B": 5}
    assert a.node_links.stats.streams_out == 5
    on_b_changes = [c.value for c in changes if (parse_member_key(c.key) or "??")[1] == "b"]
    assert on_b_changes == [group, group + " offline", group]  # one write each


async def test_a_name_groups_offline_members_get_no_turn_on_other_nodes(
    nursery: trio.Nursery, etcd: EtcdServer
) -> None:
    """The same for a name: B's member offline, every request on A and on B reaches A's
    member; back online, both again."""
    options = {"http_listen": HTTP, "domain": "example.test"}
    a = await _relay_node(nursery, etcd, "a", "127.0.0.1", **options)
    b = await _relay_node(nursery, etcd, "b", "127.0.0.2", **options)
    on_a = await pytunnel.connect_tunnel(nursery, a.address, token=TOKEN)
    on_b = await pytunnel.connect_tunnel(
        nursery, b.address, token=TOKEN, probe_interval=0.05, probe_failures=2
    )
    target = _Switchable(nursery, b"B")
    await target.up()
    await on_a.forward_name("app", "127.0.0.1", await tagged_service(nursery, b"A"), **GROUP)
    member = await on_b.forward_name("app", "127.0.0.1", target.port, **GROUP)
    key = "http/app.example.test"
    await _knows_members(a, key, {"b": 1})
    request = b"GET / HTTP/1.1\r\nHost: app.example.test\r\n\r\n"
    target.down()
    with trio.fail_after(20):
        await member.wait_status(pytunnel.ForwardStatus.OFFLINE)
    await _knows_members(a, key, {})
    for node in (a, b):
        assert node.http_address is not None
        assert Counter([await _ask(node.http_address, request) for _ in range(4)]) == {b"A": 4}
    await target.up()
    with trio.fail_after(20):
        await member.wait_status(pytunnel.ForwardStatus.ACTIVE)
    await _knows_members(a, key, {"b": 1})
    assert a.http_address is not None
    assert Counter([await _ask(a.http_address, request) for _ in range(4)]) == {b"A": 2, b"B": 2}


async def test_a_node_whose_members_went_offline_refuses_relayed_streams_and_the_sender_moves_on(
    nursery: trio.Nursery, etcd: EtcdServer
) -> None:
    """B's member is offline before A has heard of it (here: never told, as in the moment
    before the registry's watch event): B refuses A's relayed streams before accepting
    them, and A hands each to its own member instead, none reset."""
    a = await _relay_node(nursery, etcd, "a", "127.0.0.1")
    b = await _relay_node(nursery, etcd, "b", "127.0.0.2")
    port = await _members_on_a_and_b(nursery, a, b)
    key = f"tcp/{port}"
    await _knows_members(a, key, {"b": 1})
    assert await _served_by(("127.0.0.1", port), 4) == {b"A": 2, b"B": 2}
    assert b.node_links is not None
    taken = b.node_links.stats.streams_in
    (b_member,) = b.groups["tcp", str(port)].members
    b_member.online = False  # what B's client said; the registry not told
    assert await _served_by(("127.0.0.1", port), 6) == {b"A": 6}  # a reset would raise
    assert a.node_links is not None
    assert a.node_links.group_nodes(key) == {"b": 1}  # A still counts B: B refused
    assert b.node_links.stats.streams_in == taken  # refused before it was taken
    b_member.online = True
    assert set(await _served_by(("127.0.0.1", port), 4)) == {b"A", b"B"}


async def _name_group_on_two_nodes(
    nursery: trio.Nursery, etcd: EtcdServer
) -> tuple[pytunnel.TunnelServer, pytunnel.TunnelServer]:
    """Nodes A and B sharing HTTP listeners for ``example.test``, and a name group ``app``
    with one member on each (answering ``A`` and ``B``), once A knows of B's member."""
    options = {"http_listen": HTTP, "domain": "example.test"}
    a = await _relay_node(nursery, etcd, "a", "127.0.0.1", **options)
    b = await _relay_node(nursery, etcd, "b", "127.0.0.2", **options)
    on_a = await pytunnel.connect_tunnel(nursery, a.address, token=TOKEN)
    on_b = await pytunnel.connect_tunnel(nursery, b.address, token=TOKEN)
    await on_a.forward_name("app", "127.0.0.1", await tagged_service(nursery, b"A"), **GROUP)
    await on_b.forward_name("app", "127.0.0.1", await tagged_service(nursery, b"B"), **GROUP)
    await _knows_members(a, "http/app.example.test", {"b": 1})
    return a, b


async def test_a_name_relayed_to_a_node_whose_members_went_offline_goes_to_another_member(
    nursery: trio.Nursery, etcd: EtcdServer
) -> None:
    """The same for a name group's requests, whose stream carries the request head: B's
    only member is offline before A has heard of it (never told here, as in the moment
    before the watch event); B resets each request A relays before answering it, and A,
    which still holds the request, hands it to its own member: every request served, none
    answered 502 (nor reset). A request B resets that way leaves A counting B."""
    a, b = await _name_group_on_two_nodes(nursery, etcd)
    key = "http/app.example.test"
    request = b"GET / HTTP/1.1\r\nHost: app.example.test\r\n\r\n"
    assert a.http_address is not None
    assert b.http_address is not None
    assert Counter([await _ask(a.http_address, request) for _ in range(4)]) == {b"A": 2, b"B": 2}
    (b_member,) = b.groups["http", "app.example.test"].members
    b_member.online = False  # what B's client said; the registry not told
    assert a.node_links is not None
    assert b.node_links is not None
    relayed = b.node_links.stats.streams_in
    served = Counter([await _ask(a.http_address, request) for _ in range(6)])
    assert served == {b"A": 6}, served  # a 502 page or a reset would show here
    assert a.node_links.group_nodes(key) == {"b": 1}  # A still counts B: B reset them
    assert b.node_links.stats.streams_in == relayed + 3  # A's turns for B, each bounced
    # on B itself, with no other node to send it to... B's own turn goes to A's member
    assert Counter([await _ask(b.http_address, request) for _ in range(2)]) == {b"A": 2}
    b_member.online = True
    assert set(Counter([await _ask(a.http_address, request) for _ in range(4)])) == {b"A", b"B"}


async def test_a_name_group_spans_nodes(nursery: trio.Nursery, etcd: EtcdServer) -> None:
    """The same for a name on the nodes' shared HTTP listeners: a member on A and one on B;
    a request on either node goes to either member; relayed once, never back again."""
    a, b = await _name_group_on_two_nodes(nursery, etcd)
    key = "http/app.example.test"
    await _knows_members(b, key, {"a": 1})
    request = b"GET / HTTP/1.1\r\nHost: app.example.test\r\n\r\n"
    for node in (a, b):
        assert node.http_address is not None
        served = Counter([await _ask(node.http_address, request) for _ in range(6)])
        assert served == {b"A": 3, b"B": 3}, served
    assert a.node_links is not None
    assert b.node_links is not None
    assert a.node_links.stats.streams_in == b.node_links.stats.streams_in == 3


async def test_the_last_member_leaving_anywhere_frees_the_port(
    nursery: trio.Nursery, etcd: EtcdServer, echo_port: int
) -> None:
    """A's member leaves: the port stays the group's (B's member serves every connection,
    through A too, which now mirrors it); B's leaves: a plain forward gets the port, and
    both nodes serve it for that client."""
    a = await _relay_node(nursery, etcd, "a", "127.0.0.1")
    b = await _relay_node(nursery, etcd, "b", "127.0.0.2")
    on_a = await pytunnel.connect_tunnel(nursery, a.address, token=TOKEN)
    on_b = await pytunnel.connect_tunnel(nursery, b.address, token=TOKEN)
    port = _free_port_on_both()
    key = f"tcp/{port}"
    first = await on_a.forward_remote(
        "127.0.0.1", await tagged_service(nursery, b"A"), remote_port=port, **GROUP
    )
    last = await on_b.forward_remote(
        "127.0.0.1", await tagged_service(nursery, b"B"), remote_port=port, **GROUP
    )
    await _knows_members(a, key, {"b": 1})
    await first.aclose()
    await _knows_members(b, key, {})
    assert a.node_links is not None
    await wait_until(lambda: a.node_links is not None and port in a.node_links.mirrored_ports)
    assert not a.groups
    await _until_listening(("127.0.0.1", port))  # the mirror is registered before it binds
    for host in ("127.0.0.1", "127.0.0.2"):
        assert await _served_by((host, port), 4) == {b"B": 4}
    with pytest.raises(pytunnel.AddressInUseError, match="only its members can serve it"):
        await on_a.forward_remote("127.0.0.1", echo_port, remote_port=port)
    await last.aclose()
    await _until_released(a, key)
    assert b.cluster is not None
    assert await b.cluster.entries("groups/") == {}
    plain = await on_a.forward_remote("127.0.0.1", echo_port, remote_port=port)
    assert plain.listen_port == port
    assert b.node_links is not None
    await wait_until(lambda: b.node_links is not None and port in b.node_links.mirrored_ports)
    for host in ("127.0.0.1", "127.0.0.2"):
        assert await _ask((host, port), b"plain") == b"plain"


async def test_a_group_across_nodes_leaves_nothing_behind(
    nursery: trio.Nursery, etcd: EtcdServer
) -> None:
    """A group formed, served through both nodes and ended, twice: the second time every
    task and descriptor it took at both nodes is given back (the links, up from the first
    time, stay), and nothing of it is left in the engine."""
    a = await _relay_node(nursery, etcd, "a", "127.0.0.1")
    b = await _relay_node(nursery, etcd, "b", "127.0.0.2")
    on_a = await pytunnel.connect_tunnel(nursery, a.address, token=TOKEN)
    on_b = await pytunnel.connect_tunnel(nursery, b.address, token=TOKEN)
    tag_a, tag_b = await tagged_service(nursery, b"A"), await tagged_service(nursery, b"B")
    assert a.cluster is not None
    baseline: tuple[int, int] | None = None
    for _ in range(2):
        port = _free_port_on_both()
        key = f"tcp/{port}"
        first = await on_a.forward_remote("127.0.0.1", tag_a, remote_port=port, **GROUP)
        second = await on_b.forward_remote("127.0.0.1", tag_b, remote_port=port, **GROUP)
        await _knows_members(a, key, {"b": 1})
        await _knows_members(b, key, {"a": 1})
        for host in ("127.0.0.1", "127.0.0.2"):
            assert await _served_by((host, port), 4) == {b"A": 2, b"B": 2}
        await first.aclose()
        await second.aclose()
        await _until_released(a, key)
        for node in (a, b):
            links = node.node_links
            assert links is not None
            await wait_until(lambda links=links, port=port: port not in links.mirrored_ports)
        await wait_until(lambda: a.active_streams == b.active_streams == 0)
        if baseline is None:
            baseline = (count_tasks(), count_fds())
    assert baseline is not None
    tasks, fds = baseline
    await wait_until(
        lambda: count_tasks() <= tasks and count_fds() <= fds,
        seconds=20,
        what=lambda: (
            f"tasks {count_tasks()} (was {tasks}), fds {count_fds()} (was {fds}): "
            + describe_tasks()
        ),
    )
    assert await a.cluster.entries("groups/") == {}
    assert not a.groups
    assert not b.groups


async def test_members_on_a_node_no_link_reaches_lose_their_turns_not_the_connections(
    nursery: trio.Nursery, etcd: EtcdServer
) -> None:
    """B holds another cluster secret: A's links to it are refused. A connection whose turn
    is B's goes to A's member when the link attempt fails, and B's turns go to A's member
    while the link backs off: every connection is served, none reset."""
    a = await _relay_node(nursery, etcd, "a", "127.0.0.1")
    b = await _relay_node(nursery, etcd, "b", "127.0.0.2", secret="not the secret")
    port = await _members_on_a_and_b(nursery, a, b)
    key = f"tcp/{port}"
    await _knows_members(a, key, {"b": 1})
    links = a.node_links
    assert links is not None
    assert await _served_by(("127.0.0.1", port), 10) == {b"A": 10}  # a reset would raise
    assert links._backoff["b"].failures >= 1
    assert links.stats.streams_out == 0
    assert a.groups["tcp", str(port)].connections == 10  # each counted once


async def test_a_mismatched_group_is_refused_across_nodes(
    nursery: trio.Nursery, etcd: EtcdServer, echo_port: int
) -> None:
    """A member of another group (another key, another name) or a plain forward on a node
    with no member of the group: ADDRESS_IN_USE, saying why, and nothing left in the
    engine; the group and its member go on untouched."""
    a = await _relay_node(nursery, etcd, "a", "127.0.0.1")
    b = await _relay_node(nursery, etcd, "b", "127.0.0.2")
    on_a = await pytunnel.connect_tunnel(nursery, a.address, token=TOKEN)
    on_b = await pytunnel.connect_tunnel(nursery, b.address, token=TOKEN)
    port = _free_port_on_both()
    await on_a.forward_remote("127.0.0.1", echo_port, remote_port=port, **GROUP)
    assert a.cluster is not None
    before = await a.cluster.entries()
    others: list[dict[str, str]] = [
        {"group": "web", "group_key": "another key"},
        {"group": "api", "group_key": GROUP["group_key"]},
        {},
    ]
    for other in others:
        with pytest.raises(pytunnel.AddressInUseError) as info:
            await on_b.forward_remote("127.0.0.1", echo_port, remote_port=port, **other)
        assert info.value.code == ErrorCode.ADDRESS_IN_USE
        expected = (
            "is held by a load-balanced group of the cluster (another group name, or another "
            "group secret)"
            if other
            else "is held by a load-balanced group of the cluster; only its members can serve it"
        )
        assert f"port {port} {expected}" in info.value.message
    assert await a.cluster.entries() == before
    assert not b.groups
    assert await _ask(("127.0.0.1", port), b"still") == b"still"


async def test_a_member_whose_node_cannot_bind_the_port_leaves_nothing_in_the_engine(
    nursery: trio.Nursery, etcd: EtcdServer, echo_port: int
) -> None:
    """Another program holds the port on B's address: a member on B is refused (it joined
    the group in the engine first, then could not listen) and its membership is ended, so
    the group is A's members' alone; first of its group, it leaves no hold behind."""
    a = await _relay_node(nursery, etcd, "a", "127.0.0.1")
    b = await _relay_node(nursery, etcd, "b", "127.0.0.2")
    on_a = await pytunnel.connect_tunnel(nursery, a.address, token=TOKEN)
    on_b = await pytunnel.connect_tunnel(nursery, b.address, token=TOKEN)
    assert b.cluster is not None
    for first in (False, True):
        port = _free_port_on_both()
        key = f"tcp/{port}"
        squatter = socket.socket()
        squatter.bind(("127.0.0.2", port))
        squatter.listen()
        try:
            if not first:
                await on_a.forward_remote("127.0.0.1", echo_port, remote_port=port, **GROUP)
            with pytest.raises(pytunnel.AddressInUseError):
                await on_b.forward_remote("127.0.0.1", echo_port, remote_port=port, **GROUP)
        finally:
            squatter.close()
        assert not b.groups
        with trio.fail_after(20):
            while any("/b/" in k for k in await b.cluster.entries(f"groups/{key}/")):
                await trio.sleep(0.05)
        if first:
            await _until_released(b, key)
        else:
            assert await b.cluster.lookup(key) is not None
            assert await _ask(("127.0.0.1", port), b"on a") == b"on a"


async def test_first_members_racing_on_two_nodes_form_one_group(
    nursery: trio.Nursery, etcd: EtcdServer
) -> None:
    """The first two members of a group, one on each node, at once: whichever forms it, the
    other joins, every time (one hold, two members, both nodes serving both)."""
    a = await _relay_node(nursery, etcd, "a", "127.0.0.1")
    b = await _relay_node(nursery, etcd, "b", "127.0.0.2")
    on_a = await pytunnel.connect_tunnel(nursery, a.address, token=TOKEN)
    on_b = await pytunnel.connect_tunnel(nursery, b.address, token=TOKEN)
    tag_a, tag_b = await tagged_service(nursery, b"A"), await tagged_service(nursery, b"B")
    assert a.cluster is not None
    for round_ in range(5):
        port = _free_port_on_both()
        key = f"tcp/{port}"
        forwards: list[pytunnel.RemoteForward] = []

        async def join(
            tunnel: pytunnel.Tunnel,
            target: int,
            port: int = port,
            forwards: list[pytunnel.RemoteForward] = forwards,
        ) -> None:
            forwards.append(
                await tunnel.forward_remote("127.0.0.1", target, remote_port=port, **GROUP)
            )

        with trio.fail_after(30):  # a hang detector
            async with trio.open_nursery() as racers:
                racers.start_soon(join, on_a, tag_a)
                racers.start_soon(join, on_b, tag_b)
        assert len(forwards) == 2, round_
        entries = await a.cluster.entries(f"groups/{key}/")
        assert sorted(k.split("/")[-2] for k in entries) == ["a", "b"], entries
        assert len(set(entries.values())) == 1
        assert await a.cluster.lookup(key) == next(iter(entries.values()))
        await _knows_members(a, key, {"b": 1})
        await _knows_members(b, key, {"a": 1})
        for host in ("127.0.0.1", "127.0.0.2"):
            assert await _served_by((host, port), 4) == {b"A": 2, b"B": 2}
        for forward in forwards:
            await forward.aclose()
        await _until_released(a, key)


@asynccontextmanager
async def _node_process(
    etcd: EtcdServer, name: str, host: str, secret_file: Path
) -> AsyncIterator[tuple[trio.Process, tuple[str, int]]]:
    """A ``pytunnel serve`` node process and its control address; the test may kill it by
    pid, and whatever is still running at the end is killed then."""
    process = await trio.lowlevel.open_process(
        [
            *PYTUNNEL,
            "serve",
            "--listen",
            f"{host}:0",
            "--public-host",
            host,
            "--cluster",
            etcd.url,
            "--node-id",
            name,
            "--cluster-secret-file",
            str(secret_file),
            "--cluster-lease-ttl",
            "3",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTUNNEL_TOKEN": TOKEN},
    )
    try:
        assert process.stdout is not None
        pending = b""
        address: tuple[str, int] | None = None
        with trio.fail_after(30):
            while b"of the cluster at" not in pending:
                chunk = await process.stdout.receive_some()
                assert chunk, "the node process exited"
                pending += chunk
        for line in pending.decode().splitlines():
            if "listening on" in line:
                text = line.split("listening on ", 1)[1].split()[0]
                host_text, _, port_text = text.rpartition(":")
                address = (host_text, int(port_text))
        assert address is not None, pending
        yield process, address
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
        with trio.CancelScope(shield=True):
            await process.wait()


@pytest.mark.slow
async def test_a_members_node_killed_its_share_goes_to_the_survivor(
    nursery: trio.Nursery, etcd: EtcdServer, tmp_path: Path
) -> None:
    """Node B (a process) is killed with its member, under a stream of connections to A:
    the connection that finds B's link gone and cannot open another goes to A's member, and
    B is left out while its link backs off, so every connection is A's member's (only one
    relayed at the moment of the kill may be reset); once B's lease has expired its member
    is out of the group for good, and the group is A's alone."""
    secret_file = tmp_path / "cluster-secret"
    secret_file.write_text(SECRET + "\n")
    a = await _relay_node(nursery, etcd, "a", "127.0.0.1")
    async with _node_process(etcd, "b", "127.0.0.2", secret_file) as (process, b_address):
        on_a = await pytunnel.connect_tunnel(nursery, a.address, token=TOKEN)
        on_b = await pytunnel.connect_tunnel(nursery, b_address, token=TOKEN, reconnect=False)
        port = _free_port_on_both()
        key = f"tcp/{port}"
        await on_a.forward_remote(
            "127.0.0.1", await tagged_service(nursery, b"A"), remote_port=port, **GROUP
        )
        await on_b.forward_remote(
            "127.0.0.1", await tagged_service(nursery, b"B"), remote_port=port, **GROUP
        )
        await _knows_members(a, key, {"b": 1})
        assert await _served_by(("127.0.0.1", port), 4) == {b"A": 2, b"B": 2}
        assert a.cluster is not None
        killed_at = trio.current_time()
        os.kill(process.pid, signal.SIGKILL)
        links = a.node_links
        assert links is not None
        served: Counter[bytes] = Counter()
        first_reset: float | None = None
        with trio.fail_after(60):
            while any("/b/" in k for k in await a.cluster.entries(f"groups/{key}/")):
                try:
                    served[await _ask(("127.0.0.1", port))] += 1
                except trio.BrokenResourceError:
                    served[b"reset"] += 1
                    first_reset = first_reset or trio.current_time() - killed_at
        expired_after = trio.current_time() - killed_at
        assert set(served) <= {b"A", b"reset"}, served
        assert served[b"reset"] <= 1, served  # the one in flight when B died, if any
        assert "b" in links._backoff or "b" not in links.nodes  # a failed link attempt
        await _knows_members(a, key, {})
        assert await _served_by(("127.0.0.1", port), 6) == {b"A": 6}
        entries = await a.cluster.entries(f"groups/{key}/")
        assert [k.split("/")[-2] for k in entries] == ["a"]
        print(
            f"after the kill: {served[b'A']} connection(s) served by A, {served[b'reset']} "
            f"reset (the first {first_reset and round(first_reset, 2)} s after it); B's member "
            f"out of the registry {expired_after:.2f} s after it (lease TTL 3 s)"
        )


@pytest.mark.slow
async def test_a_group_whose_only_members_node_dies_is_given_back_by_another_node(
    nursery: trio.Nursery, etcd: EtcdServer, echo_port: int, tmp_path: Path
) -> None:
    """The group's only members are on node B (a process), killed: no one is left to give
    the port back, so node A, seeing B's lease expire, clears the group's hold (no claim
    needed); A stops mirroring the port, and a client of A may have it."""
    secret_file = tmp_path / "cluster-secret"
    secret_file.write_text(SECRET + "\n")
    a = await _relay_node(nursery, etcd, "a", "127.0.0.1")
    async with _node_process(etcd, "b", "127.0.0.2", secret_file) as (process, b_address):
        on_b = await pytunnel.connect_tunnel(nursery, b_address, token=TOKEN, reconnect=False)
        port = _free_port_on_both()
        key = f"tcp/{port}"
        for _ in range(2):
            await on_b.forward_remote("127.0.0.1", echo_port, remote_port=port, **GROUP)
        await _knows_members(a, key, {"b": 2})
        links = a.node_links
        assert links is not None
        await wait_until(lambda: port in links.mirrored_ports)
        assert await _ask(("127.0.0.1", port), b"via a") == b"via a"
        os.kill(process.pid, signal.SIGKILL)
        await _until_released(a, key)
        await wait_until(lambda: port not in links.mirrored_ports)
        on_a = await pytunnel.connect_tunnel(nursery, a.address, token=TOKEN)
        await on_a.forward_remote("127.0.0.1", echo_port, remote_port=port)
        assert await _ask(("127.0.0.1", port), b"a's own") == b"a's own"


@pytest.mark.slow
async def test_a_group_lost_while_the_lease_was_expired_stops_serving_here(
    nursery: trio.Nursery, etcd: EtcdServer, echo_port: int
) -> None:
    """Node A loses the engine with the group's only member: its lease expires, B clears
    the group's hold (no member left) and gives the port to a plain client. When A's link
    to the engine heals, its member cannot join again: A stops serving the group at once
    (the port is B's client's, mirrored), and drops the member's client, which reconnects
    and finds the port held (its forward suspended, retrying)."""
    link = LinkProxy(("127.0.0.1", etcd.client_port))
    await link.start(nursery)
    registry = EtcdRegistry(f"http://127.0.0.1:{link.port}", "a", lease_ttl=3, request_timeout=1.0)
    a: pytunnel.TunnelServer = await nursery.start(
        functools.partial(
            pytunnel.serve,
            0,
            host="127.0.0.1",
            token=TOKEN,
            public_host="127.0.0.1",
            cluster=registry,
            cluster_secret=SECRET,
        )
    )
    b = await _relay_node(nursery, etcd, "b", "127.0.0.2")
    member_client = await pytunnel.connect_tunnel(
        nursery, a.address, token=TOKEN, backoff_initial=0.2, backoff_jitter=0.0
    )
    on_b = await pytunnel.connect_tunnel(nursery, b.address, token=TOKEN)
    port = _free_port_on_both()
    member = await member_client.forward_remote(
        "127.0.0.1", await tagged_service(nursery, b"A"), remote_port=port, **GROUP
    )
    link.refusing = True
    link.cut()
    with trio.fail_after(20), pytest.raises(ClusterUnavailableError):
        await member_client.forward_remote(
            "127.0.0.1", echo_port, remote_port=_free_port_on_both(), **GROUP
        )
    await wait_until(lambda: not registry.available, seconds=20)
    with trio.fail_after(40):  # A's lease expires; B clears the memberless group's hold
        while True:
            try:
                taken = await on_b.forward_remote("127.0.0.1", echo_port, remote_port=port)
                break
            except pytunnel.AddressInUseError:
                await trio.sleep(0.2)
    assert await _ask(("127.0.0.1", port)) == b"A"  # A serves on, not knowing yet
    link.refusing = False
    await wait_until(lambda: not a.groups, seconds=30)
    assert a.node_links is not None
    await wait_until(lambda: a.node_links is not None and port in a.node_links.mirrored_ports)
    # B's client's, through A, once A's watch has caught up with the engine
    await _until_served(("127.0.0.1", port), b"b's")
    await wait_until(lambda: member_client.reconnects >= 1, seconds=20)
    await wait_until(
        lambda: "held by another client of the cluster (node b)" in (member.reason or ""),
        seconds=20,
        what=lambda: member.reason,
    )
    assert member.status is pytunnel.ForwardStatus.SUSPENDED
    assert taken.status is pytunnel.ForwardStatus.ACTIVE


@pytest.mark.slow
async def test_cluster_status_lists_a_group_and_its_members_under_their_nodes(
    nursery: trio.Nursery, etcd: EtcdServer, echo_port: int
) -> None:
    a = await _relay_node(nursery, etcd, "a", "127.0.0.1")
    b = await _relay_node(nursery, etcd, "b", "127.0.0.2")
    port = _free_port_on_both()
    for node in (a, b):
        tunnel = await pytunnel.connect_tunnel(nursery, node.address, token=TOKEN)
        await tunnel.forward_remote("127.0.0.1", echo_port, remote_port=port, **GROUP)
    with trio.fail_after(30):
        out = await trio.run_process(
            [
                sys.executable,
                "-m",
                "pytunnel",
                "cluster",
                "status",
                "--cluster",
                etcd.url,
                "--json",
            ],
            capture_stdout=True,
            capture_stderr=True,
        )
    view = json.loads(out.stdout)
    assert list(view["groups"]) == [f"tcp/{port}"]
    assert view["groups"][f"tcp/{port}"].startswith("@group/")
    assert view["unowned"] == {}
    for name in ("a", "b"):
        members = [k for k in view["nodes"][name]["holds"] if k.startswith("groups/")]
        assert len(members) == 1
        assert members[0].startswith(f"groups/tcp/{port}/{name}/")
