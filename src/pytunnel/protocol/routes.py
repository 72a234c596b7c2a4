"""What the ``tag`` of an ``Open`` means in the tunnel protocol (the multiplexer ignores it).

Streams the *client* opens:

* ``CONNECT`` (0): dial ``host:port`` at the server and relay (local and dynamic forwards,
  ``Tunnel.open_stream``).
* ``LISTEN`` (1): a remote forward request: listen on ``host:port`` at the server. The stream
  stays open as the forward's control stream; closing it removes the forward.
* ``UDP_CONNECT`` (2): a UDP association with ``host:port`` at the server; datagrams travel
  as ``Datagram`` messages on the stream.
* ``UDP_LISTEN`` (3): a UDP remote forward request, like ``LISTEN``.
* ``LISTEN_GROUP`` (5), ``NAME_GROUP`` (6): ``LISTEN`` and ``NAME`` for a member of a
  load-balanced group: the server accepts the stream first, the client sends ``Join`` (the
  group and the proof of its secret) before anything else, and the server answers ``Bound``
  or resets the stream with the refusal's code.
* ``NAME`` (4): a name route request: route the connections for host name ``host`` on the
  server's shared HTTP listener (``port`` 80, by the request's ``Host``) or shared HTTPS
  listener (``port`` 443, by the ClientHello's server name). The control stream stays open
  like ``LISTEN``'s; ``Bound`` answers the full name and the listener's real port.
* ``CLIENT_INFO`` (7): the client names its software and version in ``host``
  (``pytunnel/0.1.0``), once per session, for the server's admin API. The server records it
  and refuses the stream with ``NORMAL`` (0): nothing is carried. A stream rather than a
  handshake field because handshake messages take no unknown key: a server that predates
  the route refuses it as an unknown route, which the client ignores, and a client that
  predates it simply never sends it.

Streams the *server* opens carry, as ``tag``, the stream id of the remote forward's control
stream they belong to, and the public peer's address as ``host``/``port`` (informational).

Streams a node opens on a *node link* (a session between two nodes of a cluster, see
``docs/cluster.md``) are public connections that reached it for a route the other node
serves. ``host``/``port`` are the public peer's address and ``tag`` names the route:
``RELAY_TCP | port`` for a TCP port, ``RELAY_HTTP`` or ``RELAY_HTTPS`` for a name on the
shared listener (the name is in the request head or ClientHello the stream starts with),
``RELAY_UDP | port`` for one public source's association with a UDP port (a datagram
stream).
"""

from __future__ import annotations

CONNECT = 0
LISTEN = 1
#: UDP association to ``host:port`` (datagrams via ``Datagram`` messages on the stream).
UDP_CONNECT = 2
#: UDP remote forward request; the control stream stays open like ``LISTEN``'s.
UDP_LISTEN = 3
#: Name route request (``host`` the name; ``port`` 80: HTTP by Host, 443: TLS by SNI).
NAME = 4
#: The ``port`` of a ``NAME`` request for the shared HTTP listener.
NAME_HTTP = 80
#: The ``port`` of a ``NAME`` request for the shared HTTPS (TLS passthrough) listener.
NAME_TLS = 443
#: ``LISTEN`` for a member of a load-balanced group (``Join`` first on the control stream).
LISTEN_GROUP = 5
#: ``NAME`` for a member of a load-balanced group.
NAME_GROUP = 6
#: The client's software and version, in ``host`` (refused with ``NORMAL``: nothing carried).
CLIENT_INFO = 7

#: Node link streams: a public connection to TCP port ``tag & RELAY_PORT_MASK``.
RELAY_TCP = 0x10000
#: Node link streams: a connection of the shared HTTP listener (the request head follows).
RELAY_HTTP = 0x20000
#: Node link streams: a connection of the shared HTTPS listener (the ClientHello follows).
RELAY_HTTPS = 0x30000
#: Node link streams: a UDP association with public port ``tag & RELAY_PORT_MASK`` (a
#: datagram stream; ``host``/``port`` the public source).
RELAY_UDP = 0x40000
RELAY_KIND_MASK = 0xFF0000
RELAY_PORT_MASK = 0xFFFF
