"""``TunnelServer.reconfigure`` (a reload) and the server's read-only views (``clients``, the
counters the metrics and the admin API read), over real loopback connections."""

from __future__ import annotations

import functools

import attrs
import pytest
import trio
from helpers import TOKEN, echo_once, wait_until

import pytunnel

pytestmark = pytest.mark.timeout(60)


async def test_new_policy_applies_to_new_clients_only(
    nursery: trio.Nursery, echo_port: int
) -> None:
    server: pytunnel.TunnelServer = await nursery.start(
        functools.partial(pytunnel.serve, 0, token=TOKEN)
    )
    before = await pytunnel.connect_tunnel(nursery, server.address, token=TOKEN)
    server.reconfigure(
        attrs.evolve(server.config, permit_open=pytunnel.PermitOpen.parse(["nothing:1"]))
    )
    assert server.config.permit_open.allows("nothing", 1)
    # the client admitted before keeps the terms it was admitted under
    stream = await before.open_stream("127.0.0.1", echo_port)
    await stream.send_all(b"old terms")
    assert await stream.receive_some() == b"old terms"
    await stream.aclose()
    # a client admitted after gets the new ones
    after = await pytunnel.connect_tunnel(nursery, server.address, token=TOKEN)
    with pytest.raises(pytunnel.TargetForbiddenError):
        await after.open_stream("127.0.0.1", echo_port)


async def test_a_new_token_and_auth_limits_apply_to_the_next_handshake(
    nursery: trio.Nursery,
) -> None:
    server: pytunnel.TunnelServer = await nursery.start(
        functools.partial(pytunnel.serve, 0, token=TOKEN)
    )
    server.reconfigure(attrs.evolve(server.config, token="rotated", auth_failure_burst=1))
    with pytest.raises(pytunnel.AuthenticationError):
        async with pytunnel.open_tunnel(server.address, token=TOKEN, reconnect=False):
            pass  # pragma: no cover
    assert server.auth_failures == 1
    assert server.throttled_addresses == 1  # a burst of one: the address waits now
    # the throttle's new rate applies at once (0: every failure forgiven immediately)
    server.reconfigure(attrs.evolve(server.config, auth_failure_interval=0))
    assert server.throttled_addresses == 0
    async with pytunnel.open_tunnel(server.address, token="rotated") as tunnel:
        assert tunnel.connected


async def test_clients_and_limit_counters(nursery: trio.Nursery, echo_port: int) -> None:
    server: pytunnel.TunnelServer = await nursery.start(
        functools.partial(pytunnel.serve, 0, token=TOKEN, max_forwards_per_client=1)
    )
    assert server.clients == []
    tunnel = await pytunnel.connect_tunnel(nursery, server.address, token=TOKEN, client_id="laptop")
    forward = await tunnel.forward_remote("127.0.0.1", echo_port)
    with pytest.raises(pytunnel.ForwardLimitError):
        await tunnel.forward_remote("127.0.0.1", echo_port)
    (client,) = server.clients
    assert client.client_id == "laptop"
    assert client.forwards == 1
    assert client.public_ports == [pytunnel.format_target(*forward.address)]
    assert client.bytes_received > 0
    assert server.limits_hit == {"forwards": 1}
    (port,) = client.ports
    assert (port.address, port.status, port.connections_total) == (
        client.public_ports[0],
        "active",
        0,
    )
    payload = b"counted at the server" * 100
    assert await echo_once(forward.address, payload) == payload
    await wait_until(lambda: server.clients[0].ports[0].connections == 0)
    (port,) = server.clients[0].ports
    assert (port.connections_total, port.bytes_out, port.bytes_in) == (
        1,
        len(payload),
        len(payload),
    )

    server.reconfigure(attrs.evolve(server.config, max_streams=1))
    held = await tunnel.open_stream("127.0.0.1", echo_port)
    second = await tunnel.open_stream("127.0.0.1", echo_port)  # admitted under the old limit
    newcomer = await pytunnel.connect_tunnel(nursery, server.address, token=TOKEN)
    with pytest.raises(pytunnel.StreamLimitError):
        await newcomer.open_stream("127.0.0.1", echo_port)
    assert server.limits_hit == {"forwards": 1, "streams": 1}
    for stream in (held, second):
        await stream.aclose()
    await tunnel.aclose()
    await newcomer.aclose()
    await wait_until(lambda: server.clients == [])
