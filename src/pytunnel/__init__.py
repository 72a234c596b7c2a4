"""pytunnel: TCP tunnels over one multiplexed, authenticated connection, built on Trio.

Public names are re-exported explicitly here; everything else is private.
"""

from ._handshake import (
    DEFAULT_HANDSHAKE_TIMEOUT as DEFAULT_HANDSHAKE_TIMEOUT,
)
from ._handshake import (
    open_client_session as open_client_session,
)
from ._handshake import (
    open_server_session as open_server_session,
)
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
    ErrorCode as ErrorCode,
)
from .errors import (
    HandshakeTimeoutError as HandshakeTimeoutError,
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
    ProtocolError as ProtocolError,
)
from .errors import (
    RemoteProtocolError as RemoteProtocolError,
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
    TunnelError as TunnelError,
)
from .errors import (
    VersionMismatchError as VersionMismatchError,
)
from .protocol.mux import Role as Role

__version__ = "0.1.0.dev0"
