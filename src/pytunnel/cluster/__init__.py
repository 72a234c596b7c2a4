"""``pytunnel.cluster``: the registry several servers share to act as one service.

A server on its own owns its ports and names by binding them (the in-process
:class:`LocalRegistry` states the same contract for one process); with
``--cluster etcd://...`` it claims them in an :class:`EtcdRegistry` first. See
``docs/cluster.md``.

``EtcdRegistry`` is imported on first use, so a server without a cluster never loads its
HTTP client.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._address import DEFAULT_LEASE_TTL as DEFAULT_LEASE_TTL
from ._address import parse_etcd_url as parse_etcd_url
from ._ownership import is_group as is_group
from ._ownership import parse_member_key as parse_member_key
from ._registry import Change as Change
from ._registry import LocalRegistry as LocalRegistry
from ._registry import LostCallback as LostCallback
from ._registry import Registry as Registry
from ._registry import WatchCallback as WatchCallback
from ._registry import check_node_id as check_node_id

if TYPE_CHECKING:
    from .etcd import EtcdRegistry as EtcdRegistry

__all__ = [
    "DEFAULT_LEASE_TTL",
    "Change",
    "EtcdRegistry",
    "LocalRegistry",
    "LostCallback",
    "Registry",
    "WatchCallback",
    "check_node_id",
    "is_group",
    "parse_etcd_url",
    "parse_member_key",
]


def __getattr__(name: str) -> object:
    if name == "EtcdRegistry":
        from . import etcd

        return getattr(etcd, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
