"""Public traffic that reaches a node whose client is on another node, relayed over a node
link (a pytunnel session between the nodes, authenticated by the cluster secret), on a real
etcd.

Each node's public host is its own loopback address (127.0.0.1, 127.0.0.2), so both can
listen on one port: node B listens on the port of node A's client and relays to A.
"""

from __future__ import annotations

import functools
import shutil
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
    wait_until,
)
from prometheus_client import CollectorRegistry, generate_latest
from test_cluster_server import _free_port_on_both

import pytunnel
import pytunnel.metrics
from pytunnel.cluster import EtcdRegistry

pytestmark = pytest.mark.skipif(
    shutil.which("etcd") is None, reason="etcd is not installed (.ci/run installs etcd-server)"
)

SECRET = "the nodes' own secret"
HTTP = ("127.0.0.1", 0)


async def _node(
    nursery: trio.Nursery,
    etcd: EtcdServer,
    name: str,
    public_host: str,
    secret: str | None = SECRET,
    **options: object,
) -> pytunnel.TunnelServer:
    registry = EtcdRegistry(etcd.endpoint, name, lease_ttl=3, request_timeout=1.0)
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


async def _exchange(address: tuple[str, int], payload: bytes) -> bytes:
    """Send ``payload``, half-close, read until EOF (a reset raises)."""
    with trio.fail_after(10):  # a hang detector
        stream = await trio.open_tcp_stream(*address)
        async with stream:
            await stream.send_all(payload)
            await stream.send_eof()
            out = b""
            while chunk := await stream.receive_some():
                out += chunk
            return out


async def _until_eof(stream: trio.SocketStream) -> None:
    while await stream.receive_some():
        pass


async def _mirrored(node: pytunnel.TunnelServer, port: int) -> None:
    links = node.node_links
    assert links is not None
    await wait_until(lambda: port in links.mirrored_ports, seconds=20, what=f"{port} not mirrored")


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
    assert (await _exchange(("127.0.0.1", port), b"direct")).endswith(b"direct")
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
    assert await _exchange(b.http_address, request) == request  # the echo: head replayed once
    missing = await _exchange(b.http_address, b"GET / HTTP/1.1\r\nHost: nope.example.test\r\n\r\n")
    assert missing.startswith(b"HTTP/1.1 404 ")
    assert links.stats.streams_out == 1


async def test_losing_the_link_resets_the_connections_relayed_over_it(
    nursery: trio.Nursery, etcd: EtcdServer, echo_port: int
) -> None:
    """A relayed connection is live when node A goes away: its public peer at B sees a
    reset, not a clean end that would pass for a complete reply; B stops listening once
    A's key is gone and nothing of the link is left."""
    a = await _node(nursery, etcd, "a", "127.0.0.1")
    b = await _node(nursery, etcd, "b", "127.0.0.2")
    tunnel = await pytunnel.connect_tunnel(nursery, a.address, token=TOKEN, reconnect=False)
    port = _free_port_on_both()
    await tunnel.forward_remote("127.0.0.1", echo_port, remote_port=port)
    await _mirrored(b, port)
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
        await _exchange(("127.0.0.2", port), b"hello")
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
    assert await _exchange(("127.0.0.2", port), b"over tls") == b"over tls"
    assert b.node_links is not None
    assert b.node_links.linked_nodes == ["a"]

    _, stranger = _contexts(trustme.CA())
    c = await _node(nursery, etcd, "c", "127.0.0.3", tls=server_tls, cluster_tls=stranger)
    await _mirrored(c, port)
    with pytest.raises(trio.BrokenResourceError):
        await _exchange(("127.0.0.3", port), b"hello")
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
        await _exchange(("127.0.0.2", port), b"hello")
    assert a.node_links is not None
    assert a.node_links.stats.streams_in == 0  # refused before it was taken


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
        assert await _exchange(("127.0.0.2", other), b"still relays") == b"still relays"
    finally:
        squatter.close()


async def test_metrics_name_the_node_and_count_node_link_traffic(
    nursery: trio.Nursery, etcd: EtcdServer, echo_port: int
) -> None:
    """Scraped from each node: every server metric has the node's label; the relaying node
    counts its streams and bytes out, the owner its streams in and the forward's own
    counters."""
    a = await _node(nursery, etcd, "a", "127.0.0.1")
    b = await _node(nursery, etcd, "b", "127.0.0.2")
    tunnel = await pytunnel.connect_tunnel(nursery, a.address, token=TOKEN)
    port = _free_port_on_both()
    await tunnel.forward_remote("127.0.0.1", echo_port, remote_port=port)
    await _mirrored(b, port)
    payload = b"x" * 10_000
    for _ in range(2):
        assert await _exchange(("127.0.0.2", port), payload) == payload
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
    echo = await nursery.start(_udp_echo)
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


async def _udp_echo(*, task_status: trio.TaskStatus[int]) -> None:
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    with sock:
        await sock.bind(("127.0.0.1", 0))
        task_status.started(sock.getsockname()[1])
        while True:
            data, address = await sock.recvfrom(65536)
            await sock.sendto(data, address)


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
    a = await _node(nursery, etcd, "a", "127.0.0.1")
    b = await _node(nursery, etcd, "b", "127.0.0.2")
    tunnel = await pytunnel.connect_tunnel(nursery, a.address, token=TOKEN)
    port = _free_port_on_both()
    await tunnel.forward_remote("127.0.0.1", echo_port, remote_port=port)
    await _mirrored(b, port)
    assert await _exchange(("127.0.0.2", port), b"link up") == b"link up"
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
        lambda: count_tasks() == tasks and count_fds() == fds,
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
            await _exchange(("127.0.0.2", port), b"hello")
    assert "node a gave no usable address" in caplog.text
    assert await _exchange(("127.0.0.1", port), b"direct") == b"direct"


async def test_relaying_goes_on_while_the_engine_is_away(
    nursery: trio.Nursery, etcd: EtcdServer, echo_port: int
) -> None:
    """The engine is killed: a connection relayed through B before goes on, and new ones are
    relayed too (B's table of who holds what comes from its watch, not from a request per
    connection); once the engine is back the table follows it again."""
    a = await _node(nursery, etcd, "a", "127.0.0.1")
    b = await _node(nursery, etcd, "b", "127.0.0.2")
    tunnel = await pytunnel.connect_tunnel(nursery, a.address, token=TOKEN)
    port = _free_port_on_both()
    await tunnel.forward_remote("127.0.0.1", echo_port, remote_port=port)
    await _mirrored(b, port)
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
        assert await _exchange(("127.0.0.2", port), b"new %d" % i) == b"new %d" % i
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
    assert await _exchange(("127.0.0.2", other), b"after") == b"after"
