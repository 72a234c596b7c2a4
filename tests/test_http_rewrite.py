"""The per-route HTTP rewriter (``_http_rewrite``) over a real socket pair: every request of a
kept-alive or pipelined connection rewritten, bodies in their own framing, an upgrade and
what follows untouched, a head that cannot be parsed ending the connection."""

from __future__ import annotations

import base64

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


@pytest.mark.parametrize(
    "host", ["203.0.113.9\r\nX-Injected: yes", "evil.example", "fe80::1%eth0\r\nX: y", ""]
)
async def test_a_peer_that_is_not_an_ip_literal_is_unknown_in_the_headers(host: str) -> None:
    """A peer address that came from a socket is an IP; anything else (text another node
    sent) never lands in the request head."""
    public, ours = await tcp_stream_pair()
    rewriter = RequestRewriter(ours, HttpRouteOptions(forwarded_headers=True), (host, 1))
    async with public, rewriter:
        await public.send_all(b"GET / HTTP/1.1\r\nHost: app\r\n\r\n")
        with trio.fail_after(10):
            head = await rewriter.receive_some()
    assert b"X-Injected" not in head
    assert b"X: y" not in head
    assert b"evil" not in head
    if "%" in host:
        assert b"X-Forwarded-For: fe80::1\r\n" in head
    else:
        assert b"X-Forwarded-For: unknown\r\n" in head
        assert b"Forwarded: for=unknown;proto=http" in head


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


async def test_http_1_0_keep_alive_requests_are_each_rewritten() -> None:
    data = (
        b"GET /a HTTP/1.0\r\nHost: app\r\nConnection: keep-alive\r\n"
        b"X-Forwarded-For: 1.2.3.4\r\n\r\n"
        b"GET /b HTTP/1.0\r\nHost: app\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n"
    )
    out = await rewritten(data, HttpRouteOptions(forwarded_headers=True))
    first, second = out.split(b"\r\n\r\n")[:2]
    assert first.startswith(b"GET /a HTTP/1.0\r\n")
    assert b"X-Forwarded-For: 1.2.3.4, 198.51.100.7" in first
    assert second.startswith(b"GET /b HTTP/1.0\r\n")
    assert b"X-Forwarded-For: 6.6.6.6, 198.51.100.7" in second


async def test_a_body_with_both_framings_keeps_only_the_chunked_one() -> None:
    """Content-Length next to chunked (request smuggling's classic): the service never sees
    the length, so it cannot read the body another way than the rewriter did."""
    data = (
        b"POST /a HTTP/1.1\r\nHost: app\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n"
    )
    out = await rewritten(data, HttpRouteOptions(forwarded_headers=True))
    head, _, body = out.partition(b"\r\n\r\n")
    assert b"content-length" not in head.lower()
    assert body == b"5\r\nhello\r\n0\r\n\r\n"


async def test_a_later_request_without_credentials_ends_the_connection_unanswered() -> None:
    """A 401 for it would overtake the answers to the requests before it."""
    ok = "Basic " + base64.b64encode(b"u:p").decode()
    data = (
        f"GET /a HTTP/1.1\r\nHost: app\r\nAuthorization: {ok}\r\n\r\n".encode()
        + b"GET /b HTTP/1.1\r\nHost: app\r\n\r\n"
    )
    public, ours = await tcp_stream_pair()
    rewriter = RequestRewriter(ours, HttpRouteOptions(basic_auth=("u", "p")), PEER)
    async with public, rewriter:
        await public.send_all(data)
        with trio.fail_after(10):
            first = await rewriter.receive_some()
            assert first.startswith(b"GET /a HTTP/1.1\r\n")
            assert b"authorization" not in first.lower()
            with pytest.raises(trio.BrokenResourceError, match="without the credentials"):
                await _drain(rewriter)
        with trio.move_on_after(0.2):  # a hang detector would hide the 401 it looks for
            assert await public.receive_some() == b"", "something was written back"


async def _drain(stream: trio.abc.ReceiveStream) -> None:
    while await stream.receive_some():
        pass


@pytest.mark.parametrize(
    "value", ["a" * 64, "inside\r\nX-Evil: 1", "two words", "host:99999", "host:x", ""]
)
def test_a_rewritten_host_that_cannot_be_a_host_header_is_refused(value: str) -> None:
    with pytest.raises(ValueError, match="rewrite_host"):
        HttpRouteOptions(rewrite_host=value)


@pytest.mark.parametrize("value", ["inside", "inside.example:8080", "10.0.0.1", "[::1]:80"])
def test_a_rewritten_host_may_be_a_name_or_an_address_with_a_port(value: str) -> None:
    assert HttpRouteOptions(rewrite_host=value).rewrite_host == value
