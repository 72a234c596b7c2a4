"""pytunnel: TCP tunnels over one multiplexed, authenticated connection, built on Trio.

Public names are re-exported explicitly here; everything else is private.
"""

import logging

from ._dial import (
    DEFAULT_CONNECT_TIMEOUT as DEFAULT_CONNECT_TIMEOUT,
)
from ._dial import (
    format_target as format_target,
)
from ._faults import DirectionFaults as DirectionFaults
from ._faults import Faults as Faults
from ._handshake import (
    DEFAULT_HANDSHAKE_TIMEOUT as DEFAULT_HANDSHAKE_TIMEOUT,
)
from ._handshake import (
    open_client_session as open_client_session,
)
from ._handshake import (
    open_server_session as open_server_session,
)
from ._policy import PermitOpen as PermitOpen
from ._policy import PortRange as PortRange
from ._relay import DEFAULT_IDLE_TIMEOUT as DEFAULT_IDLE_TIMEOUT
from ._relay import RelayStats as RelayStats
from ._session import (
    IncomingStream as IncomingStream,
)
from ._session import (
    MuxStream as MuxStream,
)
from ._session import (
    Session as Session,
)
from ._session import (
    SessionConfig as SessionConfig,
)
from ._session import (
    StreamResetError as StreamResetError,
)
from ._session import (
    open_session as open_session,
)
from ._tls import (
    certificate_fingerprint as certificate_fingerprint,
)
from ._tls import (
    client_tls_context as client_tls_context,
)
from ._tls import (
    ensure_self_signed as ensure_self_signed,
)
from ._tls import (
    server_tls_context as server_tls_context,
)
from .client import (
    ClientConfig as ClientConfig,
)
from .client import (
    ClientOptions as ClientOptions,
)
from .client import (
    DynamicForward as DynamicForward,
)
from .client import (
    EventKind as EventKind,
)
from .client import (
    Forward as Forward,
)
from .client import (
    ForwardKind as ForwardKind,
)
from .client import (
    ForwardStatus as ForwardStatus,
)
from .client import (
    LocalForward as LocalForward,
)
from .client import (
    RemoteForward as RemoteForward,
)
from .client import (
    Tunnel as Tunnel,
)
from .client import (
    TunnelEvent as TunnelEvent,
)
from .client import (
    UdpLocalForward as UdpLocalForward,
)
from .client import (
    UdpRemoteForward as UdpRemoteForward,
)
from .client import (
    connect_tunnel as connect_tunnel,
)
from .client import (
    open_tunnel as open_tunnel,
)
from .client import (
    wrap_tunnel as wrap_tunnel,
)
from .errors import (
    AddressInUseError as AddressInUseError,
)
from .errors import (
    AuthenticationError as AuthenticationError,
)
from .errors import (
    ConnectError as ConnectError,
)
from .errors import (
    DialError as DialError,
)
from .errors import (
    DialFailure as DialFailure,
)
from .errors import (
    ErrorCode as ErrorCode,
)
from .errors import (
    ForwardError as ForwardError,
)
from .errors import (
    ForwardLimitError as ForwardLimitError,
)
from .errors import (
    HandshakeTimeoutError as HandshakeTimeoutError,
)
from .errors import (
    InvalidTargetError as InvalidTargetError,
)
from .errors import (
    LocalProtocolError as LocalProtocolError,
)
from .errors import (
    NodeTimeoutError as NodeTimeoutError,
)
from .errors import (
    NodeUnstableError as NodeUnstableError,
)
from .errors import (
    PermissionDeniedError as PermissionDeniedError,
)
from .errors import (
    PortNotAllowedError as PortNotAllowedError,
)
from .errors import (
    ProtocolError as ProtocolError,
)
from .errors import (
    RateLimitedError as RateLimitedError,
)
from .errors import (
    RemoteProtocolError as RemoteProtocolError,
)
from .errors import (
    ServerBusyError as ServerBusyError,
)
from .errors import (
    SessionClosedError as SessionClosedError,
)
from .errors import (
    StreamLimitError as StreamLimitError,
)
from .errors import (
    StreamRefusedError as StreamRefusedError,
)
from .errors import (
    TargetForbiddenError as TargetForbiddenError,
)
from .errors import (
    TLSError as TLSError,
)
from .errors import (
    TunnelError as TunnelError,
)
from .errors import (
    VersionMismatchError as VersionMismatchError,
)
from .protocol.mux import Role as Role
from .server import ServerConfig as ServerConfig
from .server import ServerOptions as ServerOptions
from .server import TunnelServer as TunnelServer
from .server import open_server as open_server
from .server import serve as serve
from .server import wrap_server_stream as wrap_server_stream

# isort: split
# What the command line (pytunnel.cli) reaches besides the names above: forward and address
# specifications, port ranges, the smallest frame limit a session accepts.
from ._policy import parse_port_ranges as parse_port_ranges
from ._spec import ForwardSpec as ForwardSpec
from ._spec import parse_forward_spec as parse_forward_spec
from ._spec import parse_host_port as parse_host_port
from .protocol.messages import MIN_MAX_FRAME_SIZE as MIN_MAX_FRAME_SIZE

__version__ = "0.1.0.dev0"

# A library does not decide where logs go: without configuration, stay silent.
logging.getLogger("pytunnel").addHandler(logging.NullHandler())
