"""What a server node claims in its cluster's registry, and how a refusal reads.

One key per public address a client can hold (``tcp/<port>``, ``http/<name>``,
``https/<name>``) and one per client identity (``clients/<id>``). The value is the owner,
``<node-id>/<session>``, so a refusal can say which node holds the address and a node can
tell its own sessions from another node's.
"""

from __future__ import annotations

import logging

import trio

from ..errors import AddressInUseError, ClusterUnavailableError, printable
from ._registry import Registry

__all__ = ["claim_or_refuse", "client_key", "name_key", "node_of", "port_key", "release_quietly"]

log = logging.getLogger("pytunnel.cluster")

#: Seconds a release may take on the way out of a forward; the registry keeps a release it
#: could not make and makes it once the engine answers, so nothing waits longer than this.
RELEASE_TIMEOUT = 2.0


def port_key(port: int, *, kind: str = "tcp") -> str:
    """``tcp/<port>`` or ``udp/<port>``: one key for a port on every node's public host."""
    return f"{kind}/{port}"


def name_key(name: str, *, tls: bool) -> str:
    return f"{'https' if tls else 'http'}/{name}"


def client_key(client_id: str) -> str:
    return f"clients/{client_id}"


def node_of(owner: str) -> str:
    """The node id in an owner string (``<node-id>/<session>``)."""
    return owner.split("/", 1)[0]


async def claim_or_refuse(
    registry: Registry,
    key: str,
    owner: str,
    *,
    what: str,
    address: str,
    error: type[AddressInUseError] = AddressInUseError,
) -> None:
    """Claim ``key`` for ``owner``, or raise ``error`` naming the node that holds it
    (``ClusterUnavailableError`` when the registry cannot decide)."""
    try:
        holder = await registry.claim(key, owner)
    except BaseException:
        # cancelled or timed out mid-request: the engine may have made the claim all the
        # same, and under a lease that lives on it would never be given back
        await release_quietly(registry, key, owner)
        raise
    if holder != owner:
        raise error(
            f"{what} is held by another client of the cluster (node {printable(node_of(holder))})",
            address=address,
        )


async def release_quietly(registry: Registry, key: str, owner: str) -> None:
    """Give ``key`` back if ``owner`` still holds it; never raises, bounded, and runs under
    cancellation too (a forward ends when its session is cancelled)."""
    with trio.CancelScope(shield=True), trio.move_on_after(RELEASE_TIMEOUT):
        try:
            await registry.release(key, owner)
        except ClusterUnavailableError as exc:
            log.info("%s not released now (it goes with the lease): %s", printable(key), exc)
