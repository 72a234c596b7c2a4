"""``pytunnel.cluster._ownership``: the keys a node claims, refusals, releases."""

from __future__ import annotations

import pytest
import trio

from pytunnel.cluster import Change, LocalRegistry
from pytunnel.cluster._ownership import (
    claim_or_refuse,
    client_key,
    group_owner,
    is_group,
    member_key,
    name_key,
    node_of,
    parse_member_key,
    port_key,
    refusal,
    release_quietly,
)
from pytunnel.cluster._registry import check_node_id
from pytunnel.errors import AddressInUseError, ClusterUnavailableError, ErrorCode, NameInUseError


def test_keys_and_owners() -> None:
    assert port_key(8080) == "tcp/8080"
    assert name_key("app.example.com", tls=False) == "http/app.example.com"
    assert name_key("app.example.com", tls=True) == "https/app.example.com"
    assert client_key("laptop") == "clients/laptop"
    assert node_of("eu-1/4f2a") == "eu-1"


def test_group_owners_and_member_keys() -> None:
    """A group's owner string is the same for the same name and proof on every node, another
    for another name or proof, never a node id, and does not carry the proof."""
    proof = bytes(range(32))
    owner = group_owner("web", proof)
    assert owner == group_owner("web", proof)
    assert owner != group_owner("web", bytes(32))
    assert owner != group_owner("api", proof)
    assert is_group(owner)
    assert not is_group("a/1f2e")
    assert proof.hex() not in owner
    with pytest.raises(ValueError, match="node id"):
        check_node_id(node_of(owner))  # "@group" is never a node's
    key = member_key("tcp/8080", "edge-1/1f2e")
    assert key == "groups/tcp/8080/edge-1/1f2e"
    assert parse_member_key(key) == ("tcp/8080", "edge-1", "1f2e")
    assert parse_member_key("groups/http/app.example.com/a/7") == ("http/app.example.com", "a", "7")
    for bad in ("groups/tcp/8080", "groups/tcp/8080/a", "groups//a/1", "tcp/8080/a/1", "groups/"):
        assert parse_member_key(bad) is None, bad


def test_refusals_for_a_key_a_group_holds() -> None:
    owner = group_owner("web", b"p")
    plain = refusal(owner, what="port 1", address="h:1")
    assert plain.message.endswith(
        "port 1 is held by a load-balanced group of the cluster; only its members can serve it"
    )
    member = refusal(owner, what="port 1", address="h:1", group=True)
    assert "(another group name, or another group secret)" in member.message
    assert member.code == ErrorCode.ADDRESS_IN_USE
    assert "(node a)" in refusal("a/1", what="port 1", address="h:1", group=True).message


async def test_a_refusal_names_the_node_that_holds_the_key() -> None:
    registry = LocalRegistry("a")
    await claim_or_refuse(registry, "tcp/1", "a/1", what="port 1", address="h:1")
    await claim_or_refuse(registry, "tcp/1", "a/1", what="port 1", address="h:1")  # again: ok
    with pytest.raises(AddressInUseError, match=r"port 1 is held .* \(node a\)") as info:
        await claim_or_refuse(registry, "tcp/1", "b/2", what="port 1", address="h:1")
    assert info.value.code == ErrorCode.ADDRESS_IN_USE
    assert info.value.address == "h:1"
    await claim_or_refuse(registry, "http/x", "a/1", what="name x", address="x")
    with pytest.raises(NameInUseError):
        await claim_or_refuse(
            registry, "http/x", "b/\n2", what="name x", address="x", error=NameInUseError
        )


async def test_release_quietly_runs_under_cancellation_and_only_for_the_owner() -> None:
    registry = LocalRegistry("a")
    await registry.claim("tcp/1", "a/1")
    await release_quietly(registry, "tcp/1", "b/2")  # not the owner: kept
    assert await registry.lookup("tcp/1") == "a/1"
    with trio.CancelScope() as scope:
        scope.cancel()
        await release_quietly(registry, "tcp/1", "a/1")  # shielded: done all the same
    assert await registry.lookup("tcp/1") is None


class _AppliedThenCancelled(LocalRegistry):
    """A claim the engine made while its caller was cancelled (the answer was lost)."""

    async def claim(self, key: str, owner: str) -> str:
        await super().claim(key, owner)
        raise trio.TooSlowError


class _Unavailable(LocalRegistry):
    async def release(self, key: str, owner: str) -> bool:
        raise ClusterUnavailableError("engine away")


async def test_a_claim_interrupted_mid_request_is_given_back() -> None:
    registry = _AppliedThenCancelled("a")
    seen: list[Change] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(registry.watch, "", seen.append)
        with pytest.raises(trio.TooSlowError):
            await claim_or_refuse(registry, "tcp/1", "a/1", what="port 1", address="")
        nursery.cancel_scope.cancel()
    assert await registry.lookup("tcp/1") is None
    assert seen == [Change("tcp/1", "a/1"), Change("tcp/1", None)]


async def test_release_quietly_never_raises() -> None:
    await release_quietly(_Unavailable("a"), "tcp/1", "a/1")
