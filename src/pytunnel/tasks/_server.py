"""The task server: Runner's HTTP exposure protocol (5.5) in front of Python tasks and events.

The rules follow what the real Runner server does (its behaviour wins over its docs):

- ``POST {base}/task/{id}``, ``POST {base}/event/{id}``, ``GET {base}/discovery``; the id is
  the rest of the path, percent-decoded strictly (a malformed escape is 404, as
  ``decodeURIComponent`` throwing is there); anything else under the base is 404
  ``NOT_FOUND``; ``OPTIONS`` anywhere under the base is the CORS preflight, answered before
  any other check;
- the checks run in a fixed order, each with its own answer: method (405), token (401, or 500
  ``AUTH_NOT_CONFIGURED`` when no token is set and anonymous access was not asked for),
  allow-list (403), registry (404), then the body (400 / 413). Exposure fails closed: only
  allow-listed ids can be called, whatever is registered;
- tokens are compared in constant time over their SHA-256 digests (so neither a token's
  content nor its length leaks through timing), every configured token each time;
- a JSON body is counted while it streams in and refused at its limit (2 MiB) without reading
  the rest; a task's own exception is 500 "Internal Error" (logged, never sent); a
  :class:`~pytunnel.tasks.TaskError` is the typed application error with its message, id and
  data;
- every answer carries ``nosniff``, ``X-Frame-Options: DENY``, the CORS headers and (past the
  preflight) ``x-runner-request-id``: the caller's when it is a safe token, else a fresh UUID.
"""

from __future__ import annotations

import hashlib
import hmac
import inspect
import logging
import math
import os
import re
import sys
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, NoReturn, TypeVar
from urllib.parse import unquote_to_bytes, urlsplit

import attrs
import trio

from .._http import (
    BodyError,
    BodyTimeout,
    BodyTooLarge,
    HttpLimits,
    Request,
    Response,
    serve_http,
    serve_http_stream,
)
from ..errors import printable
from . import serializer
from ._uploads import (
    BodyStream,
    MultipartLimits,
    UploadRefused,
    is_multipart,
    is_octet_stream,
    read_multipart,
)
from .errors import TaskError
from .serializer import UNDEFINED, SerializationError

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup  # type: ignore[import-not-found, unused-ignore]

__all__ = ["CorsConfig", "EventHandler", "TaskHandler", "TaskServer"]

log = logging.getLogger("pytunnel.tasks")

TaskHandler = Callable[[Any], Awaitable[Any]]
#: an event listener gets the payload; what it returns (if not ``None``) is the payload the
#: next listener and a ``returnPayload`` caller see
EventHandler = Callable[[Any], Awaitable[Any]]
_F = TypeVar("_F", bound=Callable[..., Awaitable[Any]])
#: what a registry holds: a task's function, or an event's listeners
_H = TypeVar("_H")

DEFAULT_BASE_PATH = "/__runner"
DEFAULT_AUTH_HEADER = "x-runner-token"
REQUEST_ID_HEADER = "x-runner-request-id"
DEFAULT_MAX_JSON = 2 * 1024 * 1024
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
JSON_CONTENT_TYPE = "application/json; charset=utf-8"
#: the headers every answer past the route starts with
_ANSWER_HEADERS = (
    ("content-type", JSON_CONTENT_TYPE),
    ("x-content-type-options", "nosniff"),
    ("x-frame-options", "DENY"),
)
_ANY_ORIGIN = (("access-control-allow-origin", "*"),)
#: how many distinct request paths keep their parsed route (the paths are the peers', so the
#: table is emptied when full rather than allowed to grow)
ROUTE_CACHE_SIZE = 1024


def _origins(value: Iterable[str] | None) -> tuple[str, ...] | None:
    return None if value is None else tuple(value)


@attrs.frozen
class CorsConfig:
    """Cross-origin answers. ``origins`` ``None``: ``*`` (unless ``credentials``, which needs
    explicit origins); a list: the request's ``Origin`` echoed when listed."""

    origins: tuple[str, ...] | None = attrs.field(default=None, converter=_origins)
    credentials: bool = False
    allowed_headers: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    exposed_headers: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    max_age: int | None = None


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


def _decode_id(raw: str) -> str | None:
    """``decodeURIComponent``: strict percent-decoding to UTF-8, ``None`` when malformed."""
    if _BAD_ESCAPE.search(raw):
        return None
    try:
        return unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        return None


_DOT = frozenset({".", "%2e"})
_DOT_DOT = frozenset({"..", ".%2e", "%2e.", "%2e%2e"})


def _without_dot_segments(path: str) -> str:
    """The path as a WHATWG URL parser (Node's ``new URL``) leaves it: ``.`` and ``..``
    segments (also percent-encoded) resolved, so a route is matched as Runner matches it."""
    if "." not in path and "%2e" not in path.lower():
        return path
    out: list[str] = []
    segments = path.split("/")
    for index, segment in enumerate(segments):
        lowered = segment.lower()
        last = index == len(segments) - 1
        if lowered in _DOT:
            if last:
                out.append("")
        elif lowered in _DOT_DOT:
            if len(out) > 1:
                out.pop()
            if last:
                out.append("")
        else:
            out.append(segment)
    return "/".join(out) or "/"


def _fresh_request_id() -> str:
    """A random (version 4) UUID's text, as ``str(uuid.uuid4())`` writes it, for a fifth of
    its cost (no ``UUID`` object on the way): set the version and variant bits of 16
    random bytes and write them as hex."""
    raw = bytearray(os.urandom(16))
    raw[6] = (raw[6] & 0x0F) | 0x40  # version 4
    raw[8] = (raw[8] & 0x3F) | 0x80  # the RFC 4122 variant
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _js_truthy(value: Any) -> bool:
    if value is UNDEFINED or value is None:
        return False
    if isinstance(value, float) and value != value:  # NaN
        return False
    if isinstance(value, (bool, int, float, str)):
        return bool(value)
    return True  # any object, even empty, is truthy in JavaScript


class TaskServer:
    """Tasks and events behind Runner's HTTP protocol, served on a port (:meth:`serve`) or on
    streams a tunnel hands over (:meth:`handle_stream`)."""

    def __init__(
        self,
        *,
        token: str | Sequence[str] | None = None,
        allow_anonymous: bool = False,
        base_path: str = DEFAULT_BASE_PATH,
        auth_header: str = DEFAULT_AUTH_HEADER,
        cors: CorsConfig | None = None,
        max_json_body: int = DEFAULT_MAX_JSON,
        task_timeout: float = 60.0,
        disable_discovery: bool = False,
        multipart_limits: MultipartLimits | None = None,
        http_limits: HttpLimits | None = None,
    ) -> None:
        tokens = [token] if isinstance(token, str) else list(token or ())
        if any(not t for t in tokens):
            raise ValueError("an empty token would let anyone in")
        self._tokens = [_digest(t) for t in tokens]
        self.allow_anonymous = allow_anonymous
        base = base_path if base_path.startswith("/") else "/" + base_path
        self.base_path = base[:-1] if base.endswith("/") and base != "/" else base
        self.auth_header = auth_header.lower()
        self.cors = cors
        self.max_json_body = max_json_body
        self.task_timeout = task_timeout
        self.disable_discovery = disable_discovery
        self.multipart_limits = multipart_limits or MultipartLimits()
        limits = http_limits or HttpLimits()
        # the body limit is the protocol's (per content type), so the HTTP layer counts none;
        # nor does it bound the handler's time: the body has its own timeout and the task its
        # own (answered in the protocol's terms)
        self.http_limits = attrs.evolve(limits, max_body=None, handler_timeout=math.inf)
        self._tasks: dict[str, TaskHandler] = {}
        self._events: dict[str, list[EventHandler]] = {}
        self._allowed_tasks: dict[str, None] = {}
        self._allowed_events: dict[str, None] = {}
        self._routes: dict[str, tuple[str, str]] = {}

    # -- registry -----------------------------------------------------------------------------

    def register_task(self, task_id: str, fn: TaskHandler, *, expose: bool = True) -> None:
        """``fn(input)`` answers ``POST {base}/task/{task_id}``; ``expose=False`` registers it
        without allow-listing it (callers get 403 until :meth:`expose_task`)."""
        _check_async(fn)
        if task_id in self._tasks:
            raise ValueError(f"task {task_id!r} is already registered")
        self._tasks[task_id] = fn
        if expose:
            self.expose_task(task_id)

    def register_event(self, event_id: str, fn: EventHandler, *, expose: bool = True) -> None:
        """Add a listener ``fn(payload)`` to ``event_id``; listeners run in the order added."""
        _check_async(fn)
        self._events.setdefault(event_id, []).append(fn)
        if expose:
            self.expose_event(event_id)

    def expose_task(self, task_id: str) -> None:
        self._allowed_tasks[task_id] = None

    def expose_event(self, event_id: str) -> None:
        self._allowed_events[event_id] = None

    def task(self, task_id: str, *, expose: bool = True) -> Callable[[_F], _F]:
        """Decorator form of :meth:`register_task`."""

        def register(fn: _F) -> _F:
            self.register_task(task_id, fn, expose=expose)
            return fn

        return register

    def event(self, event_id: str, *, expose: bool = True) -> Callable[[_F], _F]:
        """Decorator form of :meth:`register_event`."""

        def register(fn: _F) -> _F:
            self.register_event(event_id, fn, expose=expose)
            return fn

        return register

    @property
    def exposed_tasks(self) -> list[str]:
        return list(self._allowed_tasks)

    @property
    def exposed_events(self) -> list[str]:
        return list(self._allowed_events)

    # -- serving ------------------------------------------------------------------------------

    async def serve(
        self,
        host: str,
        port: int,
        *,
        task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
    ) -> NoReturn:
        """Listen on ``host:port`` (trio style: ``task_status.started(listeners)``)."""
        await serve_http(self.handle, host, port, limits=self.http_limits, task_status=task_status)

    async def handle_stream(self, stream: trio.abc.Stream) -> None:
        """Serve one connection (a tunnel's incoming stream, say), then close it."""
        await serve_http_stream(stream, self.handle, limits=self.http_limits)

    async def handle(self, request: Request) -> Response:
        """Answer one HTTP request by the protocol's rules."""
        route = self._routes.get(request.path)
        if route is None:
            route = self._route(request.path)
            if len(self._routes) >= ROUTE_CACHE_SIZE:
                self._routes.clear()
            self._routes[request.path] = route
        kind, ident = route
        if kind == "outside":
            return self._error(request, [], 404, "Not Found", "NOT_FOUND")
        if request.method == "OPTIONS":
            return self._preflight(request)
        headers = [(REQUEST_ID_HEADER, self._request_id(request))]
        if kind == "task":
            return await self._task(request, headers, ident)
        if kind == "event":
            return await self._event(request, headers, ident)
        if kind == "discovery":
            return await self._discovery(request, headers)
        return self._error(request, headers, 404, "Not Found", "NOT_FOUND")

    def _route(self, target_path: str) -> tuple[str, str]:
        """What a request path names: ``(kind, id)`` with kind ``"task"``, ``"event"``,
        ``"discovery"``, ``"none"`` (under the base, but nothing there: 404) or
        ``"outside"`` (not under the base: 404 without a request id)."""
        path = target_path
        if "://" in path:  # absolute-form target (a proxy's request)
            path = urlsplit(path).path or "/"
        path = _without_dot_segments(path)
        if not (path == self.base_path or path.startswith(self.base_path.rstrip("/") + "/")):
            return "outside", ""
        segments = [s for s in path[len(self.base_path) :].split("/") if s]
        if segments[:1] == ["discovery"]:
            return "discovery", ""
        if len(segments) < 2 or segments[0] not in ("task", "event"):
            return "none", ""
        ident = _decode_id("/".join(segments[1:]))
        if ident is None:
            return "none", ""
        return segments[0], ident

    # -- the three routes ---------------------------------------------------------------------

    async def _discovery(self, request: Request, headers: list[tuple[str, str]]) -> Response:
        if self.disable_discovery:
            return self._error(request, headers, 404, "Not Found", "NOT_FOUND")
        if request.method != "GET":
            return self._error(request, headers, 405, "Method Not Allowed", "METHOD_NOT_ALLOWED")
        denied = self._authenticate(request, headers)
        if denied is not None:
            return denied
        result = {
            "allowList": {
                "enabled": True,
                "tasks": self.exposed_tasks,
                "events": self.exposed_events,
            }
        }
        return self._json(request, headers, 200, {"ok": True, "result": result})

    def _gate(
        self,
        request: Request,
        headers: list[tuple[str, str]],
        what: str,
        ident: str,
        allowed: dict[str, None],
        registry: dict[str, _H],
    ) -> _H | Response:
        """The checks before a task or event runs, in the protocol's order: method, token,
        allow-list, registry. Returns what is registered under ``ident``, or the answer
        that refuses the call."""
        if request.method != "POST":
            return self._error(request, headers, 405, "Method Not Allowed", "METHOD_NOT_ALLOWED")
        denied = self._authenticate(request, headers)
        if denied is not None:
            return denied
        if ident not in allowed:
            return self._error(request, headers, 403, f"{what} {ident} not exposed", "FORBIDDEN")
        found = registry.get(ident)
        if found is None:
            return self._error(request, headers, 404, f"{what} {ident} not found", "NOT_FOUND")
        return found

    async def _task(
        self, request: Request, headers: list[tuple[str, str]], task_id: str
    ) -> Response:
        fn = self._gate(request, headers, "Task", task_id, self._allowed_tasks, self._tasks)
        if isinstance(fn, Response):
            return fn
        content_type = request.header("content-type") or ""
        if is_multipart(content_type):
            try:
                task_input, files = await read_multipart(request, self.multipart_limits)
            except UploadRefused as exc:
                return self._error(request, headers, exc.status, exc.message, exc.code)
            try:
                return await self._run(request, headers, f"task {task_id}", fn, task_input)
            finally:
                for file in files:
                    file.close()
        if is_octet_stream(content_type):
            stream = BodyStream(request)
            return await self._run(request, headers, f"task {task_id}", fn, stream)
        body = await self._json_body(request, headers)
        if isinstance(body, Response):
            return body
        task_input = body
        if isinstance(body, dict) and "input" in body:
            task_input = body["input"]
        return await self._run(request, headers, f"task {task_id}", fn, task_input)

    async def _event(
        self, request: Request, headers: list[tuple[str, str]], event_id: str
    ) -> Response:
        listeners = self._gate(
            request, headers, "Event", event_id, self._allowed_events, self._events
        )
        if isinstance(listeners, Response):
            return listeners
        body = await self._json_body(request, headers)
        if isinstance(body, Response):
            return body
        payload = body.get("payload", UNDEFINED) if isinstance(body, dict) else UNDEFINED
        return_payload = isinstance(body, dict) and _js_truthy(body.get("returnPayload"))

        async def emit(value: Any) -> Any:
            for listener in listeners:
                changed = await listener(value)
                if changed is not None:
                    value = changed
            return value

        response = await self._run(request, headers, f"event {event_id}", emit, payload)
        if not return_payload and response.status == 200:
            return self._json(request, headers, 200, {"ok": True})
        return response

    # -- the pieces ---------------------------------------------------------------------------

    def _authenticate(self, request: Request, headers: list[tuple[str, str]]) -> Response | None:
        if not self._tokens:
            if self.allow_anonymous:
                return None
            return self._error(
                request, headers, 500, "Authentication not configured.", "AUTH_NOT_CONFIGURED"
            )
        provided = _digest(request.header(self.auth_header) or "")
        match = False
        for expected in self._tokens:  # every token, so the time taken says nothing
            match |= hmac.compare_digest(expected, provided)
        if match:
            return None
        log.warning(
            "task request refused (unauthorized): %s %s request id %s",
            request.method,
            printable(request.path),
            headers[0][1],
        )
        return self._error(request, headers, 401, "Unauthorized", "UNAUTHORIZED")

    async def _json_body(self, request: Request, headers: list[tuple[str, str]]) -> Any:
        """The decoded body (``UNDEFINED`` when empty), or the error answer."""
        try:
            raw = await request.read_body(limit=self.max_json_body)
        except BodyTooLarge:
            return self._error(request, headers, 413, "Payload too large", "PAYLOAD_TOO_LARGE")
        except BodyTimeout:
            return self._error(request, headers, 408, "Request Timeout", "REQUEST_TIMEOUT")
        except BodyError:
            raise  # the peer broke the framing or left: the HTTP layer ends the connection
        if not raw:
            return UNDEFINED
        try:
            return serializer.loads(raw)
        except SerializationError:
            return self._error(request, headers, 400, "Invalid JSON body", "INVALID_JSON")

    async def _run(
        self,
        request: Request,
        headers: list[tuple[str, str]],
        what: str,
        fn: Callable[[Any], Awaitable[Any]],
        value: Any,
    ) -> Response:
        def timed_out() -> Response:
            log.warning("%s timed out after %s s", printable(what), self.task_timeout)
            return self._error(request, headers, 504, f"{what} timed out", "TIMEOUT")

        try:
            # the bound closes the connection when it fires (a timeout is rare; a scope per
            # request would cost every request)
            result = await request.bounded(self.task_timeout, fn, value, timed_out)
        except TaskError as exc:
            return self._typed_error(request, headers, exc)
        except (BodyTooLarge, BodyTimeout, BodyError) as exc:
            if request.aborted:
                # the task read this request's body (an octet stream) and the peer sent
                # too much, too slowly or malformed: the peer's mistake, not the task's
                return self._refused_body(request, headers, what, exc)
            log.exception("%s failed (request id %s)", printable(what), headers[0][1])
            return self._error(request, headers, 500, "Internal Error", "INTERNAL_ERROR")
        except Exception as exc:
            typed = _only_task_error(exc)
            if typed is not None:
                return self._typed_error(request, headers, typed)
            log.exception("%s failed (request id %s)", printable(what), headers[0][1])
            return self._error(request, headers, 500, "Internal Error", "INTERNAL_ERROR")
        return self._json(request, headers, 200, {"ok": True, "result": result})

    def _refused_body(
        self,
        request: Request,
        headers: list[tuple[str, str]],
        what: str,
        exc: BodyTooLarge | BodyTimeout | BodyError,
    ) -> Response:
        """The answer to a body the task was reading and the HTTP layer refused: the same
        as for a JSON body (413, 408; a malformed body or a peer gone ends the connection
        with the HTTP layer's 400). The connection closes after it either way."""
        log.warning(
            "%s: request body refused: %s (request id %s)",
            printable(what),
            printable(str(exc)),
            headers[0][1],
        )
        if isinstance(exc, BodyTooLarge):
            return self._error(request, headers, 413, "Payload too large", "PAYLOAD_TOO_LARGE")
        if isinstance(exc, BodyTimeout):
            return self._error(request, headers, 408, "Request Timeout", "REQUEST_TIMEOUT")
        raise exc

    def _typed_error(
        self, request: Request, headers: list[tuple[str, str]], exc: TaskError
    ) -> Response:
        error: dict[str, Any] = {"message": exc.message, "code": "INTERNAL_ERROR"}
        if exc.id is not None:
            error["id"] = exc.id
        if exc.data is not UNDEFINED:
            error["data"] = exc.data
        if exc.http_code is not None:
            error["httpCode"] = exc.http_code
        try:
            return self._json(request, headers, exc.http_code or 500, {"ok": False, "error": error})
        except SerializationError:
            log.exception("typed error data cannot be written (request id %s)", headers[0][1])
            return self._error(request, headers, 500, "Internal Error", "INTERNAL_ERROR")

    def _request_id(self, request: Request) -> str:
        given = request.header(REQUEST_ID_HEADER)
        if given is not None:
            given = given.strip()
            if _REQUEST_ID.fullmatch(given):
                return given
        return _fresh_request_id()

    def _cors_headers(self, request: Request) -> Iterable[tuple[str, str]]:
        cors = self.cors
        if cors is None:
            return _ANY_ORIGIN
        out: list[tuple[str, str]] = []
        origin = request.header("origin")
        if cors.origins is None:
            if not cors.credentials:
                out.append(("access-control-allow-origin", "*"))
            else:
                out.append(("vary", "Origin"))
        else:
            out.append(("vary", "Origin"))
            if origin is not None and origin in cors.origins:
                out.append(("access-control-allow-origin", origin))
        if cors.credentials:
            out.append(("access-control-allow-credentials", "true"))
        return out

    def _preflight(self, request: Request) -> Response:
        headers = list(self._cors_headers(request))
        headers.append(("access-control-allow-methods", "POST, OPTIONS"))
        cors = self.cors
        if cors is not None and cors.allowed_headers:
            allowed = ", ".join(cors.allowed_headers)
        else:
            allowed = request.header("access-control-request-headers") or ""
        if allowed:
            headers.append(("access-control-allow-headers", allowed))
        if cors is not None and cors.max_age is not None:
            headers.append(("access-control-max-age", str(cors.max_age)))
        return Response(204, headers, b"")

    def _json(
        self, request: Request, headers: Iterable[tuple[str, str]], status: int, body: object
    ) -> Response:
        try:
            data = serializer.dumps_bytes(body)
        except SerializationError:
            if status != 200:
                raise
            log.exception("a result cannot be written as Runner JSON")
            status = 500
            data = serializer.dumps_bytes(
                {"ok": False, "error": {"message": "Internal Error", "code": "INTERNAL_ERROR"}}
            )
        out = [*_ANSWER_HEADERS, *headers, *self._cors_headers(request)]
        if self.cors is not None and self.cors.exposed_headers:
            out.append(("access-control-expose-headers", ", ".join(self.cors.exposed_headers)))
        return Response(status, out, data)

    def _error(
        self,
        request: Request,
        headers: Iterable[tuple[str, str]],
        status: int,
        message: str,
        code: str,
    ) -> Response:
        return self._json(
            request, headers, status, {"ok": False, "error": {"message": message, "code": code}}
        )


def _only_task_error(exc: BaseException) -> TaskError | None:
    """The :class:`TaskError` an exception group holds as its only leaf: a task that runs
    its work in a nursery gets what a child raised wrapped in a group (Trio's strict
    groups), and the caller should still get the typed error. A group of several failures
    is no one typed error: ``None``."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc if isinstance(exc, TaskError) else None


def _check_async(fn: Callable[..., Any]) -> None:
    if not callable(fn):
        raise TypeError(f"{fn!r} is not callable")
    target = getattr(fn, "__call__", None) if not inspect.isroutine(fn) else fn  # noqa: B004
    if not (inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(target)):
        raise TypeError(f"{getattr(fn, '__name__', fn)!r} must be an async function")
