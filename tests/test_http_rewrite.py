"""The per-route HTTP rewriter (``_http_rewrite``) over a real socket pair: every request of a
kept-alive or pipelined connection rewritten, bodies in their own framing, an upgrade and
what follows untouched, a head that cannot be parsed ending the connection."""

from __future__ import annotations

import pytest
import trio
from helpers import tcp_stream_pair

from pytunnel._http_rewrite import HttpRouteOptions, RequestRewriter

PEER = ("198.51.100.7", 40000)


async def rewritten(data: bytes, options: HttpRouteOptions) -> bytes:
    """Everything the service would read, for ``data`` sent by the public client."""
    public, ours = await tcp_stream_pair()
    rewriter = RequestRewriter(ours, options, PEER)
    async with public, rewriter:
        await public.send_all(data)
        await public.send_eof()
        out = b""
        with trio.fail_after(10):
            while chunk := await rewriter.receive_some(7):  # small reads: no byte lost
                out += chunk
        return out


async def test_pipelined_requests_are_each_rewritten_and_bodies_kept() -> None:
    data = (
        b"POST /a HTTP/1.1\r\nHost: app\r\nContent-Length: 5\r\n\r\nhello"
        b"POST /b HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n2\r\nde\r\n0\r\nX-Trailer: t\r\n\r\n"
        b"GET /c HTTP/1.0\r\nHost: app\r\n\r\n"
    )
    out = await rewritten(data, HttpRouteOptions(rewrite_host="inside"))
    assert out == (
        b"POST /a HTTP/1.1\r\nHost: inside\r\nContent-Length: 5\r\n\r\nhello"
        b"POST /b HTTP/1.1\r\nHost: inside\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n2\r\nde\r\n0\r\nX-Trailer: t\r\n\r\n"
        b"GET /c HTTP/1.0\r\nHost: inside\r\n\r\n"
    )


async def test_an_upgrade_and_everything_after_it_pass_untouched() -> None:
    frames = bytes(range(256)) * 8 + b"GET /not-a-request HTTP/1.1\r\n\r\n"
    data = (
        b"GET /ws HTTP/1.1\r\nHost: app\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
        + frames
    )
    out = await rewritten(data, HttpRouteOptions(forwarded_headers=True))
    head, _, rest = out.partition(b"\r\n\r\n")
    assert b"X-Forwarded-For: 198.51.100.7" in head
    assert rest == frames


async def test_an_ipv6_peer_is_quoted_in_forwarded() -> None:
    public, ours = await tcp_stream_pair()
    rewriter = RequestRewriter(ours, HttpRouteOptions(forwarded_headers=True), ("2001:db8::1", 1))
    async with public, rewriter:
        await public.send_all(b"GET / HTTP/1.1\r\nHost: app\r\n\r\n")
        with trio.fail_after(10):
            head = await rewriter.receive_some()
    assert b'Forwarded: for="[2001:db8::1]";proto=http;host="app"\r\n' in head


async def test_a_head_that_cannot_be_parsed_ends_the_connection() -> None:
    data = b"GET / HTTP/1.1\r\nHost: app\r\n\r\n" + b"\x00\x01 not http\r\n\r\n"
    with pytest.raises(trio.BrokenResourceError, match="not an HTTP request"):
        await rewritten(data, HttpRouteOptions(forwarded_headers=True))


async def test_a_request_without_credentials_gets_401_and_nothing_reaches_the_service() -> None:
    public, ours = await tcp_stream_pair()
    rewriter = RequestRewriter(ours, HttpRouteOptions(basic_auth=("u", "p")), PEER)
    async with public, rewriter:
        await public.send_all(b"GET / HTTP/1.1\r\nHost: app\r\n\r\n")
        with trio.fail_after(10):
            assert await rewriter.receive_some() == b""
            answer = await public.receive_some()
    assert answer.startswith(b"HTTP/1.1 401 ")
    assert b'www-authenticate: Basic realm="pytunnel"' in answer


def test_options_do_not_show_the_password() -> None:
    assert "pw" not in repr(HttpRouteOptions(basic_auth=("u", "pw")))
    assert not HttpRouteOptions().active
