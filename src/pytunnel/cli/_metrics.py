"""``--metrics HOST:PORT`` of both commands: a registry with the command's collector, served
over HTTP, and the line that says where.

prometheus-client and ``pytunnel.metrics`` are imported only by a command that serves metrics
(which imports them before its event loop starts): the others, and ``--help``, do not pay for
them.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import pytunnel

from ._output import say

if TYPE_CHECKING:
    import trio
    from prometheus_client import CollectorRegistry
    from prometheus_client.registry import Collector


async def start_metrics(
    nursery: trio.Nursery, collector: Collector, address: tuple[str, int]
) -> None:
    """Serve ``collector`` at ``address`` in ``nursery`` and print where (the real port when
    0 was asked for)."""
    registry, where = await open_metrics(nursery, address)
    registry.register(collector)
    say(where)


async def open_metrics(
    nursery: trio.Nursery, address: tuple[str, int]
) -> tuple[CollectorRegistry, str]:
    """Listen at ``address`` (in ``nursery``) with an empty registry, for a collector
    registered later, and the line that says where. A registry of its own: the process's
    default one would add Python's process and GC metrics, which say nothing about the
    tunnel. Bound before the server starts, a node's metrics port is never taken first by
    the mirror of a port another node's client holds."""
    from prometheus_client import CollectorRegistry

    from pytunnel.metrics import serve_metrics

    registry = CollectorRegistry(auto_describe=True)
    listeners = await nursery.start(
        functools.partial(serve_metrics, registry, address[0], address[1])
    )
    host, port = listeners[0].socket.getsockname()[:2]
    return registry, f"metrics at http://{pytunnel.format_target(str(host), int(port))}/metrics"
