"""Declared forwards applied to a running tunnel: added, removed, replaced, left alone; over a
real server, real sockets and a real echo service."""

from __future__ import annotations

import socket

import pytest
import trio
from helpers import echo_once

import pytunnel
from pytunnel.cli._config import ForwardTable
from pytunnel.cli._declared import Declared, DeclaredForwards, TableError, declare_table

pytestmark = pytest.mark.timeout(60)


def _local(port: int, name: str | None = None, bind_port: int = 0) -> Declared:
    return Declared(
        kind="local",
        bind_host="127.0.0.1",
        bind_port=bind_port,
        target_host="127.0.0.1",
        target_port=port,
        name=name,
    )


def _remote(port: int, name: str | None = None) -> Declared:
    return Declared(
        kind="remote",
        bind_host=None,
        bind_port=0,
        target_host="127.0.0.1",
        target_port=port,
        name=name,
    )


async def test_apply_starts_keeps_and_removes_by_name_and_spec(
    tunnel: pytunnel.Tunnel, echo_port: int
) -> None:
    forwards = DeclaredForwards(tunnel)
    summary = await forwards.apply([_local(echo_port, "a"), _remote(echo_port)])
    assert summary.startswith("2 added, 0 removed")
    before = {e.id: e.forward for e in forwards.running}
    assert [e.id for e in forwards.running] == ["f1", "f2"]

    # the same declarations again: nothing changes, not even the objects
    assert (await forwards.apply([_local(echo_port, "a"), _remote(echo_port)])).endswith(
        "2 unchanged"
    )
    assert {e.id: e.forward for e in forwards.running} == before

    # drop the unnamed one, add a named dynamic one
    dynamic = Declared(kind="dynamic", bind_host="127.0.0.1", bind_port=0, name="socks")
    summary = await forwards.apply([_local(echo_port, "a"), dynamic])
    assert summary.startswith("1 added, 1 removed, 0 changed")
    assert before["f2"].status is pytunnel.ForwardStatus.STOPPED
    assert forwards.find("a") is not None
    assert forwards.find("a").forward is before["f1"]  # type: ignore[union-attr]
    assert forwards.find("f3") is forwards.find("socks")
    payload = b"still here"
    assert await echo_once(before["f1"].address, payload) == payload


async def test_changed_named_forward_is_replaced_under_its_id(
    tunnel: pytunnel.Tunnel, echo_port: int, nursery: trio.Nursery
) -> None:
    other = await trio.open_tcp_listeners(0, host="127.0.0.1")
    other_port = other[0].socket.getsockname()[1]
    forwards = DeclaredForwards(tunnel)
    await forwards.apply([_local(echo_port, "web")])
    old = forwards.running[0].forward
    summary = await forwards.apply([_local(other_port, "web")])
    assert summary.startswith("0 added, 0 removed, 1 changed")
    (entry,) = forwards.running
    assert entry.id == "f1"
    assert entry.forward is not old
    assert old.status is pytunnel.ForwardStatus.STOPPED
    assert entry.forward.target_port == other_port
    for listener in other:
        await listener.aclose()


async def test_a_live_connection_through_an_unchanged_forward_survives_apply(
    tunnel: pytunnel.Tunnel, echo_port: int
) -> None:
    forwards = DeclaredForwards(tunnel)
    await forwards.apply([_local(echo_port, "keep"), _local(echo_port, "drop")])
    keep = forwards.find("keep")
    assert keep is not None
    stream = await trio.open_tcp_stream(*keep.forward.address)
    await stream.send_all(b"before ")
    assert await stream.receive_some() == b"before "
    await forwards.apply([_local(echo_port, "keep"), _remote(echo_port, "new")])
    await stream.send_all(b"after")
    assert await stream.receive_some() == b"after"
    assert keep.forward.stats.active_connections == 1
    await stream.aclose()


async def test_a_failed_addition_rolls_back_and_changes_nothing(
    tunnel: pytunnel.Tunnel, echo_port: int
) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    busy = taken.getsockname()[1]
    forwards = DeclaredForwards(tunnel)
    await forwards.apply([_local(echo_port, "a")])
    running = [(e.id, e.forward) for e in forwards.running]
    with pytest.raises(pytunnel.AddressInUseError):
        await forwards.apply(
            [_local(echo_port, "a"), _local(echo_port, "b"), _local(echo_port, "c", busy)]
        )
    assert [(e.id, e.forward) for e in forwards.running] == running
    assert len(tunnel.forwards) == 1  # "b" was started, then closed again
    taken.close()


async def test_the_same_forward_twice_is_refused(tunnel: pytunnel.Tunnel, echo_port: int) -> None:
    forwards = DeclaredForwards(tunnel)
    with pytest.raises(ValueError, match="declared twice"):
        await forwards.apply([_local(echo_port, "a"), _local(echo_port + 1, "a")])
    await forwards.add(_local(echo_port, "a"))
    with pytest.raises(ValueError, match="name 'a' already exists"):
        await forwards.add(_local(echo_port, "a"))
    assert len(forwards.running) == 1


async def test_an_ended_forward_is_started_again(tunnel: pytunnel.Tunnel, echo_port: int) -> None:
    forwards = DeclaredForwards(tunnel)
    await forwards.apply([_local(echo_port, "a")])
    entry = forwards.running[0]
    await entry.forward.aclose()
    summary = await forwards.apply([_local(echo_port, "a")])
    assert "1 restarted" in summary
    assert entry.forward.status is pytunnel.ForwardStatus.ACTIVE
    assert await echo_once(entry.forward.address, b"x") == b"x"


@pytest.mark.parametrize(
    ("table", "key", "message"),
    [
        (ForwardTable(), "local", "exactly one of local, remote or dynamic"),
        (ForwardTable(local="0:a:1", remote="0:a:1"), "remote", "this one has local and remote"),
        (ForwardTable(local="0:a"), "local", "port:host:hostport"),
        (ForwardTable(dynamic="x:y"), "dynamic", "not a number"),
        (ForwardTable(local="0:a:1", limit="fast"), "limit", "is not a rate"),
        (ForwardTable(local="0:a:1/udp", limit="1MB"), "limit", "TCP forwards only"),
        (ForwardTable(local="0:a:1", proxy_protocol="v1"), "proxy_protocol", "remote forward"),
        (ForwardTable(remote="0:a:1", proxy_protocol="v3"), "proxy_protocol", "'v1' or 'v2'"),
        (ForwardTable(local="0:a:1", socks_auth="u:p"), "socks_auth", "dynamic forward"),
        (ForwardTable(dynamic="0", socks_auth="nopassword"), "socks_auth", "USER:PASSWORD"),
        (ForwardTable(name="", local="0:a:1"), "name", "not empty"),
    ],
)
def test_bad_tables_name_their_key(table: ForwardTable, key: str, message: str) -> None:
    with pytest.raises(TableError, match=message) as info:
        declare_table(table)
    assert info.value.key == key


def test_tables_declare_what_the_flags_would() -> None:
    declared = declare_table(
        ForwardTable(name="w", remote="0.0.0.0:8080:web:80", limit="1MB/s", proxy_protocol="v2")
    )
    assert declared == Declared(
        kind="remote",
        bind_host="0.0.0.0",
        bind_port=8080,
        target_host="web",
        target_port=80,
        name="w",
        limit=1e6,
        proxy_protocol="v2",
    )
    assert declared.spec == "-R 0.0.0.0:8080:web:80"
    assert declare_table(ForwardTable(dynamic="1080", socks_auth="u:p:q")).socks_auth == (
        "u",
        "p:q",
    )
