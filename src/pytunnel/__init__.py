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
everything else is private.
"""

import logging

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

# A library does not decide where logs go: without configuration, stay silent.
logging.getLogger("pytunnel").addHandler(logging.NullHandler())
