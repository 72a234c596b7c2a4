"""Regression tests for defects found in the second review (UDP stats, faults, sync)."""

from __future__ import annotations

import pytest
import trio

import pytunnel
from pytunnel.testing import open_tunnel_pair

pytestmark = pytest.mark.timeout(30)


async def test_udp_refused_association_counted_once() -> None:
    async with open_tunnel_pair(server_options={"permit_open": ["127.0.0.1:1"]}) as (_, tunnel):
        forward = await tunnel.forward_local("127.0.0.1", 9, protocol="udp")
        sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
        with sock:
            await sock.sendto(b"x", forward.address)
            with trio.fail_after(5):
                while not forward.stats.errors:
                    await trio.sleep(0.01)
            await trio.sleep(0.2)
        assert forward.stats.errors == {"REFUSED": 1}


async def test_close_after_exact_boundary(tunnel: pytunnel.Tunnel, echo_port: int) -> None:
    forward = await tunnel.forward_local("127.0.0.1", echo_port)
    forward.faults.set("in", close_after=5)
    stream = await trio.open_tcp_stream(*forward.address)
    await stream.send_all(b"01234")
    got = b""
    with trio.fail_after(3):  # the fault should close the connection after these 5 bytes
        while chunk := await stream.receive_some():
            got += chunk
    assert got == b"01234"
    await stream.aclose()


def test_faults_set_is_all_or_nothing() -> None:
    faults = pytunnel.testing.Faults()
    with pytest.raises(TypeError):
        faults.set(latency=1.0, latenzy=2.0)
    assert faults.out.latency == 0.0
    assert not faults.out.active
