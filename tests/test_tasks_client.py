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
    AuthNotConfiguredError,
    ConnectionFailedError,
    Discovery,
    ForbiddenError,
    HttpStatusError,
    InternalError,
    InvalidJsonError,
    InvalidResponseError,
    NotFoundError,
    PayloadTooLargeError,
    RegExp,
    SyncTaskClient,
    TaskClient,
    TaskError,
    TaskServer,
    TaskTimeoutError,
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


def test_a_server_alone_does_not_load_the_client() -> None:
    """httpx is the client's: a process that only serves tasks never imports it."""
    import subprocess
    import sys

    code = (
        "import sys, pytunnel.tasks as t; s = t.TaskServer(token='x'); "
        "assert 'httpx' not in sys.modules; t.TaskClient; assert 'httpx' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.fixture
async def edge_base(nursery: trio.Nursery) -> str:
    """A server whose limits are small enough to reach: 256-byte JSON bodies, 0.5 s tasks."""
    server = TaskServer(token=TOKEN, max_json_body=256, task_timeout=0.5)

    @server.task("echo")
    async def echo(value: Any) -> Any:
        return value

    @server.task("slow")
    async def slow(value: Any) -> Any:
        await trio.sleep_forever()

    listeners = await nursery.start(functools.partial(server.serve, "127.0.0.1", 0))
    return f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}/__runner"


async def test_every_protocol_error_a_client_can_meet_is_typed(
    edge_base: str, nursery: trio.Nursery
) -> None:
    """From real servers: 413, 400 (a RegExp the server refuses), 504, 500
    AUTH_NOT_CONFIGURED, each its class with its status and code."""
    async with TaskClient(edge_base, token=TOKEN) as client:
        with pytest.raises(PayloadTooLargeError) as large:
            await client.task("echo", "x" * 1000)
        assert (large.value.status, large.value.code) == (413, "PAYLOAD_TOO_LARGE")
        with pytest.raises(InvalidJsonError) as invalid:
            await client.task("echo", RegExp("a", "q"))
        assert (invalid.value.status, invalid.value.code) == (400, "INVALID_JSON")
        with pytest.raises(TaskTimeoutError) as timed_out:
            await client.task("slow")
        assert (timed_out.value.status, timed_out.value.code) == (504, "TIMEOUT")
        assert await client.task("echo", "still served") == "still served"
    unconfigured = TaskServer()
    listeners = await nursery.start(functools.partial(unconfigured.serve, "127.0.0.1", 0))
    port = listeners[0].socket.getsockname()[1]
    async with TaskClient(f"http://127.0.0.1:{port}/__runner", token=TOKEN) as client:
        with pytest.raises(AuthNotConfiguredError) as auth:
            await client.discovery()
        assert (auth.value.status, auth.value.code) == (500, "AUTH_NOT_CONFIGURED")


async def test_a_call_bounded_by_its_own_timeout(nursery: trio.Nursery) -> None:
    """A call's ``timeout=`` bounds it alone: past it, TaskTimeoutError with status 0 (the
    client stopped waiting); the same client's next call has the client's bound."""
    server = TaskServer(token=TOKEN)
    release = trio.Event()

    @server.task("wait")
    async def wait(value: Any) -> Any:
        if value == "forever":
            await release.wait()
        return value

    listeners = await nursery.start(functools.partial(server.serve, "127.0.0.1", 0))
    base = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}/__runner"
    async with TaskClient(base, token=TOKEN, timeout=60) as client:
        with pytest.raises(TaskTimeoutError) as timed_out:
            await client.task("wait", "forever", timeout=0.3)
        assert (timed_out.value.status, timed_out.value.code) == (0, "TIMEOUT")
        assert await client.task("wait", "now") == "now"
        assert (await client.discovery(timeout=30)).tasks == ("wait",)

    def sync_calls() -> tuple[Any, ...]:
        with SyncTaskClient(base, token=TOKEN, timeout=60) as client:
            try:
                client.task("wait", "forever", timeout=0.3)
            except TaskTimeoutError as exc:
                error: Any = exc
            return error.status, error.code, client.task("wait", "now", timeout=30)

    assert await trio.to_thread.run_sync(sync_calls) == (0, "TIMEOUT", "now")
    release.set()
