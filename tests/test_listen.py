"""Binding listeners (``_listen.py``): OS failures come back as typed forward errors;
batched reads of datagrams and of a listener's backlog."""

from __future__ import annotations

import errno
import socket
import subprocess
import sys
import textwrap

import pytest
import trio
import trio.testing
from helpers import wait_until

from pytunnel._listen import bind, bind_udp, receive_batch, serve_backlog, udp_socket_for


def test_permission_denied_is_typed() -> None:
    """Binding a privileged port as an unprivileged user (a subprocess that drops root)."""
    script = textwrap.dedent(
        """
        import os, trio, encodings.idna
        from pytunnel._listen import bind
        from pytunnel import PermissionDeniedError
        if os.geteuid() == 0:
            os.setgid(65534); os.setuid(65534)
        async def main():
            try:
                await bind("127.0.0.1", 81)
            except PermissionDeniedError as exc:
                print("typed", exc.code, exc.address)
        trio.run(main)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "typed 2102 127.0.0.1:81", out.stderr


async def test_receive_batch_takes_every_waiting_datagram_in_order() -> None:
    """Datagrams already queued come back together (at most 64 a pass), boundaries and order
    kept, each with its source."""
    receiver = await bind_udp("127.0.0.1", 0)
    sender = await bind_udp("127.0.0.1", 0)
    with receiver, sender:
        target = receiver.getsockname()
        for i in range(100):
            await sender.sendto(b"d%03d" % i, target)
        got: list[bytes] = []
        sizes = []
        with trio.fail_after(10):
            while len(got) < 100:
                batch = await receive_batch(receiver, 65536)
                sizes.append(len(batch))
                assert {address for _, address in batch} == {sender.getsockname()}
                got.extend(data for data, _ in batch)
        assert got == [b"d%03d" % i for i in range(100)]
        assert sizes[0] == 64  # the whole queue at once, up to the batch bound


async def test_receive_batch_skips_icmp_errors_and_waits_for_data() -> None:
    """On a connected socket an ICMP "port unreachable" for an earlier send is reported by the
    next receive: it is skipped, and the datagram behind it is returned."""
    peer = await bind_udp("127.0.0.1", 0)
    peer_address = peer.getsockname()
    sock, _ = await udp_socket_for("127.0.0.1", peer_address[1])
    with sock:
        await sock.connect(peer_address)
        peer.close()  # the port is closed: the kernel answers our send with ICMP
        await sock.send(b"nobody there")
        # a new socket on the same port (UDP has no TIME_WAIT) sends the real datagram
        again = await bind_udp(*peer_address)
        with again:
            await again.sendto(b"hello", sock.getsockname())
            with trio.fail_after(10):
                batch = await receive_batch(sock, 65536)
        assert [data for data, _ in batch] == [b"hello"]


async def test_receive_batch_of_a_foreign_socket_reads_one_at_a_time() -> None:
    foreign = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    sender = await bind_udp("127.0.0.1", 0)
    with foreign, sender:
        await foreign.bind(("127.0.0.1", 0))
        for _ in range(3):
            await sender.sendto(b"x", foreign.getsockname())
        with trio.fail_after(10):
            assert len(await receive_batch(foreign, 65536)) == 1


# ------------------------------------------------------------------- serve_backlog


def _queue_connections(port: int, count: int) -> list[socket.socket]:
    """``count`` connections made synchronously (the event loop does not run meanwhile),
    so that every one is in the listener's backlog before it takes any."""
    return [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(count)]


class _Steps(trio.abc.Instrument):
    """How many times the task running ``serve_backlog`` ran."""

    def __init__(self) -> None:
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task.name.endswith("serve_backlog"):
            self.steps += 1


async def test_serve_backlog_takes_a_burst_in_a_few_passes_each_after_its_slot() -> None:
    """200 connections queued at once are taken 64 a pass, not one per pass; ``reserve`` is
    called once per connection (never for a backlog that is already empty), and each
    connection comes with the slot taken for it."""
    reserved: list[int] = []
    started: list[tuple[trio.SocketStream, int]] = []
    released: list[int] = []

    async def reserve() -> int:
        reserved.append(len(reserved))
        return reserved[-1]

    def start(conn: trio.SocketStream, slot: int) -> None:
        started.append((conn, slot))

    steps = _Steps()
    [listener] = await bind("127.0.0.1", 0)
    port = listener.socket.getsockname()[1]
    clients = _queue_connections(port, 200)
    try:
        async with trio.open_nursery() as nursery:
            trio.lowlevel.add_instrument(steps)
            try:
                nursery.start_soon(serve_backlog, listener, reserve, start, released.append)
                await wait_until(lambda: len(started) == 200, 30)
                await trio.testing.wait_all_tasks_blocked()
            finally:
                trio.lowlevel.remove_instrument(steps)
            assert released == []
            assert reserved == list(range(200))
            assert [slot for _, slot in started] == reserved
            # the server side of each client, in order
            names = [conn.socket.getpeername() for conn, _ in started]
            assert names == [client.getsockname() for client in clients]
            assert steps.steps <= 20, steps.steps  # one a pass would be 200 or more
            nursery.cancel_scope.cancel()
    finally:
        for conn, _ in started:
            conn.socket.close()
        for client in clients:
            client.close()
        await listener.aclose()


@pytest.mark.parametrize("default_timeout", [None, 5.0])
async def test_serve_backlog_gives_back_the_slot_of_a_connection_gone_meanwhile(
    default_timeout: float | None,
) -> None:
    """``reserve`` may wait; a connection taken by someone else meanwhile leaves nothing to
    accept: the slot is given back at once (even with a process-wide default socket timeout,
    which must not make the accept wait) and the loop waits for the next one."""
    socket.setdefaulttimeout(default_timeout)
    try:
        await _gone_meanwhile()
    finally:
        socket.setdefaulttimeout(None)


async def _gone_meanwhile() -> None:
    free = trio.Event()
    asked = trio.Event()
    started: list[int] = []
    released: list[int] = []

    async def reserve() -> int:
        asked.set()
        await free.wait()
        return 5

    def start(conn: trio.SocketStream, slot: int) -> None:
        conn.socket.close()
        started.append(slot)

    [listener] = await bind("127.0.0.1", 0)
    port = listener.socket.getsockname()[1]
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_backlog, listener, reserve, start, released.append)
            client = socket.create_connection(("127.0.0.1", port), timeout=30)
            await asked.wait()
            stolen = await listener.accept()  # the one waiting is gone
            free.set()
            await wait_until(lambda: released == [5])
            assert started == []
            await stolen.aclose()
            client.close()
            nursery.cancel_scope.cancel()
    await listener.aclose()


async def test_serve_backlog_returns_when_the_listener_closes_while_reserving() -> None:
    """A listener closed while ``reserve`` waits (a port going offline): the slot is given
    back and the loop returns; the connection it waited for is not accepted."""
    asked = trio.Event()
    free = trio.Event()
    released: list[str] = []

    async def reserve() -> str:
        asked.set()
        await free.wait()
        return "slot"

    def start(conn: trio.SocketStream, slot: str) -> None:
        raise AssertionError("nothing may be accepted from a closed listener")

    [listener] = await bind("127.0.0.1", 0)
    port = listener.socket.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port), timeout=30)
    with trio.fail_after(30), client:
        async with trio.open_nursery() as nursery:
            done = trio.Event()

            async def run() -> None:
                await serve_backlog(listener, reserve, start, released.append)
                done.set()

            nursery.start_soon(run)
            await asked.wait()
            await listener.aclose()
            free.set()
            await done.wait()
    assert released == ["slot"]


async def test_serve_backlog_closes_the_connection_and_frees_the_slot_if_start_fails() -> None:
    """``start`` raising (its nursery closed, say): the accepted connection is closed, its
    slot given back, and the error goes to the caller."""
    released: list[int] = []

    async def reserve() -> int:
        return 1

    def start(conn: trio.SocketStream, slot: int) -> None:
        raise RuntimeError("nursery is closed")

    [listener] = await bind("127.0.0.1", 0)
    port = listener.socket.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port), timeout=30)
    with trio.fail_after(30), client:
        with pytest.raises(RuntimeError, match="nursery is closed"):
            await serve_backlog(listener, reserve, start, released.append)
        assert released == [1]
        assert await trio.to_thread.run_sync(client.recv, 10) == b""  # closed, not leaked
    await listener.aclose()


async def test_serve_backlog_raises_an_accept_error_that_is_not_about_resources() -> None:
    """A listening socket shut down for reading fails every accept(2) with ``EINVAL``: that
    is the listener broken, not a shortage to wait out, so it is raised (slot given back)."""
    released: list[int] = []

    async def reserve() -> int:
        return 2

    def start(conn: trio.SocketStream, slot: int) -> None:
        raise AssertionError("nothing to accept")

    [listener] = await bind("127.0.0.1", 0)
    listener.socket.shutdown(socket.SHUT_RD)
    with trio.fail_after(30):
        with pytest.raises(OSError, match="Invalid argument") as caught:
            await serve_backlog(listener, reserve, start, released.append)
    assert caught.value.errno == errno.EINVAL
    assert released == [2]
    await listener.aclose()
