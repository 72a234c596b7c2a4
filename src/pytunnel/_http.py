"""One small HTTP/1.1 server on Trio, shared by every HTTP surface of pytunnel.

It serves any :class:`trio.abc.Stream`: a socket accepted by :func:`serve_http`, or a stream a
tunnel hands over directly (a remote forward with no local port), so the same handler answers
both. Parsing and framing are h11's; this module only drives it and decides what a peer's
misbehaviour costs:

- every wait is bounded: the idle time between requests, the head (slow-loris), the body, the
  handler's run and each write, so a silent or slow peer cannot hold a connection's task;
- a peer's mistake is one answer (400, 408, 413, 431) and the connection is closed, never an
  exception to the caller; a handler's own failure is a 500 whose body says only
  "Internal Error" (the traceback goes to the log, never to the peer);
- a body is streamed to the handler and counted as it arrives, so an over-size body is refused
  at the limit without buffering the rest; the connection is then closed, because the only way
  to reuse it would be to read what the peer still sends.

Requests on one connection are answered one after the other (HTTP/1.1 has no other order);
concurrency comes from connections, each in its own task.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
)
from contextlib import aclosing
from http import HTTPStatus
from typing import NoReturn, TypeVar

import attrs
import h11
import trio

from ._listen import serve_backlog
from .errors import printable

__all__ = [
    "BodyError",
    "BodyTimeout",
    "BodyTooLarge",
    "Handler",
    "HttpError",
    "HttpLimits",
    "Request",
    "Response",
    "serve_http",
    "serve_http_stream",
]

log = logging.getLogger("pytunnel.http")

_T = TypeVar("_T")
_R = TypeVar("_R")

RECEIVE_SIZE = 64 * 1024
#: what is read and thrown away of a body its handler did not read, so the connection can be
#: reused; a longer unread body closes the connection instead
DRAIN_LIMIT = 64 * 1024
#: how long a closing connection keeps discarding what the peer still sends, so the peer
#: reads our answer before it sees the close (closing with unread bytes resets the
#: connection, and a reset can destroy the answer in flight)
LINGER_TIME = 1.0
LINGER_LIMIT = 4 * 1024 * 1024


@attrs.define
class HttpLimits:
    """The bounds one connection lives within (seconds and bytes)."""

    #: request line + headers (h11's ``max_incomplete_event_size``); over it: 431
    max_head: int = 16 * 1024
    #: first byte of a head to its end (the first request: from the connection's start); 408
    head_timeout: float = 10.0
    #: the whole body, from the end of its head; 408
    body_timeout: float = 30.0
    #: idle between two requests on a kept-alive connection, then closed silently
    keepalive_timeout: float = 60.0
    #: the handler's run for one request (not the streaming of its response body); 504
    handler_timeout: float = 60.0
    #: the default body limit of :meth:`Request.body_chunks` / :meth:`Request.read_body`;
    #: ``None``: unlimited (the handler reads the body as a stream and decides)
    max_body: int | None = 2 * 1024 * 1024
    #: one write to the peer (a head, a body chunk); a peer that stops reading is cut off
    send_timeout: float = 30.0


class HttpError(Exception):
    """A request the peer got wrong: answered with :attr:`status`, then the connection
    closes."""

    status = 400
    reason = "Bad Request"


class BodyTooLarge(HttpError):
    """The body went over its limit (declared in ``Content-Length`` or counted while
    streaming in); the rest is never read."""

    status = 413
    reason = "Payload Too Large"


class BodyTimeout(HttpError):
    """The body did not arrive within :attr:`HttpLimits.body_timeout`."""

    status = 408
    reason = "Request Timeout"


class BodyError(HttpError):
    """The body is malformed (bad chunked framing) or the peer went away in its middle."""


class _Default:
    """The type of :data:`_DEFAULT`: "use the connection's limit"."""


_DEFAULT = _Default()


class _Connection:
    """One h11 connection over one stream, with the waits bounded."""

    def __init__(self, stream: trio.abc.Stream, limits: HttpLimits) -> None:
        self.stream = stream
        self.limits = limits
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_head)
        #: one scope for the connection's life, its deadline moved to whatever the
        #: connection waits for (a head, a write): cheaper than a scope per wait, and a
        #: deadline that fires ends the connection anyway
        self.scope = trio.CancelScope()
        #: what the deadline of :attr:`scope` is for: ``"head"``, ``"send"`` or
        #: ``"handler"`` (:meth:`Request.bounded`, answered by :attr:`timeout_answer`)
        self.waiting = ""
        self.timeout_answer: Callable[[], Response] | None = None
        #: the bounded request is a HEAD (its timeout answer has no body)
        self.timeout_head = False
        #: a plain socket's descriptor, asked for at each write (``None``: another stream)
        self.fileno = stream.socket.fileno if isinstance(stream, trio.SocketStream) else None

    async def receive_into_h11(self, deadline: float) -> None:
        """Read once into h11 (a head's bytes), under the connection's deadline."""
        self.scope.deadline = deadline
        self.waiting = "head"
        data = await self.receive()
        self.scope.deadline = math.inf
        self.waiting = ""
        self.h11.receive_data(data)  # b"" is the peer's close; h11 decides its meaning

    async def receive(self) -> bytes:
        """One read. On a plain socket it is the descriptor's ``read``, waiting for it to
        be readable only when it is not: the same checkpoints and errors as
        ``receive_some``, without the failed read and its exception that ``receive_some``
        pays when nothing has arrived yet (as after each answer on a kept-alive
        connection)."""
        if self.fileno is None:
            return bytes(await self.stream.receive_some(RECEIVE_SIZE))
        await trio.lowlevel.checkpoint_if_cancelled()
        fd = self.fileno()
        waited = False
        while True:
            try:
                data = os.read(fd, RECEIVE_SIZE)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(fd)
                waited = True
                continue
            except OSError as exc:
                if exc.errno == errno.EBADF:
                    raise trio.ClosedResourceError("the socket was closed") from None
                raise trio.BrokenResourceError(f"the socket broke: {exc}") from exc
            if not waited:  # as receive_some: a read that did not wait still yields
                await trio.lowlevel.cancel_shielded_checkpoint()
            return data

    async def next_event(self, deadline: float) -> object:
        """The next event, reading as needed until ``deadline`` (then ``None``).

        Raises :class:`h11.RemoteProtocolError` for a malformed message and the stream's
        errors for a broken one."""
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            with trio.move_on_at(deadline):
                # b"" is the peer's close; h11 decides what it means here
                self.h11.receive_data(await self.receive())
                continue
            return None

    async def send(self, *events: h11.Event, inline: bool = True) -> None:
        """Write the events' bytes. On a plain socket, unless ``inline`` is false, what the
        kernel takes at once is written without waiting (an answer almost always fits), so
        a small answer costs no trip through the scheduler and no deadline; the rest, or
        any error, is left to ``send_all``, which waits under the send deadline and raises
        the typed error. The checkpoint that skips is made up by the next read, or by
        :func:`_read_head` when the next request is already here; a streamed body, which
        has no read between its pieces, is written with ``inline=False``."""
        out = b"".join([self.h11.send(event) or b"" for event in events])
        if out and inline and self.fileno is not None:
            try:
                sent = os.write(self.fileno(), out)
            except OSError:  # would block, or broken: send_all waits or says which
                sent = 0
            out = out[sent:]
        if out:
            # a write inside a bounded handler (a 100 Continue) restores its bound after
            deadline, waiting = self.scope.deadline, self.waiting
            self.scope.deadline = trio.current_time() + self.limits.send_timeout
            self.waiting = "send"
            await self.stream.send_all(out)
            self.scope.deadline = deadline
            self.waiting = waiting

    def buffered_size(self) -> int:
        return len(self.h11.trailing_data[0])

    def buffered(self) -> bool:
        """Whether bytes of the next request already arrived."""
        return bool(self.h11.trailing_data[0])


class Request:
    """One request: the head parsed, the body still on the wire until the handler reads it."""

    def __init__(
        self,
        conn: _Connection,
        event: h11.Request,
        peer: tuple[str, int] | None,
        max_body: int | None,
    ) -> None:
        self._conn = conn
        self.method: str = event.method.decode("ascii")
        self.target: str = event.target.decode("latin-1")
        path, _, query = self.target.partition("?")
        self.path: str = path
        self.query: str = query
        self._raw_headers = event.headers
        self._headers: list[tuple[str, str]] | None = None
        self.peer = peer
        self.max_body = max_body
        self._body_deadline = trio.current_time() + conn.limits.body_timeout
        self._started = False
        self._received = 0
        self._index: dict[str, str] | None = None
        #: the body was refused (too large, too slow, malformed): the connection cannot be
        #: reused
        self.aborted = False
        self.body_done = False

    @property
    def headers(self) -> list[tuple[str, str]]:
        """The headers in their order, names in lower case (as h11 gives them)."""
        if self._headers is None:
            self._headers = [
                (name.decode("latin-1"), value.decode("latin-1"))
                for name, value in self._raw_headers
            ]
        return self._headers

    def header(self, name: str) -> str | None:
        """The header's value (repeated headers joined with ", "), or ``None``."""
        index = self._index
        if index is None:
            index = self._index = {}
            for raw_key, raw_value in self._raw_headers:
                key = raw_key.decode("latin-1")
                value = raw_value.decode("latin-1")
                index[key] = f"{index[key]}, {value}" if key in index else value
        return index.get(name.lower())

    def content_length(self) -> int | None:
        value = self.header("content-length")
        return int(value) if value is not None else None  # h11 checked it is digits

    async def bounded(
        self,
        seconds: float,
        fn: Callable[[_T], Awaitable[_R]],
        arg: _T,
        on_timeout: Callable[[], Response],
    ) -> _R:
        """``await fn(arg)`` within ``seconds``. Past them the handler is cancelled outright,
        ``on_timeout()`` is the answer and the connection closes.

        The bound is the connection's own cancel scope with its deadline moved (as for a
        head or a write), not a scope of its own: entering and leaving a cancel scope was
        about 8% of the task server's time per small request. The price is the connection:
        a cancelled scope stays cancelled, so it closes after the timeout's answer."""
        conn = self._conn
        conn.scope.deadline = trio.current_time() + seconds
        conn.waiting = "handler"
        conn.timeout_answer = on_timeout
        conn.timeout_head = self.method == "HEAD"
        try:
            return await fn(arg)
        finally:
            if not conn.scope.cancel_called:
                conn.scope.deadline = math.inf
                conn.waiting = ""
                conn.timeout_answer = None

    async def body_chunks(
        self, limit: int | _Default | None = _DEFAULT
    ) -> AsyncGenerator[bytes, None]:
        """The body as it arrives. ``limit`` (default: the connection's ``max_body``) counts
        bytes as they come: over it, :class:`BodyTooLarge` and nothing more is read.

        Raises :class:`BodyTimeout` past the body's deadline, :class:`BodyError` for a
        malformed body or a peer gone in its middle. The body can be read once."""
        cap = await self._begin(limit)
        while (chunk := await self._next_chunk(cap)) is not None:
            yield chunk

    async def read_body(self, limit: int | _Default | None = _DEFAULT) -> bytes:
        """The whole body, with the same limit and errors as :meth:`body_chunks`."""
        cap = await self._begin(limit)
        parts: list[bytes] = []
        while (chunk := await self._next_chunk(cap)) is not None:
            parts.append(chunk)
        return b"".join(parts)

    async def _begin(self, limit: int | _Default | None) -> int | None:
        """Start reading the body: the byte limit that applies, checked against a declared
        length before anything is read."""
        if self._started:
            raise RuntimeError("the request body was already read")
        self._started = True
        cap = self.max_body if isinstance(limit, _Default) else limit
        declared = self.content_length()
        if cap is not None and declared is not None and declared > cap:
            self.aborted = True
            raise BodyTooLarge(f"the body ({declared} bytes) is over the limit of {cap}")
        if self._conn.h11.they_are_waiting_for_100_continue:
            await self._send_or_fail(h11.InformationalResponse(status_code=100, headers=[]))
        return cap

    async def _next_chunk(self, cap: int | None) -> bytes | None:
        """The next piece of the body, or ``None`` at its end."""
        while True:
            try:
                event = await self._conn.next_event(self._body_deadline)
            except h11.RemoteProtocolError as exc:
                self.aborted = True
                raise BodyError(f"malformed body: {exc}") from None
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self.aborted = True
                raise BodyError("the connection broke while reading the body") from exc
            if event is None:
                self.aborted = True
                raise BodyTimeout("the body did not arrive in time")
            if isinstance(event, h11.Data):
                self._received += len(event.data)
                if cap is not None and self._received > cap:
                    self.aborted = True
                    raise BodyTooLarge(f"the body is over the limit of {cap} bytes")
                if event.data:
                    return bytes(event.data)
                continue
            if isinstance(event, h11.EndOfMessage):
                self.body_done = True
                return None
            self.aborted = True  # pragma: no cover - h11 sends only Data and EndOfMessage here
            raise BodyError(f"unexpected {type(event).__name__} in a body")  # pragma: no cover

    async def _send_or_fail(self, event: h11.Event) -> None:
        try:
            await self._conn.send(event)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError) as exc:
            self.aborted = True
            raise BodyError("the connection broke") from exc

    async def _drain(self) -> bool:
        """Read and drop a small unread body so the connection can be reused."""
        if self.body_done:
            return True
        if self.aborted or self._started:
            return False
        declared = self.content_length()
        if declared is not None and declared > DRAIN_LIMIT:
            return False
        try:
            async with aclosing(self.body_chunks(DRAIN_LIMIT)) as chunks:
                async for _ in chunks:
                    pass
        except HttpError:
            return False
        return True


@attrs.define
class Response:
    """What a handler answers. A ``bytes`` body is sent with its length; an async iterable
    body is sent chunked as it is produced (Server-Sent Events use this)."""

    status: int
    headers: list[tuple[str, str]] = attrs.field(factory=list)
    body: bytes | AsyncIterable[bytes] = b""

    @classmethod
    def json(cls, status: int, value: object, headers: Iterable[tuple[str, str]] = ()) -> Response:
        try:
            body = json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate, which UTF-8 cannot hold: escaped
            body = json.dumps(value, separators=(",", ":")).encode("ascii")
        return cls(
            status,
            [("content-type", "application/json; charset=utf-8"), *headers],
            body,
        )

    @classmethod
    def text(cls, status: int, text: str, headers: Iterable[tuple[str, str]] = ()) -> Response:
        return cls(status, [("content-type", "text/plain; charset=utf-8"), *headers], text.encode())


Handler = Callable[[Request], Awaitable[Response]]


def _peer_of(stream: trio.abc.Stream) -> tuple[str, int] | None:
    if isinstance(stream, trio.SocketStream):
        try:
            name = stream.socket.getpeername()
        except OSError:
            return None
        if isinstance(name, tuple) and len(name) >= 2:
            return str(name[0]), int(name[1])
    return None


async def serve_http_stream(
    stream: trio.abc.Stream,
    handler: Handler,
    *,
    limits: HttpLimits | None = None,
    peer: tuple[str, int] | None = None,
) -> None:
    """Serve HTTP/1.1 requests on ``stream`` until either side ends the connection, then
    close ``stream``. A peer's misbehaviour never raises here (it costs the connection); only
    cancellation does."""
    limits = limits or HttpLimits()
    conn = _Connection(stream, limits)
    peer = peer or _peer_of(stream)
    linger = False
    try:
        with conn.scope:
            linger = await _serve_requests(conn, handler, peer)
        if conn.scope.cancelled_caught:
            linger = await _deadline_passed(conn)
    except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
        pass  # the peer went away or stopped reading: nothing left to tell it
    except Exception:
        # a bug here or in a handler's answer costs this one connection, never the server
        # (an exception out of a connection's task would end every connection)
        log.exception("HTTP connection failed")
    finally:
        if linger:
            await _linger_close(stream)
        await trio.aclose_forcefully(stream)


class _HeadFailed(Exception):
    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


async def _deadline_passed(conn: _Connection) -> bool:
    """The connection's deadline fired: a head that started and never ended is 408, a
    bounded handler that ran out of time gets its timeout answer; an idle connection or a
    write the peer would not take ends without a word. Returns whether the close should
    linger."""
    if conn.waiting == "handler" and conn.timeout_answer is not None:
        if conn.h11.our_state is not h11.SEND_RESPONSE:
            return False  # pragma: no cover - the answer is sent after the handler returns
        response = conn.timeout_answer()
        body = response.body if isinstance(response.body, bytes) else b""
        head = _head(Response(response.status, response.headers, body), False)
        with trio.move_on_after(conn.limits.send_timeout):
            if conn.timeout_head:
                await conn.send(head, h11.EndOfMessage())
            else:
                await conn.send(head, h11.Data(data=body), h11.EndOfMessage())
        return True
    if conn.waiting != "head" or not conn.buffered():
        return False
    with trio.move_on_after(conn.limits.send_timeout):
        await _send_error(conn, 408, "Request Timeout")
    return True


async def _read_head(conn: _Connection, first: bool) -> object:
    """The next request's head (the first request's head must be complete ``head_timeout``
    after the start; a later one ``head_timeout`` after its first byte, which may come
    ``keepalive_timeout`` after the previous answer)."""
    limits = conn.limits
    in_head = first
    deadline = trio.current_time() + (limits.head_timeout if first else limits.keepalive_timeout)
    received = False
    while True:
        before = conn.buffered_size()
        if not in_head and before:
            in_head = True
            deadline = trio.current_time() + limits.head_timeout
        try:
            event = conn.h11.next_event()
        except h11.RemoteProtocolError as exc:
            status = exc.error_status_hint
            text = "Request Header Fields Too Large" if status == 431 else "Bad Request"
            raise _HeadFailed(status, text) from None
        if event is not h11.NEED_DATA:
            # h11 bounds only a head still incomplete; one that arrived whole is measured here
            if before > limits.max_head and before - conn.buffered_size() > limits.max_head:
                raise _HeadFailed(431, "Request Header Fields Too Large")
            if not received and not first:
                # pipelined: no read checkpointed since the last answer (written inline)
                await trio.lowlevel.checkpoint()
            return event
        await conn.receive_into_h11(deadline)  # past the deadline: see _deadline_passed
        received = True


async def _serve_requests(
    conn: _Connection, handler: Handler, peer: tuple[str, int] | None
) -> bool:
    """The keep-alive loop; returns whether the close should linger (the peer may still be
    sending)."""
    first = True
    while True:
        try:
            event = await _read_head(conn, first)
        except _HeadFailed as exc:
            await _send_error(conn, exc.status, exc.text)
            return True
        first = False
        if not isinstance(event, h11.Request):
            return False  # ConnectionClosed (PAUSED cannot come: one cycle at a time)
        request = Request(conn, event, peer, conn.limits.max_body)
        if (
            request.header("transfer-encoding") is not None
            and request.header("content-length") is not None
        ):
            # both framings: a proxy in front may have read the other one, so what follows
            # could be a request smuggled past it. Refused and closed, as Node's parser does
            # (RFC 9112 6.3 allows either, but the connection must close after the answer)
            await _send_error(conn, 400, "Bad Request")
            return True
        if not await _answer(conn, handler, request):
            return not request.body_done
        if conn.h11.our_state is not h11.DONE or conn.h11.their_state is not h11.DONE:
            return False
        conn.h11.start_next_cycle()


async def _answer(conn: _Connection, handler: Handler, request: Request) -> bool:
    """Run the handler and send its answer; returns whether the connection may go on."""
    response: Response | None = None
    timeout = conn.limits.handler_timeout
    # no scope at all when unbounded (a handler that bounds its own work): a scope per
    # request is a measurable share of a small request's cost
    with trio.move_on_after(timeout) if timeout != math.inf else contextlib.nullcontext():
        try:
            response = await handler(request)
        except HttpError as exc:
            response = _plain(exc.status, exc.reason)
        except Exception:
            log.exception("HTTP handler failed on %s %s", request.method, printable(request.target))
            response = _plain(500, "Internal Error")
    if response is None:  # the handler's time ran out
        log.warning("HTTP handler timed out on %s %s", request.method, printable(request.target))
        response = _plain(504, "Gateway Timeout")
    keep = not request.aborted and await request._drain()
    try:
        head = _head(response, keep)
    except (h11.LocalProtocolError, UnicodeEncodeError, ValueError):
        log.exception(
            "HTTP handler gave an invalid answer to %s %s",
            request.method,
            printable(request.target),
        )
        response = _plain(500, "Internal Error")
        head = _head(response, keep)
    if isinstance(response.body, bytes):
        if request.method == "HEAD" or response.status in (204, 304):
            await conn.send(head, h11.EndOfMessage())
        else:
            await conn.send(head, h11.Data(data=response.body), h11.EndOfMessage())
        return keep
    await conn.send(head)
    if request.method == "HEAD" or response.status in (204, 304):
        await conn.send(h11.EndOfMessage())
        return keep
    try:
        async with _aclosing_iter(response.body) as chunks:
            async for chunk in chunks:
                if chunk:
                    await conn.send(h11.Data(data=chunk), inline=False)
    except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
        raise
    except Exception:
        log.exception(
            "HTTP response body failed on %s %s", request.method, printable(request.target)
        )
        return False  # the head is out: all that is left is to cut the body short
    await conn.send(h11.EndOfMessage())
    return keep


def _head(response: Response, keep: bool) -> h11.Response:
    """The answer's head, checked by h11 before anything is sent (a handler's invalid
    header or status must not break the connection's state half way through)."""
    if not 200 <= response.status <= 599:
        raise ValueError(f"a handler's answer must have a final status, not {response.status}")
    body = response.body
    if isinstance(body, bytes):  # its length is the body's, whatever was given
        headers = [
            (k.encode("latin-1"), v.encode("latin-1"))
            for k, v in response.headers
            if k.lower() not in _FRAMING
        ]
        headers.append((b"content-length", str(len(body)).encode("ascii")))
    else:
        headers = _encode(response.headers)
    if not keep:
        headers.append((b"connection", b"close"))
    return h11.Response(
        status_code=response.status, headers=headers, reason=_reason(response.status)
    )


_FRAMING = frozenset({"content-length", "transfer-encoding"})


class _aclosing_iter:
    """``aclosing`` for any async iterable: closes it if it is an async generator."""

    def __init__(self, iterable: AsyncIterable[bytes]) -> None:
        self.iterable = iterable

    async def __aenter__(self) -> AsyncIterator[bytes]:
        return aiter(self.iterable)

    async def __aexit__(self, *exc: object) -> None:
        close = getattr(self.iterable, "aclose", None)
        if close is not None:
            await close()


_REASONS = {status.value: status.phrase.encode("ascii") for status in HTTPStatus}


def _reason(status: int) -> bytes:
    return _REASONS.get(status, b"")


def _plain(status: int, text: str) -> Response:
    return Response.text(status, text)


def _encode(headers: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    return [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers]


async def _send_error(conn: _Connection, status: int, text: str) -> None:
    """Answer a request the peer got wrong, if h11 still allows an answer."""
    if conn.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        return
    body = text.encode()
    headers = [
        ("content-type", "text/plain; charset=utf-8"),
        ("content-length", str(len(body))),
        ("connection", "close"),
    ]
    head = h11.Response(status_code=status, headers=_encode(headers), reason=_reason(status))
    await conn.send(head, h11.Data(data=body), h11.EndOfMessage())


async def _linger_close(stream: trio.abc.Stream) -> None:
    """Half-close, then drop what the peer still sends for a moment (bounded in time and
    bytes), so our last answer is read before the connection closes."""
    with trio.move_on_after(LINGER_TIME):
        try:
            if isinstance(stream, trio.abc.HalfCloseableStream):
                await stream.send_eof()
            dropped = 0
            while dropped < LINGER_LIMIT:
                data = await stream.receive_some(RECEIVE_SIZE)
                if not data:
                    break
                dropped += len(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError):
            pass


async def _no_slot() -> None:
    """Connections to this server need nothing reserved before they are accepted."""


def _nothing_to_release(_slot: None) -> None:
    pass


async def _accept_loop(
    listener: trio.SocketListener,
    nursery: trio.Nursery,
    connection: Callable[[trio.SocketStream], Awaitable[None]],
) -> NoReturn:
    """Take every connection waiting in the listener's backlog at once, then wait.

    trio's ``SocketListener.accept`` yields to the scheduler after each connection, so under
    load a burst of new connections is taken one per scheduler pass: with a hundred busy
    connections a pass lasts tens of milliseconds and the last connection of a burst waits
    for its first answer a second or more (its request waits in a backlog nobody reads).
    :func:`._listen.serve_backlog` takes them all in the same pass (up to its batch bound).
    Closing the listener elsewhere ends this loop with ``ClosedResourceError``, as it ends
    trio's."""

    def start(stream: trio.SocketStream, _slot: None) -> None:
        nursery.start_soon(connection, stream)

    async with listener:
        await serve_backlog(listener, _no_slot, start, _nothing_to_release)
    raise trio.ClosedResourceError("the listener was closed")


async def serve_http(
    handler: Handler,
    host: str,
    port: int,
    *,
    limits: HttpLimits | None = None,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Listen on ``host:port`` and serve ``handler`` on every connection, in trio's
    ``serve_tcp`` style: ``task_status.started(listeners)`` once bound (port 0: see
    ``listeners[0].socket.getsockname()``)."""
    listeners = await trio.open_tcp_listeners(port, host=host)

    async def connection(stream: trio.SocketStream) -> None:
        await serve_http_stream(stream, handler, limits=limits)

    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(_accept_loop, listener, nursery, connection)
        task_status.started(listeners)
    raise AssertionError("unreachable")  # pragma: no cover - the accept loops never return
