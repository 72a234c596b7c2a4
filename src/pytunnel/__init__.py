"""pytunnel: TCP and UDP tunnels over one multiplexed, authenticated connection, built on Trio.

Most code needs only this namespace: the client (``open_tunnel``), the server
(``open_server`` / ``serve``), the forwards and their statuses, and the errors. The lower
layers have namespaces of their own:

- ``pytunnel.session``: the multiplexer over any trio stream (``open_session``, ``Session``,
  ``MuxStream``, ``Role``);
- ``pytunnel.tls``: TLS contexts, certificate fingerprints and pins, self-signed certificates;
- ``pytunnel.testing``: fault injection, ``open_tunnel_pair`` and the pytest plugin;
- ``pytunnel.protocol``: the sans-IO core (frames, messages, state machines, SOCKS);
- ``pytunnel.sync``: the tunnel in a background thread, for code that is not Trio;
- ``pytunnel.transports``: WebSocket, proxies and stdio as trio streams;
- ``pytunnel.metrics``: Prometheus collectors of a tunnel or a server, and their endpoint;
- ``pytunnel.admin``: the admin API's transport (a private Unix socket, or loopback and a
  token) and its client.

Public names are re-exported explicitly here, grouped by the module that defines them;
everything else is private. They are imported on first use (PEP 562), so that ``import
pytunnel`` (and the command line's ``--help``) does not load Trio, the session, TLS and the
HTTP stack before anything asks for them; type checkers read the imports below as written.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING

from ._build import compiled_modules as _compiled_modules

if TYPE_CHECKING:
    # isort: off
    # the client: three tiers, its configuration, its events
    from .client import ClientConfig as ClientConfig
    from .client import ClientOptions as ClientOptions
    from .client import Tunnel as Tunnel
    from .client import connect_tunnel as connect_tunnel
    from .client import open_tunnel as open_tunnel
    from .client import wrap_tunnel as wrap_tunnel
    from ._events import EventKind as EventKind
    from ._events import TunnelEvent as TunnelEvent

    # the forwards a tunnel keeps
    from .forwards import DynamicForward as DynamicForward
    from .forwards import Forward as Forward
    from .forwards import ForwardKind as ForwardKind
    from .forwards import ForwardStatus as ForwardStatus
    from .forwards import LocalForward as LocalForward
    from .forwards import NameForward as NameForward
    from .forwards import RemoteForward as RemoteForward
    from .forwards import UdpLocalForward as UdpLocalForward
    from .forwards import UdpRemoteForward as UdpRemoteForward
    from ._relay import RelayStats as RelayStats

    # the server: three tiers and its configuration
    from .server import ClientInfo as ClientInfo
    from .server import PublicPortInfo as PublicPortInfo
    from .server import UdpPortInfo as UdpPortInfo
    from .server import ServerConfig as ServerConfig
    from .server import ServerOptions as ServerOptions
    from .server import TunnelServer as TunnelServer
    from .server import open_server as open_server
    from .server import serve as serve
    from .server import wrap_server_stream as wrap_server_stream
    from ._policy import PermitOpen as PermitOpen
    from ._policy import PortRange as PortRange
    from ._policy import parse_port_ranges as parse_port_ranges

    # configuration shared by both sides, and the defaults behind it
    from .session import SessionConfig as SessionConfig
    from ._dial import DEFAULT_CONNECT_TIMEOUT as DEFAULT_CONNECT_TIMEOUT
    from ._handshake import DEFAULT_HANDSHAKE_TIMEOUT as DEFAULT_HANDSHAKE_TIMEOUT
    from ._relay import DEFAULT_IDLE_TIMEOUT as DEFAULT_IDLE_TIMEOUT
    from .protocol.messages import MIN_MAX_FRAME_SIZE as MIN_MAX_FRAME_SIZE

    # addresses and forward specifications as the command line writes them
    from ._dial import format_target as format_target
    from ._spec import ForwardSpec as ForwardSpec
    from ._spec import parse_forward_spec as parse_forward_spec
    from ._spec import parse_host_port as parse_host_port
    from ._ratelimit import parse_rate as parse_rate

    # errors: one hierarchy under TunnelError, each with a stable numeric code
    from .errors import AddressInUseError as AddressInUseError
    from .errors import AuthenticationError as AuthenticationError
    from .errors import ClusterAuthError as ClusterAuthError
    from .errors import ClusterUnavailableError as ClusterUnavailableError
    from .errors import ConnectError as ConnectError
    from .errors import DialError as DialError
    from .errors import DialFailure as DialFailure
    from .errors import ErrorCode as ErrorCode
    from .errors import ForwardError as ForwardError
    from .errors import ForwardLimitError as ForwardLimitError
    from .errors import GroupMismatchError as GroupMismatchError
    from .errors import HandshakeTimeoutError as HandshakeTimeoutError
    from .errors import InvalidTargetError as InvalidTargetError
    from .errors import LocalProtocolError as LocalProtocolError
    from .errors import NameInUseError as NameInUseError
    from .errors import NameNotAllowedError as NameNotAllowedError
    from .errors import NodeTimeoutError as NodeTimeoutError
    from .errors import NodeUnstableError as NodeUnstableError
    from .errors import PermissionDeniedError as PermissionDeniedError
    from .errors import PortNotAllowedError as PortNotAllowedError
    from .errors import ProxyError as ProxyError
    from .errors import ProtocolError as ProtocolError
    from .errors import RateLimitedError as RateLimitedError
    from .errors import RemoteProtocolError as RemoteProtocolError
    from .errors import ServerBusyError as ServerBusyError
    from .errors import SessionClosedError as SessionClosedError
    from .errors import StreamLimitError as StreamLimitError
    from .errors import StreamRefusedError as StreamRefusedError
    from .errors import StreamResetError as StreamResetError
    from .errors import TargetForbiddenError as TargetForbiddenError
    from .errors import TLSError as TLSError
    from .errors import TunnelError as TunnelError
    from .errors import VersionMismatchError as VersionMismatchError
    from .errors import WebSocketError as WebSocketError

    # the namespaces of the lower layers (see the docstring)
    from . import protocol as protocol
    from . import session as session
    from . import sync as sync
    from . import testing as testing
    from . import tls as tls
    from . import transports as transports
    # isort: on

__version__ = "0.1.0.dev0"

#: Whether the hot modules run compiled by mypyc (``pytunnel._build``), not pure Python.
__compiled__ = bool(_compiled_modules())

#: Where each public name is defined, relative to this package, in the groups above; a
#: module's own name is the module (``pytunnel.session``). ``tests/test_lazy_import.py``
#: checks that this table and the imports for type checkers name the same things.
_LAZY: dict[str, str] = {
    # the client: three tiers, its configuration, its events
    "ClientConfig": ".client",
    "ClientOptions": ".client",
    "Tunnel": ".client",
    "connect_tunnel": ".client",
    "open_tunnel": ".client",
    "wrap_tunnel": ".client",
    "EventKind": "._events",
    "TunnelEvent": "._events",
    # the forwards a tunnel keeps
    "DynamicForward": ".forwards",
    "Forward": ".forwards",
    "ForwardKind": ".forwards",
    "ForwardStatus": ".forwards",
    "LocalForward": ".forwards",
    "NameForward": ".forwards",
    "RemoteForward": ".forwards",
    "UdpLocalForward": ".forwards",
    "UdpRemoteForward": ".forwards",
    "RelayStats": "._relay",
    # the server: three tiers and its configuration
    "ClientInfo": ".server",
    "PublicPortInfo": ".server",
    "UdpPortInfo": ".server",
    "ServerConfig": ".server",
    "ServerOptions": ".server",
    "TunnelServer": ".server",
    "open_server": ".server",
    "serve": ".server",
    "wrap_server_stream": ".server",
    "PermitOpen": "._policy",
    "PortRange": "._policy",
    "parse_port_ranges": "._policy",
    # configuration shared by both sides, and the defaults behind it
    "SessionConfig": ".session",
    "DEFAULT_CONNECT_TIMEOUT": "._dial",
    "DEFAULT_HANDSHAKE_TIMEOUT": "._handshake",
    "DEFAULT_IDLE_TIMEOUT": "._relay",
    "MIN_MAX_FRAME_SIZE": ".protocol.messages",
    # addresses and forward specifications as the command line writes them
    "format_target": "._dial",
    "ForwardSpec": "._spec",
    "parse_forward_spec": "._spec",
    "parse_host_port": "._spec",
    "parse_rate": "._ratelimit",
    # errors: one hierarchy under TunnelError, each with a stable numeric code
    "AddressInUseError": ".errors",
    "AuthenticationError": ".errors",
    "ClusterAuthError": ".errors",
    "ClusterUnavailableError": ".errors",
    "ConnectError": ".errors",
    "DialError": ".errors",
    "DialFailure": ".errors",
    "ErrorCode": ".errors",
    "ForwardError": ".errors",
    "ForwardLimitError": ".errors",
    "GroupMismatchError": ".errors",
    "HandshakeTimeoutError": ".errors",
    "InvalidTargetError": ".errors",
    "LocalProtocolError": ".errors",
    "NameInUseError": ".errors",
    "NameNotAllowedError": ".errors",
    "NodeTimeoutError": ".errors",
    "NodeUnstableError": ".errors",
    "PermissionDeniedError": ".errors",
    "PortNotAllowedError": ".errors",
    "ProxyError": ".errors",
    "ProtocolError": ".errors",
    "RateLimitedError": ".errors",
    "RemoteProtocolError": ".errors",
    "ServerBusyError": ".errors",
    "SessionClosedError": ".errors",
    "StreamLimitError": ".errors",
    "StreamRefusedError": ".errors",
    "StreamResetError": ".errors",
    "TargetForbiddenError": ".errors",
    "TLSError": ".errors",
    "TunnelError": ".errors",
    "VersionMismatchError": ".errors",
    "WebSocketError": ".errors",
    # the namespaces of the lower layers (see the docstring)
    "protocol": ".protocol",
    "session": ".session",
    "sync": ".sync",
    "testing": ".testing",
    "tls": ".tls",
    "transports": ".transports",
}

#: The same names as ``_LAZY``, written out for tools that read ``__all__`` statically.
__all__ = [
    "ClientConfig",
    "ClientOptions",
    "Tunnel",
    "connect_tunnel",
    "open_tunnel",
    "wrap_tunnel",
    "EventKind",
    "TunnelEvent",
    "DynamicForward",
    "Forward",
    "ForwardKind",
    "ForwardStatus",
    "LocalForward",
    "NameForward",
    "RemoteForward",
    "UdpLocalForward",
    "UdpRemoteForward",
    "RelayStats",
    "ClientInfo",
    "PublicPortInfo",
    "UdpPortInfo",
    "ServerConfig",
    "ServerOptions",
    "TunnelServer",
    "open_server",
    "serve",
    "wrap_server_stream",
    "PermitOpen",
    "PortRange",
    "parse_port_ranges",
    "SessionConfig",
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_HANDSHAKE_TIMEOUT",
    "DEFAULT_IDLE_TIMEOUT",
    "MIN_MAX_FRAME_SIZE",
    "format_target",
    "ForwardSpec",
    "parse_forward_spec",
    "parse_host_port",
    "parse_rate",
    "AddressInUseError",
    "AuthenticationError",
    "ClusterAuthError",
    "ClusterUnavailableError",
    "ConnectError",
    "DialError",
    "DialFailure",
    "ErrorCode",
    "ForwardError",
    "ForwardLimitError",
    "GroupMismatchError",
    "HandshakeTimeoutError",
    "InvalidTargetError",
    "LocalProtocolError",
    "NameInUseError",
    "NameNotAllowedError",
    "NodeTimeoutError",
    "NodeUnstableError",
    "PermissionDeniedError",
    "PortNotAllowedError",
    "ProxyError",
    "ProtocolError",
    "RateLimitedError",
    "RemoteProtocolError",
    "ServerBusyError",
    "SessionClosedError",
    "StreamLimitError",
    "StreamRefusedError",
    "StreamResetError",
    "TargetForbiddenError",
    "TLSError",
    "TunnelError",
    "VersionMismatchError",
    "WebSocketError",
    "protocol",
    "session",
    "sync",
    "testing",
    "tls",
    "transports",
]


if not TYPE_CHECKING:  # hidden from type checkers, which would take any name as valid

    def __getattr__(name: str) -> object:
        """Import a public name the first time it is asked for, and keep it as a plain module
        attribute, so later lookups never come back here."""
        module = _LAZY.get(name)
        if module is None:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        imported = importlib.import_module(module, __name__)
        value = imported if module == f".{name}" else getattr(imported, name)
        globals()[name] = value
        return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


# A library does not decide where logs go: without configuration, stay silent.
logging.getLogger("pytunnel").addHandler(logging.NullHandler())
