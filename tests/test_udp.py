"""UDP forwarding: -L/-R with /udp, associations, expiry, floods."""

from __future__ import annotations

import os
import resource

import pytest
import trio
import trio.lowlevel

import pytunnel

pytestmark = pytest.mark.timeout(120)


async def _udp_echo(*, task_status: trio.TaskStatus[int]) -> None:
    """A UDP echo service; a request starting with b"Q" gets a DNS-like b"A" + rest answer."""
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    with sock:
        await sock.bind(("127.0.0.1", 0))
        task_status.started(sock.getsockname()[1])
        while True:
            data, addr = await sock.recvfrom(65536)
            reply = b"A" + data[1:] if data.startswith(b"Q") else data
            await sock.sendto(reply, addr)


async def _client_socket() -> trio.socket.SocketType:
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    await sock.bind(("127.0.0.1", 0))
    return sock


async def _ask(
    address: tuple[str, int], payload: bytes, sock: trio.socket.SocketType | None = None
) -> bytes:
    own = sock is None
    sock = sock or await _client_socket()
    try:
        with trio.fail_after(5):
            while True:  # UDP: retry until the association is up and answers
                await sock.sendto(payload, address)
                with trio.move_on_after(0.5):
                    data, _ = await sock.recvfrom(65536)
                    return data
    finally:
        if own:
            sock.close()


@pytest.mark.parametrize("kind", ["local", "remote"])
async def test_udp_request_response(
    tunnel: pytunnel.Tunnel, nursery: trio.Nursery, kind: str
) -> None:
    port = await nursery.start(_udp_echo)
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
    port = await nursery.start(_udp_echo)
    forward = await tunnel.forward_local("127.0.0.1", port, protocol="udp")
    results: list[bool] = []

    async def source(i: int) -> None:
        sock = await _client_socket()
        with sock:
            for j in range(5):
                payload = f"source {i} message {j}".encode()
                results.append(await _ask(forward.address, payload, sock) == payload)

    async with trio.open_nursery() as sources:
        for i in range(50):
            sources.start_soon(source, i)
    assert results == [True] * 250
    assert forward.stats.total_connections == 50


async def test_association_expiry(autojump_clock: trio.abc.Clock, nursery: trio.Nursery) -> None:
    server = await nursery.start(pytunnel.serve, "t", 0)
    tunnel = await pytunnel.connect_tunnel(nursery, server.address, token="t", udp_idle_timeout=60)
    port = await nursery.start(_udp_echo)
    forward = await tunnel.forward_local("127.0.0.1", port, protocol="udp")
    assert await _ask(forward.address, b"ping") == b"ping"
    assert forward.stats.active_connections == 1
    await trio.sleep(30)
    assert forward.stats.active_connections == 1
    await trio.sleep(40)
    assert forward.stats.active_connections == 0  # expired after 60 s idle
    assert await _ask(forward.address, b"again") == b"again"  # a new association
    assert forward.stats.total_connections == 2


async def test_flood_is_bounded_and_tcp_stays_responsive(
    tunnel: pytunnel.Tunnel, nursery: trio.Nursery, echo_port: int
) -> None:
    """100,000 datagrams as fast as possible: memory stays bounded (drops are counted) and a
    TCP stream sharing the session keeps answering."""
    port = await nursery.start(_udp_echo)
    udp = await tunnel.forward_local("127.0.0.1", port, protocol="udp")
    tcp = await tunnel.forward_local("127.0.0.1", echo_port)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    sock = await _client_socket()
    payload = b"f" * 1000
    pings: list[float] = []

    async def tcp_pings(done: trio.Event) -> None:
        stream = await trio.open_tcp_stream(*tcp.address)
        async with stream:
            while not done.is_set():
                start = trio.current_time()
                await stream.send_all(b"ping")
                assert await stream.receive_some() == b"ping"
                pings.append(trio.current_time() - start)
                await trio.sleep(0.01)

    done = trio.Event()
    async with trio.open_nursery() as flood:
        flood.start_soon(tcp_pings, done)
        with trio.fail_after(60):
            for i in range(100_000):
                await sock.sendto(payload, udp.address)
                if i % 1000 == 0:
                    await trio.lowlevel.checkpoint()
        await trio.sleep(0.5)
        done.set()
    sock.close()
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    assert grown_mib < 100, f"RSS grew by {grown_mib:.0f} MiB"
    assert pings, "the TCP stream never answered during the flood"
    assert max(pings) < 5  # answered throughout (a hang detector, not a benchmark)
    delivered = udp.stats.bytes_out // len(payload)
    assert delivered + udp.stats.datagrams_dropped <= 100_000
    # the TCP forward still works afterwards
    stream = await trio.open_tcp_stream(*tcp.address)
    await stream.send_all(b"after")
    assert await stream.receive_some() == b"after"
    await stream.aclose()


async def test_udp_port_in_use_and_policy(nursery: trio.Nursery) -> None:
    import functools

    server = await nursery.start(
        functools.partial(pytunnel.serve, "t", 0, allow_ports="40100-40110")
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
