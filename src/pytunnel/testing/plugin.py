"""pytest plugin: real tunnels as fixtures, torn down and checked for leaks after each test.

Registered through the ``pytest11`` entry point, so it is installed with pytunnel; it does
nothing unless a test asks for one of its fixtures. Needs pytest-trio (the fixtures are async).

Fixtures (all function-scoped, as pytest-trio requires):

``pytunnel_server_options`` / ``pytunnel_client_options``
    dicts of ``ServerConfig`` / ``ClientConfig`` fields; override them in your ``conftest.py``.
``pytunnel_server``
    a running ``TunnelServer`` on a free loopback port.
``pytunnel_tunnel``
    a ``Tunnel`` connected to it.
``pytunnel_expose``
    an async function ``expose(host, port) -> (host, port)``: a remote forward of a local
    service, returning its public address.

After each test, the plugin checks that the fixtures' own tasks end within 5 s of closing
(``LeakError`` naming them if not; they are then cancelled, so a leak never hangs the run).
"""

from __future__ import annotations

import functools
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import trio

from ..client import Tunnel, connect_tunnel
from ..server import TunnelServer, serve

__all__ = ["LeakError"]


class LeakError(AssertionError):
    """Tasks started by the tunnel fixtures were still alive after the test."""


@pytest.fixture
def pytunnel_token() -> str:
    return secrets.token_urlsafe(16)


@pytest.fixture
def pytunnel_server_options() -> dict[str, Any]:
    """Override in conftest.py to configure the server (``ServerConfig`` fields)."""
    return {}


@pytest.fixture
def pytunnel_client_options() -> dict[str, Any]:
    """Override in conftest.py to configure the client (``ClientConfig`` fields)."""
    return {"reconnect": False}


#: How long teardown waits for the tunnel's tasks to finish before calling them leaked.
LEAK_TIMEOUT = 5.0


async def _check_no_leak(nursery: trio.Nursery, what: str) -> None:
    """After the fixture's ``aclose``, its own nursery must empty within LEAK_TIMEOUT; what is
    still running then is reported (and cancelled, so the test run itself never hangs)."""
    with trio.move_on_after(LEAK_TIMEOUT):
        while nursery.child_tasks:  # noqa: ASYNC110 - trio offers no event for "nursery empty"
            await trio.sleep(0.01)
    leftover = sorted(task.name for task in nursery.child_tasks)
    nursery.cancel_scope.cancel()
    if leftover:
        raise LeakError(f"task(s) of the {what} outlived the test: {', '.join(leftover)}")


@pytest.fixture
async def pytunnel_server(
    pytunnel_token: str, pytunnel_server_options: dict[str, Any]
) -> AsyncIterator[TunnelServer]:
    async with trio.open_nursery() as nursery:
        server: TunnelServer = await nursery.start(
            functools.partial(serve, 0, token=pytunnel_token, **pytunnel_server_options)
        )
        yield server
        await server.aclose()
        await _check_no_leak(nursery, "tunnel server")


@pytest.fixture
async def pytunnel_tunnel(
    pytunnel_server: TunnelServer, pytunnel_token: str, pytunnel_client_options: dict[str, Any]
) -> AsyncIterator[Tunnel]:
    async with trio.open_nursery() as nursery:
        tunnel = await connect_tunnel(
            nursery, pytunnel_server.address, token=pytunnel_token, **pytunnel_client_options
        )
        yield tunnel
        await tunnel.aclose()
        await _check_no_leak(nursery, "tunnel client")


@pytest.fixture
def pytunnel_expose(
    pytunnel_tunnel: Tunnel,
) -> Callable[[str, int], Awaitable[tuple[str, int]]]:
    async def expose(host: str, port: int) -> tuple[str, int]:
        forward = await pytunnel_tunnel.forward_remote(host, port)
        return forward.address

    return expose
