"""``pytunnel.cluster.etcd``: leases, engine loss and recovery, against a real etcd."""

from __future__ import annotations

import contextlib
import functools
import os
import subprocess
import sys

import httpx
import pytest
import trio
from helpers import EtcdServer, closed_port, count_tasks, needs_etcd, wait_until

from pytunnel.cluster import Change, EtcdRegistry
from pytunnel.cluster._ownership import (
    RELEASE_TIMEOUT,
    claim_or_refuse,
    leave_quietly,
    member_state_quietly,
    release_quietly,
)
from pytunnel.errors import ClusterUnavailableError, ErrorCode

pytestmark = needs_etcd

# A node process that claims a key, says so, and then only keeps its lease alive.
_NODE = """
import sys, trio
from pytunnel.cluster import EtcdRegistry

async def main():
    registry = EtcdRegistry(sys.argv[1], "doomed", lease_ttl=2)
    async with trio.open_nursery() as nursery:
        await nursery.start(registry.run)
        assert await registry.claim("tcp/7777", "doomed/1") == "doomed/1"
        print("ready", flush=True)

trio.run(main)
"""


async def _ready(node: trio.Process) -> None:
    """Until the node process says it holds its keys (its one line, ``ready``)."""
    assert node.stdout is not None
    with trio.fail_after(30):  # a hang detector
        line = b""
        while not line.endswith(b"\n"):
            chunk = await node.stdout.receive_some()
            assert chunk, "the node process exited"
            line += chunk
    assert line == b"ready\n"


async def test_a_dead_nodes_keys_expire_with_its_lease(
    etcd: EtcdServer, nursery: trio.Nursery
) -> None:
    survivor = EtcdRegistry(etcd.endpoint, "survivor")
    await nursery.start(survivor.run)
    seen: list[Change] = []
    await nursery.start(functools.partial(survivor.watch, "", seen.append))
    node = await trio.lowlevel.open_process(
        [sys.executable, "-c", _NODE, etcd.endpoint], stdout=subprocess.PIPE
    )
    try:
        await _ready(node)
        assert await survivor.claim("tcp/7777", "survivor/1") == "doomed/1"
        assert "doomed" in await survivor.nodes()
    finally:
        os.kill(node.pid, 9)  # by pid: a node dying without a word
        with trio.CancelScope(shield=True):
            await node.wait()
    # the lease (2 s) expires: both the node's key and its claim go, and the watch says so
    await wait_until(
        lambda: Change("tcp/7777", None) in seen, seconds=20, what=lambda: f"seen {seen}"
    )
    assert Change("nodes/doomed", None) in seen
    assert await survivor.claim("tcp/7777", "survivor/1") == "survivor/1"
    assert list(await survivor.nodes()) == ["survivor"]


async def test_a_group_whose_last_members_node_is_gone_gives_its_key_back(
    etcd: EtcdServer, nursery: trio.Nursery
) -> None:
    """The group's hold on a key is under no lease (it spans nodes); its members' keys are
    under their nodes'. When the last member's node goes without a word, the hold is left
    with no member: the next claim of the key clears it and wins, whatever the claim; or a
    node that saw it clears it (only that group's, only with no member)."""
    group = "@group/" + "3" * 32
    survivor = EtcdRegistry(etcd.endpoint, "survivor")
    await nursery.start(survivor.run)
    for claim in ("plain", "group", "cleared"):
        doomed = EtcdRegistry(etcd.endpoint, "doomed", lease_ttl=2)
        async with trio.open_nursery() as inner:
            await inner.start(doomed.run)
            assert await doomed.join_group("tcp/7777", group, "doomed/1") == group
            assert await survivor.claim("tcp/7777", "survivor/1") == group
            assert doomed._lease is not None
            # the node is gone: its lease revoked (as by expiry), nothing released
            await doomed._post("/v3/lease/revoke", {"ID": doomed._lease})
            doomed._lease = None
            inner.cancel_scope.cancel()
        assert await survivor.lookup("tcp/7777") == group
        if claim == "plain":
            assert await survivor.claim("tcp/7777", "survivor/1") == "survivor/1"
            assert await survivor.release("tcp/7777", "survivor/1")
        elif claim == "cleared":  # what a node that saw the last member's node go does
            assert await survivor.clear_group("tcp/7777", "@group/" + "4" * 32) is False
            assert await survivor.clear_group("tcp/7777", group) is True
        else:
            other = "@group/" + "4" * 32
            assert await survivor.join_group("tcp/7777", other, "survivor/2") == other
            assert await survivor.leave_group("tcp/7777", other, "survivor/2")
        assert await survivor.entries("tcp/") == {}


async def test_a_clean_stop_frees_the_nodes_keys_at_once(
    etcd: EtcdServer, nursery: trio.Nursery
) -> None:
    other = EtcdRegistry(etcd.endpoint, "other")
    await nursery.start(other.run)
    baseline = count_tasks()
    registry = EtcdRegistry(etcd.endpoint, "leaving", lease_ttl=60)
    async with trio.open_nursery() as inner:
        await inner.start(registry.run)
        assert await registry.claim("http/app.example.com", "leaving/1") == "leaving/1"
        inner.cancel_scope.cancel()
    # revoked on the way out, not left for 60 s
    assert await other.lookup("http/app.example.com") is None
    assert list(await other.nodes()) == ["other"]
    assert count_tasks() == baseline
    # what is still asked of a node that left is one typed refusal, never a crash
    with pytest.raises(ClusterUnavailableError, match="has left the cluster"):
        await registry.lookup("http/app.example.com")
    assert await registry.release("http/app.example.com", "leaving/1") is False
    with pytest.raises(ClusterUnavailableError, match="cannot watch"):
        await registry.watch("", lambda change: None)


async def test_engine_loss_refuses_claims_and_recovery_is_automatic(
    etcd: EtcdServer, nursery: trio.Nursery
) -> None:
    registry = EtcdRegistry(etcd.endpoint, "n1", lease_ttl=3, request_timeout=1.0)
    await nursery.start(registry.run)
    seen: list[Change] = []
    await nursery.start(functools.partial(registry.watch, "tcp/", seen.append))
    assert await registry.claim("tcp/1", "n1/a") == "n1/a"
    assert await registry.claim("tcp/2", "n1/a") == "n1/a"

    await etcd.kill()
    with trio.fail_after(10):  # a hang detector: a refused connection answers at once
        with pytest.raises(ClusterUnavailableError) as info:
            await registry.claim("tcp/3", "n1/a")
    assert info.value.code == ErrorCode.CLUSTER_UNAVAILABLE
    with pytest.raises(ClusterUnavailableError):
        await registry.lookup("tcp/1")
    # a release while the engine is away is kept, not lost
    assert await registry.release("tcp/2", "n1/a") is False
    # once the lease may have expired the node refuses on its own, engine or not
    await wait_until(lambda: not registry.available, seconds=20)
    with pytest.raises(ClusterUnavailableError, match="no current lease"):
        await registry.claim("tcp/3", "n1/a")

    await etcd.start()  # the same data: the engine comes back with its keys and leases
    await wait_until(lambda: registry.available, seconds=20)
    assert await registry.claim("tcp/3", "n1/a") == "n1/a"
    assert await registry.lookup("tcp/1") == "n1/a"
    await wait_until(lambda: Change("tcp/2", None) in seen, seconds=20, what=lambda: str(seen))
    assert await registry.lookup("tcp/2") is None
    # the watch reopened where it left off: later changes still arrive
    await registry.release("tcp/3", "n1/a")
    await wait_until(lambda: Change("tcp/3", None) in seen, what=lambda: str(seen))


async def test_a_lost_lease_is_replaced_and_claims_taken_meanwhile_are_reported(
    etcd: EtcdServer, nursery: trio.Nursery
) -> None:
    registry = EtcdRegistry(etcd.endpoint, "n1", lease_ttl=3)
    other = EtcdRegistry(etcd.endpoint, "n2")
    await nursery.start(registry.run)
    await nursery.start(other.run)
    lost: list[tuple[str, str]] = []
    registry.on_lost(lambda key, owner: lost.append((key, owner)))
    await registry.claim("tcp/1", "n1/a")
    await registry.claim("tcp/2", "n1/a")
    # the lease ends behind the node's back (what an expiry during a partition looks like),
    # and another node takes one of its keys before it notices
    async with httpx.AsyncClient() as http:
        leases = (await http.post(f"{etcd.endpoint}/v3/lease/leases", json={})).json()
        for lease in leases["leases"]:
            reply = await http.post(
                f"{etcd.endpoint}/v3/lease/timetolive", json={"ID": lease["ID"], "keys": True}
            )
            if len(reply.json().get("keys", [])) == 3:  # n1's: its node key and two claims
                await http.post(f"{etcd.endpoint}/v3/lease/revoke", json={"ID": lease["ID"]})
    assert await other.claim("tcp/2", "n2/b") == "n2/b"
    await wait_until(lambda: lost == [("tcp/2", "n1/a")], seconds=20, what=lambda: str(lost))
    await wait_until(lambda: registry.available, seconds=20)
    assert await other.lookup("tcp/1") == "n1/a"  # claimed again under the new lease
    assert await other.lookup("tcp/2") == "n2/b"
    assert set(await other.nodes()) == {"n1", "n2"}


async def test_an_engine_that_never_answered_is_a_typed_error_at_start() -> None:
    nowhere = f"http://127.0.0.1:{closed_port()}"
    with trio.fail_after(10):  # a hang detector
        async with trio.open_nursery() as nursery:
            with pytest.raises(ClusterUnavailableError, match="unreachable"):
                await nursery.start(EtcdRegistry(nowhere, "n1").run)
            watcher = EtcdRegistry(nowhere, "n2")
            with pytest.raises(ClusterUnavailableError, match="cannot watch"):
                await nursery.start(functools.partial(watcher.watch, "", lambda change: None))
            with pytest.raises(ClusterUnavailableError, match="no current lease"):
                await watcher.claim("tcp/1", "n2/a")


async def _claim_once_it_answers(registry: EtcdRegistry, key: str, owner: str) -> str:
    """``claim``, tried again while the engine is unavailable (for at most 30 s)."""
    with trio.fail_after(30):
        while True:
            try:
                return await registry.claim(key, owner)
            except ClusterUnavailableError:
                await trio.sleep(0.2)


async def test_a_three_member_etcd_serves_on_with_one_member_down(
    tmp_path: object, nursery: trio.Nursery
) -> None:
    """Every member listed: with the member in use killed, requests, renewals and the watch
    go to the others; with the quorum lost, claims are refused; with it back, all recovers."""
    members = EtcdServer.members(str(tmp_path), 3)
    try:
        for member in members:
            await member.launch()
        for member in members:
            await member.wait_healthy()
        registry = EtcdRegistry(
            [m.endpoint for m in members], "n1", lease_ttl=6, request_timeout=1.0
        )
        other = EtcdRegistry([m.endpoint for m in reversed(members)], "n2")
        await nursery.start(registry.run)
        await nursery.start(other.run)
        seen: list[Change] = []
        await nursery.start(functools.partial(registry.watch, "tcp/", seen.append))
        assert await registry.claim("tcp/1", "n1/a") == "n1/a"
        assert registry.endpoint == members[0].endpoint

        await members[0].kill()
        # served by another member, once the two left have a leader (an election, when the
        # member killed led, takes a few seconds on a busy machine)
        assert await _claim_once_it_answers(registry, "tcp/2", "n1/a") == "n1/a"
        assert registry.endpoint != members[0].endpoint
        assert await _claim_once_it_answers(other, "tcp/3", "n2/b") == "n2/b"
        await wait_until(
            lambda: Change("tcp/3", "n2/b") in seen, seconds=20, what=lambda: str(seen)
        )
        await trio.sleep(7)  # longer than the TTL: renewals went to the living members
        assert registry.available
        assert await other.lookup("tcp/1") == "n1/a"

        await members[1].kill()  # one of three left: no quorum
        with trio.fail_after(30), pytest.raises(ClusterUnavailableError):
            await registry.claim("tcp/4", "n1/a")

        await members[0].start()
        await members[1].start()
        await wait_until(lambda: registry.available, seconds=30)
        assert await _claim_once_it_answers(registry, "tcp/4", "n1/a") == "n1/a"
        await wait_until(
            lambda: Change("tcp/4", "n1/a") in seen, seconds=20, what=lambda: str(seen)
        )
        nursery.cancel_scope.cancel()
    finally:
        for member in members:
            await member.kill()


async def test_a_members_state_is_one_write_kept_across_a_lost_lease_and_either_state_leaves(
    etcd: EtcdServer, nursery: trio.Nursery
) -> None:
    """A member's key says whether it is online: each change is one write other nodes'
    watches see; an offline member still holds the group's key; joined again under a new
    lease it is still offline; it leaves from either state, the last one giving the key
    back; a member that left is never written back."""
    group = "@group/" + "5" * 32
    member = "groups/tcp/7777/n1/1"
    registry = EtcdRegistry(etcd.endpoint, "n1", lease_ttl=3)
    other = EtcdRegistry(etcd.endpoint, "n2")
    await nursery.start(registry.run)
    await nursery.start(other.run)
    seen: list[Change] = []
    await nursery.start(functools.partial(other.watch, "groups/", seen.append))
    assert await registry.join_group("tcp/7777", group, "n1/1") == group
    await wait_until(lambda: seen == [Change(member, group)], what=lambda: str(seen))

    assert await registry.set_member_online("tcp/7777", group, "n1/1", False)
    offline = Change(member, group + " offline")
    await wait_until(lambda: seen[1:] == [offline], what=lambda: str(seen))
    # an offline member still holds the group's key
    assert await other.claim("tcp/7777", "n2/a") == group
    assert await other.join_group("tcp/7777", "@group/" + "6" * 32, "n2/1") == group

    # the lease ends behind the node's back: joined again, the member is still offline
    assert registry._lease is not None
    await registry._post("/v3/lease/revoke", {"ID": registry._lease})
    await wait_until(lambda: seen[-2:] == [Change(member, None), offline], seconds=20)
    assert (await other.entries("groups/"))[member] == group + " offline"

    assert await registry.set_member_online("tcp/7777", group, "n1/1", True)
    await wait_until(lambda: seen[-1] == Change(member, group), what=lambda: str(seen))
    assert await registry.set_member_online("tcp/7777", group, "n1/1", False)
    await wait_until(lambda: seen[-1] == offline, what=lambda: str(seen))
    events = len(seen)
    assert await registry.leave_group("tcp/7777", group, "n1/1")  # offline, the last one
    assert await other.lookup("tcp/7777") is None
    assert await registry.set_member_online("tcp/7777", group, "n1/1", True) is False
    assert await other.entries("groups/") == {}
    await wait_until(lambda: len(seen) == events + 1, what=lambda: str(seen))
    assert seen[-1] == Change(member, None)

    # one that left online too; and a key that is not under this node's lease (a member
    # that left while a state was on its way) is never written back
    assert await registry.join_group("tcp/7777", group, "n1/2") == group
    await other._post(
        "/v3/kv/put",
        {"key": other._key("groups/tcp/7777/n1/3"), "value": "eA=="},  # not n1's lease
    )
    registry._memberships.add(("tcp/7777", group, "n1/3"))
    assert await registry.set_member_online("tcp/7777", group, "n1/3", False) is False
    assert (await other.entries("groups/"))["groups/tcp/7777/n1/3"] == "x"
    await other._post("/v3/kv/deleterange", {"key": other._key("groups/tcp/7777/n1/3")})
    registry._forget_membership(("tcp/7777", group, "n1/3"))
    assert await registry.leave_group("tcp/7777", group, "n1/2")
    assert await other.entries("") == {"nodes/n1": "", "nodes/n2": ""}


async def test_a_members_state_the_engine_could_not_take_is_written_once_it_answers(
    etcd: EtcdServer, nursery: trio.Nursery
) -> None:
    """The engine is away when a member goes offline, then back online, then offline
    again: nothing is lost and nothing piles up; once the engine answers, the member's key
    says offline (the last state), written once."""
    group = "@group/" + "7" * 32
    member = "groups/tcp/7777/n1/1"
    registry = EtcdRegistry(etcd.endpoint, "n1", lease_ttl=3, request_timeout=1.0)
    await nursery.start(registry.run)
    assert await registry.join_group("tcp/7777", group, "n1/1") == group
    await etcd.kill()
    with trio.fail_after(20):  # a hang detector: a refused connection answers at once
        for online in (False, True, False):
            assert await registry.set_member_online("tcp/7777", group, "n1/1", online) is False
    assert registry._pending_states == {("tcp/7777", group, "n1/1")}
    await etcd.start()
    await wait_until(lambda: not registry._pending_states, seconds=30)
    reader = EtcdRegistry(etcd.endpoint, "reader")
    try:
        assert (await reader.entries("groups/"))[member] == group + " offline"
    finally:
        await reader.aclose()
    assert await registry.leave_group("tcp/7777", group, "n1/1")


@pytest.mark.slow
async def test_a_node_under_a_burst_of_claims_keeps_its_lease(
    etcd: EtcdServer, nursery: trio.Nursery
) -> None:
    """Far more claims in flight than the node has connections to the engine (a mass
    failover onto it), and its event loop saturated by them: its renewals are never queued
    behind them, so its lease, and with it every key it holds, outlives the burst (the
    node never leaves the registry, never joins again). Each claim succeeds or is refused
    with the typed error."""
    observer = EtcdRegistry(etcd.endpoint, "observer")
    await nursery.start(observer.run)
    seen: list[Change] = []
    await nursery.start(functools.partial(observer.watch, "nodes/", seen.append))
    busy = EtcdRegistry(etcd.endpoint, "busy", lease_ttl=3)
    await nursery.start(busy.run)
    assert await busy.claim("tcp/1", "busy/held") == "busy/held"
    outcomes = {"claimed": 0, "refused": 0}

    async def claimant(index: int, until: float) -> None:
        while trio.current_time() < until:
            key, owner = f"tcp/{1000 + index}", f"busy/s{index}"
            try:
                if await busy.claim(key, owner) == owner:
                    outcomes["claimed"] += 1
                    await busy.release(key, owner)
            except ClusterUnavailableError:  # no connection free in time: typed, retried
                outcomes["refused"] += 1
                await trio.sleep(0.05)

    with trio.fail_after(120):  # a hang detector
        until = trio.current_time() + 4 * busy.lease_ttl
        async with trio.open_nursery() as burst:
            for index in range(600):
                burst.start_soon(claimant, index, until)
    assert outcomes["claimed"] > 0, outcomes
    assert [change for change in seen if change.value is None] == [], (seen, outcomes)
    assert len(seen) <= 1, seen  # the node key written once (before the watch, or seen)
    assert await observer.lookup("tcp/1") == "busy/held"
    assert "busy" in await observer.nodes()


# A node process whose client holds its identity and a port, then only keeps its lease.
_CLIENTS_NODE = """
import sys, trio
from pytunnel.cluster import EtcdRegistry

async def main():
    registry = EtcdRegistry(sys.argv[1], "doomed", lease_ttl=2)
    async with trio.open_nursery() as nursery:
        await nursery.start(registry.run)
        await registry.replace("clients/laptop", "doomed/1")
        assert await registry.claim("tcp/7778", "doomed/1") == "doomed/1"
        print("ready", flush=True)

trio.run(main)
"""


@pytest.mark.slow
async def test_a_restore_meeting_its_own_dead_session_is_claimed_when_that_lease_ends(
    etcd: EtcdServer, nursery: trio.Nursery
) -> None:
    """A client whose node died reconnects to another node at once; its port is still held
    by its old session there until that node's lease expires. The claim of its restored
    forward waits for the key to go (the survivor's watch) and wins then, in one call,
    instead of being refused and tried again on the client's backoff; any other client is
    refused at once, as before, and a wait is bounded."""
    survivor = EtcdRegistry(etcd.endpoint, "survivor", lease_ttl=3)
    await nursery.start(survivor.run)
    node = await trio.lowlevel.open_process(
        [sys.executable, "-c", _CLIENTS_NODE, etcd.endpoint], stdout=subprocess.PIPE
    )
    try:
        await _ready(node)
    finally:
        os.kill(node.pid, 9)  # by pid: a node dying without a word
        with trio.CancelScope(shield=True):
            await node.wait()
    # another client: refused at once, whatever the holder's state
    assert await survivor.claim("tcp/7778", "survivor/other") == "doomed/1"
    # the same client, reconnected here: its identity names the old session
    assert await survivor.replace("clients/laptop", "survivor/laptop") == "doomed/1"
    with trio.fail_after(30):  # the dead node's 2 s lease, and a hang detector
        assert await survivor.claim("tcp/7778", "survivor/laptop") == "survivor/laptop"
    assert await survivor.lookup("tcp/7778") == "survivor/laptop"
    assert "doomed" not in await survivor.nodes()
    # a predecessor that never lets go (alive, not dropping it): refused once the wait ends
    alive = EtcdRegistry(etcd.endpoint, "alive", lease_ttl=60)
    await nursery.start(alive.run)
    assert await alive.replace("clients/desk", "alive/1") is None
    assert await alive.claim("tcp/7779", "alive/1") == "alive/1"
    assert await survivor.replace("clients/desk", "survivor/desk") == "alive/1"
    with trio.fail_after(30):
        assert await survivor.claim("tcp/7779", "survivor/desk") == "alive/1"
    # the session's end forgets its predecessor: the next claim is refused at once
    await survivor.release("clients/desk", "survivor/desk")
    with trio.fail_after(20):  # a hang detector
        assert await survivor.claim("tcp/7779", "survivor/desk") == "alive/1"
    assert survivor._ghost_watch is None  # no watch left open with nobody waiting


class _SilentRelay:
    """A TCP relay to etcd that, while ``silent``, drops whatever either side sends: the
    engine neither answers nor refuses, as across a network that loses packets. Nothing
    held back is sent later, so a request cut short while it is silent never lands."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = 0
        self.silent = False
        #: while set, only etcd's answers are dropped: requests still reach it
        self.deaf = False

    async def start(self, nursery: trio.Nursery) -> None:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, self._handle, 0, host="127.0.0.1")
        )
        self.port = int(listeners[0].socket.getsockname()[1])

    async def _handle(self, client: trio.SocketStream) -> None:
        async with await trio.open_tcp_stream(*self.target) as server, trio.open_nursery() as n:
            n.start_soon(self._pump, client, server, False)
            n.start_soon(self._pump, server, client, True)

    async def _pump(
        self, source: trio.SocketStream, sink: trio.SocketStream, answers: bool
    ) -> None:
        try:
            async for chunk in source:
                if not (self.silent or (answers and self.deaf)):
                    await sink.send_all(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await sink.aclose()


GROUP = "@group/" + "7" * 32


@pytest.mark.slow
@pytest.mark.parametrize("what", ["release", "leave", "state"])
async def test_a_release_cut_short_by_its_bound_is_made_after_the_next_renewal(
    etcd: EtcdServer, nursery: trio.Nursery, what: str
) -> None:
    """A forward's release is bounded (``release_quietly``: RELEASE_TIMEOUT), and so are a
    group member's leave and its state's write; when the engine stays silent for longer,
    the bound cancels the request before it could fail. It is kept all the same and made
    after the next good renewal, by the node and not by its lease's end: the lease (and the
    node's key) lives on meanwhile, so a key left behind would stay taken by nobody (or a
    member shown online while it is not) for as long as the node runs."""
    relay = _SilentRelay(("127.0.0.1", etcd.client_port))
    await relay.start(nursery)
    # a request may take longer than the release's bound, so the bound is what ends it; a
    # renewal lost while the relay is silent fails and is retried well within the lease
    registry = EtcdRegistry(
        f"http://127.0.0.1:{relay.port}",
        "n1",
        lease_ttl=12,
        request_timeout=RELEASE_TIMEOUT * 1.5,
    )
    watcher = EtcdRegistry(etcd.endpoint, "watcher")
    await nursery.start(registry.run)
    await nursery.start(watcher.run)
    member = "groups/tcp/1/n1/1"
    if what == "release":
        assert await registry.claim("tcp/1", "n1/a") == "n1/a"
        key, before, after = "tcp/1", "n1/a", None
    else:
        assert await registry.join_group("tcp/1", GROUP, "n1/1") == GROUP
        key, before = member, GROUP
        after = None if what == "leave" else GROUP + " offline"

    relay.silent = True
    with trio.fail_after(RELEASE_TIMEOUT * 10):  # a hang detector; each gives up at its bound
        if what == "release":
            await release_quietly(registry, "tcp/1", "n1/a")
        elif what == "leave":
            await leave_quietly(registry, "tcp/1", GROUP, "n1/1")
        else:
            await member_state_quietly(registry, "tcp/1", GROUP, "n1/1", False)
    assert (await watcher.entries()).get(key) == before  # nothing reached the engine
    relay.silent = False

    with trio.fail_after(60):  # the next good renewal (every TTL / 3), and a hang detector
        while (await watcher.entries()).get(key) != after:
            await trio.sleep(0.2)
    assert "n1" in await watcher.nodes()  # its lease lives: the node made the change
    if what == "leave":  # the last member gone: the group's key too
        assert await watcher.lookup("tcp/1") is None


@pytest.mark.slow
async def test_a_claim_whose_answer_is_lost_is_given_back(
    etcd: EtcdServer, nursery: trio.Nursery
) -> None:
    """The engine makes a claim and its answer is lost (the requests reach etcd, nothing
    comes back): the claim fails at the request's timeout and is given back, so the key does
    not stay under the node's live lease for a forward that was refused."""
    relay = _SilentRelay(("127.0.0.1", etcd.client_port))
    await relay.start(nursery)
    registry = EtcdRegistry(
        f"http://127.0.0.1:{relay.port}", "n1", lease_ttl=12, request_timeout=1.0
    )
    watcher = EtcdRegistry(etcd.endpoint, "watcher")
    await nursery.start(registry.run)
    await nursery.start(watcher.run)
    seen: list[Change] = []
    await nursery.start(functools.partial(watcher.watch, "tcp/", seen.append))

    relay.deaf = True
    with trio.fail_after(30), pytest.raises(ClusterUnavailableError):  # and a hang detector
        await claim_or_refuse(registry, "tcp/2", "n1/a", what="port 2", address="")
    relay.deaf = False
    # the engine made the claim, and then deleted it: the release went through, or was
    # kept and made after the next good renewal
    gone = [Change("tcp/2", "n1/a"), Change("tcp/2", None)]
    await wait_until(lambda: seen == gone, seconds=60, what=lambda: str(seen))
    assert await watcher.lookup("tcp/2") is None
    assert "n1" in await watcher.nodes()  # its lease lives: the node gave the key back
