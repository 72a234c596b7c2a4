"""TLSSocketStream: TLS with OpenSSL on the socket itself, as the control connection uses
over plain TCP.

Real loopback sockets throughout; the far end is another TLSSocketStream, ``trio.SSLStream``,
a hand-driven ``ssl.SSLObject`` (to cut records where we want), a raw socket sending
garbage, or OpenSSL's own ``s_server`` / ``s_client``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trustme
from helpers import (
    count_fds,
    count_tasks,
    describe_tasks,
    eight_streams_at_once,
    open_pair,
    receive_exactly,
    tcp_stream_pair,
    wait_until,
)

import pytunnel
from pytunnel._direct import PacedReads
from pytunnel._tls import tls_accept, tls_connect
from pytunnel._tls_stream import TLSSocketStream, wrap_socket_stream
from pytunnel.session import Role, open_session

pytestmark = pytest.mark.timeout(60)

#: A hang detector for every exchange below, far above what any of them takes.
BOUND = 20


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def server_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost", "127.0.0.1").configure_cert(context)
    return context


@pytest.fixture(scope="module")
def client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ca.configure_trust(context)
    return context


@asynccontextmanager
async def tls_pair(
    client_context: ssl.SSLContext, server_context: ssl.SSLContext
) -> AsyncIterator[tuple[TLSSocketStream, TLSSocketStream]]:
    """Two handshaken TLSSocketStreams over one loopback connection, closed afterwards."""
    raw_client, raw_server = await tcp_stream_pair()
    client = wrap_socket_stream(
        raw_client, client_context, server_side=False, server_hostname="localhost"
    )
    server = wrap_socket_stream(raw_server, server_context, server_side=True)
    try:
        with trio.fail_after(BOUND):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.do_handshake)
                nursery.start_soon(server.do_handshake)
        yield client, server
    finally:
        await trio.aclose_forcefully(client)
        await trio.aclose_forcefully(server)


# ------------------------------------------------------------------ data


async def test_bulk_both_directions_at_once_arrives_whole_and_in_order(
    client_context: ssl.SSLContext, server_context: ssl.SSLContext
) -> None:
    """8 MiB each way, written in odd sizes while the other direction runs: every byte
    arrives, in order (each side hashes what it got)."""
    size = 8 * 1024 * 1024
    payloads = [os.urandom(size), os.urandom(size)]
    async with tls_pair(client_context, server_context) as (client, server):
        received: dict[int, str] = {}

        async def send(stream: TLSSocketStream, data: bytes) -> None:
            view = memoryview(data)
            step = 1
            while view:
                step = step * 7 % 300_007 + 1  # 1 byte up to ~300 KiB, never a record size
                await stream.send_all(view[:step])
                view = view[step:]

        async def receive(stream: TLSSocketStream, slot: int) -> None:
            digest = hashlib.sha256()
            got = 0
            while got < size:
                chunk = await stream.receive_some()
                assert chunk
                assert len(chunk) <= 256 * 1024
                digest.update(chunk)
                got += len(chunk)
            received[slot] = digest.hexdigest()

        with trio.fail_after(BOUND * 3):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send, client, payloads[0])
                nursery.start_soon(send, server, payloads[1])
                nursery.start_soon(receive, server, 0)
                nursery.start_soon(receive, client, 1)
    assert received == {i: hashlib.sha256(p).hexdigest() for i, p in enumerate(payloads)}


async def test_one_receive_takes_every_record_already_there(
    client_context: ssl.SSLContext, server_context: ssl.SSLContext
) -> None:
    """Five full records sent before the receiver looks come back from one receive_some
    (trio.SSLStream returned one record per call)."""
    async with tls_pair(client_context, server_context) as (client, server):
        data = os.urandom(5 * 16384)
        with trio.fail_after(BOUND):
            await client.send_all(data)
            await wait_until(lambda: _readable_bytes(server) >= len(data) + 5 * 22)
            assert await server.receive_some(1 << 20) == data


def _readable_bytes(stream: TLSSocketStream) -> int:
    import fcntl
    import struct
    import termios

    raw = fcntl.ioctl(stream.fileno(), termios.FIONREAD, b"\0\0\0\0")
    return int(struct.unpack("i", raw)[0])


async def test_receive_some_honours_max_bytes_and_keeps_the_rest(
    client_context: ssl.SSLContext, server_context: ssl.SSLContext
) -> None:
    """A small max_bytes gets part of a record; the rest, buffered inside OpenSSL where the
    socket no longer shows it, comes with the next calls without waiting for more."""
    async with tls_pair(client_context, server_context) as (client, server):
        with trio.fail_after(BOUND):
            await client.send_all(b"0123456789")
            assert await server.receive_some(3) == b"012"
            assert await server.receive_some(3) == b"345"
            assert await server.receive_some() == b"6789"
            with pytest.raises(ValueError, match="max_bytes"):
                await server.receive_some(0)


async def test_cancelled_receive_leaves_the_stream_usable(
    client_context: ssl.SSLContext, server_context: ssl.SSLContext
) -> None:
    async with tls_pair(client_context, server_context) as (client, server):
        with trio.move_on_after(0.05):
            await server.receive_some()
        with trio.fail_after(BOUND):
            await client.send_all(b"after the cancel")
            assert await receive_exactly(server, 16) == b"after the cancel"


async def test_two_receivers_or_two_senders_are_busy(
    client_context: ssl.SSLContext, server_context: ssl.SSLContext
) -> None:
    async with tls_pair(client_context, server_context) as (client, server):
        with trio.fail_after(BOUND):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(server.receive_some)
                await trio.testing.wait_all_tasks_blocked()
                with pytest.raises(trio.BusyResourceError):
                    await server.receive_some()
                nursery.cancel_scope.cancel()
            # a sender blocked on a full socket (the peer reads nothing)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.send_all, b"x" * (64 << 20))
                await wait_until(lambda: client._sending)
                await trio.testing.wait_all_tasks_blocked()
                with pytest.raises(trio.BusyResourceError):
                    await client.send_all(b"y")
                nursery.cancel_scope.cancel()
        # a send_all cancelled mid-record leaves OpenSSL half way: the stream is broken
        with pytest.raises(trio.BrokenResourceError):
            await client.send_all(b"z")


async def test_stream_conforms_to_trio_stream_semantics(
    client_context: ssl.SSLContext, server_context: ssl.SSLContext
) -> None:
    """Empty sends are no-ops, wait_send_all_might_not_block returns on a free socket,
    every call checkpoints, getpeercert and version are those of the TLS session."""
    async with tls_pair(client_context, server_context) as (client, server):
        with trio.fail_after(BOUND):
            await client.send_all(b"")
            await client.wait_send_all_might_not_block()
            with trio.testing.assert_checkpoints():
                await client.send_all(b"a")
            with trio.testing.assert_checkpoints():
                assert await server.receive_some() == b"a"
        assert client.version() in ("TLSv1.2", "TLSv1.3")
        der = client.getpeercert(binary_form=True)
        assert der
        assert server.getpeercert() is None
        assert client.selected_alpn_protocol() is None
        assert "open" in repr(client)


async def test_send_nowait_then_send_all_of_the_rest_delivers_everything_once(
    client_context: ssl.SSLContext, server_context: ssl.SSLContext
) -> None:
    """send_nowait takes what the socket takes now; when OpenSSL holds a record it could not
    write, the rest it reports (data[n:]) starts with that record's bytes, and send_all of
    the rest delivers every byte exactly once, in order."""
    async with tls_pair(client_context, server_context) as (client, server):
        # a small send buffer fills at once; the receiver's stays large (a tiny window on
        # loopback's 64 KiB MSS leaves the sender to zero-window probes that back off)
        client.ssl_object.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        data = os.urandom(3 * 1024 * 1024 + 12345)
        taken = client.send_nowait(data)
        assert 0 <= taken < len(data)  # the socket filled up
        assert client.send_nowait(b"") == 0
        with trio.fail_after(BOUND * 3):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.send_all, memoryview(data)[taken:])
                assert await receive_exactly(server, len(data)) == data
        # the rest may also go through send_nowait again, call after call
        data = os.urandom(2 * 1024 * 1024 + 777)
        with trio.fail_after(BOUND * 3):
            async with trio.open_nursery() as nursery:

                async def push() -> None:
                    rest = memoryview(data)
                    while rest:
                        rest = rest[client.send_nowait(rest) :]
                        await trio.sleep(0.001)

                nursery.start_soon(push)
                assert await receive_exactly(server, len(data)) == data
        # an error inside send_nowait is kept for the next call to raise
        await server.aclose()
        await wait_until(lambda: _sends_fail(client))
        with pytest.raises(trio.BrokenResourceError):
            await client.send_all(b"after the reset")


def _sends_fail(stream: TLSSocketStream) -> bool:
    stream.send_nowait(b"x" * 65536)
    return stream._broken is not None


async def test_session_inline_writes_over_tls_keep_every_stream_in_order(
    client_context: ssl.SSLContext, server_context: ssl.SSLContext
) -> None:
    """Eight streams of a session over TLSSocketStream with small socket buffers: part of
    what they send goes inline (send_nowait, records left half-written included), part
    through the writer task, and every stream arrives whole and in order."""
    async with tls_pair(client_context, server_context) as (client_tls, server_tls):
        client_tls.ssl_object.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        writer_bytes = [0]
        real_send_all = client_tls.send_all

        async def spy(data: bytes | bytearray | memoryview) -> None:
            writer_bytes[0] += len(data)
            await real_send_all(data)

        client_tls.send_all = spy  # type: ignore[method-assign]
        tasks_before = count_tasks()
        payloads = [os.urandom(40_000 + 7919 * i) for i in range(8)]
        with trio.fail_after(BOUND * 3):
            received, written = await eight_streams_at_once(client_tls, server_tls, payloads)
        for i, payload in enumerate(payloads):
            assert received[i] == payload, f"stream {i} arrived damaged"
        assert writer_bytes[0], "nothing went through the writer task: the socket never filled"
        assert written > writer_bytes[0], "nothing was written inline"
        assert count_tasks() <= tasks_before, describe_tasks()


# ------------------------------------------------------------------ closing


async def test_aclose_sends_close_notify_the_peer_sees_a_clean_eof(
    client_context: ssl.SSLContext, server_context: ssl.SSLContext
) -> None:
    async with tls_pair(client_context, server_context) as (client, server):
        with trio.fail_after(BOUND):
            await client.send_all(b"last words")
            await client.aclose()
            assert await receive_exactly(server, 10) == b"last words"
            assert await server.receive_some() == b""
            assert await server.receive_some() == b""  # and again: EOF stays EOF
            await client.aclose()  # idempotent
            with pytest.raises(trio.ClosedResourceError):
                await client.send_all(b"more")
            with pytest.raises(trio.ClosedResourceError):
                await client.receive_some()
            assert "closed" in repr(client)


async def test_forceful_close_sends_no_close_notify(
    client_context: ssl.SSLContext, server_context: ssl.SSLContext
) -> None:
    """aclose_forcefully (a cancelled aclose) only closes the socket, as trio.SSLStream's:
    the peer sees a truncation, not a clean end."""
    async with tls_pair(client_context, server_context) as (client, server):
        with trio.fail_after(BOUND):
            await trio.aclose_forcefully(client)
            with pytest.raises(trio.BrokenResourceError) as info:
                await server.receive_some()
            assert isinstance(info.value.__cause__, ssl.SSLError)


@pytest.mark.parametrize("how", ["receive_some", "wait"])
async def test_closing_wakes_a_blocked_reader_with_closed_resource_error(
    client_context: ssl.SSLContext, server_context: ssl.SSLContext, how: str
) -> None:
    """A reader parked in ``receive_some`` or in the session's direct ``wait``."""
    async with tls_pair(client_context, server_context) as (_client, server):
        with trio.fail_after(BOUND):
            async with trio.open_nursery() as nursery:

                async def read() -> None:
                    with pytest.raises(trio.ClosedResourceError):
                        await getattr(server, how)()

                nursery.start_soon(read)
                await trio.testing.wait_all_tasks_blocked()
                await server.aclose()


async def _drive_handshake(
    peer: ssl.SSLObject,
    incoming: ssl.MemoryBIO,
    outgoing: ssl.MemoryBIO,
    raw: trio.SocketStream,
) -> None:
    while True:
        try:
            peer.do_handshake()
        except ssl.SSLWantReadError:
            if outgoing.pending:
                await raw.send_all(outgoing.read())
            incoming.write(await raw.receive_some())
            continue
        if outgoing.pending:
            await raw.send_all(outgoing.read())
        return


@asynccontextmanager
async def _server_with_a_hand_driven_peer(
    server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> AsyncIterator[tuple[TLSSocketStream, ssl.SSLObject, ssl.MemoryBIO, trio.SocketStream]]:
    """A server stream past its handshake with an ``ssl.SSLObject`` client: the test writes
    records with ``peer.write`` and puts ``outgoing.read()`` on ``raw_client`` as it likes,
    whole, cut short, or followed by a FIN without close_notify."""
    raw_client, raw_server = await tcp_stream_pair()
    server = wrap_socket_stream(raw_server, server_context, server_side=True)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    peer = client_context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    try:
        with trio.fail_after(BOUND):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(server.do_handshake)
                await _drive_handshake(peer, incoming, outgoing, raw_client)
        yield server, peer, outgoing, raw_client
    finally:
        await trio.aclose_forcefully(server)
        await trio.aclose_forcefully(raw_client)


@pytest.mark.parametrize("direct", [False, True], ids=["receive_some", "direct"])
async def test_peer_closing_tcp_mid_record_is_a_broken_stream_not_eof(
    server_context: ssl.SSLContext, client_context: ssl.SSLContext, direct: bool
) -> None:
    """The far end (an ssl.SSLObject we drive by hand) sends one whole record, half of the
    next, then closes TCP: the whole record is delivered, then BrokenResourceError (the
    SSLError its cause), and it stays broken, through ``receive_some`` or the session's
    direct reads alike; a truncation must never read as a clean end of the data."""
    async with _server_with_a_hand_driven_peer(server_context, client_context) as (
        server,
        peer,
        outgoing,
        raw_client,
    ):
        with trio.fail_after(BOUND):
            peer.write(b"A" * 1000)
            whole = outgoing.read()
            peer.write(b"B" * 1000)
            second = outgoing.read()
            await raw_client.send_all(whole + second[: len(second) // 2])
            await raw_client.aclose()
            receive = PacedReads(server).receive_some if direct else server.receive_some
            assert await receive(65536) == b"A" * 1000
            with pytest.raises(trio.BrokenResourceError) as info:
                await receive(65536)
            assert isinstance(info.value.__cause__, ssl.SSLError)
            with pytest.raises(trio.BrokenResourceError):  # and it stays broken
                await server.receive_some()
            with pytest.raises(trio.BrokenResourceError):
                server.receive_nowait(65536)
            with pytest.raises(trio.BrokenResourceError):
                await server.wait()


async def test_peer_closing_tcp_between_records_is_a_broken_stream_not_eof(
    server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    """Whole records, then a TCP FIN without close_notify: data first, then the error
    (https_compatible=False semantics, as the session has always had)."""
    async with _server_with_a_hand_driven_peer(server_context, client_context) as (
        server,
        peer,
        outgoing,
        raw_client,
    ):
        with trio.fail_after(BOUND):
            peer.write(b"C" * 40000)
            await raw_client.send_all(outgoing.read())
            await raw_client.aclose()
            assert await receive_exactly(server, 40000) == b"C" * 40000
            with pytest.raises(trio.BrokenResourceError):
                await server.receive_some()


# ------------------------------------------------------------------ the session's direct reads


async def test_direct_reads_take_every_record_there_and_none_when_empty(
    client_context: ssl.SSLContext, server_context: ssl.SSLContext
) -> None:
    """receive_nowait never waits: None when no whole record is there, every record already
    there in one call (up to max_bytes), the rest of a record cut by max_bytes next."""
    async with tls_pair(client_context, server_context) as (client, server):
        with trio.fail_after(BOUND):
            assert server.receive_nowait(65536) is None
            data = os.urandom(5 * 16384)
            await client.send_all(data)
            await wait_until(lambda: _readable_bytes(server) >= len(data) + 5 * 22)
            assert server.receive_nowait(1 << 20) == data
            assert server.receive_nowait(65536) is None
            await client.send_all(b"0123456789")
            await server.wait()
            await wait_until(lambda: _readable_bytes(server) >= 10 + 22)
            assert server.receive_nowait(4) == b"0123"
            assert server.receive_nowait(65536) == b"456789"  # buffered in OpenSSL
            assert server.receive_nowait(65536) is None


async def test_direct_wait_returns_when_a_record_arrives(
    client_context: ssl.SSLContext, server_context: ssl.SSLContext
) -> None:
    async with tls_pair(client_context, server_context) as (client, server):
        with trio.fail_after(BOUND):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(server.wait)
                await trio.testing.wait_all_tasks_blocked()
                await client.send_all(b"wake up")
            assert await PacedReads(server).receive_some(65536) == b"wake up"


async def test_direct_reads_after_close_notify_are_a_clean_eof(
    client_context: ssl.SSLContext, server_context: ssl.SSLContext
) -> None:
    async with tls_pair(client_context, server_context) as (client, server):
        with trio.fail_after(BOUND):
            await client.send_all(b"last words")
            await client.aclose()
            reads = PacedReads(server)
            got = b""
            while chunk := await reads.receive_some(65536):
                got += chunk
            assert got == b"last words"
            assert server.receive_nowait(65536) == b""  # EOF stays EOF
            await server.aclose()
            with pytest.raises(trio.ClosedResourceError):
                server.receive_nowait(65536)
            with pytest.raises(trio.ClosedResourceError):
                await server.wait()


async def test_direct_read_of_garbage_after_the_handshake_is_broken(
    server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> None:
    async with _server_with_a_hand_driven_peer(server_context, client_context) as (
        server,
        _peer,
        _outgoing,
        raw_client,
    ):
        with trio.fail_after(BOUND):
            await raw_client.send_all(b"\x17\x03\x03\x00\x40" + b"not a record" * 40)
            with pytest.raises(trio.BrokenResourceError) as info:
                await PacedReads(server).receive_some(65536)
            assert isinstance(info.value.__cause__, ssl.SSLError)


async def test_direct_reads_while_receive_some_runs_are_busy(
    client_context: ssl.SSLContext, server_context: ssl.SSLContext
) -> None:
    async with tls_pair(client_context, server_context) as (client, server):
        with trio.fail_after(BOUND):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(server.receive_some)
                await trio.testing.wait_all_tasks_blocked()
                with pytest.raises(trio.BusyResourceError):
                    server.receive_nowait(65536)
                await client.send_all(b"x")


async def test_a_session_over_tls_reads_without_receive_some_and_leaks_nothing(
    client_context: ssl.SSLContext,
    server_context: ssl.SSLContext,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Both session readers read the TLS stream directly (receive_nowait / wait, never
    receive_some); every byte arrives in order both ways; after the sessions close and the
    streams with them, no task or descriptor is left."""
    calls: list[object] = []
    real = TLSSocketStream.receive_some

    async def spy(self: TLSSocketStream, max_bytes: int | None = None) -> bytes:
        calls.append(self)
        return await real(self, max_bytes)

    monkeypatch.setattr(TLSSocketStream, "receive_some", spy)
    fds, tasks = count_fds(), count_tasks()
    async with tls_pair(client_context, server_context) as (client_tls, server_tls):
        up, down = os.urandom(3 << 20), os.urandom(1 << 20)
        with trio.fail_after(BOUND * 3):
            async with (
                open_session(client_tls, Role.CLIENT) as client,
                open_session(server_tls, Role.SERVER) as server,
            ):
                mine, theirs = await open_pair(client, server, host="t", port=1)
                got: dict[str, bytes] = {}

                async def pump(
                    name: str, a: trio.abc.HalfCloseableStream, b: trio.abc.Stream, data: bytes
                ) -> None:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(_send_then_eof, a, data)
                        out = bytearray()
                        while chunk := await b.receive_some():
                            out += chunk
                        got[name] = bytes(out)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(pump, "up", mine, theirs, up)
                    nursery.start_soon(pump, "down", theirs, mine, down)
                await mine.aclose()
                await theirs.aclose()
        assert got["up"] == up
        assert got["down"] == down
        assert calls == []
    assert count_fds() <= fds
    assert count_tasks() <= tasks, describe_tasks()


async def _send_then_eof(stream: trio.abc.HalfCloseableStream, data: bytes) -> None:
    for start in range(0, len(data), 100_000):
        await stream.send_all(data[start : start + 100_000])
    await stream.send_eof()


# ------------------------------------------------------------------ failed handshakes


async def test_plaintext_instead_of_tls_is_named(server_context: ssl.SSLContext) -> None:
    raw_client, raw_server = await tcp_stream_pair()
    await raw_client.send_all(b"\x00\x01 plaintext, not a TLS record " * 3000)
    with trio.fail_after(BOUND), pytest.raises(pytunnel.TLSError) as info:
        await tls_accept(raw_server, server_context, timeout=BOUND, peer="peer")
    assert "not speaking TLS" in str(info.value)
    # the close is a FIN, not a reset: what the server sent last (an alert, if OpenSSL
    # sends one) is readable, so the client can say "this is a TLS server"
    answer = await raw_client.receive_some()
    assert answer == b"" or answer[:1] == b"\x15"  # nothing, or an alert record
    await raw_client.aclose()


async def test_garbage_from_a_server_fails_the_client_handshake(
    client_context: ssl.SSLContext,
) -> None:
    raw_client, raw_server = await tcp_stream_pair()
    async with raw_server:
        with trio.fail_after(BOUND):
            async with trio.open_nursery() as nursery:

                async def answer_garbage() -> None:
                    await raw_server.receive_some()
                    await raw_server.send_all(b"SSH-2.0-OpenSSH_9.2\r\n" * 10)

                nursery.start_soon(answer_garbage)
                with pytest.raises(pytunnel.TLSError) as info:
                    await tls_connect(
                        raw_client, client_context, server_hostname="localhost", timeout=BOUND
                    )
    assert "not speaking TLS" in str(info.value) or "handshake failed" in str(info.value)
    assert raw_client.socket.fileno() == -1  # handed to the TLS stream, which closed it


async def test_peer_closing_mid_handshake_is_a_tls_error(
    client_context: ssl.SSLContext, server_context: ssl.SSLContext
) -> None:
    """Client side: the server reads the ClientHello and hangs up. Server side: the client
    sends half a ClientHello and hangs up."""
    raw_client, raw_server = await tcp_stream_pair()
    with trio.fail_after(BOUND):
        async with trio.open_nursery() as nursery:

            async def hang_up() -> None:
                await raw_server.receive_some()
                await raw_server.aclose()

            nursery.start_soon(hang_up)
            with pytest.raises(pytunnel.TLSError) as info:
                await tls_connect(
                    raw_client, client_context, server_hostname="localhost", timeout=BOUND
                )
    assert str(info.value).startswith(("[TLS_FAILED] TLS handshake failed", "[TLS_FAILED]"))

    raw_client, raw_server = await tcp_stream_pair()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    peer = client_context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        peer.do_handshake()
    hello = outgoing.read()
    await raw_client.send_all(hello[: len(hello) // 2])
    await raw_client.aclose()
    with trio.fail_after(BOUND), pytest.raises(pytunnel.TLSError) as info:
        await tls_accept(raw_server, server_context, timeout=BOUND, peer="half-hello")
    assert "half-hello failed" in str(info.value)


async def test_silent_peer_times_the_handshake_out(
    client_context: ssl.SSLContext, server_context: ssl.SSLContext
) -> None:
    raw_client, raw_server = await tcp_stream_pair()
    async with raw_server:
        with trio.fail_after(BOUND), pytest.raises(pytunnel.TLSError) as info:
            await tls_connect(raw_client, client_context, server_hostname="localhost", timeout=0.2)
    assert "did not finish within 0.2 s" in str(info.value)
    raw_client, raw_server = await tcp_stream_pair()
    async with raw_client:
        with trio.fail_after(BOUND), pytest.raises(pytunnel.TLSError) as info:
            await tls_accept(raw_server, server_context, timeout=0.2, peer="silent")
    assert "silent timed out" in str(info.value)


async def test_cancelled_accept_closes_the_socket(server_context: ssl.SSLContext) -> None:
    """The TLS stream owns the descriptor once made: a cancelled accept must close it, since
    the caller's own stream no longer does."""
    before = count_fds()
    raw_client, raw_server = await tcp_stream_pair()
    with trio.move_on_after(0.2):
        await tls_accept(raw_server, server_context, timeout=BOUND, peer="silent")
    await raw_client.aclose()
    await raw_server.aclose()
    assert count_fds() <= before


async def test_wrong_pin_is_refused(
    client_context: ssl.SSLContext, server_context: ssl.SSLContext
) -> None:
    raw_client, raw_server = await tcp_stream_pair()
    with trio.fail_after(BOUND):
        async with trio.open_nursery() as nursery:

            async def accept() -> None:
                tls = await tls_accept(raw_server, server_context, timeout=BOUND, peer="p")
                async with tls:
                    with pytest.raises(trio.BrokenResourceError):
                        await tls.receive_some()  # the client hangs up after checking

            nursery.start_soon(accept)
            with pytest.raises(pytunnel.TLSError) as info:
                await tls_connect(
                    raw_client,
                    client_context,
                    server_hostname="localhost",
                    fingerprint="SHA256:" + "A" * 43,
                    timeout=BOUND,
                )
    assert "fingerprint mismatch" in str(info.value)


async def _connect_and_accept(
    client_side: trio.abc.Stream,
    server_side: trio.abc.Stream,
    client_context: ssl.SSLContext,
    server_context: ssl.SSLContext,
    fingerprint: str | None = None,
) -> tuple[trio.abc.Stream, trio.abc.Stream]:
    """Both ends of one TLS connection through the public entry points, each handshake in a
    task of its own (neither side can finish alone)."""
    box: list[trio.abc.Stream] = []

    async def accept() -> None:
        box.append(await tls_accept(server_side, server_context, timeout=BOUND, peer="p"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(accept)
        client = await tls_connect(
            client_side,
            client_context,
            server_hostname="localhost",
            fingerprint=fingerprint,
            timeout=BOUND,
        )
    return client, box[0]


async def test_right_pin_is_accepted_and_sni_is_sent(
    ca: trustme.CA, client_context: ssl.SSLContext
) -> None:
    names: list[str | None] = []
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert = ca.issue_cert("localhost")
    cert.configure_cert(context)
    context.sni_callback = lambda _sock, name, _ctx: names.append(name)  # type: ignore[assignment,misc,return-value]
    der = ssl.PEM_cert_to_DER_cert(cert.cert_chain_pems[0].bytes().decode())
    raw_client, raw_server = await tcp_stream_pair()
    with trio.fail_after(BOUND):
        client, server = await _connect_and_accept(
            raw_client,
            raw_server,
            client_context,
            context,
            fingerprint=pytunnel.tls.certificate_fingerprint(der),
        )
        assert isinstance(client, TLSSocketStream)
        assert isinstance(server, TLSSocketStream)
        await client.send_all(b"pinned")
        assert await receive_exactly(server, 6) == b"pinned"
        await client.aclose()
        await server.aclose()
    assert names == ["localhost"]


async def test_other_streams_keep_trio_ssl_stream(
    client_context: ssl.SSLContext, server_context: ssl.SSLContext
) -> None:
    """Only an exact trio.SocketStream gets the socket path; anything else (here a memory
    stream pair) keeps trio.SSLStream, which works over any stream."""
    left, right = trio.testing.memory_stream_pair()
    with trio.fail_after(BOUND):
        client, server = await _connect_and_accept(left, right, client_context, server_context)
    assert isinstance(client, trio.SSLStream)
    assert isinstance(server, trio.SSLStream)


async def test_nothing_leaks_after_many_connections_and_failures(
    client_context: ssl.SSLContext, server_context: ssl.SSLContext
) -> None:
    fds, tasks = count_fds(), count_tasks()
    for _ in range(20):
        async with tls_pair(client_context, server_context) as (client, server):
            await client.send_all(b"x")
            assert await server.receive_some() == b"x"
        raw_client, raw_server = await tcp_stream_pair()
        await raw_client.send_all(b"not tls at all" * 10)
        with pytest.raises(pytunnel.TLSError):
            await tls_accept(raw_server, server_context, timeout=BOUND, peer="p")
        await raw_client.aclose()
    assert count_fds() <= fds
    assert count_tasks() <= tasks, describe_tasks()


# ------------------------------------------------------------------ interop with OpenSSL

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


def _pem_files(ca: trustme.CA, tmp_path: Path) -> tuple[Path, Path]:
    both, ca_file = tmp_path / "server.pem", tmp_path / "ca.pem"
    ca.issue_cert("localhost", "127.0.0.1").private_key_and_cert_chain_pem.write_to_path(both)
    ca.cert_pem.write_to_path(ca_file)
    return both, ca_file


async def _read_line(process: trio.Process, what: Callable[[bytes], bool]) -> bytes:
    assert process.stdout is not None
    seen = b""
    while not what(seen):
        chunk = await process.stdout.receive_some()
        assert chunk, f"openssl ended; it said {seen!r}"
        seen += chunk
    return seen


@needs_openssl
async def test_interop_with_openssl_s_server(
    ca: trustme.CA, client_context: ssl.SSLContext, tmp_path: Path
) -> None:
    """Our client against OpenSSL's server: handshake, data both ways (s_server prints
    what it gets and sends its stdin), then our close_notify."""
    both, _ = _pem_files(ca, tmp_path)
    command = ["openssl", "s_server", "-accept", "127.0.0.1:0", "-cert", str(both), "-naccept", "1"]
    process = await trio.lowlevel.open_process(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        with trio.fail_after(BOUND):
            seen = await _read_line(process, lambda s: b"ACCEPT" in s and s.endswith(b"\n"))
            port = int(seen.split(b"ACCEPT ", 1)[1].split(b":")[1].split()[0])
            raw = await trio.open_tcp_stream("127.0.0.1", port)
            client = await tls_connect(
                raw, client_context, server_hostname="localhost", timeout=BOUND
            )
            assert isinstance(client, TLSSocketStream)
            await client.send_all(b"hello from pytunnel\n")
            await _read_line(process, lambda s: b"hello from pytunnel\n" in s)
            assert process.stdin is not None
            await process.stdin.send_all(b"hello from openssl\n")
            assert await receive_exactly(client, 19) == b"hello from openssl\n"
            await client.aclose()
            await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()


@needs_openssl
@pytest.mark.parametrize("direct", [False, True], ids=["receive_some", "direct_reads"])
async def test_interop_with_openssl_s_client(
    ca: trustme.CA,
    server_context: ssl.SSLContext,
    tmp_path: Path,
    nursery: trio.Nursery,
    direct: bool,
) -> None:
    """OpenSSL's client against our server: what it sends arrives, what we send it prints;
    its stdin closing makes it close (a close_notify: a clean EOF for us), read through
    ``receive_some`` or through the session's direct reads."""
    _, ca_file = _pem_files(ca, tmp_path)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    got: list[bytes] = []
    done = trio.Event()

    async def serve() -> None:
        raw = await listeners[0].accept()
        await listeners[0].aclose()
        tls = await tls_accept(raw, server_context, timeout=BOUND, peer="s_client")
        assert isinstance(tls, TLSSocketStream)
        async with tls:
            await tls.send_all(b"hello from pytunnel\n")
            receive = PacedReads(tls).receive_some if direct else tls.receive_some
            data = b""
            while chunk := await receive(65536):
                data += chunk
            got.append(data)
        done.set()

    nursery.start_soon(serve)
    command = [
        "openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost",
        "-CAfile", str(ca_file), "-verify_return_error", "-quiet", "-no_ign_eof",
    ]  # fmt: skip
    process = await trio.lowlevel.open_process(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    try:
        with trio.fail_after(BOUND):
            await _read_line(process, lambda s: b"hello from pytunnel\n" in s)
            assert process.stdin is not None
            await process.stdin.send_all(b"hello from openssl\n")
            await process.stdin.aclose()
            await done.wait()
            await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()
    assert got == [b"hello from openssl\n"]
