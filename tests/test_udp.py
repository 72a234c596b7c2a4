"""UDP forwarding: -L/-R with /udp, associations, expiry, floods."""

from __future__ import annotations

import contextlib
import functools
import os
import resource
import socket
from collections.abc import Callable, Collection

import pytest
import trio
import trio.lowlevel
from helpers import TOKEN, udp_echo

import pytunnel
import pytunnel._udp
from pytunnel.testing import open_tunnel_pair

pytestmark = pytest.mark.timeout(120)


async def _client_socket() -> trio.socket.SocketType:
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    await sock.bind(("127.0.0.1", 0))
    return sock


async def _ask(
    address: tuple[str, int],
    payload: bytes,
    sock: trio.socket.SocketType | None = None,
    *,
    stale: Collection[bytes] = (),
) -> bytes:
    """Send ``payload`` until an answer comes; answers in ``stale`` (late replies to earlier
    retries) are skipped."""
    own = sock is None
    sock = sock or await _client_socket()
    try:
        with trio.fail_after(15):
            while True:  # UDP: retry until the association is up and answers
                await sock.sendto(payload, address)
                with trio.move_on_after(0.5):
                    while True:
                        data, _ = await sock.recvfrom(65536)
                        if data not in stale:
                            return data
    finally:
        if own:
            sock.close()


@pytest.mark.parametrize("kind", ["local", "remote"])
async def test_udp_request_response(
    tunnel: pytunnel.Tunnel, nursery: trio.Nursery, kind: str
) -> None:
    port = await nursery.start(udp_echo)
    if kind == "local":
        forward: pytunnel.Forward = await tunnel.forward_local("127.0.0.1", port, protocol="udp")
    else:
        forward = await tunnel.forward_remote("127.0.0.1", port, protocol="udp")
    assert forward.status is pytunnel.ForwardStatus.ACTIVE
    assert await _ask(forward.address, b"Qexample.org") == b"Aexample.org"
    big = os.urandom(60_000)  # one datagram, boundaries kept
    assert await _ask(forward.address, big) == big


async def test_fifty_sources_get_their_own_replies(
    tunnel: pytunnel.Tunnel, nursery: trio.Nursery
) -> None:
    port = await nursery.start(udp_echo)
    forward = await tunnel.forward_local("127.0.0.1", port, protocol="udp")
    results: list[bool] = []

    async def source(i: int) -> None:
        sock = await _client_socket()
        with sock:
            asked: list[bytes] = []
            for j in range(5):
                payload = f"source {i} message {j}".encode()
                reply = await _ask(forward.address, payload, sock, stale=asked)
                results.append(reply == payload)
                asked.append(payload)

    async with trio.open_nursery() as sources:
        for i in range(50):
            sources.start_soon(source, i)
    assert results == [True] * 250
    assert forward.stats.total_connections == 50


async def test_association_expiry(autojump_clock: trio.abc.Clock, nursery: trio.Nursery) -> None:
    server = await nursery.start(functools.partial(pytunnel.serve, 0, token="t"))
    tunnel = await pytunnel.connect_tunnel(nursery, server.address, token="t", udp_idle_timeout=60)
    port = await nursery.start(udp_echo)
    forward = await tunnel.forward_local("127.0.0.1", port, protocol="udp")
    assert await _ask(forward.address, b"ping") == b"ping"
    assert forward.stats.active_connections == 1
    await trio.sleep(30)
    assert forward.stats.active_connections == 1
    await trio.sleep(40)
    assert forward.stats.active_connections == 0  # expired after 60 s idle
    assert await _ask(forward.address, b"again") == b"again"  # a new association
    assert forward.stats.total_connections == 2


@pytest.mark.slow
async def test_flood_is_bounded_and_tcp_stays_responsive(
    tunnel: pytunnel.Tunnel, nursery: trio.Nursery, echo_port: int
) -> None:
    """Up to 100,000 datagrams as fast as possible: memory stays bounded and a TCP stream
    sharing the session keeps answering throughout (each ping has a generous hang detector;
    the flood is bounded in count and in time so a loaded machine only floods for less).

    The datagrams go in bursts of 100 without a checkpoint in between, as from another
    process: one trio ``sendto`` per datagram would let the whole tunnel, running in this
    same process, take a scheduler pass per datagram, and the flood would trickle for its
    full time bound (about 550 datagrams/s) instead of flooding."""
    port = await nursery.start(udp_echo)
    udp = await tunnel.forward_local("127.0.0.1", port, protocol="udp")
    tcp = await tunnel.forward_local("127.0.0.1", echo_port)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    payload = b"f" * 1000
    pings = 0

    async def tcp_pings(done: trio.Event) -> None:
        nonlocal pings
        stream = await trio.open_tcp_stream(*tcp.address)
        async with stream:
            while not done.is_set():
                with trio.fail_after(30):  # a hang detector, not a benchmark
                    await stream.send_all(b"ping")
                    received = b""
                    while len(received) < 4:
                        chunk = await stream.receive_some()
                        assert chunk, "the TCP stream ended during the flood"
                        received += chunk
                assert received == b"ping"
                pings += 1
                await trio.sleep(0.01)

    done = trio.Event()
    async with trio.open_nursery() as flood:
        flood.start_soon(tcp_pings, done)
        with trio.move_on_after(30):
            sent = 0
            while sent < 100_000 or pings < 3:
                for _ in range(100):
                    with contextlib.suppress(BlockingIOError):  # the kernel drops it
                        sock.sendto(payload, udp.address)
                sent += 100
                await trio.lowlevel.checkpoint()
        done.set()
    sock.close()
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    assert grown_mib < 100, f"RSS grew by {grown_mib:.0f} MiB"
    assert pings >= 3, f"the TCP stream answered only {pings} times during the flood"
    assert udp.stats.active_connections == 1  # one source, one association
    # the TCP forward still works afterwards
    stream = await trio.open_tcp_stream(*tcp.address)
    with trio.fail_after(30):
        await stream.send_all(b"after")
        assert await stream.receive_some() == b"after"
    await stream.aclose()


async def _pausable_proxy(
    target_port: int, paused: trio.Event, *, task_status: trio.TaskStatus[int]
) -> None:
    """A TCP relay to ``target_port`` that, once ``paused`` is set, stops reading from the
    side that connected to it: that side's writes back up as on a stalled link."""

    async def pump(source: trio.SocketStream, sink: trio.SocketStream, pausable: bool) -> None:
        while True:
            if pausable and paused.is_set():
                await trio.sleep_forever()
            data = await source.receive_some()
            if not data:
                return
            await sink.send_all(data)

    async def handle(client: trio.SocketStream) -> None:
        server = await trio.open_tcp_stream("127.0.0.1", target_port)
        async with client, server, trio.open_nursery() as pumps:
            pumps.start_soon(pump, client, server, True)
            pumps.start_soon(pump, server, client, False)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handle, listeners)


async def test_datagrams_beyond_a_stalled_link_wait_in_the_socket_and_drops_are_counted(
    tunnel_server: pytunnel.TunnelServer, nursery: trio.Nursery
) -> None:
    """When the link stops draining, the forward stops reading once the session's write
    buffer is at its mark: the datagrams wait in the socket's receive buffer instead of
    being dropped at the session, and those the kernel drops once that buffer is full are
    counted as dropped too, exactly as many as the kernel says: none is lost uncounted."""
    paused = trio.Event()
    proxy_port = await nursery.start(_pausable_proxy, tunnel_server.address[1], paused)
    tunnel = await pytunnel.connect_tunnel(
        nursery, ("127.0.0.1", proxy_port), token=TOKEN, heartbeat_timeout=600
    )
    port = await nursery.start(udp_echo)
    udp = await tunnel.forward_local("127.0.0.1", port, protocol="udp")
    sock = await _client_socket()
    with sock:
        assert await _ask(udp.address, b"up", sock) == b"up"  # the association is open
        drops_before = _udp_drops(udp.address[1])
        assert udp.stats.datagrams_dropped == 0
        paused.set()
        big = b"b" * 60_000
        sent = 0
        with trio.fail_after(60):
            for _ in range(2_000):  # at most 120 MB: more than any socket buffers hold
                await sock.sendto(big, udp.address)
                sent += 1
                if _udp_drops(udp.address[1]) > drops_before:
                    break
            assert _udp_drops(udp.address[1]) > drops_before, "the kernel never dropped one"
            # the forward stopped reading: a backlog waits in its socket, not in the session
            assert _udp_receive_queue(udp.address[1]) > 0
            assert udp.stats.bytes_out < sent * len(big)
            # the kernel's drops show in the forward's count (brought up to date while it
            # waits for room), and nothing else was dropped
            while udp.stats.datagrams_dropped < _udp_drops(udp.address[1]) - drops_before:
                await trio.sleep(0.05)
        assert udp.stats.datagrams_dropped == _udp_drops(udp.address[1]) - drops_before


async def _whoami(*, task_status: trio.TaskStatus[int]) -> None:
    """A UDP service answering each datagram with the address it came from: the dialling
    side uses one socket per association, so equal answers mean the same association."""
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    with sock:
        await sock.bind(("127.0.0.1", 0))
        task_status.started(sock.getsockname()[1])
        while True:
            _, addr = await sock.recvfrom(65536)
            await sock.sendto(f"{addr[0]}:{addr[1]}".encode(), addr)


async def test_full_table_evicts_the_least_recently_used_association(
    tunnel_server: pytunnel.TunnelServer, nursery: trio.Nursery
) -> None:
    """A new source is never dropped for a full table: the association idle the longest
    makes room, so spoofed sources cannot lock real ones out for an idle timeout."""
    tunnel = await pytunnel.connect_tunnel(
        nursery, tunnel_server.address, token=TOKEN, max_udp_associations=4
    )
    port = await nursery.start(_whoami)
    udp = await tunnel.forward_local("127.0.0.1", port, protocol="udp")
    sources = {name: await _client_socket() for name in "ABCDE"}
    try:
        seen = {name: await _ask(udp.address, b"?", sources[name]) for name in "ABCD"}
        assert len(set(seen.values())) == 4
        assert await _ask(udp.address, b"?", sources["A"]) == seen["A"]  # A is now the newest
        assert await _ask(udp.address, b"?", sources["E"])  # a fifth source gets through...
        assert udp.stats.total_connections == 5
        assert udp.stats.datagrams_dropped == 0
        # ... by evicting B, the least recently used; A kept its association
        assert await _ask(udp.address, b"?", sources["A"]) == seen["A"]
        assert udp.stats.total_connections == 5
        assert await _ask(udp.address, b"?", sources["B"], stale={seen["B"]})  # a new one
        assert udp.stats.total_connections == 6
        with trio.fail_after(10):
            while udp.stats.active_connections > 4:
                await trio.sleep(0.01)
    finally:
        for sock in sources.values():
            sock.close()


async def test_udp_associations_count_against_the_server_stream_budget(
    nursery: trio.Nursery, echo_port: int
) -> None:
    """Associations hold slots of the server's stream budget; when the budget is spent (here
    by TCP streams), a new source takes the slot of the forward's least recently used
    association instead of being refused, so the forward never holds more, and quiet or
    spoofed sources cannot lock live ones out."""
    import functools

    server = await nursery.start(functools.partial(pytunnel.serve, 0, token=TOKEN, max_streams=8))
    tunnel = await pytunnel.connect_tunnel(nursery, server.address, token=TOKEN)
    tcp = [await tunnel.open_stream("127.0.0.1", echo_port) for _ in range(6)]
    port = await nursery.start(udp_echo)
    udp = await tunnel.forward_remote("127.0.0.1", port, protocol="udp")
    first, second, third = [await _client_socket() for _ in range(3)]
    try:
        assert await _ask(udp.address, b"one", first) == b"one"
        assert await _ask(udp.address, b"two", second) == b"two"
        assert server.active_streams == 8  # the budget is spent
        assert await _ask(udp.address, b"three", third) == b"three"  # "one" made way
        assert server.active_streams == 8
        assert udp.stats.total_connections == 3
        assert await _ask(udp.address, b"one again", first) == b"one again"  # "two" made way
        assert server.active_streams == 8
        for stream in tcp:  # the TCP streams that spent the budget are untouched
            await stream.send_all(b"tcp")
            assert await stream.receive_some() == b"tcp"
        await udp.aclose()
        with trio.fail_after(10):
            while server.active_streams > 6:
                await trio.sleep(0.01)
    finally:
        for sock in (first, second, third):
            sock.close()
        for stream in tcp:
            await stream.aclose()


async def test_one_udp_forward_takes_at_most_a_quarter_of_the_stream_budget(
    nursery: trio.Nursery,
) -> None:
    import functools

    server = await nursery.start(functools.partial(pytunnel.serve, 0, token=TOKEN, max_streams=8))
    tunnel = await pytunnel.connect_tunnel(nursery, server.address, token=TOKEN)
    port = await nursery.start(udp_echo)
    udp = await tunnel.forward_remote("127.0.0.1", port, protocol="udp")
    sockets = [await _client_socket() for _ in range(5)]
    try:
        for i, sock in enumerate(sockets):
            assert await _ask(udp.address, b"q%d" % i, sock) == b"q%d" % i
            assert server.active_streams <= 2
        assert udp.stats.total_connections == 5
    finally:
        for sock in sockets:
            sock.close()


async def _send_burst(sock: trio.socket.SocketType, address: tuple[str, int], count: int) -> None:
    for i in range(count):
        await sock.sendto(b"q%d" % i, address)


def _udp_receive_queue(port: int) -> int:
    """Bytes waiting in the kernel for the UDP socket bound to ``port`` (Linux)."""
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        with open(table) as handle:
            for line in handle.read().splitlines()[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port:
                    return int(fields[4].split(":")[1], 16)
    raise LookupError(f"no UDP socket on port {port}")


def _udp_drops(port: int) -> int:
    """Datagrams the kernel dropped on the UDP socket bound to ``port`` (Linux)."""
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        with open(table) as handle:
            for line in handle.read().splitlines()[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port:
                    return int(fields[12])
    raise LookupError(f"no UDP socket on port {port}")


async def _wait_handled(port: int, busy: Callable[[], bool]) -> None:
    """Until the forward on ``port`` has read every datagram sent to it (its receive loop
    handles each one before reading the next) and no association is still opening."""
    with trio.fail_after(30):
        while _udp_receive_queue(port) or busy():
            await trio.sleep(0.01)


async def test_refused_source_is_remembered_not_reopened_per_datagram(
    nursery: trio.Nursery,
) -> None:
    """1,000 datagrams from a source whose target the server forbids open a handful of
    streams, not one per datagram."""
    import functools

    server = await nursery.start(
        functools.partial(pytunnel.serve, 0, token=TOKEN, permit_open="127.0.0.1:1")
    )
    tunnel = await pytunnel.connect_tunnel(nursery, server.address, token=TOKEN)
    port = await nursery.start(udp_echo)
    udp = await tunnel.forward_local("127.0.0.1", port, protocol="udp")
    sock = await _client_socket()
    with sock:
        await _send_burst(sock, udp.address, 1000)
        await _wait_handled(udp.address[1], lambda: udp.stats.active_connections > 0)
    assert 1 <= udp.stats.total_connections <= 3, udp.stats
    assert udp.stats.errors == {"FORBIDDEN": udp.stats.total_connections}
    assert udp.stats.bytes_out == 0  # nothing counted as sent that was not
    assert udp.stats.datagrams_dropped > 0


async def test_refused_association_is_remembered_by_the_server(
    tunnel_server: pytunnel.TunnelServer, tunnel: pytunnel.Tunnel
) -> None:
    """The dialling side refuses each association (its target does not resolve): the
    server's forward stops opening streams for that source instead of one per datagram."""
    udp = await tunnel.forward_remote("nonexistent.invalid", 53, protocol="udp")
    sock = await _client_socket()
    with sock:
        await _send_burst(sock, udp.address, 1000)
        # an association holds a server stream slot until its Open is answered
        await _wait_handled(udp.address[1], lambda: tunnel_server.active_streams > 0)
    refused = udp.stats.errors.get("NODE_UNSTABLE", 0)  # one per Open the client refused
    assert 1 <= refused <= 3, udp.stats


async def test_refusal_memory_expires(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery
) -> None:
    import functools

    server = await nursery.start(
        functools.partial(pytunnel.serve, 0, token=TOKEN, permit_open="127.0.0.1:1")
    )
    tunnel = await pytunnel.connect_tunnel(nursery, server.address, token=TOKEN)
    port = await nursery.start(udp_echo)
    udp = await tunnel.forward_local("127.0.0.1", port, protocol="udp")
    sock = await _client_socket()
    with sock:

        async def send_and_wait(payload: bytes) -> None:
            dropped, refused = udp.stats.datagrams_dropped, udp.stats.errors.get("FORBIDDEN", 0)
            await sock.sendto(payload, udp.address)
            for _ in range(1000):  # virtual time: each poll is 1 ms of it
                if (
                    udp.stats.datagrams_dropped > dropped
                    or udp.stats.errors.get("FORBIDDEN", 0) > refused
                ):
                    return
                await trio.sleep(0.001)
            raise AssertionError("the datagram was never handled")

        await send_and_wait(b"first")
        assert udp.stats.total_connections == 1
        with trio.fail_after(5):
            while udp.stats.errors.get("FORBIDDEN", 0) < 1:
                await trio.sleep(0.001)
        await trio.sleep(2)
        await send_and_wait(b"soon after")  # remembered: dropped, nothing opened
        assert udp.stats.total_connections == 1
        await trio.sleep(pytunnel._udp.DEFAULT_REFUSAL_MEMORY)
        await send_and_wait(b"later")  # forgotten: a new attempt
        assert udp.stats.total_connections == 2


async def test_udp_port_in_use_and_policy(nursery: trio.Nursery) -> None:
    import functools

    server = await nursery.start(
        functools.partial(pytunnel.serve, 0, token="t", allow_ports="40100-40110")
    )
    tunnel = await pytunnel.connect_tunnel(nursery, server.address, token="t")
    with pytest.raises(pytunnel.PortNotAllowedError):
        await tunnel.forward_remote("127.0.0.1", 53, remote_port=5353, protocol="udp")
    forward = await tunnel.forward_remote("127.0.0.1", 53, protocol="udp")
    assert 40100 <= forward.listen_port <= 40110  # port 0 stays inside the allowed range
    taken = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    await taken.bind(("127.0.0.1", 0))
    with pytest.raises(pytunnel.AddressInUseError):
        await tunnel.forward_local(
            "127.0.0.1", 53, local_port=taken.getsockname()[1], protocol="udp"
        )
    taken.close()


async def test_udp_refused_association_counted_once() -> None:
    async with open_tunnel_pair(server_options={"permit_open": ["127.0.0.1:1"]}) as (_, tunnel):
        forward = await tunnel.forward_local("127.0.0.1", 9, protocol="udp")
        sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
        with sock:
            await sock.sendto(b"x", forward.address)
            with trio.fail_after(5):
                while not forward.stats.errors:
                    await trio.sleep(0.01)
            await trio.sleep(0.2)
        assert forward.stats.errors == {"FORBIDDEN": 1}
