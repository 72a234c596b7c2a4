"""Prometheus metrics of a tunnel client or server, read from the live objects at each scrape.

The collectors keep no counters of their own: every sample is read, when Prometheus asks,
from the counters the tunnel already keeps for its status (``Forward.stats``,
``Tunnel.reconnects``, ``TunnelServer.active_streams``...), so the metrics and the status
shown elsewhere can never disagree. The registry and the text format are prometheus-client's
(``generate_latest``); the endpoint is served by pytunnel's HTTP stack.

    registry = CollectorRegistry()
    registry.register(TunnelCollector(tunnel))
    await nursery.start(serve_metrics, registry, "127.0.0.1", 9100)

Metric names and labels are listed in docs/monitoring.md.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, NoReturn

import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ._dial import format_target
from ._http import Handler, HttpLimits, Request, Response, serve_http
from .forwards import Forward, ForwardKind, ForwardStatus

if TYPE_CHECKING:  # a client's metrics do not need the server loaded, nor the reverse
    from .client import Tunnel
    from .server import TunnelServer

__all__ = [
    "CONTENT_TYPE_LATEST",
    "ForwardLabels",
    "ServerCollector",
    "TunnelCollector",
    "metrics_handler",
    "serve_metrics",
]

#: The ``id`` and ``name`` labels of a forward, for code that names its forwards (the CLI's
#: config file); the ids must differ. Without it, each forward gets ``f1``, ``f2``, ... as the
#: collector first sees it, and an empty name.
ForwardLabels = Callable[[], Iterable[tuple[str, str, Forward]]]

_FORWARD_LABELS = ["id", "name", "kind", "bind", "target"]

#: The dial error categories of ``RelayStats.errors``, always exported (0 until one happens),
#: so a rate() over them exists before the first failure.
_CATEGORIES = ("NODE_TIMEOUT", "NODE_UNSTABLE", "FORBIDDEN", "REFUSED", "LINK_DOWN")


class TunnelCollector(Collector):
    """A tunnel client's metrics (``pytunnel_client_*``, ``pytunnel_forward_*``).

    ``forwards`` gives each forward its ``id`` and ``name`` labels; without it the collector
    numbers the tunnel's forwards itself, so that two forwards alike in everything else
    (members of one group) are still two series."""

    def __init__(self, tunnel: Tunnel, forwards: ForwardLabels | None = None) -> None:
        self.tunnel = tunnel
        self._forwards = forwards or self._numbered
        # Two forwards can share kind, bind and target (members of one load-balanced group),
        # and a series given twice is dropped by Prometheus: an id per forward object, kept
        # for as long as the forward lives, tells them apart and stays the same across scrapes.
        self._ids: weakref.WeakKeyDictionary[Forward, str] = weakref.WeakKeyDictionary()
        self._sequence = itertools.count(1)

    def _numbered(self) -> Iterator[tuple[str, str, Forward]]:
        for forward in self.tunnel.forwards:
            ident = self._ids.get(forward)
            if ident is None:
                ident = self._ids[forward] = f"f{next(self._sequence)}"
            yield ident, "", forward

    def collect(self) -> Iterator[Metric]:
        tunnel = self.tunnel
        yield GaugeMetricFamily(
            "pytunnel_client_connected",
            "1 while the tunnel connection to the server is up.",
            value=1 if tunnel.connected else 0,
        )
        yield CounterMetricFamily(
            "pytunnel_client_reconnects",
            "Successful reconnections to the server.",
            value=tunnel.reconnects,
        )
        rtt = GaugeMetricFamily(
            "pytunnel_client_heartbeat_rtt_seconds",
            "Round-trip time of the last heartbeat (absent before the first).",
        )
        if tunnel.rtt is not None:
            rtt.add_metric([], tunnel.rtt)
        yield rtt
        yield CounterMetricFamily(
            "pytunnel_client_events_dropped",
            "Events not delivered to a subscriber whose buffer was full.",
            value=tunnel.dropped_events,
        )
        yield from forward_metrics(self._forwards())


def forward_metrics(forwards: Iterable[tuple[str, str, Forward]]) -> Iterator[Metric]:
    """The ``pytunnel_forward_*`` families of these forwards (labelled id, name, kind,
    bind, target)."""
    status = GaugeMetricFamily(
        "pytunnel_forward_status",
        "1 for the status the forward is in, 0 for the others.",
        labels=[*_FORWARD_LABELS, "status"],
    )
    streams_open = GaugeMetricFamily(
        "pytunnel_forward_streams_open", "Relayed connections open.", labels=_FORWARD_LABELS
    )
    streams = CounterMetricFamily(
        "pytunnel_forward_streams", "Relayed connections accepted.", labels=_FORWARD_LABELS
    )
    sent = CounterMetricFamily(
        "pytunnel_forward_bytes",
        "Bytes relayed: out is towards the target, in is back from it.",
        labels=[*_FORWARD_LABELS, "direction"],
    )
    errors = CounterMetricFamily(
        "pytunnel_forward_dial_errors",
        "Connections that failed, by category (NODE_TIMEOUT, NODE_UNSTABLE, REFUSED: policy or "
        "limit, LINK_DOWN: no tunnel connection).",
        labels=[*_FORWARD_LABELS, "category"],
    )
    dropped = CounterMetricFamily(
        "pytunnel_forward_udp_dropped",
        "Datagrams dropped (queue full, too many associations, send failed).",
        labels=_FORWARD_LABELS,
    )
    for ident, name, forward in forwards:
        labels = [
            ident,
            name,
            forward.kind.name.lower(),
            format_target(*forward.address),
            "socks" if forward.kind is ForwardKind.DYNAMIC else forward.target,
        ]
        for value in ForwardStatus:
            status.add_metric([*labels, value.value], 1 if forward.status is value else 0)
        stats = forward.stats
        streams_open.add_metric(labels, stats.active_connections)
        streams.add_metric(labels, stats.total_connections)
        sent.add_metric([*labels, "out"], stats.bytes_out)
        sent.add_metric([*labels, "in"], stats.bytes_in)
        for category in sorted({*_CATEGORIES, *stats.errors}):
            errors.add_metric([*labels, category], stats.errors.get(category, 0))
        if forward.kind.udp:
            dropped.add_metric(labels, stats.datagrams_dropped)
    yield from (status, streams_open, streams, sent, errors, dropped)


class ServerCollector(Collector):
    """A tunnel server's metrics (``pytunnel_server_*``)."""

    def __init__(self, server: TunnelServer) -> None:
        self.server = server

    def collect(self) -> Iterator[Metric]:
        cluster = self.server.cluster
        if cluster is None:
            yield from self._collect()
            return
        # in a cluster every metric names its node, so that series scraped from several
        # nodes never merge (through a balancer, or summed across nodes)
        node = cluster.node_id
        for family in self._collect():
            family.samples = [
                sample._replace(labels={**sample.labels, "node": node}) for sample in family.samples
            ]
            yield family

    def _collect(self) -> Iterator[Metric]:
        server = self.server
        yield GaugeMetricFamily(
            "pytunnel_server_sessions",
            "Authenticated clients connected.",
            value=len(server.clients),
        )
        yield GaugeMetricFamily(
            "pytunnel_server_streams_open",
            "Relayed streams open across all clients.",
            value=server.active_streams,
        )
        yield CounterMetricFamily(
            "pytunnel_server_streams",
            "Relayed streams admitted across all clients since the server started.",
            value=server.total_streams,
        )
        yield GaugeMetricFamily(
            "pytunnel_server_max_streams",
            "The limit of relayed streams across all clients.",
            value=server.config.max_streams,
        )
        yield GaugeMetricFamily(
            "pytunnel_server_pending_handshakes",
            "Connections accepted but not yet authenticated.",
            value=server.pending_handshakes,
        )
        yield GaugeMetricFamily(
            "pytunnel_server_remote_forwards",
            "Remote forwards held by the connected clients.",
            value=sum(c.forwards for c in server.clients),
        )
        yield CounterMetricFamily(
            "pytunnel_server_auth_failures", "Failed authentications.", value=server.auth_failures
        )
        yield GaugeMetricFamily(
            "pytunnel_server_throttled_addresses",
            "Source addresses refused right now for too many failed authentications.",
            value=server.throttled_addresses,
        )
        limits = CounterMetricFamily(
            "pytunnel_server_limits_hit",
            "Requests refused at a limit: streams (max_streams), forwards "
            "(max_forwards_per_client).",
            labels=["limit"],
        )
        for limit in sorted({"streams", "forwards", *server.limits_hit}):
            limits.add_metric([limit], server.limits_hit.get(limit, 0))
        yield limits
        udp = server.udp_stats
        yield GaugeMetricFamily(
            "pytunnel_server_udp_associations_open",
            "UDP associations clients opened through this server (-L .../udp) open now.",
            value=udp.active_connections,
        )
        yield CounterMetricFamily(
            "pytunnel_server_udp_dropped",
            "Datagrams of those associations dropped here (queue full, send failed or its "
            "buffer full too long, no room in the session for a reply).",
            value=udp.datagrams_dropped,
        )
        rtt = GaugeMetricFamily(
            "pytunnel_server_client_heartbeat_rtt_seconds",
            "Round-trip time of the server's last ping to each client (absent before the first).",
            labels=["client"],
        )
        for client in server.clients:
            if client.rtt is not None:
                rtt.add_metric([client.client_id or client.peer], client.rtt)
        yield rtt
        yield from _port_metrics(server)
        yield from _node_link_metrics(server)


def _node_link_metrics(server: TunnelServer) -> Iterator[Metric]:
    """Traffic between this node and the other nodes of its cluster (node links)."""
    links = server.node_links
    if links is None:
        return
    stats = links.stats
    yield GaugeMetricFamily(
        "pytunnel_server_node_links",
        "Node links from this node to other nodes, up now.",
        value=len(links.linked_nodes),
    )
    yield CounterMetricFamily(
        "pytunnel_server_node_links_opened",
        "Node links this node opened to other nodes.",
        value=stats.links_opened,
    )
    yield GaugeMetricFamily(
        "pytunnel_server_node_mirrored_ports",
        "TCP and UDP ports this node listens on for clients of other nodes.",
        value=len(links.mirrored_ports) + len(links.mirrored_udp_ports),
    )
    streams = CounterMetricFamily(
        "pytunnel_server_node_link_streams",
        "Public connections over node links: out relayed by this node to the client's node, "
        "in relayed here by another node.",
        labels=["direction"],
    )
    streams.add_metric(["out"], stats.streams_out)
    streams.add_metric(["in"], stats.streams_in)
    yield streams
    relayed = CounterMetricFamily(
        "pytunnel_server_node_link_bytes",
        "Bytes of the connections this node relayed to other nodes: out from the public "
        "peers towards the client's node, in back.",
        labels=["direction"],
    )
    relayed.add_metric(["out"], stats.relayed.bytes_out)
    relayed.add_metric(["in"], stats.relayed.bytes_in)
    yield relayed


def _port_metrics(server: TunnelServer) -> Iterator[Metric]:
    """The clients' remote forwards (TCP and UDP), name routes and group memberships,
    labelled ``client`` (its identity, else its address), ``bind`` (``host:port``,
    ``host:port/udp``, or a name route's ``http://name`` / ``https://name``) and ``id``
    (the forward's control stream: one client's memberships of one group share the rest)."""
    labels = ["client", "bind", "id"]
    online = GaugeMetricFamily(
        "pytunnel_server_forward_online",
        "1 while a remote forward accepts connections, 0 while its client reports it offline.",
        labels=labels,
    )
    streams_open = GaugeMetricFamily(
        "pytunnel_server_forward_streams_open", "Public connections open.", labels=labels
    )
    streams = CounterMetricFamily(
        "pytunnel_server_forward_streams", "Public connections accepted.", labels=labels
    )
    relayed = CounterMetricFamily(
        "pytunnel_server_forward_bytes",
        "Bytes relayed: out is from the public peers towards the client, in is back.",
        labels=[*labels, "direction"],
    )
    dropped = CounterMetricFamily(
        "pytunnel_server_forward_udp_dropped",
        "UDP remote forwards: datagrams from the public peers dropped at the port.",
        labels=labels,
    )
    for client in server.clients:
        for port in client.ports:
            values = [client.client_id or client.peer, port.address, str(port.forward_id)]
            online.add_metric(values, 1 if port.status == "active" else 0)
            streams_open.add_metric(values, port.connections)
            streams.add_metric(values, port.connections_total)
            relayed.add_metric([*values, "out"], port.bytes_out)
            relayed.add_metric([*values, "in"], port.bytes_in)
        for route in client.routes:
            # a name route's bind is its URL, so the HTTP and HTTPS routes of one name differ
            bind = route.address if route.kind == "tcp" else f"{route.kind}://{route.address}"
            values = [client.client_id or client.peer, bind, str(route.forward_id)]
            online.add_metric(values, 1 if route.status == "active" else 0)
            streams_open.add_metric(values, route.connections)
            streams.add_metric(values, route.connections_total)
            relayed.add_metric([*values, "out"], route.bytes_out)
            relayed.add_metric([*values, "in"], route.bytes_in)
        for udp in client.udp_ports:
            # a UDP port's bind says so: the same port number may also be a TCP forward's
            values = [client.client_id or client.peer, f"{udp.address}/udp", str(udp.forward_id)]
            online.add_metric(values, 1)
            streams_open.add_metric(values, udp.connections)
            streams.add_metric(values, udp.connections_total)
            relayed.add_metric([*values, "out"], udp.bytes_out)
            relayed.add_metric([*values, "in"], udp.bytes_in)
            dropped.add_metric(values, udp.datagrams_dropped)
    yield from (online, streams_open, streams, relayed, dropped)


def metrics_handler(registry: CollectorRegistry) -> Handler:
    """An HTTP handler answering ``GET /metrics`` with the registry's text format (and 404
    elsewhere, 405 for other methods)."""

    async def handle(request: Request) -> Response:
        if request.path != "/metrics":
            return Response.text(404, "not found: the metrics are at /metrics\n")
        if request.method not in ("GET", "HEAD"):
            return Response.text(405, "method not allowed\n", [("allow", "GET, HEAD")])
        # collecting reads plain attributes: quick, and never awaits
        return Response(200, [("content-type", CONTENT_TYPE_LATEST)], generate_latest(registry))

    return handle


async def serve_metrics(
    registry: CollectorRegistry,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Serve ``registry`` at ``http://host:port/metrics`` until cancelled, in trio's
    ``serve_tcp`` style (``task_status.started(listeners)`` once listening; port 0: any).

    Raises ``OSError`` if the address cannot be bound."""
    limits = HttpLimits(max_body=0, handler_timeout=10.0)
    await serve_http(metrics_handler(registry), host, port, limits=limits, task_status=task_status)
