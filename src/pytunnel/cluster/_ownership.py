"""What a server node claims in its cluster's registry, and how a refusal reads.

One key per public address a client can hold (``tcp/<port>``, ``http/<name>``,
``https/<name>``) and one per client identity (``clients/<id>``). The value is the owner,
``<node-id>/<session>``, so a refusal can say which node holds the address and a node can
tell its own sessions from another node's.

A load-balanced group holds its address cluster-wide under a value of its own,
``@group/<digest>`` (see :func:`group_owner`: ``@`` is never in a node id, so it is never
taken for a node), and each member, on whichever node, has a key under
``groups/<address key>/<node-id>/<member>`` in its node's lease. A member key's value is the
group's owner string while the member is online, and that string with :data:`OFFLINE_MARK`
while its health probes find its target down (see :func:`member_value`).
"""

from __future__ import annotations

import hashlib
import logging
from typing import TYPE_CHECKING

import trio

from ..errors import AddressInUseError, ClusterUnavailableError, printable

if TYPE_CHECKING:
    from ._registry import Registry

__all__ = [
    "GROUP_PREFIX",
    "OFFLINE_MARK",
    "refusal",
    "claim_or_refuse",
    "clear_quietly",
    "client_key",
    "group_owner",
    "is_group",
    "member_key",
    "member_online",
    "member_state_quietly",
    "member_value",
    "members_prefix",
    "name_key",
    "node_of",
    "parse_member_key",
    "port_key",
    "leave_quietly",
    "release_quietly",
]

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


#: How the owner string of a load-balanced group begins (never a node id: ``@`` is not in
#: the node id alphabet).
GROUP_PREFIX = "@group/"


def group_owner(name: str, proof: bytes) -> str:
    """The owner string of the group ``name`` whose members prove ``proof``: the same on
    every node, so members of one group on any node find each other, and a digest, so the
    engine's readers learn nothing that would let them join (the proof stays secret)."""
    digest = hashlib.sha256(b"pytunnel-group-owner\0" + name.encode() + b"\0" + proof)
    return GROUP_PREFIX + digest.hexdigest()[:32]


def is_group(owner: str) -> bool:
    return owner.startswith(GROUP_PREFIX)


#: What ends a member key's value while the member is offline (a space: never in an owner
#: string, so the two states can never be taken for each other).
OFFLINE_MARK = " offline"


def member_value(group: str, online: bool) -> str:
    """The value of a member key of ``group``: the group's owner string, marked while the
    member is offline, so that every node's watch counts only the members that can serve."""
    return group if online else group + OFFLINE_MARK


def member_online(value: str) -> bool:
    """Whether the member whose key holds ``value`` is online (see :func:`member_value`)."""
    return not value.endswith(OFFLINE_MARK)


def members_prefix(key: str) -> str:
    """Where the members of the group holding ``key`` are registered."""
    return f"groups/{key}/"


def member_key(key: str, member: str) -> str:
    """The key of one member (``<node-id>/<member>``) of the group holding ``key``."""
    return members_prefix(key) + member


def parse_member_key(key: str) -> tuple[str, str, str] | None:
    """``groups/<address key>/<node>/<member>`` -> (address key, node, member); ``None`` for
    anything else under ``groups/``."""
    if not key.startswith("groups/"):
        return None
    address, _, rest = key[len("groups/") :].rpartition("/")
    address, _, node = address.rpartition("/")
    if not address or not node or not rest or "/" not in address:
        return None
    return address, node, rest


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
        raise refusal(holder, what=what, address=address, error=error)


def refusal(
    holder: str,
    *,
    what: str,
    address: str,
    error: type[AddressInUseError] = AddressInUseError,
    group: bool = False,
) -> AddressInUseError:
    """The refusal of ``what`` held by ``holder``: a client on a named node, or a group
    (whose members may be on any node); ``group``: the one refused is a group member."""
    if is_group(holder):
        why = (
            " (another group name, or another group secret)"
            if group
            else "; only its members can serve it"
        )
        return error(
            f"{what} is held by a load-balanced group of the cluster{why}", address=address
        )
    return error(
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


async def leave_quietly(registry: Registry, key: str, group: str, member: str) -> None:
    """End ``member``'s membership of ``group`` (the last one's gives ``key`` back); never
    raises, bounded, and runs under cancellation too, as :func:`release_quietly`."""
    with trio.CancelScope(shield=True), trio.move_on_after(RELEASE_TIMEOUT):
        try:
            await registry.leave_group(key, group, member)
        except ClusterUnavailableError as exc:
            log.info(
                "membership of %s not ended now (it goes with the lease): %s", printable(key), exc
            )


async def clear_quietly(registry: Registry, key: str, group: str) -> None:
    """:meth:`Registry.clear_group`, never raising and bounded: the next claim of the key
    clears it anyway."""
    with trio.CancelScope(shield=True), trio.move_on_after(RELEASE_TIMEOUT):
        try:
            await registry.clear_group(key, group)
        except ClusterUnavailableError as exc:
            log.info("%s not cleared now (the next claim clears it): %s", printable(key), exc)


async def member_state_quietly(
    registry: Registry, key: str, group: str, member: str, online: bool
) -> None:
    """:meth:`Registry.set_member_online`, never raising and bounded: the registry keeps a
    state it could not write and writes it after the next good renewal."""
    with trio.CancelScope(shield=True), trio.move_on_after(RELEASE_TIMEOUT):
        try:
            await registry.set_member_online(key, group, member, online)
        except ClusterUnavailableError as exc:
            log.info(
                "state of a member of %s not written now (written later): %s", printable(key), exc
            )
