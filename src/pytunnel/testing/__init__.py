"""Helpers for tests that need a real tunnel for a few seconds, in-process, on ephemeral ports.

``async with open_tunnel_pair() as (server, tunnel):`` starts a server on a free loopback port
and a client connected to it; leaving the block tears both down without a trace. The pytest
plugin (``pytunnel.testing.plugin``, registered as a ``pytest11`` entry point) wraps these in
fixtures; ``pytunnel.sync`` offers the same to code that is not Trio.
"""

from __future__ import annotations

import functools
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import trio

from .faults import DirectionFaults, Faults, FaultyStream

if TYPE_CHECKING:
    from ..client import Tunnel
    from ..server import TunnelServer

__all__ = [
    "DirectionFaults",
    "Faults",
    "FaultyStream",
    "count_tasks",
    "expose",
    "open_tunnel_pair",
]


@asynccontextmanager
async def open_tunnel_pair(
    *,
    token: str | None = None,
    server_options: dict[str, Any] | None = None,
    client_options: dict[str, Any] | None = None,
) -> AsyncIterator[tuple[TunnelServer, Tunnel]]:
    """A server on ``127.0.0.1:0`` and a client connected to it, for one ``async with``."""
    # imported here: the tunnel itself uses this package's fault injection
    from ..client import connect_tunnel
    from ..server import serve

    secret = token or secrets.token_urlsafe(16)
    async with trio.open_nursery() as nursery:
        server: TunnelServer = await nursery.start(
            functools.partial(serve, 0, token=secret, **(server_options or {}))
        )
        tunnel = await connect_tunnel(
            nursery, server.address, token=secret, **(client_options or {})
        )
        try:
            yield server, tunnel
        finally:
            with trio.CancelScope(shield=True):
                await tunnel.aclose()
                await server.aclose()
            nursery.cancel_scope.cancel()


async def expose(tunnel: Tunnel, host: str, port: int) -> tuple[str, int]:
    """Expose ``host:port`` through the server (a remote forward); its public address."""
    forward = await tunnel.forward_remote(host, port)
    return forward.address


def count_tasks() -> int:
    """Live trio tasks in this run: compare before and after to prove nothing leaked."""
    root = trio.lowlevel.current_root_task()
    if root is None:  # pragma: no cover - only called inside trio.run
        return 0
    count = 0
    stack = [root]
    while stack:
        task = stack.pop()
        count += 1
        for child in task.child_nurseries:
            stack.extend(child.child_tasks)
    return count
