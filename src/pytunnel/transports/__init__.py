"""``pytunnel.transports``: what carries the tunnel's connection to its server.

Each transport turns an address into a connected ``trio.abc.Stream`` that the session runs
over unchanged:

- :mod:`~pytunnel.transports.websocket`: the tunnel inside WebSocket binary messages, for
  reverse proxies and CDNs (``ws://`` / ``wss://`` addresses; ``ServerConfig.ws_path``);
- :mod:`~pytunnel.transports.proxy`: through an HTTP CONNECT or SOCKS5 proxy
  (``ClientConfig.proxy``, or the environment's ``HTTPS_PROXY`` / ``ALL_PROXY``);
- :mod:`~pytunnel.transports.stdio`: stdin and stdout as a stream (``connect --stdio``).

``open_tunnel`` picks them from its arguments; these names are for code that builds its own
transport (and hands it to ``wrap_tunnel`` / ``wrap_server_stream``).
"""

from .proxy import ProxyURL as ProxyURL
from .proxy import connect_via_proxy as connect_via_proxy
from .proxy import parse_proxy_url as parse_proxy_url
from .proxy import proxy_from_environment as proxy_from_environment
from .stdio import open_stdio_stream as open_stdio_stream
from .stdio import relay_stdio as relay_stdio
from .websocket import DEFAULT_PING_INTERVAL as DEFAULT_PING_INTERVAL
from .websocket import WebSocketStream as WebSocketStream
from .websocket import WebSocketURL as WebSocketURL
from .websocket import accept_websocket as accept_websocket
from .websocket import accept_websocket_or_raw as accept_websocket_or_raw
from .websocket import connect_websocket as connect_websocket
from .websocket import parse_websocket_url as parse_websocket_url
