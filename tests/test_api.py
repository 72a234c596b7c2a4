"""The public API's shape: the three tiers on each side, options, the token given once, enums."""

from __future__ import annotations

import functools

import attrs
import pytest
import trio
import trio.testing
from helpers import TOKEN, closed_port, count_tasks, echo_once

import pytunnel


def test_client_options_name_every_client_config_field_but_the_token() -> None:
    fields = {field.name for field in attrs.fields(pytunnel.ClientConfig)}
    assert set(pytunnel.ClientOptions.__annotations__) == fields - {"token"}


def test_server_options_name_every_server_config_field_but_the_token() -> None:
    fields = {field.name for field in attrs.fields(pytunnel.ServerConfig)}
    assert set(pytunnel.ServerOptions.__annotations__) == fields - {"token"}


async def test_open_server_and_open_tunnel_carry_bytes_and_leave_no_task(echo_port: int) -> None:
    tasks = count_tasks()
    async with (
        pytunnel.open_server(token=TOKEN) as server,
        pytunnel.open_tunnel(server.address, token=TOKEN) as tunnel,
    ):
        forward = await tunnel.forward_local("127.0.0.1", echo_port)
        assert await echo_once(forward.address, b"tiers") == b"tiers"
        assert server.session_count == 1
    assert tunnel.closed
    assert count_tasks() == tasks


async def test_the_token_may_come_from_the_config_but_not_twice(echo_port: int) -> None:
    server_config = pytunnel.ServerConfig(token=TOKEN)
    async with pytunnel.open_server(config=server_config) as server:
        client_config = pytunnel.ClientConfig(token=TOKEN, reconnect=False)
        async with pytunnel.open_tunnel(server.address, config=client_config) as tunnel:
            assert tunnel.connected
        with pytest.raises(TypeError, match="twice"):
            async with pytunnel.open_tunnel(server.address, token=TOKEN, config=client_config):
                pass  # pragma: no cover
        with pytest.raises(TypeError, match="token is needed"):
            async with pytunnel.open_tunnel(server.address):
                pass  # pragma: no cover
    with pytest.raises(TypeError, match="twice"):
        async with pytunnel.open_server(token=TOKEN, config=server_config):
            pass  # pragma: no cover


async def test_open_server_raises_a_busy_port_as_itself() -> None:
    async with pytunnel.open_server(token=TOKEN) as server:
        with pytest.raises(pytunnel.AddressInUseError):
            async with pytunnel.open_server(server.port, token=TOKEN):
                pass  # pragma: no cover


async def test_serve_started_in_a_nursery_hands_back_the_listening_server(
    nursery: trio.Nursery,
) -> None:
    server: pytunnel.TunnelServer = await nursery.start(
        functools.partial(pytunnel.serve, 0, token=TOKEN)
    )
    async with pytunnel.open_tunnel(server.address, token=TOKEN, reconnect=False) as tunnel:
        assert tunnel.connected
    await server.aclose()


async def test_wrap_server_stream_and_wrap_tunnel_over_memory_streams(
    nursery: trio.Nursery, echo_port: int
) -> None:
    a, b = trio.testing.memory_stream_pair()
    server = await pytunnel.wrap_server_stream(nursery, b, token=TOKEN, peer="memory")
    tunnel = await pytunnel.wrap_tunnel(nursery, a, token=TOKEN)
    forward = await tunnel.forward_local("127.0.0.1", echo_port)
    assert await echo_once(forward.address, b"over memory") == b"over memory"
    with pytest.raises(RuntimeError, match="no control listener"):
        server.address  # noqa: B018
    # closing a server without a listener ends the sessions it was handed
    with trio.fail_after(10):
        await server.aclose()
        await tunnel.wait_closed()
    assert server.session_count == 0
    assert isinstance(tunnel.failure, pytunnel.SessionClosedError)


async def test_unreachable_server_is_one_connect_error_naming_server_and_cause() -> None:
    port = closed_port()
    with trio.fail_after(10), pytest.raises(pytunnel.ConnectError) as info:
        async with pytunnel.open_tunnel(("127.0.0.1", port), token=TOKEN):
            pass  # pragma: no cover - the connection is refused
    assert info.value.message == (
        f"cannot reach tunnel server 127.0.0.1:{port}: Connection refused"
    )


async def test_a_closed_server_turns_away_a_stream_handed_to_it(nursery: trio.Nursery) -> None:
    _a, b = trio.testing.memory_stream_pair()
    server = await pytunnel.wrap_server_stream(nursery, b, token=TOKEN)
    await server.aclose()
    c, d = trio.testing.memory_stream_pair()
    with trio.fail_after(10):
        await server.handle_stream(d)
        with pytest.raises(pytunnel.ConnectError):
            await pytunnel.wrap_tunnel(nursery, c, token=TOKEN)


async def test_forward_kind_and_status_are_enums_that_read_as_their_phrases(
    tunnel: pytunnel.Tunnel, echo_port: int
) -> None:
    local = await tunnel.forward_local("127.0.0.1", echo_port)
    remote = await tunnel.forward_remote("127.0.0.1", echo_port)
    assert local.kind is pytunnel.ForwardKind.LOCAL
    assert remote.kind is pytunnel.ForwardKind.REMOTE
    assert remote.kind.remote
    assert not local.kind.udp
    assert not local.kind.remote
    assert str(local.kind) == f"{local.kind}" == "local forward"
    assert local.status is pytunnel.ForwardStatus.ACTIVE
    assert local.status == "active"
    assert f"{local.status}" == "active"


async def test_forward_error_is_the_exception_that_ended_it(
    nursery: trio.Nursery, echo_port: int
) -> None:
    server = await nursery.start(functools.partial(pytunnel.serve, 0, token=TOKEN))
    tunnel = await pytunnel.connect_tunnel(nursery, server.address, token=TOKEN, reconnect=False)
    local = await tunnel.forward_local("127.0.0.1", echo_port)
    assert local.error is None
    await server.aclose()
    with trio.fail_after(10):
        await tunnel.wait_closed()
        await local.wait_closed()
    assert isinstance(tunnel.failure, pytunnel.SessionClosedError)
    assert local.status is pytunnel.ForwardStatus.ERROR
    assert local.error is tunnel.failure
    assert local.reason.startswith("tunnel ended: ")
