"""Public traffic that reaches a node whose client is on another node, relayed over a node
link (a pytunnel session between the nodes, authenticated by the cluster secret), on a real
etcd.

Each node's public host is its own loopback address (127.0.0.1, 127.0.0.2), so both can
listen on one port: node B listens on the port of node A's client and relays to A.
"""

from __future__ import annotations

import functools
import logging
import socket
import ssl
import struct

import pytest
import trio
import trustme
from helpers import (
    TOKEN,
    EtcdServer,
    closed_port,
    count_fds,
    count_tasks,
    describe_tasks,
    needs_etcd,
    send_and_read_all,
    udp_echo,
    wait_until,
)
from prometheus_client import CollectorRegistry, generate_latest
from test_cluster_server import _free_port_on_both

import pytunnel
import pytunnel.metrics
from pytunnel.cluster import EtcdRegistry

pytestmark = needs_etcd

SECRET = "the nodes' own secret"
HTTP = ("127.0.0.1", 0)


async def _node(
    nursery: trio.Nursery,
    etcd: EtcdServer,
    name: str,
    public_host: str,
    secret: str | None = SECRET,
    node_address: str = "",
    **options: object,
) -> pytunnel.TunnelServer:
    registry = EtcdRegistry(etcd.endpoint, name, node_address, lease_ttl=3, request_timeout=1.0)
    server: pytunnel.TunnelServer = await nursery.start(
        functools.partial(
            pytunnel.serve,
            0,
            host=public_host,
            token=TOKEN,
            public_host=public_host,
            cluster=registry,
            cluster_secret=secret,
            **options,  # type: ignore[arg-type]
        )
    )
    return server


async def _until_eof(stream: trio.SocketStream) -> None:
    while await stream.receive_some():
        pass


async def _mirrored(node: pytunnel.TunnelServer, port: int) -> None:
    links = node.node_links
    assert links is not None
    await wait_until(lambda: port in links.mirrored_ports, seconds=20, what=f"{port} not mirrored")


async def _two_nodes_one_port(
    nursery: trio.Nursery, etcd: EtcdServer, echo_port: int, *, reconnect: bool = True
) -> tuple[pytunnel.TunnelServer, pytunnel.TunnelServer, pytunnel.Tunnel, int]:
    """Nodes a (127.0.0.1) and b (127.0.0.2), a client of a holding ``port`` (free on both
    addresses) for the echo service, and b mirroring it: the usual start of a relay test."""
    a = await _node(nursery, etcd, "a", "127.0.0.1")
    b = await _node(nursery, etcd, "b", "127.0.0.2")
    tunnel = await pytunnel.connect_tunnel(nursery, a.address, token=TOKEN, reconnect=reconnect)
    port = _free_port_on_both()
    await tunnel.forward_remote("127.0.0.1", echo_port, remote_port=port)
    await _mirrored(b, port)
    return a, b, tunnel, port


async def test_a_port_of_a_client_on_node_a_is_served_through_node_b(
    nursery: trio.Nursery, etcd: EtcdServer, echo_port: int
) -> None:
    """The client holds a port on A; B listens on it too and relays every connection to A
    over one link, with the real public peer named to the client (PROXY protocol), both
    directions' bytes intact, the forward's stats counting it at A; when the forward ends
    B stops listening."""
    a = await _node(nursery, etcd, "a", "127.0.0.1")
    b = await _node(nursery, etcd, "b", "127.0.0.2")
    tunnel = await pytunnel.connect_tunnel(nursery, a.address, token=TOKEN)
    port = _free_port_on_both()
    remote = await tunnel.forward_remote(
        "127.0.0.1", echo_port, remote_port=port, proxy_protocol="v1"
    )
    await _mirrored(b, port)
    payload = bytes(range(256)) * 4096  # 1 MiB, more than any window
    for _ in range(3):
        with trio.fail_after(10):
            stream = await trio.open_tcp_stream("127.0.0.2", port)
            source_port = stream.socket.getsockname()[1]
            async with stream:
                await stream.send_all(payload)
                await stream.send_eof()
                out = b""
                while chunk := await stream.receive_some():
                    out += chunk
        header, _, body = out.partition(b"\r\n")
        # the client's target sees who really connected, through B: not B's own address
        fields = header.split()
        assert fields[:2] == [b"PROXY", b"TCP4"], header
        assert fields[4] == str(source_port).encode(), header
        assert body == payload
    assert b.node_links is not None
    assert b.node_links.stats.streams_out == 3
    assert a.node_links is not None
    assert a.node_links.stats.streams_in == 3
    assert b.node_links.linked_nodes == ["a"]  # one link carried the three
    port_info = a.clients[0].ports[0]
    assert port_info.connections_total == 3
    # A serves its own port as before
    assert (await send_and_read_all(("127.0.0.1", port), b"direct")).endswith(b"direct")
    await remote.aclose()
    links = b.node_links
    await wait_until(lambda: port not in links.mirrored_ports, seconds=20)
    with trio.fail_after(10), pytest.raises(OSError, match="all attempts to connect"):
        await trio.open_tcp_stream("127.0.0.2", port)


async def test_a_name_held_on_node_a_is_served_through_node_b(
    nursery: trio.Nursery, etcd: EtcdServer, echo_port: int
) -> None:
    """B's shared HTTP listener has no route for the name; the registry says A's client
    holds it, so B replays the request head it read to A, which routes it as its own. A
    name nobody holds still gets B's 404."""
    a = await _node(nursery, etcd, "a", "127.0.0.1", http_listen=HTTP, domain="example.test")
    b = await _node(nursery, etcd, "b", "127.0.0.2", http_listen=HTTP, domain="example.test")
    tunnel = await pytunnel.connect_tunnel(nursery, a.address, token=TOKEN)
    await tunnel.forward_name("app", "127.0.0.1", echo_port)
    links = b.node_links
    assert links is not None
    await wait_until(lambda: links.owner_node("http/app.example.test") == "a", seconds=20)
    assert b.http_address is not None
    request = b"GET /x HTTP/1.1\r\nHost: app.example.test\r\n\r\n" + b"body" * 1000
    # the echo: the head replayed once
    assert await send_and_read_all(b.http_address, request) == request
    missing = await send_and_read_all(
        b.http_address, b"GET / HTTP/1.1\r\nHost: nope.example.test\r\n\r\n"
    )
    assert missing.startswith(b"HTTP/1.1 404 ")
    assert links.stats.streams_out == 1


async def test_losing_the_link_resets_the_connections_relayed_over_it(
    nursery: trio.Nursery, etcd: EtcdServer, echo_port: int
) -> None:
    """A relayed connection is live when node A goes away: its public peer at B sees a
    reset, not a clean end that would pass for a complete reply; B stops listening once
    A's key is gone and nothing of the link is left."""
    a, b, _tunnel, port = await _two_nodes_one_port(nursery, etcd, echo_port, reconnect=False)
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.2", port)
        await stream.send_all(b"first")
        got = b""
        while len(got) < 5:
            got += await stream.receive_some()
        assert got == b"first"
        await a.aclose()
        with pytest.raises(trio.BrokenResourceError):
            await _until_eof(stream)
        await stream.aclose()
    links = b.node_links
    assert links is not None
    await wait_until(lambda: not links.mirrored_ports, seconds=20)
    await wait_until(lambda: not links.linked_nodes, seconds=20)
    assert b.active_streams == 0


async def test_a_node_with_the_wrong_secret_relays_nothing(
    nursery: trio.Nursery, etcd: EtcdServer, echo_port: int
) -> None:
    """B's link to A is refused (wrong secret): the public connection at B is reset, A
    counts a failed authentication; and a client cannot log in with the cluster secret."""
    a = await _node(nursery, etcd, "a", "127.0.0.1")
    b = await _node(nursery, etcd, "b", "127.0.0.2", secret="not the secret")
    tunnel = await pytunnel.connect_tunnel(nursery, a.address, token=TOKEN)
    port = _free_port_on_both()
    await tunnel.forward_remote("127.0.0.1", echo_port, remote_port=port)
    await _mirrored(b, port)
    with pytest.raises(trio.BrokenResourceError):
        await send_and_read_all(("127.0.0.2", port), b"hello")
    assert a.auth_failures == 1
    assert b.node_links is not None
    assert b.node_links.linked_nodes == []
    with trio.fail_after(10), pytest.raises(pytunnel.AuthenticationError):
        await pytunnel.connect_tunnel(nursery, a.address, token=SECRET, reconnect=False)


def _contexts(ca: trustme.CA) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server context for both nodes' addresses and a client context trusting ``ca``."""
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "127.0.0.2").configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return server, client


async def test_node_links_to_tls_listeners_are_tls_and_verify_the_peer(
    nursery: trio.Nursery, etcd: EtcdServer, echo_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    """Both nodes' control listeners are TLS: B's link to A is TLS too, verified against the
    nodes' CA, and carries the relayed connection. A node trusting another CA cannot open a
    link (a TLS error, logged) and resets the public connection."""
    ca = trustme.CA()
    server_tls, client_tls = _contexts(ca)
    a = await _node(nursery, etcd, "a", "127.0.0.1", tls=server_tls, cluster_tls=client_tls)
    b = await _node(nursery, etcd, "b", "127.0.0.2", tls=server_tls, cluster_tls=client_tls)
    tunnel = await pytunnel.connect_tunnel(nursery, a.address, token=TOKEN, tls=client_tls)
    port = _free_port_on_both()
    await tunnel.forward_remote("127.0.0.1", echo_port, remote_port=port)
    await _mirrored(b, port)
    assert await send_and_read_all(("127.0.0.2", port), b"over tls") == b"over tls"
    assert b.node_links is not None
    assert b.node_links.linked_nodes == ["a"]

    _, stranger = _contexts(trustme.CA())
    c = await _node(nursery, etcd, "c", "127.0.0.3", tls=server_tls, cluster_tls=stranger)
    await _mirrored(c, port)
    with pytest.raises(trio.BrokenResourceError):
        await send_and_read_all(("127.0.0.3", port), b"hello")
    assert "certificate verification failed" in caplog.text
    assert c.node_links is not None
    assert c.node_links.linked_nodes == []


async def test_a_stream_for_a_port_the_owner_no_longer_serves_is_reset(
    nursery: trio.Nursery, etcd: EtcdServer, echo_port: int
) -> None:
    """B relays a connection for a port while A's forward is offline (its target is down):
    A refuses the stream and the public peer at B is reset, as at A's own closed port."""
    a = await _node(nursery, etcd, "a", "127.0.0.1")
    b = await _node(nursery, etcd, "b", "127.0.0.2")
    tunnel = await pytunnel.connect_tunnel(
        nursery, a.address, token=TOKEN, probe_interval=0.05, probe_failures=1
    )
    port = _free_port_on_both()
    target = closed_port()
    forward = await tunnel.forward_remote("127.0.0.1", target, remote_port=port)
    await _mirrored(b, port)
    with trio.fail_after(20):
        await forward.wait_status(pytunnel.ForwardStatus.OFFLINE)
    await wait_until(lambda: a.clients[0].ports[0].status != "active", seconds=20)
    with pytest.raises(trio.BrokenResourceError):
        await send_and_read_all(("127.0.0.2", port), b"hello")
    assert a.node_links is not None
    assert a.node_links.stats.streams_in == 0  # refused before it was taken


async def test_a_mirror_is_listed_only_once_it_listens(
    nursery: trio.Nursery, etcd: EtcdServer, echo_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    """``mirrored_ports`` names a port only once B's socket for it is bound: while another
    program holds the port on B's address (B retrying its bind) it is not listed, and once
    listed a connection to it is accepted at once."""
    a = await _node(nursery, etcd, "a", "127.0.0.1")
    b = await _node(nursery, etcd, "b", "127.0.0.2")
    links = b.node_links
    assert links is not None
    port = _free_port_on_both()
    squatter = socket.socket()
    squatter.bind(("127.0.0.2", port))
    squatter.listen()
    try:
        tunnel = await pytunnel.connect_tunnel(nursery, a.address, token=TOKEN)
        await tunnel.forward_remote("127.0.0.1", echo_port, remote_port=port)
        await wait_until(lambda: f"tcp/{port}" in links.elsewhere, seconds=20)
        await trio.sleep(0.1)  # B's mirror task runs its first bind attempt
        assert port not in links.mirrored_ports
    finally:
        squatter.close()
    await wait_until(
        lambda: port in links.mirrored_ports or "not served here" in caplog.text, seconds=20
    )
    if port in links.mirrored_ports:  # B's retries outlasted the squatter (the usual case)
        assert await send_and_read_all(("127.0.0.2", port), b"listed") == b"listed"


async def test_a_port_another_program_holds_here_is_not_mirrored_and_nothing_breaks(
    nursery: trio.Nursery, etcd: EtcdServer, echo_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    """B cannot listen on the port of A's client (another program has it on B's address):
    logged, and B goes on serving everything else."""
    a = await _node(nursery, etcd, "a", "127.0.0.1")
    b = await _node(nursery, etcd, "b", "127.0.0.2")
    port = _free_port_on_both()
    squatter = socket.socket()
    squatter.bind(("127.0.0.2", port))
    squatter.listen()
    try:
        tunnel = await pytunnel.connect_tunnel(nursery, a.address, token=TOKEN)
        await tunnel.forward_remote("127.0.0.1", echo_port, remote_port=port)
        await wait_until(lambda: "not served here" in caplog.text, seconds=20)
        assert b.node_links is not None
        assert port not in b.node_links.mirrored_ports
        other = _free_port_on_both()
        await tunnel.forward_remote("127.0.0.1", echo_port, remote_port=other)
        await _mirrored(b, other)
        assert await send_and_read_all(("127.0.0.2", other), b"still relays") == b"still relays"
    finally:
        squatter.close()


async def test_metrics_name_the_node_and_count_node_link_traffic(
    nursery: trio.Nursery, etcd: EtcdServer, echo_port: int
) -> None:
    """Scraped from each node: every server metric has the node's label; the relaying node
    counts its streams and bytes out, the owner its streams in and the forward's own
    counters."""
    a, b, _tunnel, port = await _two_nodes_one_port(nursery, etcd, echo_port)
    payload = b"x" * 10_000
    for _ in range(2):
        assert await send_and_read_all(("127.0.0.2", port), payload) == payload
    pages = {}
    for node in (a, b):
        registry = CollectorRegistry()
        registry.register(pytunnel.metrics.ServerCollector(node))
        pages[node] = generate_latest(registry).decode()
    samples_b = [line for line in pages[b].splitlines() if line and not line.startswith("#")]
    assert samples_b
    assert all('node="b"' in line for line in samples_b)
    assert 'pytunnel_server_node_link_streams_total{direction="out",node="b"} 2.0' in pages[b]
    assert 'pytunnel_server_node_link_bytes_total{direction="out",node="b"} 20000.0' in pages[b]
    assert 'pytunnel_server_node_mirrored_ports{node="b"} 1.0' in pages[b]
    assert 'pytunnel_server_node_links{node="b"} 1.0' in pages[b]
    assert 'pytunnel_server_node_link_streams_total{direction="in",node="a"} 2.0' in pages[a]
    assert 'pytunnel_server_sessions{node="a"} 1.0' in pages[a]
    forward = [line for line in pages[a].splitlines() if "forward_streams_total{" in line]
    assert len(forward) == 1
    assert forward[0].endswith(" 2.0")


async def test_a_udp_port_of_a_client_on_node_a_is_served_through_node_b(
    nursery: trio.Nursery, etcd: EtcdServer
) -> None:
    """B listens on the UDP port of A's client too: each public source is one association,
    a datagram stream of the link, handed at A to the client's UDP forward (boundaries kept,
    each source its own replies); when the forward ends B stops listening."""
    a = await _node(nursery, etcd, "a", "127.0.0.1")
    b = await _node(nursery, etcd, "b", "127.0.0.2")
    tunnel = await pytunnel.connect_tunnel(nursery, a.address, token=TOKEN)
    echo = await nursery.start(udp_echo)
    port = _free_port_on_both(socket.SOCK_DGRAM)
    forward = await tunnel.forward_remote("127.0.0.1", echo, remote_port=port, protocol="udp")
    links = b.node_links
    assert links is not None
    await wait_until(lambda: port in links.mirrored_udp_ports, seconds=20)
    for source in range(3):
        sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
        with sock:
            await sock.bind(("127.0.0.1", 0))
            for message in range(3):
                payload = f"source {source} datagram {message} ".encode() * 100
                assert await _ask(sock, ("127.0.0.2", port), payload) == payload
    assert links.stats.streams_out == 3  # one association per source
    assert forward.stats.total_connections == 3  # ... each one of the forward's own at A
    await forward.aclose()
    await wait_until(lambda: port not in links.mirrored_udp_ports, seconds=20)


async def _ask(sock: trio.socket.SocketType, address: tuple[str, int], payload: bytes) -> bytes:
    """Send ``payload`` until its answer comes (UDP: the association may not be up yet);
    an answer to an earlier try of another payload is skipped."""
    with trio.fail_after(15):  # a hang detector
        while True:
            await sock.sendto(payload, address)
            with trio.move_on_after(0.5):
                while True:
                    data, _ = await sock.recvfrom(65536)
                    if data == payload:
                        return data


async def test_relayed_connections_leave_nothing_behind(
    nursery: trio.Nursery, etcd: EtcdServer, echo_port: int
) -> None:
    """Ten connections relayed at once through B, held open, then closed (half of them by
    a reset): every task and descriptor they took at both nodes is given back, and only the
    one link stays."""
    a, b, _tunnel, port = await _two_nodes_one_port(nursery, etcd, echo_port)
    assert await send_and_read_all(("127.0.0.2", port), b"link up") == b"link up"
    await wait_until(lambda: b.active_streams == 0 and a.active_streams == 0, seconds=20)
    tasks, fds = count_tasks(), count_fds()
    streams = []
    with trio.fail_after(20):
        for i in range(10):
            stream = await trio.open_tcp_stream("127.0.0.2", port)
            await stream.send_all(b"held %d" % i)
            got = b""
            while len(got) < len(b"held %d" % i):
                got += await stream.receive_some()
            streams.append(stream)
    assert b.active_streams == 10
    assert a.active_streams == 10
    for i, stream in enumerate(streams):
        if i % 2:
            stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await stream.aclose()
    await wait_until(
        lambda: count_tasks() <= tasks and count_fds() <= fds,
        seconds=20,
        what=lambda: (
            f"tasks {count_tasks()} (was {tasks}), fds {count_fds()} (was {fds}): "
            + describe_tasks()
        ),
    )
    assert a.active_streams == b.active_streams == 0
    assert b.node_links is not None
    assert b.node_links.linked_nodes == ["a"]
    assert b.node_links.stats.links_opened == 1


async def test_a_node_that_gave_no_usable_address_gets_nothing_relayed(
    nursery: trio.Nursery, etcd: EtcdServer, echo_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    """A's membership names no usable address: B resets the public connection, says why,
    and keeps serving (a later connection meets the same, nothing crashes)."""
    registry = EtcdRegistry(etcd.endpoint, "a", "no port here", lease_ttl=3, request_timeout=1.0)
    a: pytunnel.TunnelServer = await nursery.start(
        functools.partial(
            pytunnel.serve,
            0,
            token=TOKEN,
            public_host="127.0.0.1",
            cluster=registry,
            cluster_secret=SECRET,
        )
    )
    b = await _node(nursery, etcd, "b", "127.0.0.2")
    tunnel = await pytunnel.connect_tunnel(nursery, a.address, token=TOKEN)
    port = _free_port_on_both()
    await tunnel.forward_remote("127.0.0.1", echo_port, remote_port=port)
    await _mirrored(b, port)
    for _ in range(2):
        with pytest.raises(trio.BrokenResourceError):
            await send_and_read_all(("127.0.0.2", port), b"hello")
    assert "node a gave no usable address" in caplog.text
    assert await send_and_read_all(("127.0.0.1", port), b"direct") == b"direct"


async def test_relaying_goes_on_while_the_engine_is_away(
    nursery: trio.Nursery, etcd: EtcdServer, echo_port: int
) -> None:
    """The engine is killed: a connection relayed through B before goes on, and new ones are
    relayed too (B's table of who holds what comes from its watch, not from a request per
    connection); once the engine is back the table follows it again."""
    _a, b, tunnel, port = await _two_nodes_one_port(nursery, etcd, echo_port)
    with trio.fail_after(10):
        live = await trio.open_tcp_stream("127.0.0.2", port)
        await live.send_all(b"before")
        got = b""
        while len(got) < 6:
            got += await live.receive_some()
    await etcd.kill()
    with trio.fail_after(10):
        await live.send_all(b"during")
        got = b""
        while len(got) < 6:
            got += await live.receive_some()
        assert got == b"during"
        await live.aclose()
    for i in range(3):
        assert await send_and_read_all(("127.0.0.2", port), b"new %d" % i) == b"new %d" % i
    await etcd.start()
    other = _free_port_on_both()
    with trio.fail_after(30):
        while True:  # the node's claims are refused until its lease is known current
            try:
                await tunnel.forward_remote("127.0.0.1", echo_port, remote_port=other)
                break
            except pytunnel.ClusterUnavailableError:
                await trio.sleep(0.2)
    await _mirrored(b, other)
    assert await send_and_read_all(("127.0.0.2", other), b"after") == b"after"


# ---------------------------------------------------------------- review findings (issue 17)
# peer text, node ids, registry keys, partitions, backoff, the node's own ports, limits


async def _echo_once(stream: trio.SocketStream, data: bytes) -> bytes:
    await stream.send_all(data)
    got = b""
    while len(got) < len(data):
        chunk = await stream.receive_some()
        if not chunk:
            break
        got += chunk
    return got


def test_a_node_id_is_held_to_the_rule_of_client_ids() -> None:
    """The node link sends the node id as ``Auth.client_id`` (only [A-Za-z0-9._:-]): a
    node id such as "edge 2" is refused where it is given, in one clear error, rather than
    taking the node down at its first relayed connection."""
    with pytest.raises(ValueError, match=r"node id is 1-64 characters of \[A-Za-z0-9._:-\]"):
        EtcdRegistry("http://127.0.0.1:2379", "edge 2")
    registry = pytunnel.cluster.LocalRegistry("edge 2")
    with pytest.raises(ValueError, match="node id is 1-64 characters"):
        pytunnel.ServerConfig(token=TOKEN, cluster=registry)


async def test_a_link_that_cannot_send_the_node_id_does_not_stop_the_node(
    nursery: trio.Nursery, etcd: EtcdServer, echo_port: int
) -> None:
    """Whatever ``ValueError`` a link attempt meets (white box: a node id changed under a
    running node, which the handshake refuses to send) ends that attempt only: the public
    connection is reset and the node goes on relaying once the link can be made."""
    _a, b, _tunnel, port = await _two_nodes_one_port(nursery, etcd, echo_port)
    assert b.cluster is not None
    b.cluster.node_id = "edge 2"
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.2", port)
        async with stream:
            with pytest.raises(trio.BrokenResourceError):
                await _echo_once(stream, b"hello")
    b.cluster.node_id = "b"
    links = b.node_links
    assert links is not None
    links._backoff.clear()  # the failed attempt's backoff, not under test here
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.2", port)
        async with stream:
            assert await _echo_once(stream, b"hello") == b"hello"


async def test_an_idle_relayed_connection_survives_a_short_heartbeat_timeout(
    nursery: trio.Nursery, etcd: EtcdServer, echo_port: int
) -> None:
    """The answering node drops a link silent for ``heartbeat_timeout``, but the connecting
    node pings only every LINK_PING_INTERVAL (5 s, fixed). With --heartbeat-timeout 3 (and
    clients pinging every second, which is fine for them) every idle link is cut after 3 s,
    resetting every idle relayed connection (an SSH session, a keep-alive HTTP connection)."""
    options = {"heartbeat_timeout": 3.0, "heartbeat_check_interval": 0.5}
    a = await _node(nursery, etcd, "a", "127.0.0.1", **options)
    b = await _node(nursery, etcd, "b", "127.0.0.2", **options)
    tunnel = await pytunnel.connect_tunnel(
        nursery, a.address, token=TOKEN, heartbeat_interval=1.0, heartbeat_timeout=3.0
    )
    port = _free_port_on_both()
    await tunnel.forward_remote("127.0.0.1", echo_port, remote_port=port)
    await _mirrored(b, port)
    with trio.fail_after(30):
        stream = await trio.open_tcp_stream("127.0.0.2", port)
        async with stream:
            assert await _echo_once(stream, b"first") == b"first"
            await trio.sleep(7)  # idle, well within idle_timeout (300 s)
            # the client's own session lived through it
            assert a.clients
            assert await _echo_once(stream, b"second") == b"second"


async def _drain(stream: trio.SocketStream) -> None:
    while await stream.receive_some():
        pass


class _Freezer:
    """A TCP proxy in front of node A's control port that can stop carrying bytes in both
    directions without closing anything: a partition between the nodes (A still talks to
    etcd, so its lease and keys live on)."""

    def __init__(self) -> None:
        self.target: tuple[str, int] | None = None
        self.frozen = trio.Event()
        self.listener: trio.SocketListener | None = None

    async def run(self, *, task_status: trio.TaskStatus[int]) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.listener = listeners[0]
        task_status.started(int(self.listener.socket.getsockname()[1]))
        async with trio.open_nursery() as nursery:
            while True:
                conn = await self.listener.accept()
                nursery.start_soon(self._carry, conn)

    async def _carry(self, conn: trio.SocketStream) -> None:
        assert self.target is not None
        upstream = await trio.open_tcp_stream(*self.target)

        async def pump(src: trio.SocketStream, dst: trio.SocketStream) -> None:
            try:
                while True:
                    if self.frozen.is_set():
                        await trio.sleep_forever()
                    data = await src.receive_some()
                    if self.frozen.is_set():
                        await trio.sleep_forever()
                    if not data:
                        await dst.send_eof()
                        return
                    await dst.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return

        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump, conn, upstream)
            nursery.start_soon(pump, upstream, conn)


async def test_a_link_to_a_partitioned_node_is_given_up_and_connections_are_reset(
    nursery: trio.Nursery, etcd: EtcdServer, echo_port: int
) -> None:
    """Only the *answering* node watches a link's silence; the connecting node pings every
    5 s but never times a ping out (``Session.ping`` waits for ever) and
    ``session.open_stream`` waits for the Accept for ever. When the nodes are cut off from
    each other (A still renews its lease), B keeps the dead link for good: every public
    connection it relays to A hangs (holding a descriptor and a stream slot) instead of
    being reset, until TCP itself gives up many minutes later."""
    freezer = _Freezer()
    proxy_port = await nursery.start(freezer.run)
    options = {"heartbeat_timeout": 6.0, "heartbeat_check_interval": 0.5}
    a = await _node(
        nursery, etcd, "a", "127.0.0.1", node_address=f"127.0.0.1:{proxy_port}", **options
    )
    freezer.target = a.address
    b = await _node(
        nursery, etcd, "b", "127.0.0.2", handshake_timeout=3.0, connect_timeout=3.0, **options
    )
    tunnel = await pytunnel.connect_tunnel(nursery, a.address, token=TOKEN, heartbeat_interval=1.0)
    port = _free_port_on_both()
    await tunnel.forward_remote("127.0.0.1", echo_port, remote_port=port)
    await _mirrored(b, port)
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.2", port)
        async with stream:
            assert await _echo_once(stream, b"up") == b"up"
    links = b.node_links
    assert links is not None
    assert links.linked_nodes == ["a"]
    freezer.frozen.set()
    # A drops its side after 6 s of silence; B should notice unanswered pings about as fast
    await trio.sleep(15)
    assert port in links.mirrored_ports  # A's lease lives on: B still serves the port
    stream = await trio.open_tcp_stream("127.0.0.2", port)
    async with stream:
        await stream.send_all(b"lost?")
        # a connection that cannot be relayed is reset (docs/cluster.md), in bounded time
        with trio.fail_after(15), pytest.raises(trio.BrokenResourceError):
            await _drain(stream)
    await wait_until(lambda: not links.linked_nodes, seconds=5, what="dead link kept")


async def _rogue_link(a: pytunnel.TunnelServer):  # type: ignore[no-untyped-def]
    """A node link to A made by hand (the secret known), as another node's code would."""
    from pytunnel._handshake import client_handshake
    from pytunnel.protocol.mux import Role

    stream = await trio.open_tcp_stream(*a.address)
    result = await client_handshake(
        stream,
        SECRET,
        max_frame_size=a.config.session.max_frame_size,
        client_id="rogue",
        node=True,
    )
    return result.open_session(stream, Role.CLIENT, a.config.session, name="rogue")


async def test_a_relayed_peer_address_is_validated_before_it_reaches_http_headers(
    nursery: trio.Nursery, etcd: EtcdServer, echo_port: int
) -> None:
    """The owner hands the relaying node's ``Open.host`` to its client as the public peer,
    unchecked (on one server it is always getpeername()'s IP). The client's name route with
    forwarded headers writes it into X-Forwarded-For as it is: a node (a buggy or
    compromised one, or a session relayed by a man in the middle) injects headers into
    every request of the service. The owner should refuse a host that is not an IP."""
    from pytunnel.protocol import routes

    a = await _node(
        nursery, etcd, "a", "127.0.0.1", http_listen=("127.0.0.1", 0), domain="example.test"
    )
    tunnel = await pytunnel.connect_tunnel(nursery, a.address, token=TOKEN)
    await tunnel.forward_name("app", "127.0.0.1", echo_port, forwarded_headers=True)
    out = b""
    with trio.fail_after(10):
        async with await _rogue_link(a) as session:
            try:
                ms = await session.open_stream(
                    "203.0.113.9\r\nX-Injected: yes", 1234, tag=routes.RELAY_HTTP
                )
            except pytunnel.errors.TunnelError:
                return  # refused: what a fix does
            await ms.send_all(b"GET / HTTP/1.1\r\nHost: app.example.test\r\n\r\n")
            await ms.send_eof()
            try:
                while chunk := await ms.receive_some():
                    out += chunk
            except trio.BrokenResourceError:
                pass
    assert b"\r\nX-Injected: yes\r\n" not in out, out


@pytest.mark.parametrize(("kind", "datagrams"), [("http", False), ("tcp", False), ("udp", True)])
async def test_a_relayed_peer_address_is_escaped_in_the_owner_log(
    nursery: trio.Nursery,
    etcd: EtcdServer,
    caplog: pytest.LogCaptureFixture,
    kind: str,
    datagrams: bool,
) -> None:
    """``route_connection`` logs a refused relayed connection with the other node's
    ``Open.host`` as it is ("%s:%d", no printable()): a newline in it forges log lines.
    Every kind of relayed stream (a port, a UDP association, a name) is checked alike."""
    from pytunnel.protocol import routes

    tag = {
        "http": routes.RELAY_HTTP,
        "tcp": routes.RELAY_TCP | 8080,
        "udp": routes.RELAY_UDP | 8080,
    }[kind]
    caplog.set_level(logging.INFO)
    a = await _node(
        nursery, etcd, "a", "127.0.0.1", http_listen=("127.0.0.1", 0), domain="example.test"
    )
    with trio.fail_after(10):
        async with await _rogue_link(a) as session:
            # refused (what the owner does with a peer that is not an IP), logged escaped
            with pytest.raises(pytunnel.errors.TunnelError, match="not an IP address"):
                await session.open_stream(
                    "203.0.113.9 refused\nCRITICAL forged line", 1, tag=tag, datagrams=datagrams
                )
    forged = [r.getMessage() for r in caplog.records if "\n" in r.getMessage()]
    assert not forged, forged
    assert any("203.0.113.9 refused\\nCRITICAL" in r.getMessage() for r in caplog.records)


async def test_a_link_that_can_open_no_more_streams_is_replaced(
    nursery: trio.Nursery, etcd: EtcdServer, echo_port: int
) -> None:
    """One link carries every connection between two nodes for as long as both live; its
    stream ids run out after 2**31 opens (~25 days at 1,000 relayed connections/s). Then
    ``open_stream`` raises "going away" for every connection, but the session itself stays
    up, so ``NodeLinks`` keeps it for ever: all relaying to that node is dead until a
    restart. (White box: the id counter is moved to its end.)"""
    _a, b, _tunnel, port = await _two_nodes_one_port(nursery, etcd, echo_port)
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.2", port)
        async with stream:
            assert await _echo_once(stream, b"one") == b"one"
    links = b.node_links
    assert links is not None
    session = links._peers["a"].session
    assert session is not None
    session._mux._next_id = 2**32 + 1  # the ids of a long-lived link, used up
    results = []
    for _ in range(3):
        with trio.fail_after(10):
            stream = await trio.open_tcp_stream("127.0.0.2", port)
            async with stream:
                try:
                    results.append(await _echo_once(stream, b"two"))
                except trio.BrokenResourceError:
                    results.append(b"<reset>")
    assert results[-1] == b"two", results
    assert results == [b"two"] * 3, results  # the first connection already takes a new link
    assert links._peers["a"].session is not session
    await wait_until(lambda: session.closed, seconds=10, what="the used-up link kept open")
    assert links.linked_nodes == ["a"]


async def test_a_client_token_is_never_also_the_cluster_secret(
    nursery: trio.Nursery, etcd: EtcdServer
) -> None:
    """Nothing stops an operator from giving the token file as --cluster-secret-file (the
    docs: "the secret the nodes share, one line in a file"), and then every holder of the
    client token can authenticate as a node (test_handshake_proofs even pins that): it
    then relays into any client's port or name with any public address it likes (PROXY
    protocol, X-Forwarded-For). A node should refuse a cluster secret equal to the token."""
    from pytunnel._handshake import client_handshake

    registry = EtcdRegistry(etcd.endpoint, "a", lease_ttl=3, request_timeout=1.0)
    try:
        a: pytunnel.TunnelServer = await nursery.start(
            functools.partial(
                pytunnel.serve,
                0,
                host="127.0.0.1",
                token=TOKEN,
                cluster=registry,
                cluster_secret=TOKEN,
            )
        )
    except ValueError:
        return  # refused: what a fix does
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream(*a.address)
        result = await client_handshake(
            stream, TOKEN, max_frame_size=65536, client_id="just-a-client", node=True
        )
        await stream.aclose()
    assert not result.node, "a client with the token got a node link"


async def _etcd_put(etcd: EtcdServer, key: str, value: str) -> None:
    import base64

    import httpx

    def b64(text: str) -> str:
        return base64.b64encode(text.encode()).decode()

    async with httpx.AsyncClient() as http:
        reply = await http.post(
            f"{etcd.endpoint}/v3/kv/put", json={"key": b64("/pytunnel/" + key), "value": b64(value)}
        )
        reply.raise_for_status()


async def test_registry_port_keys_are_validated_before_a_port_is_mirrored(
    nursery: trio.Nursery, etcd: EtcdServer
) -> None:
    """``_apply`` takes any ``tcp/<digits>`` key as a port: ``tcp/99999`` (str.isdigit,
    no range check) is "mirrored", and getaddrinfo wraps the port, so the node listens on
    99999 - 65536 = 34463 and relays it with tag RELAY_TCP | 99999, which the owner reads
    as port 34463 too."""
    await _etcd_put(etcd, "nodes/x", "127.0.0.1:9")
    await _etcd_put(etcd, "tcp/99999", "x/s1")
    b = await _node(nursery, etcd, "b", "127.0.0.2")
    links = b.node_links
    assert links is not None
    await trio.sleep(1)
    assert 99999 not in links.mirrored_ports


async def test_a_bad_registry_key_does_not_stop_a_node_from_starting(
    nursery: trio.Nursery, etcd: EtcdServer, caplog: pytest.LogCaptureFixture
) -> None:
    """``"²".isdigit()`` is true but ``int("²")`` raises ValueError: one such key under
    the prefix (any etcd writer, another version's key) and no node with a cluster secret
    can start (the snapshot in NodeLinks.run raises out of serve)."""
    await _etcd_put(etcd, "tcp/\u00b2", "x/s1")
    b = await _node(nursery, etcd, "b", "127.0.0.2")
    assert b.node_links is not None
    # nor does one the watch reports: the node goes on following the registry after it
    await _etcd_put(etcd, "nodes/x", "127.0.0.1:9")
    for bad in ("udp/\u00b2", "tcp/0", "tcp/65536", "tcp/\n8080"):
        await _etcd_put(etcd, bad, "x/s1")
    port = _free_port_on_both()
    await _etcd_put(etcd, f"tcp/{port}", "x/s1")
    await _mirrored(b, port)
    assert b.node_links.mirrored_ports == [port]
    ignored = [r.getMessage() for r in caplog.records if "ignored: not a port" in r.getMessage()]
    assert "registry key tcp/\\n8080 ignored: not a port" in ignored, ignored


async def test_a_port_that_moves_to_the_node_mirroring_it_is_served_by_both(
    nursery: trio.Nursery, etcd: EtcdServer, echo_port: int
) -> None:
    """The client holds a port on A, which B mirrors; its link to A dies one-sidedly and it
    reconnects to B: B stops its mirror and binds the port for the client, A drops the
    ghost and mirrors the port for B. Both nodes must serve it afterwards."""
    from helpers import start_link_proxy
    from test_cluster_server import FAST, _echo

    a = await _node(nursery, etcd, "a", "127.0.0.1")
    b = await _node(nursery, etcd, "b", "127.0.0.2")
    proxy, listening = await start_link_proxy(nursery, a.address)
    tunnel = await pytunnel.connect_tunnel(nursery, [proxy.address, b.address], token=TOKEN, **FAST)
    port = _free_port_on_both()
    remote = await tunnel.forward_remote("127.0.0.1", echo_port, remote_port=port)
    await _mirrored(b, port)
    assert await _echo(("127.0.0.2", port)) == b"ping"  # relayed B -> A
    try:
        proxy.reset_client_side()
        listening.cancel()
        await wait_until(lambda: b.session_count == 1, seconds=20)
        with trio.fail_after(20):
            status = await remote.wait_status(
                pytunnel.ForwardStatus.ACTIVE, pytunnel.ForwardStatus.ERROR
            )
        assert status is pytunnel.ForwardStatus.ACTIVE, remote.reason
        await _mirrored(a, port)
        assert b.node_links is not None
        assert port not in b.node_links.mirrored_ports
        assert await _echo(("127.0.0.2", port)) == b"ping"  # B's own client now
        assert await _echo(("127.0.0.1", port)) == b"ping"  # relayed A -> B
    finally:
        await tunnel.aclose()
        proxy.close()


async def test_link_attempts_to_a_failing_node_back_off(
    nursery: trio.Nursery, etcd: EtcdServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A node whose link cannot be made (here: it answers and hangs up at once, as a node
    being restarted or with the wrong secret does) is dialled again for *every* public
    connection that lands on a port it holds: no backoff, no memory of the failure, so a
    burst of public connections is a burst of dials and handshakes at that node (and, with a
    wrong secret, of authentication failures that get this node's address throttled)."""
    accepted = [0]
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    node_port = listeners[0].socket.getsockname()[1]

    async def hang_up(conn: trio.SocketStream) -> None:
        accepted[0] += 1
        await conn.aclose()

    nursery.start_soon(trio.serve_listeners, hang_up, listeners)
    port = _free_port_on_both()
    await _etcd_put(etcd, "nodes/x", f"127.0.0.1:{node_port}")
    await _etcd_put(etcd, f"tcp/{port}", "x/s1")
    b = await _node(nursery, etcd, "b", "127.0.0.2")
    await _mirrored(b, port)
    for _ in range(30):
        with trio.fail_after(10):
            stream = await trio.open_tcp_stream("127.0.0.2", port)
            async with stream:
                try:
                    while await stream.receive_some():
                        pass
                except trio.BrokenResourceError:
                    pass
    assert accepted[0] <= 5, f"{accepted[0]} link attempts for 30 public connections"
    warned = [r for r in caplog.records if r.getMessage().startswith("no link to node x")]
    assert len(warned) == 1, [r.getMessage() for r in warned]


async def test_a_client_of_another_node_cannot_keep_a_node_from_starting(
    nursery: trio.Nursery, etcd: EtcdServer, echo_port: int, tmp_path: object
) -> None:
    """``serve`` mirrors every port held elsewhere while it joins the cluster, before the
    CLI binds its own --metrics / --admin listeners. A client of node A (the token only)
    that holds port P therefore makes node B, started with --metrics on P of its public
    host, fail to start (on one server the metrics port is bound before any client can
    ask for it). A node's own listeners should be bound first, or never mirrored."""
    import os
    import pathlib
    import subprocess
    import sys

    a = await _node(nursery, etcd, "a", "127.0.0.1")
    tunnel = await pytunnel.connect_tunnel(nursery, a.address, token=TOKEN)
    port = _free_port_on_both()
    await tunnel.forward_remote("127.0.0.1", echo_port, remote_port=port)
    secret = pathlib.Path(str(tmp_path)) / "secret"
    secret.write_text(SECRET + "\n")
    process = await trio.lowlevel.open_process(
        [
            sys.executable,
            "-m",
            "pytunnel",
            "serve",
            "--listen",
            "127.0.0.2:0",
            "--public-host",
            "127.0.0.2",
            "--cluster",
            etcd.url,
            "--node-id",
            "b",
            "--cluster-lease-ttl",
            "3",
            "--cluster-secret-file",
            str(secret),
            "--metrics",
            f"127.0.0.2:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(pathlib.Path(str(tmp_path)) / "stderr").open("wb"),
        env={**os.environ, "PYTUNNEL_TOKEN": "another"},
    )
    try:
        with trio.move_on_after(8):
            await process.wait()
        said = (pathlib.Path(str(tmp_path)) / "stderr").read_text()[-600:]
        assert process.returncode is None, f"node b exited with {process.returncode}: {said}"
    finally:
        if process.returncode is None:
            process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()


async def test_a_port_this_node_listens_on_itself_is_never_mirrored(
    nursery: trio.Nursery, etcd: EtcdServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A key naming this node's own control or shared HTTP port (another node's client on
    that port of its own host) is not mirrored here: the node keeps its listeners."""
    caplog.set_level(logging.INFO)
    b = await _node(nursery, etcd, "b", "127.0.0.2", http_listen=("127.0.0.2", 0))
    links = b.node_links
    assert links is not None
    assert b.http_address is not None
    await _etcd_put(etcd, "nodes/x", "127.0.0.1:9")
    own = [b.address[1], b.http_address[1]]
    for port in own:
        await _etcd_put(etcd, f"tcp/{port}", "x/s1")
    other = _free_port_on_both()
    await _etcd_put(etcd, f"tcp/{other}", "x/s1")
    await _mirrored(b, other)  # the keys before it were seen
    assert links.mirrored_ports == [other]
    said = [r.getMessage() for r in caplog.records]
    for port in own:
        assert f"tcp port {port} is held on another node but this node listens on it" in said


async def test_a_link_cut_mid_stream_resets_and_gives_back_everything(
    nursery: trio.Nursery, etcd: EtcdServer, echo_port: int
) -> None:
    """Ten connections held through B when the link's transport dies under B: each public
    peer sees a reset, both nodes give back every slot, task and descriptor (a new link
    replaces the old one)."""
    import socket as _socket  # noqa: F401

    from helpers import count_fds, count_tasks, describe_tasks

    from pytunnel.errors import SessionClosedError

    a, b, _tunnel, port = await _two_nodes_one_port(nursery, etcd, echo_port)
    with trio.fail_after(10):
        s = await trio.open_tcp_stream("127.0.0.2", port)
        async with s:
            assert await _echo_once(s, b"up") == b"up"
    await wait_until(lambda: b.active_streams == 0 and a.active_streams == 0, seconds=20)
    tasks, fds = count_tasks(), count_fds()
    streams = []
    with trio.fail_after(20):
        for i in range(10):
            s = await trio.open_tcp_stream("127.0.0.2", port)
            assert await _echo_once(s, b"held %d" % i) == b"held %d" % i
            streams.append(s)
    links = b.node_links
    assert links is not None
    session = links._peers["a"].session
    assert session is not None
    await session.abort(SessionClosedError("transport lost"))
    resets = 0
    with trio.fail_after(20):
        for s in streams:
            try:
                while await s.receive_some():
                    pass
            except trio.BrokenResourceError:
                resets += 1
            await s.aclose()
    assert resets == 10
    await wait_until(
        lambda: b.active_streams == 0 and a.active_streams == 0,
        seconds=20,
        what=lambda: f"slots a={a.active_streams} b={b.active_streams}",
    )
    with trio.fail_after(10):
        s = await trio.open_tcp_stream("127.0.0.2", port)
        async with s:
            assert await _echo_once(s, b"again") == b"again"
    await wait_until(
        lambda: count_tasks() <= tasks and count_fds() <= fds,
        seconds=20,
        what=lambda: (
            f"tasks {count_tasks()} (was {tasks}), fds {count_fds()} (was {fds}): "
            + describe_tasks()
        ),
    )


async def test_an_upload_cut_on_the_link_reaches_the_target_as_a_reset(
    nursery: trio.Nursery, etcd: EtcdServer
) -> None:
    """The public peer at B uploads without finishing (no EOF) when the link dies: the
    client's target (behind A's client) must see a reset, never a clean EOF that would
    pass for a complete upload."""
    from pytunnel.errors import SessionClosedError

    seen: list[str] = []
    got_bytes = trio.Event()
    ended = trio.Event()

    async def target(conn: trio.SocketStream) -> None:
        try:
            while data := await conn.receive_some():
                got_bytes.set()
                del data
            seen.append("eof")
        except trio.BrokenResourceError:
            seen.append("reset")
        finally:
            ended.set()
            await conn.aclose()

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    target_port = listeners[0].socket.getsockname()[1]
    nursery.start_soon(trio.serve_listeners, target, listeners)
    a = await _node(nursery, etcd, "a", "127.0.0.1")
    b = await _node(nursery, etcd, "b", "127.0.0.2")
    tunnel = await pytunnel.connect_tunnel(nursery, a.address, token=TOKEN)
    port = _free_port_on_both()
    await tunnel.forward_remote("127.0.0.1", target_port, remote_port=port)
    await _mirrored(b, port)
    with trio.fail_after(20):
        s = await trio.open_tcp_stream("127.0.0.2", port)
        await s.send_all(b"x" * 100_000)
        await got_bytes.wait()
        links = b.node_links
        assert links is not None
        session = links._peers["a"].session
        assert session is not None
        await session.abort(SessionClosedError("transport lost"))
        await ended.wait()
        await s.aclose()
    assert seen == ["reset"]


async def test_one_link_carries_more_than_one_sessions_worth_of_streams(
    nursery: trio.Nursery, etcd: EtcdServer, echo_port: int
) -> None:
    """Every connection from B to A shares one link, a session with the *client* session
    limit (``--max-session-streams``, 4,096 by default) rather than the server's
    ``max_streams`` (16,384): past it B resets public connections that A would take
    directly. Here the session limit is 4: three clients at A with three held connections
    each through B (9 < max_streams, 3 <= 4 per client session)."""
    options = {"session": pytunnel.SessionConfig(max_streams=4)}
    a = await _node(nursery, etcd, "a", "127.0.0.1", **options)
    b = await _node(nursery, etcd, "b", "127.0.0.2", **options)
    ports = []
    for _ in range(3):
        tunnel = await pytunnel.connect_tunnel(nursery, a.address, token=TOKEN)
        port = _free_port_on_both()
        await tunnel.forward_remote("127.0.0.1", echo_port, remote_port=port)
        ports.append(port)
    for port in ports:
        await _mirrored(b, port)
    held = []
    results = []
    with trio.fail_after(20):
        for port in ports:
            for i in range(3):
                s = await trio.open_tcp_stream("127.0.0.2", port)
                held.append(s)
                try:
                    results.append(await _echo_once(s, b"n%d" % i) == b"n%d" % i)
                except trio.BrokenResourceError:
                    results.append(False)
    for s in held:
        await s.aclose()
    assert all(results), results
