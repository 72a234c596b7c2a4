"""``pytunnel.cluster``: the registry several servers share to act as one service.

A server without a cluster keeps its ownership in a :class:`LocalRegistry`; with
``--cluster etcd://...`` it uses an :class:`EtcdRegistry`. See ``docs/cluster.md``.
"""

from __future__ import annotations

from ._registry import Change as Change
from ._registry import LocalRegistry as LocalRegistry
from ._registry import LostCallback as LostCallback
from ._registry import Registry as Registry
from ._registry import WatchCallback as WatchCallback
from .etcd import EtcdRegistry as EtcdRegistry
from .etcd import parse_etcd_url as parse_etcd_url

__all__ = [
    "Change",
    "EtcdRegistry",
    "LocalRegistry",
    "LostCallback",
    "Registry",
    "WatchCallback",
    "parse_etcd_url",
]
