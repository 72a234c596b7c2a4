"""The shared HTTP/1.1 server (``pytunnel._http``) over real loopback sockets: curl and an h11
client for well-formed traffic, raw bytes for everything a peer can get wrong."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import pathlib
import shutil
import socket
import stat
import subprocess
import sys
from collections.abc import AsyncIterator

import h11
import pytest
import trio
import trio.testing
from helpers import count_tasks, describe_tasks, wait_until

from pytunnel._http import (
    BodyTooLarge,
    HttpLimits,
    Request,
    Response,
    serve_http,
    serve_http_stream,
)

needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")


async def app(request: Request) -> Response:
    """A handler with one route per behaviour under test."""
    if request.path == "/echo":
        body = await request.read_body()
        return Response(
            200,
            [("x-method", request.method), ("x-query", request.query)],
            body,
        )
    if request.path == "/json":
        return Response.json(200, {"ok": True, "target": request.target})
    if request.path == "/boom":
        raise RuntimeError("secret detail")
    if request.path == "/slow":
        await trio.sleep_forever()
    if request.path == "/stream":

        async def chunks() -> AsyncIterator[bytes]:
            for i in range(3):
                yield f"data: {i}\n\n".encode()

        return Response(200, [("content-type", "text/event-stream")], chunks())
    if request.path == "/count":
        total = 0
        async for chunk in request.body_chunks(limit=1000):
            total += len(chunk)
        return Response.text(200, str(total))
    if request.path == "/toolarge-caught":
        try:
            await request.read_body(limit=10)
        except BodyTooLarge:
            return Response.json(413, {"ok": False})
        return Response.text(200, "fit")
    if request.path == "/header":
        return Response.text(200, request.header("X-Thing") or "none")
    if request.path == "/peer":
        return Response.text(200, repr(request.peer))
    return Response.text(404, "no")


async def start(
    nursery: trio.Nursery, limits: HttpLimits | None = None, handler: object = app
) -> int:
    listeners = await nursery.start(
        functools.partial(serve_http, handler, "127.0.0.1", 0, limits=limits)  # type: ignore[arg-type]
    )
    return int(listeners[0].socket.getsockname()[1])


async def raw(port: int, data: bytes, *, shut: bool = False) -> bytes:
    """Send ``data``, read until the server closes; 10 s is a hang detector."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(data)
        if shut:
            await stream.send_eof()
        out = b""
        with trio.fail_after(10):
            try:
                while chunk := await stream.receive_some():
                    out += chunk
            except trio.BrokenResourceError:
                pass
    return out


def parse(data: bytes) -> list[tuple[h11.Response, bytes]]:
    """Responses in ``data``, parsed by an h11 client."""
    client = h11.Connection(h11.CLIENT)
    client.receive_data(data)
    client.receive_data(b"")
    out: list[tuple[h11.Response, bytes]] = []
    head: h11.Response | None = None
    body = b""
    while True:
        if client.our_state is h11.IDLE:
            client.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
            client.send(h11.EndOfMessage())
        try:
            event = client.next_event()
        except h11.RemoteProtocolError:  # closed where a next answer would start
            return out
        if isinstance(event, h11.Response):
            head, body = event, b""
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            assert head is not None
            out.append((head, body))
            if client.our_state is h11.DONE and client.their_state is h11.DONE:
                client.start_next_cycle()
            else:
                return out
        elif event is h11.NEED_DATA or isinstance(event, h11.ConnectionClosed):
            return out


def header(response: h11.Response, name: str) -> str | None:
    for key, value in response.headers:
        if key.decode() == name:
            return bytes(value).decode()
    return None


async def curl(*args: str) -> tuple[int, str]:
    result = await trio.run_process(
        ["curl", "-sS", "--max-time", "20", *args], capture_stdout=True, check=False
    )
    return result.returncode, result.stdout.decode()


def test_json_answer_with_a_lone_surrogate_is_escaped_not_a_failure() -> None:
    """Python strings may hold lone surrogates (JSON's ``"\\ud800"`` reads as one), which
    UTF-8 cannot: such an answer is written with the ``\\u`` escape instead of failing."""
    response = Response.json(200, {"name": "a\ud800", "é": "é"})
    assert response.body == b'{"name":"a\\ud800","\\u00e9":"\\u00e9"}'
    assert Response.json(200, {"é": 1}).body == '{"é":1}'.encode()


@needs_curl
async def test_curl_get_post_head(nursery: trio.Nursery) -> None:
    port = await start(nursery)
    base = f"http://127.0.0.1:{port}"
    code, out = await curl(f"{base}/json?x=1")
    assert code == 0
    assert out == '{"ok":true,"target":"/json?x=1"}'
    code, out = await curl("-d", "hello", f"{base}/echo?a=b")
    assert code == 0
    assert out == "hello"
    code, out = await curl("-I", f"{base}/echo")
    assert code == 0
    assert out.startswith("HTTP/1.1 200")
    assert "content-length: 0" in out.lower()
    code, out = await curl("-H", "X-Thing: yes", f"{base}/header")
    assert out == "yes"


@needs_curl
async def test_curl_chunked_upload_and_streamed_response(nursery: trio.Nursery) -> None:
    port = await start(nursery)
    base = f"http://127.0.0.1:{port}"
    code, out = await curl(
        "-H", "Transfer-Encoding: chunked", "--data-binary", "x" * 5000, f"{base}/echo"
    )
    assert code == 0
    assert out == "x" * 5000
    code, out = await curl("-N", f"{base}/stream")
    assert code == 0
    assert out == "data: 0\n\ndata: 1\n\ndata: 2\n\n"


@needs_curl
async def test_curl_keeps_one_connection_for_several_requests(nursery: trio.Nursery) -> None:
    port = await start(nursery)
    base = f"http://127.0.0.1:{port}"
    result = await trio.run_process(
        ["curl", "-sS", "-v", f"{base}/json", f"{base}/json", f"{base}/stream"],
        capture_stdout=True,
        capture_stderr=True,
    )
    assert b"Re-using existing connection" in result.stderr or (
        b"Reusing existing connection" in result.stderr
    )


async def test_keepalive_pipelined_and_connection_close(nursery: trio.Nursery) -> None:
    port = await start(nursery)
    data = (
        b"GET /json HTTP/1.1\r\nHost: x\r\n\r\n"
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
        b"GET /json HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    responses = parse(await raw(port, data))
    assert [r.status_code for r, _ in responses] == [200, 200, 200]
    assert responses[1][1] == b"abc"
    assert header(responses[2][0], "connection") == "close"


async def test_unread_small_body_is_drained_and_connection_reused(nursery: trio.Nursery) -> None:
    port = await start(nursery)
    data = (
        b"POST /json HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
        b"GET /json HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert [r.status_code for r, _ in parse(await raw(port, data))] == [200, 200]


async def test_head_request_has_no_body(nursery: trio.Nursery) -> None:
    port = await start(nursery)
    out = await raw(port, b"HEAD /json HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head, _, rest = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert rest == b""
    assert b"content-length: 28" in head


@pytest.mark.parametrize(
    "data",
    [
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\n",  # no Host
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nbad header\r\n\r\n",
        b"GET /\x1b[31m HTTP/1.1\r\nHost: x\r\n\r\n",  # a target is printable ASCII only
        b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + b"\x00" * 40 + b"\r\n\r\n",
    ],
)
async def test_malformed_head_is_400(nursery: trio.Nursery, data: bytes) -> None:
    port = await start(nursery)
    responses = parse(await raw(port, data))
    assert [r.status_code for r, _ in responses] == [400]
    assert header(responses[0][0], "connection") == "close"


async def test_both_content_length_and_chunked_is_400_and_closed(nursery: trio.Nursery) -> None:
    """A request with both framings could hide a second request from a proxy in front that
    reads the other one: refused, and nothing after it on the connection is answered."""
    port = await start(nursery)
    smuggled = b"GET /json HTTP/1.1\r\nHost: x\r\n\r\n"
    for framing in (
        b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
        b"Transfer-Encoding: chunked\r\nContent-Length: 0\r\n",
    ):
        data = b"POST /echo HTTP/1.1\r\nHost: x\r\n" + framing + b"\r\n0\r\n\r\n" + smuggled
        responses = parse(await raw(port, data))
        assert [r.status_code for r, _ in responses] == [400]
        assert header(responses[0][0], "connection") == "close"
    # either framing alone is served as before
    responses = parse(
        await raw(
            port,
            b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi"
            + smuggled.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"),
        )
    )
    assert [(r.status_code, body[:2]) for r, body in responses] == [(200, b"hi"), (200, b'{"')]


async def test_head_too_large_is_431(nursery: trio.Nursery) -> None:
    port = await start(nursery, HttpLimits(max_head=1024))
    data = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 5000 + b"\r\n\r\n"
    responses = parse(await raw(port, data))
    assert [r.status_code for r, _ in responses] == [431]


async def test_slow_head_is_408_and_idle_connection_closes_silently(
    nursery: trio.Nursery,
) -> None:
    port = await start(nursery, HttpLimits(head_timeout=0.5, keepalive_timeout=0.5))
    responses = parse(await raw(port, b"GET / HTTP/1.1\r\nHost:"))
    assert [r.status_code for r, _ in responses] == [408]
    # no byte at all: closed without an answer
    assert await raw(port, b"") == b""
    # a kept-alive connection that goes idle: the first answer, then a silent close
    responses = parse(await raw(port, b"GET /json HTTP/1.1\r\nHost: x\r\n\r\n"))
    assert [r.status_code for r, _ in responses] == [200]


async def test_slow_loris_trickle_cannot_extend_the_head_deadline(nursery: trio.Nursery) -> None:
    port = await start(nursery, HttpLimits(head_timeout=1.0))
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    out = b""
    async with stream:
        with trio.fail_after(10):
            try:
                for byte in b"GET / HTTP/1.1\r\nHost: xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx":
                    await stream.send_all(bytes([byte]))
                    await trio.sleep(0.1)
            except trio.BrokenResourceError:
                pass
            try:
                while chunk := await stream.receive_some():
                    out += chunk
            except trio.BrokenResourceError:
                pass
    assert out.startswith(b"HTTP/1.1 408")


async def test_body_over_limit_is_413_declared_or_streamed(nursery: trio.Nursery) -> None:
    port = await start(nursery, HttpLimits(max_body=100))
    declared = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n" + b"a" * 200
    responses = parse(await raw(port, declared))
    assert [r.status_code for r, _ in responses] == [413]
    chunked = (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"40\r\n"
        + b"a" * 64
        + b"\r\n"
        + b"40\r\n"
        + b"a" * 64
        + b"\r\n"
    )
    responses = parse(await raw(port, chunked))
    assert [r.status_code for r, _ in responses] == [413]
    assert header(responses[0][0], "connection") == "close"


async def test_413_reaches_a_client_still_sending_a_huge_body(nursery: trio.Nursery) -> None:
    """The cut comes while the client is still writing: the answer must not be lost to a
    reset, and the server must not read the whole body first."""
    port = await start(nursery, HttpLimits(max_body=1000))
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    out = b""
    async with stream:
        await stream.send_all(
            b"POST /count HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        with trio.fail_after(10):
            try:
                for _ in range(2000):  # 64 MiB offered; the server stops long before
                    await stream.send_all(b"8000\r\n" + b"a" * 0x8000 + b"\r\n")
            except trio.BrokenResourceError:
                pass
            try:
                while chunk := await stream.receive_some():
                    out += chunk
            except trio.BrokenResourceError:
                pass
    assert out.startswith(b"HTTP/1.1 413")


async def test_handler_catching_too_large_answers_and_closes(nursery: trio.Nursery) -> None:
    port = await start(nursery)
    data = (
        b"POST /toolarge-caught HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n"
        + b"a" * 50
        + b"GET /json HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    responses = parse(await raw(port, data))
    assert [r.status_code for r, _ in responses] == [413]
    assert responses[0][1] == b'{"ok":false}'
    assert header(responses[0][0], "connection") == "close"


async def test_slow_body_is_408(nursery: trio.Nursery) -> None:
    port = await start(nursery, HttpLimits(body_timeout=0.5))
    out = await raw(port, b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
    assert [r.status_code for r, _ in parse(out)] == [408]


async def test_malformed_chunked_body_is_400(nursery: trio.Nursery) -> None:
    port = await start(nursery)
    data = b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"
    assert [r.status_code for r, _ in parse(await raw(port, data))] == [400]


async def test_body_cut_by_peer_close_ends_quietly(nursery: trio.Nursery) -> None:
    port = await start(nursery)
    data = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc"
    out = await raw(port, data, shut=True)
    assert [r.status_code for r, _ in parse(out)] in ([400], [])
    again = parse(await raw(port, b"GET /json HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))
    assert [r.status_code for r, _ in again] == [200]


async def test_handler_error_is_500_without_detail_and_logged(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    port = await start(nursery)
    with caplog.at_level(logging.ERROR, logger="pytunnel.http"):
        data = (
            b"GET /boom HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /json HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        responses = parse(await raw(port, data))
    assert [r.status_code for r, _ in responses] == [500, 200]
    assert responses[0][1] == b"Internal Error"
    assert "secret detail" in caplog.text
    assert "Traceback" in caplog.text


async def test_handler_timeout_is_504_and_server_lives_on(nursery: trio.Nursery) -> None:
    port = await start(nursery, HttpLimits(handler_timeout=0.3))
    data = (
        b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /json HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert [r.status_code for r, _ in parse(await raw(port, data))] == [504, 200]


async def test_peer_address_is_given(nursery: trio.Nursery) -> None:
    port = await start(nursery)
    out = parse(await raw(port, b"GET /peer HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))
    assert out[0][1].startswith(b"('127.0.0.1', ")


async def test_any_stream_can_be_served() -> None:
    """A non-socket stream (as a tunnel hands over): served, then closed."""
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            functools.partial(serve_http_stream, server, app, peer=("203.0.113.9", 4000))
        )
        await client.send_all(b"GET /peer HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        out = b""
        with trio.fail_after(10):
            while chunk := await client.receive_some():
                out += chunk
    assert parse(out)[0][1] == b"('203.0.113.9', 4000)"


async def test_response_body_failure_cuts_the_stream(nursery: trio.Nursery) -> None:
    async def handler(request: Request) -> Response:
        async def chunks() -> AsyncIterator[bytes]:
            yield b"part"
            raise RuntimeError("broken producer")

        return Response(200, [], chunks())

    port = await start(nursery, handler=handler)
    out = await raw(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200")
    assert b"part" in out
    assert not out.endswith(b"0\r\n\r\n")  # no clean end of the chunked body


async def test_nothing_leaks_after_many_bad_connections(nursery: trio.Nursery) -> None:
    port = await start(nursery, HttpLimits(head_timeout=0.5, body_timeout=0.5))
    before = count_tasks()
    bad = [
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost:",
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nab",
        b"GET /boom HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    ]
    async with trio.open_nursery() as inner:
        for _ in range(5):
            for data in bad:
                inner.start_soon(raw, port, data)
    await wait_until(lambda: count_tasks() <= before, 30, describe_tasks)


async def test_reset_by_peer_mid_request_is_quiet(nursery: trio.Nursery) -> None:
    port = await start(nursery)
    before = count_tasks()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nab")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()  # RST
    await wait_until(lambda: count_tasks() <= before, 30, describe_tasks)
    out = parse(await raw(port, b"GET /json HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))
    assert [r.status_code for r, _ in out] == [200]


async def test_repeated_headers_are_joined_and_names_case_blind(nursery: trio.Nursery) -> None:
    port = await start(nursery)
    data = (
        b"GET /header HTTP/1.1\r\nHost: x\r\nX-Thing: a\r\nx-thing: b\r\nConnection: close\r\n\r\n"
    )
    assert parse(await raw(port, data))[0][1] == b"a, b"


@pytest.mark.parametrize(
    "bad",
    [
        Response(200, [("x-bad", "line\r\nbreak")]),  # h11 refuses the header value
        Response(200, [("x-name", "\u20ac")]),  # not latin-1
        Response(101, []),  # not a final status
        Response(200, [("content-length", "999")], b"short"),  # framing is ours: fixed
    ],
)
async def test_invalid_answer_from_a_handler_is_500_and_the_server_lives(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture, bad: Response
) -> None:
    async def handler(request: Request) -> Response:
        return bad if request.path == "/bad" else Response.text(200, "fine")

    port = await start(nursery, handler=handler)
    data = (
        b"GET /bad HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /good HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    with caplog.at_level(logging.ERROR, logger="pytunnel.http"):
        responses = parse(await raw(port, data))
    if bad.body == b"short":
        assert [(r.status_code, body) for r, body in responses] == [(200, b"short"), (200, b"fine")]
    else:
        assert [r.status_code for r, _ in responses] == [500, 200]
        assert "invalid answer" in caplog.text


async def test_no_content_answers_carry_no_body(nursery: trio.Nursery) -> None:
    async def handler(request: Request) -> Response:
        return Response(204, [], b"dropped") if request.path == "/nc" else Response.text(200, "ok")

    port = await start(nursery, handler=handler)
    data = (
        b"GET /nc HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /ok HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    responses = parse(await raw(port, data))
    assert [(r.status_code, body) for r, body in responses] == [(204, b""), (200, b"ok")]


async def test_an_unexpected_failure_costs_the_connection_only(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Whatever goes wrong on one connection is logged there, never raised to the server
    (whose other connections would end with it)."""

    class Failing(trio.abc.Stream):
        closed = False

        async def receive_some(self, max_bytes: int | None = None) -> bytes:
            raise RuntimeError("a transport bug")

        async def send_all(self, data: bytes | bytearray | memoryview) -> None:
            raise AssertionError("nothing to send")

        async def wait_send_all_might_not_block(self) -> None:
            return None

        async def aclose(self) -> None:
            self.closed = True

    stream = Failing()
    with caplog.at_level(logging.ERROR, logger="pytunnel.http"), trio.fail_after(10):
        await serve_http_stream(stream, app)
    assert "HTTP connection failed" in caplog.text
    assert stream.closed


async def test_a_peer_that_stops_reading_is_cut_off_at_the_send_timeout(
    nursery: trio.Nursery,
) -> None:
    async def handler(request: Request) -> Response:
        async def endless() -> AsyncIterator[bytes]:
            while True:
                yield b"x" * 65536

        return Response(200, [], endless())

    port = await start(nursery, HttpLimits(send_timeout=0.5), handler=handler)
    before = count_tasks()
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        # never read: the server's writes block once the socket buffers are full
        await wait_until(lambda: count_tasks() <= before, 30, describe_tasks)


# -- accepting ----------------------------------------------------------------------------------


class _SpawnsPerPass(trio.abc.Instrument):
    """How many tasks were spawned in each scheduler pass (between two waits for I/O)."""

    def __init__(self) -> None:
        self.passes: list[int] = [0]

    def after_io_wait(self, timeout: float) -> None:
        self.passes.append(0)

    def task_spawned(self, task: trio.lowlevel.Task) -> None:
        self.passes[-1] += 1


async def test_a_burst_of_connections_is_accepted_in_one_scheduler_pass(
    nursery: trio.Nursery,
) -> None:
    """A backlog is drained in one go: one connection per pass would leave the last of a
    burst waiting for its first answer as many passes as there are connections before it."""
    port = await start(nursery)
    await trio.testing.wait_all_tasks_blocked()
    spawns = _SpawnsPerPass()
    burst = []
    trio.lowlevel.add_instrument(spawns)
    try:
        # blocking connects without yielding: all 40 wait in the backlog before the server runs
        for _ in range(40):
            client = socket.create_connection(("127.0.0.1", port))
            client.sendall(b"GET /json HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            burst.append(client)
        await trio.testing.wait_all_tasks_blocked()
    finally:
        trio.lowlevel.remove_instrument(spawns)
    assert max(spawns.passes) >= 40, spawns.passes
    for client in burst:
        with client:
            client.settimeout(10)
            data = b""
            while chunk := client.recv(65536):
                data += chunk
        [(head, body)] = parse(data)
        assert head.status_code == 200
        assert b'"ok":true' in body


def _server_side_socket(client: socket.socket) -> socket.socket:
    """This process's other end of ``client`` (the server runs in this process), found among
    the open descriptors; a duplicate, to be closed by the caller."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        with contextlib.suppress(OSError):
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            candidate = socket.socket(fileno=os.dup(fd))
            try:
                if candidate.getpeername() == client.getsockname():
                    return candidate
            except OSError:
                pass
            candidate.close()
    raise AssertionError("the accepted socket is not in this process")


async def test_accepted_connections_have_nagle_off(nursery: trio.Nursery) -> None:
    """An answer written in pieces (a head, then a streamed body) must not wait for the
    peer's delayed ACK."""
    port = await start(nursery)
    with socket.create_connection(("127.0.0.1", port)) as client:
        client.settimeout(10)
        client.sendall(b"GET /json HTTP/1.1\r\nHost: x\r\n\r\n")
        # answered: the server has accepted it
        assert (await trio.to_thread.run_sync(client.recv, 65536)).startswith(b"HTTP/1.1 200 ")
        with _server_side_socket(client) as accepted:
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


ACCEPT_EMFILE = r"""
import logging, os, resource, trio
from pytunnel._http import Response, serve_http

logging.basicConfig(level=logging.WARNING)

async def handler(request):
    return Response.text(200, "ok")

async def main():
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(serve_http, handler, "127.0.0.1", 0)
        used = len(os.listdir("/proc/self/fd"))
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (used + 3, hard))  # a few connections
        print(listeners[0].socket.getsockname()[1], flush=True)

trio.run(main)
"""


async def _answered(stream: trio.SocketStream) -> bytes:
    with trio.fail_after(20):  # a hang detector
        return bytes(await stream.receive_some(65536))


async def test_out_of_descriptors_waits_and_accepts_again(tmp_path: pathlib.Path) -> None:
    """accept(2) failing for want of descriptors is logged and retried, never the end of the
    server: the connections that waited are served once descriptors are free again."""
    script = tmp_path / "server.py"
    script.write_text(ACCEPT_EMFILE)
    log_path = tmp_path / "server.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    with log_path.open("wb") as log_file:
        proc = await trio.lowlevel.open_process(
            [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=log_file, env=env
        )
    try:
        assert proc.stdout is not None
        line = b""
        with trio.fail_after(30):
            while not line.endswith(b"\n"):
                line += await proc.stdout.receive_some(100)
        port = int(line)
        # connected, nothing sent: the server holds as many as it has descriptors for
        clients = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(8)]
        await wait_until(lambda: "Too many open files" in log_path.read_text())
        assert proc.poll() is None  # the server lives on
        for client in clients:  # each connection answered is closed, freeing a descriptor
            await client.send_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        for client in clients:
            assert (await _answered(client)).startswith(b"HTTP/1.1 200 ")
            await client.aclose()
        assert proc.poll() is None
    finally:
        proc.terminate()
        await proc.wait()
    assert "accept failed (Too many open files); accepting again in 0.1 s" in log_path.read_text()


class _StepsOf(trio.abc.Instrument):
    """How many times tasks whose name contains ``name`` ran."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if self.name in task.name:
            self.steps += 1


async def test_pipelined_requests_still_let_other_tasks_run(nursery: trio.Nursery) -> None:
    """Answers are written without waiting when the socket takes them, so requests that are
    already buffered could be answered one after the other without a checkpoint: each
    still yields once, and no connection can hold the scheduler."""
    port = await start(nursery)
    steps = _StepsOf("serve_http.<locals>.connection")
    trio.lowlevel.add_instrument(steps)
    try:
        count = 50
        data = b"GET /json HTTP/1.1\r\nHost: x\r\n\r\n" * (count - 1)
        data += b"GET /json HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        answers = parse(await raw(port, data))
    finally:
        trio.lowlevel.remove_instrument(steps)
    assert [head.status_code for head, _ in answers] == [200] * count
    assert steps.steps >= count


async def test_closing_the_listener_ends_serving_and_frees_the_port() -> None:
    """The backlog is drained by non-blocking accepts of our own; closing trio's listener
    still ends the loop (as it ends trio's own) and nothing keeps the port open."""
    errors: list[BaseException] = []

    async def run(task_status: trio.TaskStatus[list[trio.SocketListener]]) -> None:
        try:
            await serve_http(app, "127.0.0.1", 0, task_status=task_status)
        except BaseException as exc:  # examined below
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(run)
        port = listeners[0].socket.getsockname()[1]
        [(head, _)] = parse(
            await raw(port, b"GET /json HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        )
        assert head.status_code == 200
        await listeners[0].aclose()
    [error] = errors
    leaves = [error]
    while any(hasattr(leaf, "exceptions") for leaf in leaves):  # flatten exception groups
        leaves = [e for leaf in leaves for e in getattr(leaf, "exceptions", (leaf,))]
    assert [type(leaf) for leaf in leaves] == [trio.ClosedResourceError], repr(error)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=10).close()
