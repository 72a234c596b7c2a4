"""Where UDP datagrams can be lost, and what pytunnel does about each place: socket buffers
asked for both ways, a full send buffer waited for (bounded) instead of dropped, reads
limited to what the session has room for, and the kernel's own drops counted."""

from __future__ import annotations

import logging
import select
import socket

import pytest
import trio
import trio.testing
from helpers import TOKEN, wait_until
from test_udp_batches import _sessions

import pytunnel
from pytunnel import _listen
from pytunnel._listen import (
    adopt_datagram_socket,
    bind_udp,
    kernel_drops,
    receive_batch,
    send_batch,
)
from pytunnel._relay import RelayStats
from pytunnel._udp import UDP_QUEUE_BYTES, relay_association
from pytunnel.session import MuxStream

pytestmark = pytest.mark.timeout(120)


def _sysctl(name: str) -> int:
    with open(f"/proc/sys/net/core/{name}") as handle:
        return int(handle.read())


def _proc_drops(port: int) -> int:
    """The kernel's "drops" column of /proc/net/udp for the socket bound to ``port``."""
    with open("/proc/net/udp") as handle:
        for line in handle.read().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port:
                return int(fields[12])
    raise LookupError(f"no UDP socket on port {port}")


def _unix_pair() -> tuple[trio.socket.SocketType, socket.socket]:
    """A datagram socket pair whose sender blocks (``EAGAIN``) once the receiver's queue is
    full, unlike UDP over loopback, whose datagrams leave the send buffer at once."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    b.setblocking(False)
    return adopt_datagram_socket(a), b


async def test_socket_buffers_are_asked_for_both_ways_within_what_the_kernel_allows() -> None:
    wanted = 1024 * 1024
    sock = await bind_udp("127.0.0.1", 0, buffer=wanted)
    plain = await bind_udp("127.0.0.1", 0, buffer=0)
    reference = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock, plain, reference:
        # Linux doubles what it grants (its bookkeeping), and grants at most *mem_max
        rcv = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        snd = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        assert rcv == 2 * min(wanted, _sysctl("rmem_max"))
        assert snd == 2 * min(wanted, _sysctl("wmem_max"))
        # 0: the kernel's defaults
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            assert plain.getsockopt(socket.SOL_SOCKET, option) == reference.getsockopt(
                socket.SOL_SOCKET, option
            )


async def test_a_full_send_buffer_is_waited_for_while_the_receiver_pauses() -> None:
    """The receiver reads nothing until the sender has blocked; then every datagram of the
    batch arrives, in order: none was dropped for want of buffer."""
    sender, receiver = _unix_pair()
    batch = [i.to_bytes(4, "big") + bytes(996) for i in range(500)]
    result: list[tuple[int, int]] = []
    received: list[bytes] = []

    async def send() -> None:
        result.append(await send_batch(sender, batch))

    with sender, receiver, trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            # the receiver pauses: the sender fills the queue and has to wait for room
            await wait_until(lambda: _blocked(sender))
            assert not result, "500 datagrams cannot all fit the queue: the sender must wait"
            while len(received) < len(batch):
                await trio.lowlevel.wait_readable(receiver)
                while True:
                    try:
                        received.append(receiver.recv(2000))
                    except BlockingIOError:
                        break
        assert result == [(500, 500_000)]
        assert received == batch


def _blocked(sender: trio.socket.SocketType) -> bool:
    """Whether ``sender`` cannot send now (its peer's queue is full)."""
    poller = select.poll()
    poller.register(sender.fileno(), select.POLLOUT)
    return not poller.poll(0)


async def test_a_send_buffer_full_for_too_long_drops_the_rest_of_the_batch(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A receiver that never reads holds a batch for SEND_WAIT_LIMIT, not for ever: what was
    sent is reported, the rest dropped."""
    sender, receiver = _unix_pair()
    batch = [bytes(1000)] * 500
    with sender, receiver:
        start = trio.current_time()
        sent, size = await send_batch(sender, batch)
        assert 0 < sent < len(batch)
        assert size == sent * 1000
        assert trio.current_time() - start >= _listen.SEND_WAIT_LIMIT
        # the socket works again once the receiver reads
        while True:
            try:
                receiver.recv(2000)
            except BlockingIOError:
                break
        assert await send_batch(sender, [b"again"]) == (1, 5)
        assert receiver.recv(100) == b"again"


async def test_a_read_takes_no_more_than_max_bytes() -> None:
    receiver = await bind_udp("127.0.0.1", 0)
    sender = await bind_udp("127.0.0.1", 0)
    with receiver, sender:
        address = receiver.getsockname()
        for i in range(10):
            await sender.sendto(bytes([i]) * 1000, address)
        got: list[bytes] = []
        with trio.fail_after(30):
            first = await receive_batch(receiver, 65536, 2500)
            assert [len(data) for data, _ in first] == [1000, 1000, 1000]  # past 2,500 once
            got += [data for data, _ in first]
            while len(got) < 10:
                got += [data for data, _ in await receive_batch(receiver, 65536)]
        assert got == [bytes([i]) * 1000 for i in range(10)]


async def test_kernel_drops_are_what_the_kernel_counts() -> None:
    receiver = await bind_udp("127.0.0.1", 0, buffer=0)
    receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the smallest there is
    sender = await bind_udp("127.0.0.1", 0)
    with receiver, sender:
        port = receiver.getsockname()[1]
        assert kernel_drops(receiver) == 0
        for _ in range(100):
            await sender.sendto(bytes(1400), ("127.0.0.1", port))
        assert kernel_drops(receiver) == _proc_drops(port) > 0


async def test_the_server_counts_its_udp_associations(
    tunnel_server: pytunnel.TunnelServer, nursery: trio.Nursery
) -> None:
    """``TunnelServer.udp_stats`` (the ``pytunnel_server_udp_*`` metrics) covers the
    associations clients open through the server; a reply the kernel drops at the server's
    socket for the target is among its drops."""
    server = tunnel_server
    tunnel = await pytunnel.connect_tunnel(nursery, server.address, token=TOKEN)
    target = await bind_udp("127.0.0.1", 0)
    client = await bind_udp("127.0.0.1", 0)
    with target, client:
        udp = await tunnel.forward_local("127.0.0.1", target.getsockname()[1], protocol="udp")
        with trio.fail_after(30):
            # the first datagram opens the association (retried: it may be dropped while
            # the stream opens, as UDP may)
            while True:
                await client.sendto(b"hello", udp.address)
                with trio.move_on_after(0.5):
                    data, _ = await target.recvfrom(100)
                    break
            assert data == b"hello"
            await wait_until(lambda: server.udp_stats.active_connections == 1)
            assert server.udp_stats.total_connections == 1
            dropped = server.udp_stats.datagrams_dropped
            assert dropped == 0
            await tunnel.aclose()
            await wait_until(lambda: server.udp_stats.active_connections == 0)


async def test_a_target_that_never_reads_costs_the_rest_of_a_batch_counted_and_logged(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The dialing side of an association whose target stops reading: ``send_batch`` waits
    SEND_WAIT_LIMIT, then drops the rest; every datagram is delivered or counted, and the
    association's end logs why."""
    monkeypatch.setattr(_listen, "SEND_WAIT_LIMIT", 0.2)
    caplog.set_level(logging.DEBUG, logger="pytunnel.udp")
    sender, receiver = _unix_pair()
    stats = RelayStats()
    done = trio.Event()
    with receiver, trio.fail_after(60):
        async with _sessions(2) as (client, server), trio.open_nursery() as nursery:

            async def dial_side() -> None:
                incoming = await server.accept_stream()
                await relay_association(incoming.accept(), sender, stats=stats)
                done.set()

            nursery.start_soon(dial_side)
            stream = await client.open_stream("127.0.0.1", 9, datagrams=True)
            assert stream.send_datagrams([bytes(1000)] * 200)[0] == 200
            await wait_until(lambda: stats.datagrams_dropped > 0, 30)
            await stream.aclose()
            await done.wait()
        delivered = 0
        while True:
            try:
                receiver.recv(2000)
            except BlockingIOError:
                break
            delivered += 1
    assert 0 < delivered < 200
    assert delivered + stats.datagrams_dropped == 200
    messages = [r.getMessage() for r in caplog.records if r.name == "pytunnel.udp"]
    assert any(
        f"{200 - delivered} datagrams dropped" in m and f"send failed {200 - delivered}" in m
        for m in messages
    ), messages


@pytest.mark.parametrize(("size", "count"), [(60_000, 100), (1400, 1000)], ids=["large", "small"])
async def test_a_stalled_target_holds_the_association_queue_to_its_bytes(
    size: int, count: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The dialing side of an association over real sessions, its target a datagram socket
    whose queue is full (a UNIX one: over loopback a UDP send never waits). While the send
    waits, what arrives queues on the stream: datagrams near 64 KiB up to UDP_QUEUE_BYTES,
    the rest dropped and counted; 1400-byte ones up to the count, as before, none dropped.
    Once the target reads again, every datagram was delivered, in order, or counted."""
    monkeypatch.setattr(_listen, "SEND_WAIT_LIMIT", 60.0)  # the target reads long before
    std, receiver = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    std.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    receiver.setblocking(False)
    sender = adopt_datagram_socket(std)
    while True:  # the target's queue full before the burst
        try:
            std.send(b"f")
        except BlockingIOError:
            break
    stats = RelayStats()
    accepted: list[MuxStream] = []
    payloads = [i.to_bytes(4, "big") * (size // 4) for i in range(count)]
    delivered: list[bytes] = []

    def read() -> bool:
        while True:
            try:
                data = receiver.recv(65536)
            except BlockingIOError:
                return len(delivered) + stats.datagrams_dropped >= count
            if data != b"f":
                delivered.append(data)

    with receiver, trio.fail_after(90):
        async with _sessions(2) as (client, server), trio.open_nursery() as nursery:

            async def dial_side() -> None:
                incoming = await server.accept_stream()
                accepted.append(incoming.accept())
                await relay_association(accepted[0], sender, stats=stats)

            nursery.start_soon(dial_side)
            stream = await client.open_stream("127.0.0.1", 9, datagrams=True)
            queue = accepted[0]
            # the first one alone: the relay takes it and waits for the target to have room
            assert stream.send_datagrams(payloads[:1])[0] == 1
            await wait_until(lambda: queue.datagrams_received == 1)
            await wait_until(lambda: queue.datagram_bytes_queued == 0)
            for payload in payloads[1:]:
                await client.wait_for_room(size)
                assert stream.send_datagrams([payload])[0] == 1
            await wait_until(
                lambda: queue.datagrams_received + queue.datagrams_dropped == count,
                30,
                lambda: f"{queue.datagrams_received} queued, {queue.datagrams_dropped} dropped",
            )
            peak, dropped = queue.datagram_bytes_peak, queue.datagrams_dropped
            await wait_until(read, 30, lambda: f"{len(delivered)} delivered, {stats}")
            await stream.aclose()
    # all but the first waited in the queue, as many as its bytes allow
    held = min(count - 1, UDP_QUEUE_BYTES // size)
    assert peak == held * size <= UDP_QUEUE_BYTES
    assert dropped == count - 1 - held
    assert dropped > 0 if size > 2048 else dropped == 0
    # every drop was the queue's, and counted once
    assert stats.datagrams_dropped == dropped
    assert len(delivered) + dropped == count
    indices = [int.from_bytes(data[:4], "big") for data in delivered]
    assert indices == sorted(set(indices))
    assert delivered == [payloads[i] for i in indices]
