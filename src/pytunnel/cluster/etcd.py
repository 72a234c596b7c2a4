"""The registry of a cluster, kept in etcd (v3) through its JSON gateway.

etcd gives exactly what cluster-wide ownership needs: leases that expire by themselves when a
node dies, transactions for compare-and-swap (a claim is one ``create_revision == 0`` txn:
one winner, whatever the race), and watches that stream every change in order from a given
revision, so nothing is polled and a watch that reconnects misses nothing. Its gRPC gateway
speaks JSON over HTTP/1.1 (``/v3/kv/txn``, ``/v3/lease/keepalive``, ``/v3/watch`` as a
streaming POST; keys and values base64), which httpx drives on Trio through anyio: no
blocking client on the event loop and no extra dependency.

No split brain: a node only claims while its lease is known to be current (renewed less than
its TTL ago, timed from when the renewal was sent). Once it cannot tell, every claim raises
``ClusterUnavailableError`` until the engine answers again; relays already running are not
touched. When the lease did expire meanwhile, the node takes a new one, joins again and claims
again what it still holds; a key another node took in between is reported as lost.

The connection to the engine may be TLS (``https://`` members, ``etcds://`` in a cluster
address) with a CA and a client certificate in an ``ssl.SSLContext``, and may authenticate as
an etcd user: ``/v3/auth/authenticate`` trades the user and password for a token sent in the
``Authorization`` header of every request, taken again whenever the engine says it no
longer knows it (expired, or the engine restarted). Neither the password nor the token is
ever logged or put in an error.
"""

from __future__ import annotations

import base64
import functools
import json
import logging
import math
import ssl
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import httpx
import trio

from ..errors import ClusterAuthError, ClusterUnavailableError, printable
from ._address import DEFAULT_LEASE_TTL, parse_etcd_url
from ._ownership import is_group, member_key, member_value, members_prefix
from ._registry import Change, LostCallback, WatchCallback, check_node_id

__all__ = ["DEFAULT_LEASE_TTL", "EtcdRegistry", "parse_etcd_url"]

log = logging.getLogger("pytunnel.cluster")

#: Seconds one request to the engine may take before the engine counts as unreachable.
DEFAULT_REQUEST_TIMEOUT = 2.0
#: Seconds between attempts while the engine does not answer (renewals, watches).
DEFAULT_RETRY_INTERVAL = 0.5
#: Requests to the engine in flight at once (each on a connection kept open): the node's own
#: CPU, not the engine, bounds its rate, so more would only queue inside the HTTP client.
_REQUESTS = 16
#: Connections kept besides them for watches (each holds one for as long as it runs).
_WATCHES = 8
#: Claims retried when the key vanished between the compare and the read of its owner.
_CLAIM_ATTEMPTS = 3
#: What etcd answers for a token it no longer takes (expired unused, or issued before its
#: users or roles changed): a new token is taken and the request sent again.
_STALE_TOKEN = ("invalid auth token", "auth store is old")
#: What etcd answers when the credentials themselves are the trouble (no token sent, a wrong
#: password, a user without the right to the keys): a wrong setting, not an outage.
_REFUSED = ("user name is empty", "authentication failed", "permission denied")

#: Sends one request: ``(url, body, headers)`` -> the response.
_Poster = Callable[[str, dict[str, Any], dict[str, str]], Awaitable[httpx.Response]]


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode("ascii")


def _text(b64: str) -> str:
    return base64.b64decode(b64).decode(errors="replace")


def _range_end(prefix: str) -> str:
    """The end of etcd's range that holds every key starting with ``prefix``."""
    raw = bytearray(prefix.encode())
    raw[-1] += 1  # prefixes end in "/", never in 0xff
    return base64.b64encode(bytes(raw)).decode("ascii")


class EtcdRegistry:
    """A :class:`~pytunnel.cluster.Registry` in etcd; see the module docstring.

    ``endpoints`` are the gateway URLs of the engine's members (one, or all of them): each
    request goes to the member that answered last, and to the next one when that one does
    not answer or answers that it cannot serve (a member cut off from its quorum), so a
    three-member etcd keeps the cluster going with one member down.

    ``tls`` verifies ``https://`` members (its CA, its client certificate if the engine asks
    for one; default: the system's store); ``user`` and ``password`` authenticate to an etcd
    with authentication enabled (see the module docstring).

    ``run`` must be running (``await nursery.start(registry.run)``) for claims to succeed; it
    takes the lease, registers the node under ``nodes/<node_id>`` and renews the lease until
    cancelled, then revokes it (the node's keys are freed at once on a clean stop) and closes
    its HTTP client.
    """

    def __init__(
        self,
        endpoints: str | Sequence[str],
        node_id: str,
        node_address: str = "",
        *,
        prefix: str = "/pytunnel/",
        lease_ttl: int = DEFAULT_LEASE_TTL,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
        retry_interval: float = DEFAULT_RETRY_INTERVAL,
        tls: ssl.SSLContext | None = None,
        user: str | None = None,
        password: str | None = None,
    ) -> None:
        check_node_id(node_id)
        if (user is None) != (password is None):
            raise ValueError("etcd authentication needs both a user and a password")
        if lease_ttl < 2:
            raise ValueError(f"the lease TTL is 2 s or more, not {lease_ttl!r}")
        self.node_id = node_id
        self.node_address = node_address
        listed = [endpoints] if isinstance(endpoints, str) else list(endpoints)
        if not listed:
            raise ValueError("an etcd registry needs at least one endpoint")
        self.endpoints = tuple(one.rstrip("/") for one in listed)
        self._member = 0
        self.prefix = prefix
        self.lease_ttl = lease_ttl
        self._retry_interval = retry_interval
        #: Claims, releases, reads and watches, over a few connections kept open. Requests
        #: beyond them wait in ``_requests`` (a FIFO), not in the HTTP client's own queue:
        #: with hundreds of claims in flight (a mass failover onto the node) httpx's pool
        #: (100 connections, 20 kept) connected and closed again for most of them, and its
        #: bookkeeping walks every connection for every queued request at each change.
        self._http = httpx.AsyncClient(
            timeout=request_timeout,
            verify=tls or True,
            limits=httpx.Limits(
                max_connections=_REQUESTS + _WATCHES, max_keepalive_connections=_REQUESTS + _WATCHES
            ),
        )
        self._requests = trio.CapacityLimiter(_REQUESTS)
        self._request_timeout = request_timeout
        #: The lease's own connection (its grant, renewals, revoke, and authentication),
        #: driven from a thread of its own: a node busy with claims (a mass failover onto
        #: it) may have every connection of ``_http`` taken with a queue behind them, and its
        #: event loop so busy that each step of an exchange waits for hundreds of other
        #: tasks. A renewal waiting behind either would let the lease, and every key under
        #: it, lapse; in the thread it costs the loop two wake-ups, whatever the load.
        self._lease_http = httpx.Client(
            timeout=request_timeout,
            verify=tls or True,
            limits=httpx.Limits(max_connections=2, max_keepalive_connections=2),
        )
        #: The lease thread's own limiter: never queued behind other threads (name lookups).
        self._lease_thread = trio.CapacityLimiter(1)
        self._user = user
        self._password = password
        #: The engine's token for ``user`` (``None``: none taken yet, or the last one stale).
        self._auth_token: str | None = None
        self._auth_lock = trio.Lock()
        self._watch_timeout = httpx.Timeout(request_timeout, read=None)
        self._lease: str | None = None
        self._valid_until = -math.inf
        #: What this node holds, claimed again under a new lease after an expiry.
        self._claims: dict[str, str] = {}
        #: Releases the engine did not take yet, as ``(key, owner)``; retried after each good
        #: renewal. By pair, not by key: a session's release and the release of a claim that
        #: failed for its successor (same key, another owner) are both kept.
        self._pending_releases: set[tuple[str, str]] = set()
        #: The group memberships of this node's members, as ``(key, group, member)``: joined
        #: again under a new lease after an expiry.
        self._memberships: set[tuple[str, str, str]] = set()
        #: Memberships the engine did not take the end of yet, retried like releases.
        self._pending_leaves: set[tuple[str, str, str]] = set()
        #: The memberships whose member is offline (its health probes): their keys say so,
        #: and say so again when joined again under a new lease.
        self._offline: set[tuple[str, str, str]] = set()
        #: Memberships whose state the engine did not take yet: written after the next good
        #: renewal (their current state, once, however often it changed meanwhile).
        self._pending_states: set[tuple[str, str, str]] = set()
        #: Whether what this node holds is still to be claimed again under a new lease.
        self._reclaim_due = False
        #: Set after a good renewal when there is upkeep to do (claims again, releases and
        #: states kept): done by its own task, so that it never delays the next renewal.
        self._upkeep_wanted = trio.Event()
        self._lost: list[LostCallback] = []
        #: Where ``run`` starts the tasks it needs while it runs.
        self._nursery: trio.Nursery | None = None
        #: Each session's predecessor, as ``replace`` of its client identity found it:
        #: owner -> the previous owner (the same client's older session, on any node).
        self._previous: dict[str, str] = {}
        #: Claims waiting for a key their client's older session still holds to go:
        #: key -> [(that holder, set once the key no longer holds it)].
        self._ghost_waiters: dict[str, list[tuple[str, trio.Event]]] = {}
        #: The watch those waits use while there are any: its scope and "it is open".
        self._ghost_watch: tuple[trio.CancelScope, trio.Event] | None = None
        #: Whether the last exchange with the engine worked (logged on each change only).
        self._reachable = True

    @classmethod
    def from_url(
        cls, url: str, node_id: str, node_address: str = "", **kwargs: Any
    ) -> EtcdRegistry:
        """The registry at ``etcd://host:port[/prefix]``."""
        endpoints, prefix = parse_etcd_url(url)
        return cls(endpoints, node_id, node_address, prefix=prefix, **kwargs)

    @property
    def endpoint(self) -> str:
        """The member requests go to now."""
        return self.endpoints[self._member]

    def _next_member(self) -> None:
        self._member = (self._member + 1) % len(self.endpoints)

    @property
    def available(self) -> bool:
        return self._lease is not None and trio.current_time() < self._valid_until

    def on_lost(self, callback: LostCallback) -> None:
        self._lost.append(callback)

    # ------------------------------------------------------------------ lifetime

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            joined = trio.current_time()
            await self._join()
            log.info("node %s joined the cluster (etcd at %s)", self.node_id, self.endpoint)
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._upkeep)
                task_status.started()
                await self._keep_lease(joined)
        finally:
            with trio.CancelScope(shield=True):
                with trio.move_on_after(1.0):
                    await self._revoke()
                await self._http.aclose()
                self._lease_http.close()

    async def _keep_lease(self, sent: float) -> None:
        """Renew every TTL / 3, timed from when the last good renewal was *sent* (a slow
        answer does not stretch the interval), and every retry interval while renewals
        fail. Nothing else runs in this task."""
        next_at = sent + self.lease_ttl / 3
        while True:
            await trio.sleep_until(next_at)
            sent = trio.current_time()
            if await self._renew():
                next_at = sent + self.lease_ttl / 3
            else:
                next_at = trio.current_time() + self._retry_interval

    async def _join(self) -> None:
        sent = trio.current_time()
        reply = await self._post("/v3/lease/grant", {"TTL": self.lease_ttl}, http=self._lease_post)
        lease, ttl = str(reply["ID"]), int(reply["TTL"])
        await self._post(
            "/v3/kv/put",
            {
                "key": self._key(f"nodes/{self.node_id}"),
                "value": _b64(self.node_address),
                "lease": lease,
            },
            http=self._lease_post,
        )
        self._lease, self._valid_until = lease, sent + ttl

    async def _renew(self) -> bool:
        """One renewal (or a new lease and the node key again, once it expired); true if
        the lease is current afterwards."""
        lease = self._lease
        sent = trio.current_time()
        try:
            if lease is None:
                await self._rejoin()
                return True
            reply = await self._post("/v3/lease/keepalive", {"ID": lease}, http=self._lease_post)
        except ClusterUnavailableError as exc:
            self._unreachable(exc)
            return False
        ttl = int(reply.get("result", {}).get("TTL", 0))
        if ttl <= 0:  # expired while the engine was out of reach: its keys are gone
            log.warning("node %s: its lease expired; joining the cluster again", self.node_id)
            self._lease = None
            try:
                await self._rejoin()
            except ClusterUnavailableError as exc:
                self._unreachable(exc)
                return False
            return True
        self._valid_until = sent + ttl
        self._reached()
        pending = self._pending_releases or self._pending_leaves or self._pending_states
        if self._reclaim_due or pending:
            self._upkeep_wanted.set()
        return True

    async def _rejoin(self) -> None:
        """A new lease and the node key again; every claim still held is then claimed
        again by the upkeep task."""
        await self._join()
        self._reclaim_due = True
        self._reached()
        self._upkeep_wanted.set()

    async def _upkeep(self) -> None:
        """What a good renewal leaves to do: claim again what is held (after a new lease),
        make the releases, leaves and member states the engine did not take. Its own task,
        so that a long reclaim (thousands of keys) never delays a renewal; cut short by the
        engine, it is resumed after the next good renewal."""
        while True:
            await self._upkeep_wanted.wait()
            self._upkeep_wanted = trio.Event()
            try:
                if self._reclaim_due:
                    await self._reclaim()
                else:
                    await self._flush_releases()
            except ClusterUnavailableError as exc:
                log.info(
                    "node %s: upkeep cut short (resumed after the next renewal): %s",
                    self.node_id,
                    exc.message,
                )

    async def _reclaim(self) -> None:
        """Claim again, under the new lease, every key and membership still held; kept due
        (and resumed after the next good renewal) if the engine goes away meanwhile, so none
        is left unclaimed. One released while this runs is released again after its claim,
        so none is left behind either. A rejoin while this runs makes it due again."""
        self._reclaim_due = False
        try:
            await self._reclaim_all()
        except BaseException:
            self._reclaim_due = True
            raise
        await self._flush_releases()

    async def _reclaim_all(self) -> None:
        for key, owner in list(self._claims.items()):
            if self._claims.get(key) != owner:
                continue  # released meanwhile
            holder = await self._claim_once(key, owner)
            if self._claims.get(key) != owner:
                if holder == owner:
                    self._pending_releases.add((key, owner))  # flushed below, or later
                continue
            if holder == owner:
                continue
            del self._claims[key]
            log.warning(
                "node %s lost %s to %s while its lease was expired",
                self.node_id,
                printable(key),
                printable(holder or "nobody"),
            )
            for callback in list(self._lost):
                callback(key, owner)
        for key, group, member in sorted(self._memberships):
            if (key, group, member) not in self._memberships:
                continue  # ended meanwhile
            self._pending_states.discard((key, group, member))  # written by the join
            holder = await self._join_group_once(key, group, member)
            if (key, group, member) not in self._memberships:
                if holder == group:
                    self._pending_leaves.add((key, group, member))  # flushed below, or later
                continue
            if holder == group:
                continue
            self._forget_membership((key, group, member))
            log.warning(
                "node %s: a member of the group holding %s lost it to %s while its lease "
                "was expired",
                self.node_id,
                printable(key),
                printable(holder),
            )
            for callback in list(self._lost):
                callback(key, group)

    async def _revoke(self) -> None:
        lease, self._lease = self._lease, None
        if lease is None:
            return
        try:
            await self._post("/v3/lease/revoke", {"ID": lease}, http=self._lease_post)
        except ClusterUnavailableError as exc:
            log.info("node %s: lease not revoked (it will expire): %s", self.node_id, exc.message)

    def _unreachable(self, exc: ClusterUnavailableError) -> None:
        if self._reachable:
            log.warning("node %s: cluster engine unreachable: %s", self.node_id, exc.message)
        self._reachable = False

    def _reached(self) -> None:
        if not self._reachable:
            log.info("node %s: cluster engine reachable again", self.node_id)
        self._reachable = True

    # ------------------------------------------------------------------ keys

    async def claim(self, key: str, owner: str) -> str:
        """See :meth:`Registry.claim`. A key held by this client's own previous session
        (``replace`` of its identity named it: a session on a node that died, its lease
        not expired yet, or on a live node dropping it as a ghost) is waited for, up to
        one lease TTL and a second, and claimed the moment it goes, instead of being
        refused: the client would only try again on its backoff, each try a request."""
        holder = await self._claim_once(key, owner)
        ghost = self._previous.get(owner)
        if holder != owner and holder == ghost and not is_group(holder):
            holder = await self._claim_after_ghost(key, owner, holder)
        if holder == owner:
            self._claims[key] = owner
            self._pending_releases.discard((key, owner))
        return holder

    async def _claim_once(self, key: str, owner: str) -> str:
        lease = self._require()
        full = self._key(key)
        for _ in range(_CLAIM_ATTEMPTS):
            reply = await self._post(
                "/v3/kv/txn",
                {
                    "compare": [
                        {"key": full, "target": "CREATE", "create_revision": "0", "result": "EQUAL"}
                    ],
                    "success": [
                        {"request_put": {"key": full, "value": _b64(owner), "lease": lease}}
                    ],
                    "failure": [{"request_range": {"key": full}}, self._count_members(key)],
                },
            )
            if reply.get("succeeded"):
                return owner
            holder = await self._holder(key, reply["responses"])
            if holder is not None:
                return holder
        raise ClusterUnavailableError(f"{printable(key)} keeps changing owner; try again")

    def _count_members(self, key: str) -> dict[str, Any]:
        prefix = self.prefix + members_prefix(key)
        return {
            "request_range": {
                "key": _b64(prefix),
                "range_end": _range_end(prefix),
                "count_only": True,
            }
        }

    async def _holder(self, key: str, responses: list[dict[str, Any]]) -> str | None:
        """The holder in a reply of ``[range of the key, count of its members]``; ``None``
        if nobody holds it, or if a group with no member left did (the last one's node
        died), cleared now: either way the caller tries again."""
        kvs = responses[0]["response_range"].get("kvs", [])
        if not kvs:
            return None
        holder = _text(kvs[0].get("value", ""))
        if is_group(holder) and not int(responses[1]["response_range"].get("count", 0)):
            await self._clear_empty_group(key, holder)
            return None
        return holder

    def _group_empty(self, key: str, group: str) -> list[dict[str, Any]]:
        """Compares true while ``group`` holds ``key`` and has no member anywhere."""
        prefix = self.prefix + members_prefix(key)
        return [
            {"key": self._key(key), "target": "VALUE", "value": _b64(group), "result": "EQUAL"},
            {
                "key": _b64(prefix),
                "range_end": _range_end(prefix),
                "target": "CREATE",
                "create_revision": "0",
                "result": "EQUAL",
            },
        ]

    async def clear_group(self, key: str, group: str) -> bool:
        return await self._clear_empty_group(key, group)

    async def _clear_empty_group(self, key: str, group: str) -> bool:
        reply = await self._post(
            "/v3/kv/txn",
            {
                "compare": self._group_empty(key, group),
                "success": [{"request_delete_range": {"key": self._key(key)}}],
                "failure": [],
            },
        )
        cleared = bool(reply.get("succeeded"))
        if cleared:
            log.info("%s given back: its group has no member left", printable(key))
        return cleared

    async def join_group(self, key: str, group: str, member: str) -> str:
        self._offline.discard((key, group, member))  # a member joins online
        holder = await self._join_group_once(key, group, member)
        if holder == group:
            self._memberships.add((key, group, member))
            self._pending_leaves.discard((key, group, member))
        return holder

    def _forget_membership(self, membership: tuple[str, str, str]) -> None:
        self._memberships.discard(membership)
        self._offline.discard(membership)
        self._pending_states.discard(membership)

    async def set_member_online(self, key: str, group: str, member: str, online: bool) -> bool:
        """See :meth:`Registry.set_member_online`. The state is kept here first, so a join
        again under a new lease writes it; one the engine cannot take now is written after
        the next good renewal (``False`` now)."""
        membership = (key, group, member)
        if membership not in self._memberships:
            return False  # left (or never joined): no key to rewrite
        if online:
            self._offline.discard(membership)
        else:
            self._offline.add(membership)
        try:
            written = await self._write_state_once(key, group, member)
        except ClusterUnavailableError:
            self._pending_states.add(membership)
            return False
        except BaseException:  # cut short before it could fail: kept as a release is
            self._pending_states.add(membership)
            raise
        # a state that changed while the request was out is written by its own call
        self._pending_states.discard(membership)
        return written

    async def _write_state_once(self, key: str, group: str, member: str) -> bool:
        """Put the member key's current state, only while it is under this node's lease:
        a member that left meanwhile (its key deleted) is never written back."""
        lease = self._require()
        full = self._key(member_key(key, member))
        online = (key, group, member) not in self._offline
        reply = await self._post(
            "/v3/kv/txn",
            {
                "compare": [{"key": full, "target": "LEASE", "lease": lease, "result": "EQUAL"}],
                "success": [
                    {
                        "request_put": {
                            "key": full,
                            "value": _b64(member_value(group, online)),
                            "lease": lease,
                        }
                    }
                ],
                "failure": [],
            },
        )
        return bool(reply.get("succeeded"))

    async def _join_group_once(self, key: str, group: str, member: str) -> str:
        """One transaction joins the group if it holds ``key``, or forms it (the key under
        no lease, the member under this node's) if nobody does: a member racing another
        member on another node either forms the group or joins the one that did."""
        lease = self._require()
        full = self._key(key)
        online = (key, group, member) not in self._offline
        put_member = {
            "request_put": {
                "key": self._key(member_key(key, member)),
                "value": _b64(member_value(group, online)),
                "lease": lease,
            }
        }
        for _ in range(_CLAIM_ATTEMPTS):
            reply = await self._post(
                "/v3/kv/txn",
                {
                    "compare": [
                        {"key": full, "target": "VALUE", "value": _b64(group), "result": "EQUAL"}
                    ],
                    "success": [put_member],
                    "failure": [
                        {
                            "request_txn": {
                                "compare": [
                                    {
                                        "key": full,
                                        "target": "CREATE",
                                        "create_revision": "0",
                                        "result": "EQUAL",
                                    }
                                ],
                                "success": [
                                    {"request_put": {"key": full, "value": _b64(group)}},
                                    put_member,
                                ],
                                "failure": [
                                    {"request_range": {"key": full}},
                                    self._count_members(key),
                                ],
                            }
                        }
                    ],
                },
            )
            if reply.get("succeeded"):
                return group
            inner = reply["responses"][0]["response_txn"]
            if inner.get("succeeded"):
                return group
            holder = await self._holder(key, inner["responses"])
            if holder is not None:
                return holder
        raise ClusterUnavailableError(f"{printable(key)} keeps changing owner; try again")

    async def leave_group(self, key: str, group: str, member: str) -> bool:
        """See :meth:`Registry.leave_group`; kept and made after the next good renewal when
        the engine cannot be reached (``False`` now), as a release is."""
        self._forget_membership((key, group, member))
        try:
            return await self._leave_once(key, group, member)
        except ClusterUnavailableError:
            self._pending_leaves.add((key, group, member))
            return False
        except BaseException:  # cut short before it could fail: kept as a release is
            self._pending_leaves.add((key, group, member))
            raise

    async def _leave_once(self, key: str, group: str, member: str) -> bool:
        full = self._key(member_key(key, member))

        def delete_if(online: bool, otherwise: list[dict[str, Any]]) -> dict[str, Any]:
            value = _b64(member_value(group, online))
            return {
                "compare": [{"key": full, "target": "VALUE", "value": value, "result": "EQUAL"}],
                "success": [{"request_delete_range": {"key": full}}],
                "failure": otherwise,
            }

        # the member key in either state, in one request: online, else offline
        await self._post("/v3/kv/txn", delete_if(True, [{"request_txn": delete_if(False, [])}]))
        # a second transaction: the compares of one see none of its own writes
        return await self._clear_empty_group(key, group)

    async def _claim_after_ghost(self, key: str, owner: str, ghost: str) -> str:
        if self._nursery is None:
            return ghost
        entry = (ghost, trio.Event())
        self._ghost_waiters.setdefault(key, []).append(entry)
        try:
            await self._open_ghost_watch()
            # checked again once the watch is open: a release between the first claim and
            # the watch's start is seen here, every later one by the watch
            holder = await self._claim_once(key, owner)
            if holder != ghost:
                return holder
            with trio.move_on_after(self.lease_ttl + 1.0):
                await entry[1].wait()
            return await self._claim_once(key, owner)
        finally:
            waiters = self._ghost_waiters.get(key, [])
            if entry in waiters:
                waiters.remove(entry)
            if not waiters:
                self._ghost_waiters.pop(key, None)
            if not self._ghost_waiters and self._ghost_watch is not None:
                self._ghost_watch[0].cancel()  # nobody waits: no watch
                self._ghost_watch = None

    async def _open_ghost_watch(self) -> None:
        """One watch of the registry for all the claims waiting for a ghost's key, opened
        for the first of them and closed after the last (a failover's moment)."""
        if self._ghost_watch is None:
            assert self._nursery is not None
            watch = self._ghost_watch = (trio.CancelScope(), trio.Event())
            self._nursery.start_soon(self._run_ghost_watch, *watch)
        await self._ghost_watch[1].wait()

    async def _run_ghost_watch(self, scope: trio.CancelScope, opened: trio.Event) -> None:
        try:
            with scope:
                async with trio.open_nursery() as nursery:
                    await nursery.start(functools.partial(self.watch, "", self._ghost_changed))
                    opened.set()
        except ClusterUnavailableError as exc:  # the waits end by their bound instead
            log.info("node %s: no watch for restores: %s", self.node_id, exc.message)
        finally:
            opened.set()
            if self._ghost_watch is not None and self._ghost_watch[0] is scope:
                self._ghost_watch = None

    def _ghost_changed(self, change: Change) -> None:
        for ghost, gone in self._ghost_waiters.get(change.key, []):
            if change.value != ghost:
                gone.set()

    async def replace(self, key: str, owner: str) -> str | None:
        lease = self._require()
        reply = await self._post(
            "/v3/kv/put",
            {"key": self._key(key), "value": _b64(owner), "lease": lease, "prev_kv": True},
        )
        self._claims[key] = owner
        self._pending_releases.discard((key, owner))
        previous = reply.get("prev_kv")
        replaced = _text(previous.get("value", "")) if previous else None
        if replaced is not None and replaced != owner and key.startswith("clients/"):
            self._previous[owner] = replaced
        return replaced

    async def release(self, key: str, owner: str) -> bool:
        """Delete ``key`` if ``owner`` still holds it. When the engine cannot be reached, or
        the request is cut short before it could fail (the caller's bound, a cancellation),
        the release is kept and made after the next good renewal (returns ``False`` now, or
        raises what cut it short), so a key is never left behind under a lease that lives on."""
        if self._claims.get(key) == owner:
            del self._claims[key]
        if key.startswith("clients/"):
            self._previous.pop(owner, None)  # the session ends
        try:
            return await self._release_once(key, owner)
        except ClusterUnavailableError:
            self._pending_releases.add((key, owner))
            return False
        except BaseException:
            # cut short before it could fail (the caller's bound, a cancellation): the
            # engine may not have it, and the lease lives on, so it is kept the same way
            self._pending_releases.add((key, owner))
            raise

    async def _release_once(self, key: str, owner: str) -> bool:
        full = self._key(key)
        reply = await self._post(
            "/v3/kv/txn",
            {
                "compare": [
                    {"key": full, "target": "VALUE", "value": _b64(owner), "result": "EQUAL"}
                ],
                "success": [{"request_delete_range": {"key": full}}],
                "failure": [],
            },
        )
        return bool(reply.get("succeeded"))

    async def _flush_releases(self) -> None:
        for key, owner in sorted(self._pending_releases):
            try:
                await self._release_once(key, owner)
            except ClusterUnavailableError:
                return
            self._pending_releases.discard((key, owner))
        for key, group, member in sorted(self._pending_leaves):
            try:
                await self._leave_once(key, group, member)
            except ClusterUnavailableError:
                return
            self._pending_leaves.discard((key, group, member))
        for membership in sorted(self._pending_states):
            if membership not in self._pending_states:
                continue  # written meanwhile, or ended
            try:
                await self._write_state_once(*membership)
            except ClusterUnavailableError:
                return
            self._pending_states.discard(membership)

    async def lookup(self, key: str) -> str | None:
        reply = await self._post("/v3/kv/range", {"key": self._key(key)})
        kvs = reply.get("kvs", [])
        return _text(kvs[0].get("value", "")) if kvs else None

    async def nodes(self) -> dict[str, str]:
        entries = await self.entries("nodes/")
        return {key[len("nodes/") :]: value for key, value in entries.items()}

    async def entries(self, prefix: str = "") -> dict[str, str]:
        """Every key under ``prefix`` (relative to the registry's prefix) and its value; a
        read, which needs no lease (``pytunnel cluster status`` makes it without joining)."""
        full = self.prefix + prefix
        reply = await self._post("/v3/kv/range", {"key": _b64(full), "range_end": _range_end(full)})
        skip = len(self.prefix)
        return {_text(kv["key"])[skip:]: _text(kv.get("value", "")) for kv in reply.get("kvs", [])}

    async def aclose(self) -> None:
        """Close the HTTP clients of a registry used without :meth:`run` (which closes them)."""
        await self._http.aclose()
        self._lease_http.close()

    # ------------------------------------------------------------------ watches

    async def watch(
        self,
        prefix: str,
        on_change: WatchCallback,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """See :meth:`Registry.watch`. A watch the engine drops is opened again from the
        revision after the last one seen, so no change is missed; the first one must open,
        or this raises ``ClusterUnavailableError``."""
        full = self.prefix + prefix
        next_revision: int | None = None
        started = False
        attempts = 0  # members tried before the first watch opened
        denied = 0  # refusals in a row, each after a new token
        while True:
            request: dict[str, Any] = {"key": _b64(full), "range_end": _range_end(full)}
            if next_revision is not None:
                request["start_revision"] = str(next_revision)
            try:
                self._check_open()
                endpoint = self.endpoint
                headers, token = await self._auth_headers(endpoint)
                async with self._http.stream(
                    "POST",
                    f"{endpoint}/v3/watch",
                    json={"create_request": request},
                    headers=headers,
                    timeout=self._watch_timeout,
                ) as response:
                    if response.status_code != 200:
                        raise ClusterUnavailableError(f"watch refused: HTTP {response.status_code}")
                    async for line in response.aiter_lines():
                        if not line.strip():
                            continue
                        result = _watch_result(line)
                        revision = int(result.get("header", {}).get("revision", 0))
                        if result.get("canceled"):
                            reason = str(result.get("cancel_reason", ""))
                            if any(t in reason for t in (*_STALE_TOKEN, "permission denied")):
                                # a stale token (expired, or older than the engine's users)
                                # or a user without the right: a new token once, then it is
                                # the user's right
                                denied += 1
                                self._forget_token(token)
                                if self._user is None or denied > 1:
                                    raise ClusterAuthError(f"watch refused: {printable(reason)}")
                                break
                            # compacted past what we need: from now on
                            log.warning("watch of %s cancelled by the engine", printable(prefix))
                            next_revision = None
                            break
                        if result.get("created"):
                            denied = 0
                            if next_revision is None:
                                # a watch from "now": it begins after the current revision.
                                # One resumed from a revision keeps it until its backlog
                                # arrives: cut again before, it must resume there again
                                next_revision = revision + 1
                            if not started:
                                started = True
                                task_status.started()
                        for event in result.get("events", []):
                            kv = event["kv"]
                            next_revision = int(kv["mod_revision"]) + 1
                            value = (
                                None
                                if event.get("type") == "DELETE"
                                else _text(kv.get("value", ""))
                            )
                            on_change(Change(_text(kv["key"])[len(self.prefix) :], value))
                if denied == 1:
                    continue  # at once, with the new token
            except (httpx.HTTPError, ClusterUnavailableError, ValueError, KeyError) as exc:
                failed_at = self.endpoint
                self._next_member()
                if not started:
                    attempts += 1
                    if attempts < len(self.endpoints):
                        continue  # the next member, at once
                    error = ClusterAuthError if _refused(exc) else ClusterUnavailableError
                    raise error(
                        f"cannot watch {printable(prefix)} at {failed_at}: {_describe(exc)}"
                    ) from None
                log.info(
                    "watch of %s broken (%s); opening it again", printable(prefix), _describe(exc)
                )
            if not started:
                raise ClusterUnavailableError(f"the watch of {printable(prefix)} ended at once")
            await trio.sleep(self._retry_interval)

    # ------------------------------------------------------------------ requests

    def _check_open(self) -> None:
        """After ``run`` has ended (its lease revoked, its HTTP client closed) the node is out
        of the cluster: what is still asked of it (a release on the way out) is refused."""
        if self._http.is_closed:
            raise ClusterUnavailableError(f"node {self.node_id} has left the cluster")

    def _key(self, key: str) -> str:
        return _b64(self.prefix + key)

    def _require(self) -> str:
        if self._lease is None or not self.available:
            raise ClusterUnavailableError(
                f"node {self.node_id} has no current lease on the cluster engine at "
                f"{self.endpoint}; it registers nothing until the engine answers again"
            )
        return self._lease

    async def _post(
        self, path: str, body: dict[str, Any], *, http: _Poster | None = None
    ) -> dict[str, Any]:
        """One request to the gateway, to each member in turn until one serves it; every way
        it can fail is a ClusterUnavailableError (a ClusterAuthError when every member
        refused this node's credentials or certificate, or failed its TLS verification).

        A request a member took but did not answer may be sent again to the next one; each
        is safe to repeat: a claim finds its own owner, a release finds nothing to delete, a
        put writes the same value, a second lease would only expire unused. ``http`` sends
        it (default: :meth:`_shared_post`, the connections of claims and reads)."""
        failures = []
        refused = 0
        for _ in self.endpoints:
            self._check_open()
            endpoint = self.endpoint
            try:
                response, reply = await self._send(endpoint, path, body, http or self._shared_post)
            except (httpx.HTTPError, ValueError) as exc:
                refused += isinstance(_tls_failure(exc), ssl.SSLError)
                failures.append(f"{endpoint}: {_describe(exc)}")
                self._next_member()
                continue
            except ClusterUnavailableError as exc:  # no token could be had from this member
                refused += isinstance(exc, ClusterAuthError)
                failures.append(f"{endpoint}: {exc.message}")
                self._next_member()
                continue
            if response.status_code >= 500:  # no leader, quorum lost: another member may serve
                failures.append(f"{endpoint}: {printable(_reason(reply, response.status_code))}")
                self._next_member()
                continue
            if response.status_code != 200 or not isinstance(reply, dict) or "error" in reply:
                reason = _reason(reply, response.status_code)
                error = ClusterAuthError if _refused(reason) else ClusterUnavailableError
                raise error(
                    f"cluster engine at {endpoint} refused {path}: {printable(reason)}"
                    + (_AUTH_HINT if self._user is None and "user name is empty" in reason else "")
                )
            return reply
        if refused == len(self.endpoints):
            raise ClusterAuthError(f"cluster engine refused this node: {'; '.join(failures)}")
        raise ClusterUnavailableError(f"cluster engine unreachable: {'; '.join(failures)}")

    async def _shared_post(
        self, url: str, body: dict[str, Any], headers: dict[str, str]
    ) -> httpx.Response:
        # a turn not had within the request timeout fails like a pool that had no free
        # connection in time (httpx's own pool timeout, which this replaces)
        with trio.move_on_after(self._request_timeout) as waiting:
            await self._requests.acquire()
        if waiting.cancelled_caught:
            raise httpx.PoolTimeout("no connection to the cluster engine free in time")
        try:
            return await self._http.post(url, json=body, headers=headers)
        finally:
            self._requests.release()

    async def _lease_post(
        self, url: str, body: dict[str, Any], headers: dict[str, str]
    ) -> httpx.Response:
        """A request over the lease's own connection, in its own thread (see ``__init__``).
        Abandoned if cancelled (a node stopping): its timeout ends it soon anyway."""
        return await trio.to_thread.run_sync(
            functools.partial(self._lease_http.post, url, json=body, headers=headers),
            abandon_on_cancel=True,
            limiter=self._lease_thread,
        )

    async def _send(
        self, endpoint: str, path: str, body: dict[str, Any], http: _Poster
    ) -> tuple[httpx.Response, Any]:
        """One request to one member, with this node's token; sent once more with a new
        token when the member says the one sent is stale."""
        headers, token = await self._auth_headers(endpoint)
        response = await http(f"{endpoint}{path}", body, headers)
        reply = response.json()
        if token is not None and any(s in _reason(reply, 200) for s in _STALE_TOKEN):
            self._forget_token(token)
            headers, token = await self._auth_headers(endpoint)
            response = await http(f"{endpoint}{path}", body, headers)
            reply = response.json()
        return response, reply

    async def _auth_headers(self, endpoint: str) -> tuple[dict[str, str], str | None]:
        """The headers that authenticate a request (none without a user) and the token in
        them; a token is taken first if there is none. One authentication at a time: the
        requests that find the token stale together wait for one new token."""
        if self._user is None or self._password is None:
            return {}, None
        async with self._auth_lock:
            if self._auth_token is None:
                self._auth_token = await self._authenticate(endpoint, self._user, self._password)
            token = self._auth_token
        return {"Authorization": token}, token

    def _forget_token(self, token: str | None) -> None:
        """Drop ``token`` as stale, unless another request already replaced it."""
        if token is not None and self._auth_token == token:
            self._auth_token = None

    async def _authenticate(self, endpoint: str, user: str, password: str) -> str:
        # over the lease's connection: a renewal waiting for a new token must not wait for
        # a connection behind the claims too
        response = await self._lease_post(
            f"{endpoint}/v3/auth/authenticate", {"name": user, "password": password}, {}
        )
        reply = response.json()
        token = reply.get("token") if isinstance(reply, dict) else None
        if response.status_code >= 500:  # no leader: the member cannot tell, another may
            raise ClusterUnavailableError(printable(_reason(reply, response.status_code)))
        if response.status_code != 200 or not isinstance(token, str) or not token:
            raise ClusterAuthError(
                f"user {printable(user)} refused: {printable(_reason(reply, response.status_code))}"
            )
        log.info("node %s: authenticated to the engine as %s", self.node_id, printable(user))
        return token


_AUTH_HINT = " (the engine requires authentication: give a user and a password)"


def _refused(reason: object) -> bool:
    """Whether a refusal (a message or an exception) is about this node's credentials or
    certificate rather than the engine's health."""
    if isinstance(reason, ClusterAuthError):
        return True
    if isinstance(reason, BaseException):
        return isinstance(_tls_failure(reason), ssl.SSLError)
    return any(text in str(reason) for text in _REFUSED)


def _tls_failure(exc: BaseException) -> BaseException | None:
    """The ``ssl.SSLError`` behind an httpx error (a CA that does not verify the member, a
    client certificate the member refused), if that is what it is."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None or isinstance(seen, ssl.SSLError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _reason(reply: object, status: int) -> str:
    if isinstance(reply, dict):
        return str(reply.get("message", reply.get("error", status)))
    return str(status)


def _watch_result(line: str) -> dict[str, Any]:
    message = json.loads(line)
    if not isinstance(message, dict) or "result" not in message:
        reason = message.get("error") if isinstance(message, dict) else message
        raise ClusterUnavailableError(f"watch failed: {printable(str(reason))}")
    result: dict[str, Any] = message["result"]
    return result


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ClusterUnavailableError):
        return exc.message
    tls = _tls_failure(exc)
    if tls is not None and tls is not exc:  # httpx says only "ConnectError": say why
        return printable(f"{type(exc).__name__}: {tls}")
    return printable(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
