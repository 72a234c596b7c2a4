"""Regression tests for defects found in code review, each with real sockets or memory
streams: crashes of the server from one client's behaviour, sockets outliving their owner,
unbounded write buffers, hangs, lost data, limits overshot, wrapped exceptions."""

from __future__ import annotations

import contextlib
import functools

import pytest
import trio
import trio.testing
from helpers import TOKEN, session_pair, tcp_stream_pair

import pytunnel
from pytunnel import ErrorCode
from pytunnel._handshake import client_handshake, open_server_session, server_handshake
from pytunnel.client import ForwardStatus
from pytunnel.protocol.frames import FrameDecoder, encode_message
from pytunnel.protocol.messages import Bound, Open, Reset
from pytunnel.session import Role, open_session

pytestmark = pytest.mark.timeout(60)


class _Crash:
    """Runs ``serve`` in its own nursery and records whatever it raised (instead of letting it
    tear down the test), so a test can assert that the server is still alive."""

    def __init__(self) -> None:
        self.error: BaseException | None = None

    async def serve(
        self, *, task_status: trio.TaskStatus[pytunnel.TunnelServer], **kw: object
    ) -> None:
        try:
            await pytunnel.serve(0, token=TOKEN, task_status=task_status, **kw)
        except trio.Cancelled:
            raise
        except BaseException as exc:
            self.error = exc


# ------------------------------------------------------------------------------------- server


async def test_undialable_host_name_does_not_crash_the_server(nursery: trio.Nursery) -> None:
    crash = _Crash()
    server: pytunnel.TunnelServer = await nursery.start(crash.serve)
    bystander = await pytunnel.connect_tunnel(
        nursery, server.address, token=TOKEN, reconnect=False, probe_interval=0
    )
    tunnel = await pytunnel.connect_tunnel(
        nursery, server.address, token=TOKEN, reconnect=False, probe_interval=0
    )
    # 'a' * 64 is a DNS label that is too long: a plain typo-level mistake, or a hostile client
    try:
        await tunnel.open_stream("a" * 64 + ".example", 80)
    except pytunnel.TunnelError as exc:
        refusal: BaseException = exc
    await trio.sleep(0.2)
    assert crash.error is None, repr(crash.error)
    assert isinstance(refusal, pytunnel.StreamRefusedError), repr(refusal)
    assert bystander.connected


async def test_queued_opens_then_eof_do_not_crash_the_server(nursery: trio.Nursery) -> None:
    crash = _Crash()
    server: pytunnel.TunnelServer = await nursery.start(crash.serve)
    for _ in range(5):
        stream = await trio.open_tcp_stream(*server.address)
        await client_handshake(stream, TOKEN, max_frame_size=2**20)
        # 50 opens on an unknown route (refused in _ClientSession.run), then the link drops
        frames = b"".join(encode_message(Open(2 * i + 1, 65536, "x", 1, 77)) for i in range(50))
        await stream.send_all(frames)
        await stream.aclose()
        await trio.sleep(0.1)
        if crash.error is not None:
            break
    assert crash.error is None, repr(crash.error)


async def test_server_stream_limit_holds_for_a_burst(nursery: trio.Nursery, echo_port: int) -> None:
    server: pytunnel.TunnelServer = await nursery.start(
        functools.partial(pytunnel.serve, 0, token=TOKEN, max_streams=2)
    )
    tunnel = await pytunnel.connect_tunnel(
        nursery, server.address, token=TOKEN, reconnect=False, probe_interval=0
    )
    opened: list[trio.abc.Stream] = []

    async def one() -> None:
        with contextlib.suppress(pytunnel.StreamLimitError):
            opened.append(await tunnel.open_stream("127.0.0.1", echo_port))

    async with trio.open_nursery() as burst:
        for _ in range(20):
            burst.start_soon(one)
    await trio.sleep(0.1)
    peak = server.active_streams
    for s in opened:
        await s.aclose()
    assert len(opened) <= 2, (len(opened), peak)
    assert peak <= 2, (len(opened), peak)


# ------------------------------------------------------------------------------------- client


async def test_client_survives_queued_opens_then_eof() -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    outcome: list[BaseException | None] = []

    async def fake_server() -> None:
        stream = await listeners[0].accept()
        await server_handshake(stream, TOKEN, max_frame_size=2**20)
        frames = b"".join(encode_message(Open(2 * i + 2, 65536, "x", 1, 999)) for i in range(50))
        await stream.send_all(frames)
        await stream.aclose()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fake_server)
            tunnel = await pytunnel.connect_tunnel(
                nursery, ("127.0.0.1", port), token=TOKEN, reconnect=False, probe_interval=0
            )
            with trio.fail_after(5):
                await tunnel.wait_closed()
        outcome.append(None)
    except BaseException as exc:
        outcome.append(exc)
    finally:
        await listeners[0].aclose()
    assert outcome == [None], repr(outcome)
    assert isinstance(tunnel.failure, pytunnel.SessionClosedError)


async def test_reattach_failure_before_bound_does_not_kill_the_tunnel() -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    second_done = trio.Event()

    async def fake_server() -> None:
        # connection 1: register the forward properly, then drop the link
        stream = await listeners[0].accept()
        async with open_server_session(stream, TOKEN) as session:
            incoming = await session.accept_stream()
            control = incoming.accept()
            await control.send_all(encode_message(Bound("127.0.0.1", 45678)))
            await trio.sleep(0.2)
        # connection 2 (the reconnect): accept the re-registration, then reset it before Bound
        stream = await listeners[0].accept()
        async with open_server_session(stream, TOKEN) as session:
            incoming = await session.accept_stream()
            incoming.accept().reset(ErrorCode.FORWARD_FAILED, "cannot restore")
            second_done.set()
            await trio.sleep(1)

    error: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fake_server)
            tunnel = await pytunnel.connect_tunnel(
                nursery,
                ("127.0.0.1", port),
                token=TOKEN,
                probe_interval=0,
                backoff_initial=0.01,
                backoff_max=0.01,
            )
            forward = await tunnel.forward_remote("127.0.0.1", 9, remote_port=45678)
            with trio.fail_after(5):
                await second_done.wait()
                await forward.wait_status(ForwardStatus.ERROR)
            assert not tunnel.closed
            await tunnel.aclose()
    except BaseException as exc:
        error = exc
    finally:
        await listeners[0].aclose()
    assert error is None, repr(error)


async def test_events_after_the_tunnel_ended_terminate(
    nursery: trio.Nursery, tunnel_server: pytunnel.TunnelServer
) -> None:
    tunnel = await pytunnel.connect_tunnel(nursery, tunnel_server.address, token=TOKEN)
    await tunnel.aclose()
    with trio.fail_after(1):
        async for _ in tunnel.events():
            pass


# ------------------------------------------------------------------------------------ session


@pytest.mark.parametrize("transport", ["memory", "tcp"])
async def test_data_and_fin_received_before_session_end_are_readable(transport: str) -> None:
    async with session_pair(transport) as (client, server):
        async with trio.open_nursery() as nursery:
            box: list[trio.abc.HalfCloseableStream] = []

            async def accept() -> None:
                box.append((await server.accept_stream()).accept())

            nursery.start_soon(accept)
            mine = await client.open_stream("t", 1)
        theirs = box[0]
        await theirs.send_all(b"the whole response")
        await theirs.send_eof()
        await server.aclose()  # GoAway, then the transport closes
        with trio.fail_after(5):
            await client.wait_closed()
        received = b""
        while chunk := await mine.receive_some():
            received += chunk
        assert received == b"the whole response"


async def test_reset_of_an_opening_stream_wakes_the_opener() -> None:
    a, b = trio.testing.memory_stream_pair()
    async with open_session(a, Role.CLIENT) as client:
        async with trio.open_nursery() as nursery:
            result: list[BaseException] = []

            async def opener() -> None:
                try:
                    await client.open_stream("t", 1)
                except BaseException as exc:
                    result.append(exc)
                    if isinstance(exc, trio.Cancelled):
                        raise

            nursery.start_soon(opener)
            # a peer (another implementation) answers the Open with Reset, as yamux allows
            decoder = FrameDecoder(2**20)
            while True:
                decoder.receive_data(await b.receive_some())
                message = decoder.next_message()
                if message is not None:
                    break
            assert isinstance(message, Open)
            await b.send_all(encode_message(Reset(message.stream, ErrorCode.CANCELLED, "no")))
            with trio.move_on_after(2):
                while not result:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        assert result
        assert isinstance(result[0], pytunnel.TunnelError), result


async def test_sender_parked_on_write_buffer_sees_closed_when_we_close() -> None:
    a, b = await tcp_stream_pair()  # b is never read: the writer blocks, the buffer fills
    config = pytunnel.SessionConfig(write_buffer_high=0, close_timeout=0.1)
    async with (
        open_session(a, Role.CLIENT, config) as client,
        open_session(b, Role.SERVER, config) as server,
    ):
        async with trio.open_nursery() as nursery:
            box: list[trio.abc.HalfCloseableStream] = []

            async def accept() -> None:
                box.append((await server.accept_stream()).accept())

            nursery.start_soon(accept)
            mine = await client.open_stream("t", 1)
        # stop the server session from reading so the client's writer blocks
        server._cancel_scope.cancel()
        errors: list[BaseException] = []

        async def sender() -> None:
            try:
                while True:
                    await mine.send_all(b"x" * 65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender)
            await trio.sleep(0.5)
            await client.aclose()
        assert errors
        assert isinstance(errors[0], trio.ClosedResourceError), errors


class _InFlight(trio.abc.HalfCloseableStream):
    """Delegates to a socket stream and records how many bytes one send_all holds."""

    def __init__(self, inner: trio.SocketStream) -> None:
        self.inner = inner
        self.in_flight = 0

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.in_flight = len(data)
        try:
            await self.inner.send_all(data)
        finally:
            self.in_flight = 0

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return await self.inner.receive_some(max_bytes)

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_write_buffer_is_bounded_by_the_high_water_mark() -> None:
    raw, b = await tcp_stream_pair()
    a = _InFlight(raw)
    config = pytunnel.SessionConfig(write_buffer_high=256 * 1024)
    async with (
        open_session(a, Role.CLIENT, config) as client,
        open_session(b, Role.SERVER, config) as server,
    ):
        streams: list[trio.abc.HalfCloseableStream] = []
        for _ in range(64):
            async with trio.open_nursery() as nursery:

                async def accept() -> None:
                    (await server.accept_stream()).accept()

                nursery.start_soon(accept)
                streams.append(await client.open_stream("t", 1))
        server._cancel_scope.cancel()  # the peer stops reading: the link is congested
        async with trio.open_nursery() as nursery:
            for s in streams:
                nursery.start_soon(s.send_all, b"x" * 256 * 1024)
            await trio.sleep(0.5)
            queued = client._mux.bytes_to_send + a.in_flight
            nursery.cancel_scope.cancel()
        # allow the mark plus one frame's worth of slack; today it is ~60 x the mark
        assert queued <= 2 * config.write_buffer_high, f"{queued / 2**20:.1f} MiB queued"


async def test_connect_does_not_wrap_cancelled(tunnel_server: pytunnel.TunnelServer) -> None:
    seen: list[BaseException] = []
    with trio.CancelScope() as scope:
        try:
            async with pytunnel.open_tunnel(tunnel_server.address, token=TOKEN) as _:
                scope.cancel()
                await trio.sleep(1)
        except BaseException as exc:
            seen.append(exc)
            raise
    assert len(seen) == 1
    assert isinstance(seen[0], trio.Cancelled), repr(seen)


async def _partial_then_rst(stream: trio.SocketStream) -> None:
    import socket
    import struct

    await stream.send_all(b"partial")
    await trio.sleep(0.1)
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await stream.aclose()


async def test_target_reset_is_not_reported_as_clean_eof(
    nursery: trio.Nursery, tunnel: pytunnel.Tunnel
) -> None:
    listeners = await nursery.start(
        functools.partial(trio.serve_tcp, _partial_then_rst, 0, host="127.0.0.1")
    )
    port = listeners[0].socket.getsockname()[1]
    forward = await tunnel.forward_local("127.0.0.1", port)
    conn = await trio.open_tcp_stream(*forward.address)
    received = b""
    error: BaseException | None = None
    with trio.fail_after(5):
        try:
            while chunk := await conn.receive_some():
                received += chunk
        except trio.BrokenResourceError as exc:
            error = exc
    assert received == b"partial"
    assert isinstance(error, trio.BrokenResourceError), "the far end saw a clean EOF"


async def _sees_eof_or_reset(conn: trio.SocketStream, within: float) -> bool:
    with trio.move_on_after(within):
        try:
            while await conn.receive_some():
                pass
        except trio.BrokenResourceError:
            pass
        return True
    return False


async def test_local_connection_waiting_for_dial_is_closed_with_the_tunnel(
    tunnel_server: pytunnel.TunnelServer, blackhole: object
) -> None:
    async with pytunnel.open_tunnel(tunnel_server.address, token=TOKEN) as tunnel:
        forward = await tunnel.forward_local("127.0.0.1", blackhole.port)  # type: ignore[attr-defined]
        conn = await trio.open_tcp_stream(*forward.address)
        await trio.sleep(0.3)  # the server is now dialling the black hole (5 s)
    try:
        assert await _sees_eof_or_reset(conn, 1.0)
    finally:
        await conn.aclose()


async def test_public_connection_waiting_for_client_dial_is_closed_on_server_shutdown(
    nursery: trio.Nursery, blackhole: object
) -> None:
    crash = _Crash()
    server: pytunnel.TunnelServer = await nursery.start(crash.serve)
    tunnel = await pytunnel.connect_tunnel(
        nursery, server.address, token=TOKEN, reconnect=False, probe_interval=0
    )
    forward = await tunnel.forward_remote("127.0.0.1", blackhole.port)  # type: ignore[attr-defined]
    conn = await trio.open_tcp_stream(*forward.address)
    await trio.sleep(0.3)  # the client is now dialling the black hole (5 s)
    await server.aclose()
    try:
        assert await _sees_eof_or_reset(conn, 1.0)
    finally:
        await conn.aclose()


async def test_cancelled_open_during_server_dial_does_not_crash_the_server(
    nursery: trio.Nursery, blackhole: object
) -> None:
    crash = _Crash()
    server: pytunnel.TunnelServer = await nursery.start(
        functools.partial(crash.serve, connect_timeout=0.5)
    )
    tunnel = await pytunnel.connect_tunnel(
        nursery, server.address, token=TOKEN, reconnect=False, probe_interval=0
    )
    with trio.move_on_after(0.1):  # an impatient caller: a plain timeout around open_stream
        await tunnel.open_stream("127.0.0.1", blackhole.port)  # type: ignore[attr-defined]
    await trio.sleep(1.0)  # the server's dial times out and it answers the (reset) stream
    assert crash.error is None, repr(crash.error)
    assert tunnel.connected
