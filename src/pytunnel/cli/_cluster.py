"""The cluster options of ``pytunnel serve``: checked together, turned into a registry."""

from __future__ import annotations

import click

from ..cluster import EtcdRegistry, parse_etcd_url
from ..cluster.etcd import DEFAULT_LEASE_TTL

__all__ = ["DEFAULT_LEASE_TTL", "check_cluster_options", "node_registry"]


def check_cluster_options(
    cluster: str | None, node_id: str | None, node_address: str | None
) -> None:
    """One usage error for options that cannot go together, before anything starts."""
    if cluster is None:
        if node_id is not None or node_address is not None:
            raise click.UsageError("--node-id and --node-address are for a node of a --cluster")
        return
    try:
        parse_etcd_url(cluster)
    except ValueError as exc:
        raise click.UsageError(f"--cluster: {exc}") from None
    if not node_id:
        raise click.UsageError("--cluster needs --node-id NAME (unique in the cluster)")
    if "/" in node_id or not node_id.isprintable():
        raise click.UsageError(f"--node-id: a printable name without '/', not {node_id!r}")


def node_registry(
    cluster: str | None, node_id: str | None, node_address: str, lease_ttl: int
) -> EtcdRegistry | None:
    """The registry of this node (made on the event loop, where its HTTP client lives)."""
    if cluster is None or node_id is None:
        return None
    return EtcdRegistry.from_url(cluster, node_id, node_address, lease_ttl=lease_ttl)
