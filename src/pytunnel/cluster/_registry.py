"""The registry: who owns what across the servers of one service.

A single server owns its ports and names by binding them; several servers (a cluster) need
one place that says which node's client holds a port, a name or a client identity, and
that place must hand a key to exactly one of two racers. :class:`Registry` is that contract;
:class:`LocalRegistry` is the in-process one (a single server, where every claim is decided
by one event loop) and ``pytunnel.cluster.etcd.EtcdRegistry`` the engine-backed one.

Keys are relative paths (``tcp/8080``, ``http/app.example.com``, ``clients/<id>``); values
are owner strings chosen by the caller (the server writes ``<node-id>/<session>``). Every
claim of a node lives under that node's lease: when the node dies or loses its engine for
longer than the lease, its keys disappear by themselves.

A load-balanced group spans nodes, so its hold on a key cannot live under one node's lease:
the key names the group (its owner string) under no lease, and each member has a key of its
own, ``groups/<key>/<member>``, under its node's lease. The key is the group's while one
member is left anywhere, online or not; the last member leaving (or its node's lease
expiring) lets it go. A member key's value says whether the member is online (its health
probes), so that other nodes hand connections only to nodes with a member that can serve.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import attrs
import trio

from ..protocol.messages import MAX_CLIENT_ID, valid_client_id
from ._ownership import is_group, member_key, member_value, members_prefix

__all__ = [
    "Change",
    "LocalRegistry",
    "LostCallback",
    "Registry",
    "WatchCallback",
    "check_node_id",
]


def check_node_id(node_id: str) -> None:
    """Refuse (``ValueError``) a node id that could not be a client id: a node link sends
    it as its handshake's client id, and owner strings and logs carry it as it is."""
    if not node_id or not valid_client_id(node_id):
        raise ValueError(
            f"a node id is 1-{MAX_CLIENT_ID} characters of [A-Za-z0-9._:-] (the rule of "
            f"client ids), not {node_id!r}"
        )


@attrs.frozen
class Change:
    """One key changed under a watched prefix: ``value`` is its new owner, ``None`` once the
    key is gone (released, or its lease expired)."""

    key: str
    value: str | None


#: Told each change, synchronously, in the order the engine made them.
WatchCallback = Callable[[Change], None]
#: Told ``(key, owner)`` for a claim this node held and lost (its lease expired while the
#: engine was out of reach and another node took the key meanwhile).
LostCallback = Callable[[str, str], None]


class Registry(Protocol):
    """What a server needs of its cluster's registry.

    ``run`` holds the node's membership for as long as it runs (started in the server's
    nursery); every other call may be made once it has started. Calls that need the engine
    raise ``ClusterUnavailableError`` when it cannot be reached or the node's lease may have
    expired, never a transport exception.
    """

    #: This node's name in the cluster (``--node-id``).
    node_id: str
    #: Where the other nodes reach this one (``--node-address``); a server fills in its
    #: control listener's address when this is empty, before the node joins.
    node_address: str

    @property
    def available(self) -> bool:
        """Whether claims can be made now: the engine answered and the lease is current."""
        ...

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Join the cluster and keep this node's lease alive; never returns."""
        ...

    async def claim(self, key: str, owner: str) -> str:
        """Create ``key`` for ``owner`` if no one holds it; return the owner holding it now
        (``owner`` itself when this call won, or when ``owner`` held it already)."""
        ...

    async def replace(self, key: str, owner: str) -> str | None:
        """Make ``owner`` the holder of ``key`` whoever held it (the newest session of a
        client identity wins); return the previous holder, ``None`` if there was none."""
        ...

    async def release(self, key: str, owner: str) -> bool:
        """Delete ``key`` if ``owner`` still holds it; whether it did."""
        ...

    async def join_group(self, key: str, group: str, member: str) -> str:
        """Make ``member`` (``<node-id>/<id>``) a member of ``group`` (a group's owner
        string), forming the group's hold on ``key`` if nobody holds it; return the holder
        of ``key`` now (``group`` itself when ``member`` is in). A group whose every member
        is gone is cleared first, so its key never stays taken by nobody."""
        ...

    async def leave_group(self, key: str, group: str, member: str) -> bool:
        """Take ``member`` out of ``group``; when it was the last member anywhere, ``key``
        is given back. Whether ``key`` was given back."""
        ...

    async def set_member_online(self, key: str, group: str, member: str, online: bool) -> bool:
        """Rewrite ``member``'s key (under the same lease) to say whether it is online; one
        write, and none once the member has left. Whether it wrote."""
        ...

    async def clear_group(self, key: str, group: str) -> bool:
        """Give ``key`` back if ``group`` holds it with no member left anywhere (its last
        members' node died); whether it did."""
        ...

    async def lookup(self, key: str) -> str | None:
        """The owner of ``key``, ``None`` if nobody holds it."""
        ...

    async def nodes(self) -> dict[str, str]:
        """The live nodes: node id -> the address it gave (``--node-address``)."""
        ...

    async def entries(self, prefix: str = "") -> dict[str, str]:
        """Every key under ``prefix`` and its owner (what ``pytunnel cluster status`` shows)."""
        ...

    async def watch(
        self,
        prefix: str,
        on_change: WatchCallback,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Tell ``on_change`` every change under ``prefix`` from the moment this has started
        (``await nursery.start(registry.watch, ...)``); never returns."""
        ...

    def on_lost(self, callback: LostCallback) -> None:
        """Be told of claims this node lost (see :data:`LostCallback`)."""
        ...


class LocalRegistry:
    """The registry of a server that is its own cluster: one process decides every claim.

    Claims are decided synchronously, so of two tasks claiming one key the first to run wins;
    nothing expires because the node cannot die without its keys.
    """

    def __init__(self, node_id: str = "local", address: str = "") -> None:
        self.node_id = node_id
        self.node_address = address
        self._keys: dict[str, str] = {}
        self._watchers: list[tuple[str, WatchCallback]] = []

    @property
    def available(self) -> bool:
        return True

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await trio.sleep_forever()

    async def claim(self, key: str, owner: str) -> str:
        await trio.lowlevel.checkpoint()
        holder = self._keys.get(key)
        if holder is not None:
            return holder
        self._keys[key] = owner
        self._notify(key, owner)
        return owner

    async def replace(self, key: str, owner: str) -> str | None:
        await trio.lowlevel.checkpoint()
        previous = self._keys.get(key)
        self._keys[key] = owner
        if previous != owner:
            self._notify(key, owner)
        return previous

    async def release(self, key: str, owner: str) -> bool:
        await trio.lowlevel.checkpoint()
        if self._keys.get(key) != owner:
            return False
        del self._keys[key]
        self._notify(key, None)
        return True

    async def join_group(self, key: str, group: str, member: str) -> str:
        await trio.lowlevel.checkpoint()
        holder = self._keys.get(key)
        if holder is not None and is_group(holder) and holder != group:
            self._drop_empty_group(key, holder)
            holder = self._keys.get(key)
        if holder is None:
            self._keys[key] = holder = group
            self._notify(key, group)
        if holder == group:
            self._keys[member_key(key, member)] = group
            self._notify(member_key(key, member), group)
        return holder

    async def leave_group(self, key: str, group: str, member: str) -> bool:
        await trio.lowlevel.checkpoint()
        if self._keys.get(member_key(key, member)) in (
            member_value(group, True),
            member_value(group, False),
        ):
            del self._keys[member_key(key, member)]
            self._notify(member_key(key, member), None)
        return self._drop_empty_group(key, group)

    async def set_member_online(self, key: str, group: str, member: str, online: bool) -> bool:
        await trio.lowlevel.checkpoint()
        full = member_key(key, member)
        if full not in self._keys:
            return False
        value = member_value(group, online)
        if self._keys[full] != value:
            self._keys[full] = value
            self._notify(full, value)
        return True

    async def clear_group(self, key: str, group: str) -> bool:
        await trio.lowlevel.checkpoint()
        return self._drop_empty_group(key, group)

    def _drop_empty_group(self, key: str, group: str) -> bool:
        prefix = members_prefix(key)
        if self._keys.get(key) != group or any(k.startswith(prefix) for k in self._keys):
            return False
        del self._keys[key]
        self._notify(key, None)
        return True

    async def lookup(self, key: str) -> str | None:
        await trio.lowlevel.checkpoint()
        return self._keys.get(key)

    async def nodes(self) -> dict[str, str]:
        await trio.lowlevel.checkpoint()
        return {self.node_id: self.node_address}

    async def entries(self, prefix: str = "") -> dict[str, str]:
        await trio.lowlevel.checkpoint()
        found = {f"nodes/{self.node_id}": self.node_address}
        found.update(self._keys)
        return {key: value for key, value in sorted(found.items()) if key.startswith(prefix)}

    async def watch(
        self,
        prefix: str,
        on_change: WatchCallback,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        entry = (prefix, on_change)
        self._watchers.append(entry)
        try:
            task_status.started()
            await trio.sleep_forever()
        finally:
            self._watchers.remove(entry)

    def on_lost(self, callback: LostCallback) -> None:
        """Nothing is ever lost in one process: the callback is never called."""

    def _notify(self, key: str, value: str | None) -> None:
        for prefix, callback in list(self._watchers):
            if key.startswith(prefix):
                callback(Change(key, value))
