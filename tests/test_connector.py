"""Several server addresses (``transports/_connector.py``): the first that answers wins, a
dead or hanging one costs an attempt delay and not a connect timeout, and after the server in
use is lost the tunnel reconnects to another and restores its forwards there."""

from __future__ import annotations

import functools

import pytest
import trio
from helpers import TOKEN, Blackhole, closed_port, echo_handler, echo_once, wait_until

import pytunnel


async def start_server(nursery: trio.Nursery) -> pytunnel.TunnelServer:
    server: pytunnel.TunnelServer = await nursery.start(
        functools.partial(pytunnel.serve, 0, token=TOKEN)
    )
    return server


def label(server: pytunnel.TunnelServer) -> str:
    return pytunnel.format_target(*server.address)


async def test_a_refused_server_is_passed_over_for_the_next(nursery: trio.Nursery) -> None:
    server = await start_server(nursery)
    down = f"127.0.0.1:{closed_port()}"
    async with pytunnel.open_tunnel([down, label(server)], token=TOKEN) as tunnel:
        assert tunnel.server == label(server)
        assert server.session_count == 1


async def test_a_hanging_server_costs_an_attempt_delay_not_the_connect_timeout(
    nursery: trio.Nursery, blackhole: Blackhole
) -> None:
    """The first address never answers its SYN; with a 60 s connect timeout the tunnel is
    still up at once, through the second (the bound below is a hang detector)."""
    server = await start_server(nursery)
    addresses = [("127.0.0.1", blackhole.port), server.address]
    with trio.fail_after(20):
        async with pytunnel.open_tunnel(addresses, token=TOKEN, connect_timeout=60) as tunnel:
            assert tunnel.server == label(server)


async def test_when_every_server_fails_the_error_names_each(nursery: trio.Nursery) -> None:
    first, second = closed_port(), closed_port()
    with pytest.raises(pytunnel.ConnectError) as info:
        async with pytunnel.open_tunnel(
            [f"127.0.0.1:{first}", f"127.0.0.1:{second}"], token=TOKEN, reconnect=False
        ):
            pass  # pragma: no cover - never connected
    text = str(info.value)
    assert "cannot reach any of 2 tunnel servers" in text
    assert f"127.0.0.1:{first}: " in text
    assert f"127.0.0.1:{second}: " in text


async def test_the_tunnel_fails_over_to_another_server_and_restores_its_forwards(
    nursery: trio.Nursery,
) -> None:
    echo = await nursery.start(functools.partial(trio.serve_tcp, echo_handler, 0, host="127.0.0.1"))
    target = echo[0].socket.getsockname()[1]
    async with trio.open_nursery() as first_scope:
        first = await start_server(first_scope)
        second = await start_server(nursery)
        async with pytunnel.open_tunnel(
            [label(first), label(second)], token=TOKEN, backoff_initial=0.05, backoff_max=0.2
        ) as tunnel:
            assert tunnel.server == label(first)
            remote = await tunnel.forward_remote("127.0.0.1", target)
            local = await tunnel.forward_local("127.0.0.1", target)
            assert await echo_once(remote.address, b"before") == b"before"
            await first.aclose()  # the server in use goes away
            first_scope.cancel_scope.cancel()
            await wait_until(
                lambda: (
                    tunnel.server == label(second)
                    and tunnel.connected
                    and remote.status is pytunnel.ForwardStatus.ACTIVE
                ),
                15,
                lambda: f"server {tunnel.server}, forward {remote.status}: {remote.reason}",
            )
            assert second.session_count == 1
            # the remote forward is on the second server now; the local one never moved
            assert await echo_once(remote.address, b"after") == b"after"
            assert await echo_once(local.address, b"local") == b"local"
            assert tunnel.reconnects == 1


async def test_one_address_given_as_a_list_is_one_server(nursery: trio.Nursery) -> None:
    server = await start_server(nursery)
    async with pytunnel.open_tunnel([server.address], token=TOKEN) as tunnel:
        assert tunnel.server == label(server)


async def test_no_address_at_all_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="no server address"):
        async with pytunnel.open_tunnel([], token=TOKEN):
            pass  # pragma: no cover


async def test_a_server_that_accepts_but_never_answers_is_passed_over(
    nursery: trio.Nursery,
) -> None:
    """The first address takes the TCP connection and then says nothing (a balancer in front
    of a dead backend): its handshake times out and the second server is tried at once, for
    the first connection and for a reconnection alike."""

    async def silent(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    listeners = await nursery.start(functools.partial(trio.serve_tcp, silent, 0, host="127.0.0.1"))
    stalled = ("127.0.0.1", listeners[0].socket.getsockname()[1])
    server = await start_server(nursery)
    async with pytunnel.open_tunnel(
        [stalled, server.address], token=TOKEN, handshake_timeout=0.5, backoff_initial=0.05
    ) as tunnel:
        assert tunnel.server == label(server)
        session = tunnel.session
        assert session is not None
        await session.abort(pytunnel.SessionClosedError("cut"))
        await wait_until(
            lambda: tunnel.connected and tunnel.session is not session,
            15,
            lambda: f"not reconnected; server {tunnel.server}",
        )
        assert tunnel.server == label(server)
