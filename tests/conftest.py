"""Shared fixtures only: echo service, tunnel server and client, black hole, transports.

Plain helpers (constants, pair builders, counters) live in ``helpers.py``; test files import
them from there, never from this module.
"""

from __future__ import annotations

import functools
import shutil
from collections.abc import AsyncIterator, Iterator

import pytest
import trio
from helpers import TOKEN, Blackhole, EtcdServer, echo_handler

import pytunnel


@pytest.fixture(params=["memory", "tcp"])
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def echo_port(nursery: trio.Nursery) -> int:
    """A real TCP echo service on loopback."""
    listeners = await nursery.start(
        functools.partial(trio.serve_tcp, echo_handler, 0, host="127.0.0.1")
    )
    return int(listeners[0].socket.getsockname()[1])


@pytest.fixture
async def tunnel_server(nursery: trio.Nursery) -> pytunnel.TunnelServer:
    server: pytunnel.TunnelServer = await nursery.start(
        functools.partial(pytunnel.serve, 0, token=TOKEN)
    )
    return server


@pytest.fixture
async def tunnel(nursery: trio.Nursery, tunnel_server: pytunnel.TunnelServer) -> pytunnel.Tunnel:
    return await pytunnel.connect_tunnel(nursery, tunnel_server.address, token=TOKEN)


@pytest.fixture
def blackhole() -> Iterator[Blackhole]:
    hole = Blackhole()
    yield hole
    hole.close()


@pytest.fixture
async def etcd(tmp_path: object) -> AsyncIterator[EtcdServer]:
    """A private etcd on loopback (the cluster tests' engine); skips without the binary."""
    if shutil.which("etcd") is None:
        pytest.skip("etcd is not installed (.ci/run installs etcd-server)")
    server = EtcdServer(f"{tmp_path}/etcd")
    await server.start()
    try:
        yield server
    finally:
        await server.kill()
