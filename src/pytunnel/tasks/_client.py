"""A client of Runner's HTTP exposure protocol: calls tasks and emits events on a Runner
server (Node's ``nodeExposure``, or a :class:`~pytunnel.tasks.TaskServer`).

The requests are the ones Runner's own ``createHttpClient`` sends (``{"input": ...}``,
``{"payload": ...}``, ``returnPayload``, the typed JSON, the token header), so a server
cannot tell the two apart. HTTP is httpx's: keep-alive pooling, chunked framing, TLS; on Trio
through anyio, and a plain thread-blocking form (:class:`SyncTaskClient`) for code without an
event loop. Redirects are never followed, so the token is never sent anywhere else.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import TracebackType
from typing import Any
from urllib.parse import quote

import attrs
import httpx

from . import serializer
from .errors import (
    ConnectionFailedError,
    HttpStatusError,
    InvalidResponseError,
    TaskCallError,
    TaskTimeoutError,
    call_error,
)
from .serializer import UNDEFINED, SerializationError

__all__ = ["Discovery", "SyncTaskClient", "TaskClient"]

REQUEST_ID_HEADER = "x-runner-request-id"


@attrs.frozen
class Discovery:
    """What a server exposes (its allow-list)."""

    enabled: bool
    tasks: tuple[str, ...]
    events: tuple[str, ...]


class _Protocol:
    """The requests and the reading of answers, shared by both client forms."""

    def __init__(
        self, base_url: str, token: str | None, auth_header: str, headers: Mapping[str, str]
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must be an http(s) URL, not {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.headers = {"content-type": "application/json; charset=utf-8", **headers}
        if token:
            self.headers[auth_header.lower()] = token

    def url(self, kind: str, ident: str) -> str:
        return f"{self.base_url}/{kind}/{quote(ident, safe='')}"  # encodeURIComponent

    @staticmethod
    def body(value: object) -> bytes:
        return serializer.dumps_bytes(value)

    @staticmethod
    def result(response: httpx.Response, *, want_result: bool = True) -> Any:
        request_id = response.headers.get(REQUEST_ID_HEADER)
        text = response.content
        try:
            envelope = serializer.loads(text) if text else UNDEFINED
        except SerializationError:
            envelope = UNDEFINED
        if not isinstance(envelope, dict):
            if not response.is_success:
                raise HttpStatusError(
                    f"HTTP {response.status_code} {response.reason_phrase}".rstrip(),
                    status=response.status_code,
                    request_id=request_id,
                )
            raise InvalidResponseError(
                "the answer is not a Runner envelope",
                status=response.status_code,
                request_id=request_id,
            )
        if envelope.get("ok") is True:
            if want_result and "result" not in envelope:
                raise InvalidResponseError(
                    "the server did not include the result",
                    status=response.status_code,
                    request_id=request_id,
                )
            return envelope.get("result", UNDEFINED)
        error = envelope.get("error")
        if not isinstance(error, dict) or not isinstance(error.get("message"), str):
            raise InvalidResponseError(
                "the error answer has no message",
                status=response.status_code,
                request_id=request_id,
            )
        code = error.get("code")
        ident = error.get("id")
        raise call_error(
            response.status_code,
            error["message"],
            code if isinstance(code, str) else None,
            id=ident if isinstance(ident, str) else None,
            data=error.get("data", UNDEFINED),
            request_id=request_id,
        )

    @staticmethod
    def discovery(result: Any, status: int) -> Discovery:
        allow = result.get("allowList") if isinstance(result, dict) else None
        if not isinstance(allow, dict):
            raise InvalidResponseError("discovery without an allow-list", status=status)
        return Discovery(
            bool(allow.get("enabled")),
            tuple(str(t) for t in allow.get("tasks", ())),
            tuple(str(e) for e in allow.get("events", ())),
        )


#: a call's ``timeout`` when none is given: the client's own
_CLIENT_DEFAULT: Any = httpx.USE_CLIENT_DEFAULT


def _connection_failed(exc: httpx.TransportError) -> TaskCallError:
    """The typed error of a call that got no answer: :class:`TaskTimeoutError` when the
    client stopped waiting (so a caller catches every timeout, the server's 504 and its
    own, as one), else :class:`ConnectionFailedError`; ``status`` 0 for both."""
    if isinstance(exc, httpx.TimeoutException):
        return TaskTimeoutError(f"no answer in time ({type(exc).__name__})", status=0)
    return ConnectionFailedError(f"{type(exc).__name__}: {exc}", status=0)


def _timeout(seconds: float | None) -> Any:
    return _CLIENT_DEFAULT if seconds is None else seconds


class TaskClient:
    """An async client (Trio or asyncio) of a Runner HTTP exposure at ``base_url``
    (``http://host:port/__runner``). Use it as ``async with`` or call :meth:`aclose`.

    ``timeout`` bounds each call (connecting, sending, each wait for the answer), unless the
    call gives its own ``timeout=``; a call that runs out of it raises
    :class:`TaskTimeoutError` with ``status`` 0."""

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        auth_header: str = "x-runner-token",
        timeout: float = 30.0,
        headers: Mapping[str, str] | None = None,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self._p = _Protocol(base_url, token, auth_header, headers or {})
        self._owns_http = http is None
        self._http = http or httpx.AsyncClient(timeout=timeout, follow_redirects=False)

    async def __aenter__(self) -> TaskClient:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def _post(self, url: str, body: object, timeout: float | None) -> httpx.Response:
        try:
            return await self._http.post(
                url, content=self._p.body(body), headers=self._p.headers, timeout=_timeout(timeout)
            )
        except httpx.TransportError as exc:
            raise _connection_failed(exc) from exc

    async def task(
        self, task_id: str, input: Any = UNDEFINED, *, timeout: float | None = None
    ) -> Any:
        """Run a task and return its result (typed JSON decoded). ``timeout``: this call's
        bound in seconds (default: the client's); past it, :class:`TaskTimeoutError`."""
        response = await self._post(self._p.url("task", task_id), {"input": input}, timeout)
        return self._p.result(response)

    async def event(
        self, event_id: str, payload: Any = UNDEFINED, *, timeout: float | None = None
    ) -> None:
        """Emit an event."""
        body = {"payload": payload}
        response = await self._post(self._p.url("event", event_id), body, timeout)
        self._p.result(response, want_result=False)

    async def event_with_result(
        self, event_id: str, payload: Any = UNDEFINED, *, timeout: float | None = None
    ) -> Any:
        """Emit an event and return the payload as its listeners left it."""
        body = {"payload": payload, "returnPayload": True}
        response = await self._post(self._p.url("event", event_id), body, timeout)
        return self._p.result(response)

    async def discovery(self, *, timeout: float | None = None) -> Discovery:
        """What the server exposes."""
        try:
            response = await self._http.get(
                f"{self._p.base_url}/discovery", headers=self._p.headers, timeout=_timeout(timeout)
            )
        except httpx.TransportError as exc:
            raise _connection_failed(exc) from exc
        return self._p.discovery(self._p.result(response), response.status_code)


class SyncTaskClient:
    """:class:`TaskClient` for code without an event loop (each call blocks)."""

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        auth_header: str = "x-runner-token",
        timeout: float = 30.0,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self._p = _Protocol(base_url, token, auth_header, headers or {})
        self._http = httpx.Client(timeout=timeout, follow_redirects=False)

    def __enter__(self) -> SyncTaskClient:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _post(self, url: str, body: object, timeout: float | None) -> httpx.Response:
        try:
            return self._http.post(
                url, content=self._p.body(body), headers=self._p.headers, timeout=_timeout(timeout)
            )
        except httpx.TransportError as exc:
            raise _connection_failed(exc) from exc

    def task(self, task_id: str, input: Any = UNDEFINED, *, timeout: float | None = None) -> Any:
        url = self._p.url("task", task_id)
        return self._p.result(self._post(url, {"input": input}, timeout))

    def event(
        self, event_id: str, payload: Any = UNDEFINED, *, timeout: float | None = None
    ) -> None:
        url = self._p.url("event", event_id)
        self._p.result(self._post(url, {"payload": payload}, timeout), want_result=False)

    def event_with_result(
        self, event_id: str, payload: Any = UNDEFINED, *, timeout: float | None = None
    ) -> Any:
        body = {"payload": payload, "returnPayload": True}
        return self._p.result(self._post(self._p.url("event", event_id), body, timeout))

    def discovery(self, *, timeout: float | None = None) -> Discovery:
        try:
            response = self._http.get(
                f"{self._p.base_url}/discovery", headers=self._p.headers, timeout=_timeout(timeout)
            )
        except httpx.TransportError as exc:
            raise _connection_failed(exc) from exc
        return self._p.discovery(self._p.result(response), response.status_code)
