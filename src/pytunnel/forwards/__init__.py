"""The forwards a tunnel keeps: one module per kind, and what they share.

- ``_base``: :class:`Forward`, its status machine (:class:`ForwardStatus`) and kinds;
- ``local`` (``-L``), ``dynamic`` (``-D``, SOCKS), ``remote`` (``-R``), ``name`` (``-R`` with a
  host name on the server's shared HTTP/HTTPS port), ``udp`` (both, for datagrams);
- ``_public_port``, ``_public_name``: the server side of a remote forward and a name route.

A forward knows its tunnel only through the ``Link`` it is given (``_link.py``).
"""

from ._base import FINAL as FINAL
from ._base import Forward as Forward
from ._base import ForwardKind as ForwardKind
from ._base import ForwardStatus as ForwardStatus
from .dynamic import DynamicForward as DynamicForward
from .local import LocalForward as LocalForward
from .name import NameForward as NameForward
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
    "NameForward",
    "RemoteForward",
    "UdpLocalForward",
    "UdpRemoteForward",
]
