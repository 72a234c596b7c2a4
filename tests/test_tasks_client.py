"""The task client (async and sync) against a real TaskServer over loopback, and against
servers that do not speak the protocol; every error answer is its typed error."""

from __future__ import annotations

import datetime as dt
import functools
from typing import Any

import pytest
import trio
from helpers import closed_port

from pytunnel._http import Request, Response, serve_http
from pytunnel.tasks import (
    UNDEFINED,
    ConnectionFailedError,
    Discovery,
    ForbiddenError,
    HttpStatusError,
    InternalError,
    InvalidResponseError,
    NotFoundError,
    SyncTaskClient,
    TaskClient,
    TaskError,
    TaskServer,
    UnauthorizedError,
)

TOKEN = "client-token"
UTC = dt.timezone.utc


def build() -> TaskServer:
    server = TaskServer(token=TOKEN)

    @server.task("math.add")
    async def add(value: Any) -> Any:
        return value["a"] + value["b"]

    @server.task("app/echo")
    async def echo(value: Any) -> Any:
        return value

    @server.task("typed")
    async def typed(value: Any) -> Any:
        raise TaskError("nope", id="app.errors.nope", data={"why": "because"}, http_code=422)

    @server.task("boom")
    async def boom(value: Any) -> Any:
        raise RuntimeError("hidden")

    @server.event("ev")
    async def listener(payload: Any) -> Any:
        return {"seen": payload}

    server.expose_task("ghost")
    return server


@pytest.fixture
async def base(nursery: trio.Nursery) -> str:
    listeners = await nursery.start(functools.partial(build().serve, "127.0.0.1", 0))
    return f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}/__runner/"


async def test_calls(base: str) -> None:
    when = dt.datetime(2030, 1, 2, 3, 4, 5, 6000, tzinfo=UTC)
    async with TaskClient(base, token=TOKEN) as client:
        assert await client.task("math.add", {"a": 1, "b": 2}) == 3
        assert await client.task("app/echo", {"when": when, "set": {1, 2}}) == {
            "when": when,
            "set": {1, 2},
        }
        assert await client.task("app/echo") is UNDEFINED
        await client.event("ev", {"x": 1})
        assert await client.event_with_result("ev", 5) == {"seen": 5}
        assert await client.discovery() == Discovery(
            True, ("math.add", "app/echo", "typed", "boom", "ghost"), ("ev",)
        )


async def test_typed_errors(base: str) -> None:
    async with TaskClient(base, token=TOKEN) as client:
        with pytest.raises(ForbiddenError) as forbidden:
            await client.task("missing")
        assert forbidden.value.status == 403
        assert forbidden.value.message == "Task missing not exposed"
        assert forbidden.value.request_id
        with pytest.raises(NotFoundError):
            await client.task("ghost")
        with pytest.raises(InternalError) as typed:
            await client.task("typed")
        assert (typed.value.status, typed.value.id, typed.value.data) == (
            422,
            "app.errors.nope",
            {"why": "because"},
        )
        with pytest.raises(InternalError) as boom:
            await client.task("boom")
        assert boom.value.message == "Internal Error"
    async with TaskClient(base, token="wrong") as client:
        with pytest.raises(UnauthorizedError):
            await client.discovery()


async def test_connection_refused_is_typed() -> None:
    async with TaskClient(f"http://127.0.0.1:{closed_port()}/__runner", token=TOKEN) as client:
        with pytest.raises(ConnectionFailedError) as failed:
            await client.task("x")
    assert failed.value.status == 0


async def test_answers_that_are_not_the_protocol(nursery: trio.Nursery) -> None:
    async def handler(request: Request) -> Response:
        if request.path.endswith("/proxy"):
            return Response.text(502, "<html>bad gateway</html>")
        if request.path.endswith("/redirect"):
            return Response(302, [("location", "http://127.0.0.1:1/steal")])
        if request.path.endswith("/nomsg"):
            return Response.json(400, {"ok": False, "error": {"code": "X"}})
        if request.path.endswith("/noresult"):
            return Response.json(200, {"ok": True})
        return Response.text(200, "hello")

    listeners = await nursery.start(functools.partial(serve_http, handler, "127.0.0.1", 0))
    base = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}/__runner"
    async with TaskClient(base, token=TOKEN) as client:
        with pytest.raises(HttpStatusError) as proxy:
            await client.task("proxy")
        assert proxy.value.status == 502
        with pytest.raises(HttpStatusError):
            await client.task("redirect")  # never followed: the token stays here
        with pytest.raises(InvalidResponseError):
            await client.task("plain")
        with pytest.raises(InvalidResponseError):
            await client.task("nomsg")
        with pytest.raises(InvalidResponseError):
            await client.task("noresult")
        await client.event("noresult")  # an event answer has no result


def test_base_url_must_be_http() -> None:
    with pytest.raises(ValueError, match="http"):
        TaskClient("ftp://x")


async def test_sync_client(base: str) -> None:
    def calls() -> tuple[Any, ...]:
        with SyncTaskClient(base, token=TOKEN) as client:
            added = client.task("math.add", {"a": 20, "b": 22})
            client.event("ev", 1)
            seen = client.event_with_result("ev", 2)
            found = client.discovery()
            try:
                client.task("missing")
            except ForbiddenError as exc:
                error: Any = exc
            return added, seen, found.tasks[0], error.code

    assert await trio.to_thread.run_sync(calls) == (42, {"seen": 2}, "math.add", "FORBIDDEN")


def test_sync_client_connection_refused() -> None:
    with (
        SyncTaskClient(f"http://127.0.0.1:{closed_port()}", token=TOKEN) as client,
        pytest.raises(ConnectionFailedError),
    ):
        client.discovery()
