"""Binding listeners (``_listen.py``): OS failures come back as typed forward errors."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import trio

from pytunnel._listen import bind_udp, receive_batch, udp_socket_for


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
