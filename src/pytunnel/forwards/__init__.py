"""The forwards a tunnel keeps: one module per kind, and what they share.

- ``_base``: :class:`Forward`, its status machine (:class:`ForwardStatus`) and kinds;
- ``local`` (``-L``), ``dynamic`` (``-D``, SOCKS), ``remote`` (``-R``), ``udp`` (both, for
  datagrams).

A forward knows its tunnel only through the ``Link`` it is given (``_link.py``).
"""

from ._base import FINAL as FINAL
from ._base import Forward as Forward
from ._base import ForwardKind as ForwardKind
from ._base import ForwardStatus as ForwardStatus
from .dynamic import DynamicForward as DynamicForward
from .local import LocalForward as LocalForward
from .remote import RemoteForward as RemoteForward
from .udp import UdpLocalForward as UdpLocalForward
from .udp import UdpRemoteForward as UdpRemoteForward

__all__ = [
    "FINAL",
    "DynamicForward",
    "Forward",
    "ForwardKind",
    "ForwardStatus",
    "LocalForward",
    "RemoteForward",
    "UdpLocalForward",
    "UdpRemoteForward",
]
