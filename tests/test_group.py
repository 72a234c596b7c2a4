"""Load-balanced groups (``forwards/_group.py``): several real clients serving one public port
or one name, round robin across the live members, a member that leaves or goes offline
skipped at once, the port or name given back when the last one leaves."""

from __future__ import annotations

import contextlib
import functools
import shutil
from collections.abc import AsyncIterator

import pytest
import trio
from helpers import TOKEN, closed_port, count_fds, port_is_free, wait_until

import pytunnel
from pytunnel._control import ControlChannel
from pytunnel.protocol import routes
from pytunnel.protocol.control import ControlRole
from pytunnel.protocol.messages import Join, group_proof

KEY = "group secret"
CURL = shutil.which("curl")


async def named_echo(nursery: trio.Nursery, name: str) -> int:
    """A target that answers each connection with its name, then echoes."""

    async def handle(stream: trio.SocketStream) -> None:
        with contextlib.suppress(trio.BrokenResourceError):
            async with stream:
                await stream.send_all(name.encode() + b":")
                async for chunk in stream:
                    await stream.send_all(chunk)

    listeners = await nursery.start(functools.partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
    return int(listeners[0].socket.getsockname()[1])


async def ask(port: int, payload: bytes = b"hi") -> bytes:
    """One public connection: who answered, and the echo."""
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(payload)
            await stream.send_eof()
            out = b""
            async for chunk in stream:
                out += chunk
            return out


def free_port() -> int:
    return closed_port()


@contextlib.asynccontextmanager
async def members(
    server: pytunnel.TunnelServer, count: int, **options: object
) -> AsyncIterator[list[pytunnel.Tunnel]]:
    async with contextlib.AsyncExitStack() as stack:
        tunnels = [
            await stack.enter_async_context(
                pytunnel.open_tunnel(server.address, token=TOKEN, **options)  # type: ignore[arg-type]
            )
            for _ in range(count)
        ]
        yield tunnels


def group_of(server: pytunnel.TunnelServer, key: tuple[str, str]) -> list[str]:
    group = server.groups.get(key)
    return [] if group is None else [member.peer for member in group.members]


async def test_connections_are_spread_round_robin_across_the_members(
    nursery: trio.Nursery, tunnel_server: pytunnel.TunnelServer
) -> None:
    port = free_port()
    async with members(tunnel_server, 3) as clients:
        for index, client in enumerate(clients):
            target = await named_echo(nursery, f"m{index}")
            forward = await client.forward_remote(
                "127.0.0.1", target, remote_port=port, group="web", group_key=KEY
            )
            assert forward.address[1] == port
            assert forward.group == ("web", KEY.encode())
        answers = [await ask(port) for _ in range(30)]
        assert sorted(set(answers)) == [b"m0:hi", b"m1:hi", b"m2:hi"]
        assert all(answers.count(a) == 10 for a in set(answers))
        assert tunnel_server.groups[("tcp", str(port))].connections == 30


async def test_a_member_that_loses_its_link_is_skipped_and_the_port_stays_served(
    nursery: trio.Nursery, tunnel_server: pytunnel.TunnelServer
) -> None:
    """The first member (whose nursery runs the accept loop) is cut off mid-run: once the
    server has noticed, every connection is served by the others, on the same port."""
    port = free_port()
    async with members(tunnel_server, 3, reconnect=False) as clients:
        for index, client in enumerate(clients):
            target = await named_echo(nursery, f"m{index}")
            await client.forward_remote(
                "127.0.0.1", target, remote_port=port, group="web", group_key=KEY
            )
        assert {await ask(port) for _ in range(3)} == {b"m0:hi", b"m1:hi", b"m2:hi"}
        session = clients[0].session
        assert session is not None
        await session.abort(pytunnel.SessionClosedError("link lost"))
        key = ("tcp", str(port))
        await wait_until(lambda: len(group_of(tunnel_server, key)) == 2, 10, lambda: "no leave")
        answers = [await ask(port) for _ in range(20)]
        assert set(answers) == {b"m1:hi", b"m2:hi"}
        # the last two leave: the port is given back at once
        await clients[1].aclose()
        assert await ask(port) == b"m2:hi"
        await clients[2].aclose()
        await wait_until(lambda: key not in tunnel_server.groups, 10, lambda: "group left")
        assert port_is_free(port)


async def test_load_keeps_flowing_while_a_member_is_killed(
    nursery: trio.Nursery, tunnel_server: pytunnel.TunnelServer
) -> None:
    """Concurrent requests (bounded: 3 workers x 40) while one member's link dies: a request
    may fail only before the server noticed; none fails after."""
    port = free_port()
    failures_after: list[BaseException] = []
    noticed = trio.Event()
    async with members(tunnel_server, 3, reconnect=False) as clients:
        for index, client in enumerate(clients):
            target = await named_echo(nursery, f"m{index}")
            await client.forward_remote(
                "127.0.0.1", target, remote_port=port, group="web", group_key=KEY
            )

        async def worker() -> None:
            for _ in range(40):
                was_noticed = noticed.is_set()
                try:
                    assert (await ask(port, b"x")).endswith(b":x")
                except (OSError, AssertionError, trio.BrokenResourceError) as exc:
                    if was_noticed:
                        failures_after.append(exc)

        async def kill() -> None:
            await trio.sleep(0.05)
            session = clients[1].session
            assert session is not None
            await session.abort(pytunnel.SessionClosedError("killed"))
            await wait_until(
                lambda: len(group_of(tunnel_server, ("tcp", str(port)))) == 2, 10, lambda: "?"
            )
            noticed.set()

        async with trio.open_nursery() as load:
            for _ in range(3):
                load.start_soon(worker)
            load.start_soon(kill)
        assert noticed.is_set()
        assert failures_after == []


async def test_an_offline_member_is_skipped(
    nursery: trio.Nursery, tunnel_server: pytunnel.TunnelServer
) -> None:
    port = free_port()
    async with members(tunnel_server, 2, probe_interval=0.05, probe_failures=2) as (a, b):
        down = await a.forward_remote(
            "127.0.0.1", closed_port(), remote_port=port, group="web", group_key=KEY
        )
        await b.forward_remote(
            "127.0.0.1",
            await named_echo(nursery, "up"),
            remote_port=port,
            group="web",
            group_key=KEY,
        )
        with trio.fail_after(10):
            await down.wait_status(pytunnel.ForwardStatus.OFFLINE)
        group = tunnel_server.groups[("tcp", str(port))]
        await wait_until(lambda: not group.members[0].online, 10, lambda: "still online")
        assert [await ask(port) for _ in range(6)] == [b"up:hi"] * 6


@pytest.mark.parametrize(
    ("group", "key"), [("web", "another secret"), ("other", KEY)], ids=["key", "name"]
)
async def test_a_member_with_another_name_or_key_is_refused(
    nursery: trio.Nursery, tunnel_server: pytunnel.TunnelServer, group: str, key: str
) -> None:
    port = free_port()
    target = await named_echo(nursery, "m")
    async with members(tunnel_server, 2) as (a, b):
        await a.forward_remote("127.0.0.1", target, remote_port=port, group="web", group_key=KEY)
        with pytest.raises(pytunnel.GroupMismatchError, match="cannot join") as info:
            await b.forward_remote(
                "127.0.0.1", target, remote_port=port, group=group, group_key=key
            )
        assert info.value.code == pytunnel.ErrorCode.GROUP_MISMATCH
        assert b.forwards == []
        assert group_of(tunnel_server, ("tcp", str(port))) == [a_peer(tunnel_server)]


def a_peer(server: pytunnel.TunnelServer) -> str:
    (group,) = server.groups.values()
    return group.members[0].peer


async def test_a_group_and_a_plain_forward_never_share_a_port(
    nursery: trio.Nursery, tunnel_server: pytunnel.TunnelServer, tunnel: pytunnel.Tunnel
) -> None:
    target = await named_echo(nursery, "m")
    plain = await tunnel.forward_remote("127.0.0.1", target)
    with pytest.raises(pytunnel.AddressInUseError):
        await tunnel.forward_remote(
            "127.0.0.1", target, remote_port=plain.address[1], group="web", group_key=KEY
        )
    port = free_port()
    await tunnel.forward_remote("127.0.0.1", target, remote_port=port, group="web", group_key=KEY)
    async with pytunnel.open_tunnel(tunnel_server.address, token=TOKEN) as other:
        with pytest.raises(pytunnel.AddressInUseError):
            await other.forward_remote("127.0.0.1", target, remote_port=port)


async def test_group_arguments_are_checked_where_they_are_given(tunnel: pytunnel.Tunnel) -> None:
    with pytest.raises(ValueError, match="both a group name and a group key"):
        await tunnel.forward_remote("127.0.0.1", 9, remote_port=1, group="web")
    with pytest.raises(ValueError, match="fixed remote_port"):
        await tunnel.forward_remote("127.0.0.1", 9, group="web", group_key=KEY)
    with pytest.raises(ValueError, match="TCP"):
        await tunnel.forward_remote(
            "127.0.0.1", 9, remote_port=1, protocol="udp", group="web", group_key=KEY
        )
    with pytest.raises(ValueError, match="group name"):
        await tunnel.forward_remote("127.0.0.1", 9, remote_port=1, group="w" * 65, group_key=KEY)


async def test_members_leave_nothing_behind(
    nursery: trio.Nursery, tunnel_server: pytunnel.TunnelServer
) -> None:
    port = free_port()
    target = await named_echo(nursery, "m")
    fds = count_fds()
    for _ in range(5):
        async with members(tunnel_server, 2) as clients:
            for client in clients:
                await client.forward_remote(
                    "127.0.0.1", target, remote_port=port, group="web", group_key=KEY
                )
            assert await ask(port) == b"m:hi"
        await wait_until(lambda: not tunnel_server.groups, 10, lambda: "a group is left")
    await wait_until(lambda: count_fds() <= fds, 10, lambda: f"fds {count_fds()} > {fds}")


# --------------------------------------------------------------------------- name groups


@pytest.mark.skipif(CURL is None, reason="curl is not installed (.ci/run installs it)")
async def test_a_name_is_served_by_its_group(nursery: trio.Nursery) -> None:
    async with pytunnel.open_server(
        token=TOKEN, http_listen=("127.0.0.1", 0), domain="tunnel.test"
    ) as server:
        assert server.http_address is not None
        port = server.http_address[1]
        async with members(server, 2) as (a, b):
            for index, client in enumerate((a, b)):
                target = await named_echo(nursery, f"m{index}")
                forward = await client.forward_name(
                    "app", "127.0.0.1", target, group="web", group_key=KEY
                )
                assert forward.address == ("app.tunnel.test", port)
            head = b"GET / HTTP/1.1\r\nHost: app.tunnel.test\r\n\r\n"
            answers = [await ask(port, head) for _ in range(4)]
            assert sorted(answers) == sorted([b"m0:" + head, b"m1:" + head] * 2)
            async with pytunnel.open_tunnel(server.address, token=TOKEN) as outsider:
                with pytest.raises(pytunnel.NameInUseError):
                    await outsider.forward_name("app", "127.0.0.1", 9)
                with pytest.raises(pytunnel.GroupMismatchError):
                    await outsider.forward_name(
                        "app", "127.0.0.1", 9, group="web", group_key="wrong"
                    )
            await a.aclose()
            await wait_until(
                lambda: len(group_of(server, ("http", "app.tunnel.test"))) == 1, 10, lambda: "?"
            )
            assert await ask(port, head) == b"m1:" + head
        await wait_until(lambda: not server.groups, 10, lambda: "the group is left")
        gone = await ask(port, b"GET / HTTP/1.1\r\nHost: app.tunnel.test\r\n\r\n")
        assert gone.startswith(b"HTTP/1.1 404 ")


async def test_members_that_join_at_the_same_moment_all_get_in(
    nursery: trio.Nursery, tunnel_server: pytunnel.TunnelServer
) -> None:
    """Ten rounds of three members starting at once: one forms the group, the others join it
    (never ADDRESS_IN_USE against their own group)."""
    target = await named_echo(nursery, "m")
    for _ in range(10):
        port = free_port()
        async with members(tunnel_server, 3) as clients:
            forwards: list[pytunnel.RemoteForward] = []

            async with trio.open_nursery() as starts:
                for client in clients:
                    starts.start_soon(_join_group, client, target, port, forwards)
            assert len(forwards) == 3
            assert len(group_of(tunnel_server, ("tcp", str(port)))) == 3
            assert await ask(port) == b"m:hi"
        await wait_until(lambda: not tunnel_server.groups, 10, lambda: "a group is left")


async def _join_group(
    client: pytunnel.Tunnel, target: int, port: int, forwards: list[pytunnel.RemoteForward]
) -> None:
    forwards.append(
        await client.forward_remote(
            "127.0.0.1", target, remote_port=port, group="web", group_key=KEY
        )
    )


@pytest.mark.parametrize("named", [False, True], ids=["port", "name"])
async def test_a_member_that_vanishes_right_after_join_leaves_nothing_registered(
    nursery: trio.Nursery, named: bool
) -> None:
    """Join and then gone before the server's Bound (reset, or the whole client): the group
    it formed is given back, so the real owner can have the port or name."""
    async with pytunnel.open_server(
        token=TOKEN, http_listen=("127.0.0.1", 0), domain="tunnel.test"
    ) as server:
        port = free_port()
        for _ in range(5):
            async with pytunnel.open_tunnel(server.address, token=TOKEN) as client:
                session = client.session
                assert session is not None
                route = routes.NAME_GROUP if named else routes.LISTEN_GROUP
                control = await session.open_stream(
                    "app" if named else "", 80 if named else port, tag=route
                )
                await ControlChannel(control, ControlRole.CLIENT, grouped=True).send(
                    Join("web", group_proof("web", KEY.encode()))
                )
                control.reset(pytunnel.ErrorCode.CANCELLED, "gone")
            await wait_until(lambda: not server.groups, 10, lambda: f"left: {server.groups}")
        async with pytunnel.open_tunnel(server.address, token=TOKEN) as owner:
            if named:
                await owner.forward_name("app", "127.0.0.1", 9)
            else:
                await owner.forward_remote("127.0.0.1", 9, remote_port=port)
