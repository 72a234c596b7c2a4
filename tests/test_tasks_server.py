"""The task server's protocol rules over real sockets: routing, the order of the checks, each
status and code, headers, request ids, CORS, body limits while streaming, chunked bodies,
typed errors, timeouts, and nothing leaked by bad input."""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import json
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import h11
import httpx
import pytest
import trio
import trio.testing
from helpers import count_fds, count_tasks, describe_tasks, wait_until

from pytunnel.tasks import UNDEFINED, CorsConfig, TaskError, TaskServer
from pytunnel.tasks import serializer as ser

TOKEN = "task-token-1"
UTC = dt.timezone.utc


def make_server(**kw: Any) -> TaskServer:
    kw.setdefault("token", TOKEN)
    server = TaskServer(**kw)

    @server.task("math.add")
    async def add(value: Any) -> Any:
        return value["a"] + value["b"]

    @server.task("echo")
    async def echo(value: Any) -> Any:
        return {"got": value, "undefined": value is UNDEFINED}

    @server.task("a/b")
    async def slashed(value: Any) -> Any:
        return "slashed"

    @server.task("boom")
    async def boom(value: Any) -> Any:
        raise RuntimeError("secret detail /etc/passwd")

    @server.task("typed")
    async def typed(value: Any) -> Any:
        raise TaskError("Out of stock", id="app.errors.stock", data={"left": 0}, http_code=409)

    @server.task("typed500")
    async def typed500(value: Any) -> Any:
        raise TaskError("Plain typed", id="app.errors.plain")

    @server.task("slow")
    async def slow(value: Any) -> Any:
        await trio.sleep_forever()

    @server.task("unwritable")
    async def unwritable(value: Any) -> Any:
        return object()

    @server.task("hidden", expose=False)
    async def hidden(value: Any) -> Any:
        return "hidden"

    server.expose_task("ghost")  # allow-listed, never registered

    seen: list[Any] = []

    @server.event("app.events.ping")
    async def first(payload: Any) -> Any:
        seen.append(payload)
        if isinstance(payload, dict):
            return {**payload, "first": True}
        return None

    @server.event("app.events.ping")
    async def second(payload: Any) -> Any:
        if isinstance(payload, dict):
            return {**payload, "second": True}
        return None

    server.seen = seen  # type: ignore[attr-defined]
    return server


@pytest.fixture
async def base(nursery: trio.Nursery) -> str:
    server = make_server(task_timeout=1.0)
    listeners = await nursery.start(functools.partial(server.serve, "127.0.0.1", 0))
    port = listeners[0].socket.getsockname()[1]
    return f"http://127.0.0.1:{port}/__runner"


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=20) as client:
        yield client


AUTH = {"x-runner-token": TOKEN}


def body_of(response: httpx.Response) -> Any:
    assert response.headers["content-type"] == "application/json; charset=utf-8"
    return ser.loads(response.content)


def error_of(response: httpx.Response) -> tuple[int, str, str]:
    body = body_of(response)
    assert body["ok"] is False
    return response.status_code, body["error"]["code"], body["error"]["message"]


async def test_task_call_and_result(base: str, http: httpx.AsyncClient) -> None:
    r = await http.post(f"{base}/task/math.add", json={"input": {"a": 2, "b": 3}}, headers=AUTH)
    assert r.status_code == 200
    assert body_of(r) == {"ok": True, "result": 5}
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["x-frame-options"] == "DENY"
    assert r.headers["access-control-allow-origin"] == "*"


async def test_input_forms(base: str, http: httpx.AsyncClient) -> None:
    async def call(content: bytes) -> Any:
        r = await http.post(f"{base}/task/echo", content=content, headers=AUTH)
        assert r.status_code == 200
        return body_of(r)["result"]

    assert await call(b"") == {"got": UNDEFINED, "undefined": True}
    assert await call(b'{"input": 7}') == {"got": 7, "undefined": False}
    assert await call(b'{"other": 7}') == {"got": {"other": 7}, "undefined": False}
    assert await call(b"[1, 2]") == {"got": [1, 2], "undefined": False}
    assert await call(b"5") == {"got": 5, "undefined": False}
    assert await call(b'{"input": null}') == {"got": None, "undefined": False}
    when = dt.datetime(2024, 5, 6, 7, 8, 9, 123000, tzinfo=UTC)
    typed = ser.dumps({"input": {"when": when, "s": {1}}}).encode()
    assert await call(typed) == {"got": {"when": when, "s": {1}}, "undefined": False}


async def test_peer_values_that_utf8_or_utc_cannot_hold_get_protocol_answers(
    base: str, http: httpx.AsyncClient
) -> None:
    """A lone surrogate (``"\\ud800"`` is valid JSON) echoed back, and a Date at the edge of
    Python's range with an offset, are each a JSON answer, not a bare plain-text 500."""
    r = await http.post(f"{base}/task/echo", content=b'{"input":"a\\ud800"}', headers=AUTH)
    assert r.status_code == 200
    assert b'"a\\ud800"' in r.content
    assert body_of(r)["result"]["got"] == "a\ud800"
    edge = b'{"input":{"__type":"Date","value":"0001-01-01T00:00:00+05:00"}}'
    r = await http.post(f"{base}/task/echo", content=edge, headers=AUTH)
    assert error_of(r)[:2] == (400, "INVALID_JSON")
    assert "x-runner-request-id" in r.headers


async def test_id_is_percent_decoded_and_may_hold_slashes(
    base: str, http: httpx.AsyncClient
) -> None:
    for path in ("a%2Fb", "a/b", "a//b"):
        r = await http.post(f"{base}/task/{path}", headers=AUTH)
        assert body_of(r) == {"ok": True, "result": "slashed"}, path


@pytest.mark.parametrize("path", ["/task/%E0%A4%A", "/task/%zz", "/task/%C3%28"])
async def test_invalid_percent_encoding_is_404(
    base: str, http: httpx.AsyncClient, path: str
) -> None:
    r = await http.post(base + path, headers=AUTH)
    assert error_of(r) == (404, "NOT_FOUND", "Not Found")


@pytest.mark.parametrize("path", ["", "/", "/task", "/task/", "/nope/x", "/event"])
async def test_unknown_routes_under_the_base_are_404(
    base: str, http: httpx.AsyncClient, path: str
) -> None:
    r = await http.post(base + path, headers=AUTH)
    assert error_of(r)[:2] == (404, "NOT_FOUND")
    assert "x-runner-request-id" in r.headers


async def test_outside_the_base_is_404_without_request_id(
    base: str, http: httpx.AsyncClient
) -> None:
    r = await http.get(base.replace("/__runner", "/elsewhere"))
    assert error_of(r)[:2] == (404, "NOT_FOUND")
    assert "x-runner-request-id" not in r.headers
    r = await http.get(base + "x/discovery", headers=AUTH)  # /__runnerx is not under /__runner
    assert r.status_code == 404


async def test_check_order_method_auth_allowlist_registry_body(
    base: str, http: httpx.AsyncClient
) -> None:
    # method before auth
    assert error_of(await http.get(f"{base}/task/nothing"))[:2] == (405, "METHOD_NOT_ALLOWED")
    assert error_of(await http.put(f"{base}/event/nothing"))[:2] == (405, "METHOD_NOT_ALLOWED")
    # auth before the allow-list
    assert error_of(await http.post(f"{base}/task/nothing"))[:2] == (401, "UNAUTHORIZED")
    bad = {"x-runner-token": TOKEN + "x"}
    assert error_of(await http.post(f"{base}/task/math.add", headers=bad))[:2] == (
        401,
        "UNAUTHORIZED",
    )
    # the allow-list before the registry (fails closed: registered but hidden is 403)
    assert error_of(await http.post(f"{base}/task/nothing", headers=AUTH)) == (
        403,
        "FORBIDDEN",
        "Task nothing not exposed",
    )
    assert error_of(await http.post(f"{base}/task/hidden", headers=AUTH))[:2] == (
        403,
        "FORBIDDEN",
    )
    assert error_of(await http.post(f"{base}/event/nothing", headers=AUTH)) == (
        403,
        "FORBIDDEN",
        "Event nothing not exposed",
    )
    # the registry before the body
    assert error_of(await http.post(f"{base}/task/ghost", content=b"{", headers=AUTH)) == (
        404,
        "NOT_FOUND",
        "Task ghost not found",
    )
    # then the body
    r = await http.post(f"{base}/task/echo", content=b"{", headers=AUTH)
    assert error_of(r) == (400, "INVALID_JSON", "Invalid JSON body")


async def test_unknown_type_is_invalid_json(base: str, http: httpx.AsyncClient) -> None:
    r = await http.post(
        f"{base}/task/echo", content=b'{"input": {"__type": "Nope", "value": 1}}', headers=AUTH
    )
    assert error_of(r)[:2] == (400, "INVALID_JSON")


async def test_discovery(base: str, http: httpx.AsyncClient) -> None:
    r = await http.get(f"{base}/discovery", headers=AUTH)
    assert body_of(r) == {
        "ok": True,
        "result": {
            "allowList": {
                "enabled": True,
                "tasks": [
                    "math.add",
                    "echo",
                    "a/b",
                    "boom",
                    "typed",
                    "typed500",
                    "slow",
                    "unwritable",
                    "ghost",
                ],
                "events": ["app.events.ping"],
            }
        },
    }
    assert error_of(await http.post(f"{base}/discovery", headers=AUTH))[:2] == (
        405,
        "METHOD_NOT_ALLOWED",
    )
    r = await http.head(f"{base}/discovery", headers=AUTH)
    assert r.status_code == 405
    assert r.content == b""
    assert error_of(await http.get(f"{base}/discovery"))[:2] == (401, "UNAUTHORIZED")


async def test_events_with_and_without_payload(base: str, http: httpx.AsyncClient) -> None:
    r = await http.post(f"{base}/event/app.events.ping", json={"payload": {"n": 1}}, headers=AUTH)
    assert body_of(r) == {"ok": True}
    r = await http.post(
        f"{base}/event/app.events.ping",
        json={"payload": {"n": 2}, "returnPayload": True},
        headers=AUTH,
    )
    assert body_of(r) == {"ok": True, "result": {"n": 2, "first": True, "second": True}}
    r = await http.post(f"{base}/event/app.events.ping", content=b"", headers=AUTH)
    assert body_of(r) == {"ok": True}
    r = await http.post(f"{base}/event/app.events.ping", json={"returnPayload": 1}, headers=AUTH)
    assert body_of(r) == {"ok": True, "result": UNDEFINED}


async def test_internal_error_is_opaque_and_logged(
    base: str, http: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="pytunnel.tasks"):
        r = await http.post(f"{base}/task/boom", headers=AUTH)
    assert error_of(r) == (500, "INTERNAL_ERROR", "Internal Error")
    assert b"secret" not in r.content
    assert "secret detail" in caplog.text
    r = await http.post(f"{base}/task/unwritable", headers=AUTH)
    assert error_of(r) == (500, "INTERNAL_ERROR", "Internal Error")
    # the server lives on
    r = await http.post(f"{base}/task/math.add", json={"input": {"a": 1, "b": 1}}, headers=AUTH)
    assert body_of(r)["result"] == 2


async def test_typed_application_errors(base: str, http: httpx.AsyncClient) -> None:
    r = await http.post(f"{base}/task/typed", headers=AUTH)
    assert r.status_code == 409
    assert body_of(r) == {
        "ok": False,
        "error": {
            "message": "Out of stock",
            "code": "INTERNAL_ERROR",
            "id": "app.errors.stock",
            "data": {"left": 0},
            "httpCode": 409,
        },
    }
    r = await http.post(f"{base}/task/typed500", headers=AUTH)
    assert r.status_code == 500
    assert body_of(r)["error"] == {
        "message": "Plain typed",
        "code": "INTERNAL_ERROR",
        "id": "app.errors.plain",
    }


async def test_results_that_cannot_be_written_are_a_json_500(
    nursery: trio.Nursery, http: httpx.AsyncClient
) -> None:
    """A result (or a typed error's data) the serializer cannot write is the protocol's
    500 JSON answer, never a bare plain-text 500."""
    server = TaskServer(token=TOKEN)

    @server.task("huge.int")
    async def huge(value: Any) -> Any:
        return {"n": 2**20000}

    @server.task("huge.data")
    async def huge_data(value: Any) -> Any:
        raise TaskError("typed", data=2**20000)

    listeners = await nursery.start(functools.partial(server.serve, "127.0.0.1", 0))
    base = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}/__runner"
    for task in ("huge.int", "huge.data"):
        r = await http.post(f"{base}/task/{task}", headers=AUTH)
        assert error_of(r) == (500, "INTERNAL_ERROR", "Internal Error"), task


async def test_typed_error_raised_in_a_nursery_stays_typed(
    nursery: trio.Nursery, http: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    """A task doing its work in a nursery gets a child's TaskError wrapped in an exception
    group (Trio's strict groups): the caller still gets the typed error; a group of several
    failures is the opaque 500."""
    server = TaskServer(token=TOKEN)

    @server.task("nursery.typed")
    async def typed(value: Any) -> Any:
        async def child() -> None:
            raise TaskError("Out of stock", id="app.errors.stock", data={"left": 0}, http_code=409)

        async with trio.open_nursery() as inner:
            inner.start_soon(child)

    @server.task("nursery.two")
    async def two(value: Any) -> Any:
        async def child(message: str) -> None:
            raise TaskError(message)

        async with trio.open_nursery() as inner:
            inner.start_soon(child, "first secret")
            inner.start_soon(child, "second secret")

    listeners = await nursery.start(functools.partial(server.serve, "127.0.0.1", 0))
    base = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}/__runner"
    r = await http.post(f"{base}/task/nursery.typed", headers=AUTH)
    assert r.status_code == 409
    assert body_of(r)["error"] == {
        "message": "Out of stock",
        "code": "INTERNAL_ERROR",
        "id": "app.errors.stock",
        "data": {"left": 0},
        "httpCode": 409,
    }
    with caplog.at_level(logging.ERROR, logger="pytunnel.tasks"):
        r = await http.post(f"{base}/task/nursery.two", headers=AUTH)
    assert error_of(r) == (500, "INTERNAL_ERROR", "Internal Error")
    assert b"secret" not in r.content
    assert "nursery.two failed" in caplog.text


async def test_task_timeout(base: str, http: httpx.AsyncClient) -> None:
    r = await http.post(f"{base}/task/slow", headers=AUTH)
    assert error_of(r)[:2] == (504, "TIMEOUT")


async def _exchange(stream: trio.SocketStream, request: bytes) -> tuple[h11.Response, bytes]:
    """One request on a kept-alive connection, its answer parsed by an h11 client."""
    client = h11.Connection(h11.CLIENT)
    await stream.send_all(request)
    head: h11.Response | None = None
    body = b""
    with trio.fail_after(10):  # a hang detector
        while True:
            event = client.next_event()
            if event is h11.NEED_DATA:
                client.receive_data(bytes(await stream.receive_some()))
            elif isinstance(event, h11.Response):
                head = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                return head, body


def _post(path: str, extra: str = "", body: str = "{}") -> bytes:
    return (
        f"POST /__runner/task/{path} HTTP/1.1\r\nHost: x\r\nx-runner-token: {TOKEN}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n{extra}\r\n{body}"
    ).encode()


async def test_task_timeout_answers_then_closes_and_the_server_lives_on(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    """The task's bound is the connection's own cancel scope, so the connection ends with
    the 504; the tasks of the call are gone, and other connections are served."""
    server = make_server(task_timeout=0.3)

    @server.task("nested")
    async def nested(value: Any) -> Any:
        with trio.move_on_after(0.01):  # the task's own scopes nest inside the bound
            await trio.sleep_forever()
        await trio.lowlevel.checkpoint()
        return "done"

    listeners = await nursery.start(functools.partial(server.serve, "127.0.0.1", 0))
    port = listeners[0].socket.getsockname()[1]
    before = count_tasks()
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        # a task that waits and ends in time leaves the connection reusable
        for _ in range(2):
            head, body = await _exchange(stream, _post("nested", "x-runner-request-id: r1\r\n"))
            assert (head.status_code, ser.loads(body)) == (200, {"ok": True, "result": "done"})
        head, body = await _exchange(stream, _post("slow", "x-runner-request-id: r2\r\n"))
        headers = {k.decode(): v.decode() for k, v in head.headers}
        assert head.status_code == 504
        assert ser.loads(body)["error"]["code"] == "TIMEOUT"
        assert headers["connection"] == "close"
        assert headers["x-runner-request-id"] == "r2"
        assert headers["x-content-type-options"] == "nosniff"
        with trio.fail_after(10):
            assert await stream.receive_some() == b""  # closed after the answer
    assert "task slow timed out after 0.3 s" in caplog.text
    await wait_until(lambda: count_tasks() <= before, 10, describe_tasks)
    async with await trio.open_tcp_stream("127.0.0.1", port) as other:
        head, body = await _exchange(other, _post("math.add", body='{"input":{"a":1,"b":2}}'))
        assert (head.status_code, ser.loads(body)) == (200, {"ok": True, "result": 3})


async def test_request_id_echoed_or_fresh(base: str, http: httpx.AsyncClient) -> None:
    r = await http.post(f"{base}/task/echo", headers={**AUTH, "x-runner-request-id": "abc.1:2-3_"})
    assert r.headers["x-runner-request-id"] == "abc.1:2-3_"
    fresh = []
    for bad in ("has space", "x" * 129, "semi;colon", ""):
        r = await http.post(f"{base}/task/echo", headers={**AUTH, "x-runner-request-id": bad})
        fresh.append(r.headers["x-runner-request-id"])
    r = await http.post(f"{base}/task/nothing")  # errors carry it too
    fresh.append(r.headers["x-runner-request-id"])
    for text in fresh:  # a random UUID, written as Node's randomUUID writes one
        value = uuid.UUID(text)
        assert (value.version, value.variant, str(value)) == (4, uuid.RFC_4122, text)
    assert len(set(fresh)) == len(fresh)


async def test_preflight_before_auth(base: str, http: httpx.AsyncClient) -> None:
    for path in ("/task/math.add", "/event/x", "/discovery", "/whatever"):
        r = await http.options(
            base + path,
            headers={
                "origin": "https://app.example",
                "access-control-request-method": "POST",
                "access-control-request-headers": "content-type, x-runner-token",
            },
        )
        assert r.status_code == 204, path
        assert r.headers["access-control-allow-origin"] == "*"
        assert r.headers["access-control-allow-methods"] == "POST, OPTIONS"
        assert r.headers["access-control-allow-headers"] == "content-type, x-runner-token"
        assert "x-runner-request-id" not in r.headers


async def test_cors_with_explicit_origins(nursery: trio.Nursery, http: httpx.AsyncClient) -> None:
    server = make_server(
        cors=CorsConfig(origins=["https://ok.example"], credentials=True, max_age=600)
    )
    listeners = await nursery.start(functools.partial(server.serve, "127.0.0.1", 0))
    base = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}/__runner"
    r = await http.post(f"{base}/task/echo", headers={**AUTH, "origin": "https://ok.example"})
    assert r.headers["access-control-allow-origin"] == "https://ok.example"
    assert r.headers["access-control-allow-credentials"] == "true"
    assert r.headers["vary"] == "Origin"
    r = await http.post(f"{base}/task/echo", headers={**AUTH, "origin": "https://evil.example"})
    assert "access-control-allow-origin" not in r.headers
    r = await http.options(f"{base}/task/echo", headers={"origin": "https://ok.example"})
    assert r.status_code == 204
    assert r.headers["access-control-max-age"] == "600"
    assert r.headers["access-control-allow-origin"] == "https://ok.example"


async def test_auth_not_configured_and_anonymous(
    nursery: trio.Nursery, http: httpx.AsyncClient
) -> None:
    closed = make_server(token=None)
    open_ = make_server(token=None, allow_anonymous=True)
    ports = []
    for server in (closed, open_):
        listeners = await nursery.start(functools.partial(server.serve, "127.0.0.1", 0))
        ports.append(listeners[0].socket.getsockname()[1])
    r = await http.post(f"http://127.0.0.1:{ports[0]}/__runner/task/echo")
    assert error_of(r) == (500, "AUTH_NOT_CONFIGURED", "Authentication not configured.")
    r = await http.post(f"http://127.0.0.1:{ports[1]}/__runner/task/echo", json={"input": 1})
    assert body_of(r)["result"]["got"] == 1


async def test_several_tokens_and_custom_header_and_base(
    nursery: trio.Nursery, http: httpx.AsyncClient
) -> None:
    # the base path is given without its leading slash and with a trailing one: "/api"
    server = make_server(token=["one", "two"], auth_header="X-Key", base_path="api/")
    listeners = await nursery.start(functools.partial(server.serve, "127.0.0.1", 0))
    base = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}/api"
    for token in ("one", "two"):
        r = await http.post(f"{base}/task/echo", headers={"x-key": token})
        assert r.status_code == 200
    r = await http.post(f"{base}/task/echo", headers={"x-runner-token": "one"})
    assert r.status_code == 401


def test_empty_token_is_refused() -> None:
    with pytest.raises(ValueError, match="empty token"):
        TaskServer(token="")


def test_sync_handler_is_refused() -> None:
    server = TaskServer(token=TOKEN)
    with pytest.raises(TypeError, match="async"):
        server.register_task("x", lambda value: value)
    server.register_task("x", make_server().handle)
    with pytest.raises(ValueError, match="already"):
        server.register_task("x", make_server().handle)


async def test_chunked_request_body(base: str, http: httpx.AsyncClient) -> None:
    async def parts() -> AsyncIterator[bytes]:
        yield b'{"input": {"a": '
        yield b'40, "b": 2}}'

    r = await http.post(f"{base}/task/math.add", content=parts(), headers=AUTH)
    assert "content-length" not in r.request.headers
    assert body_of(r)["result"] == 42


async def raw(port: int, data: bytes, *, read_limit: float = 15) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    out = b""
    async with stream:
        with trio.fail_after(read_limit):
            with contextlib.suppress(trio.BrokenResourceError):
                await stream.send_all(data)
            try:
                while chunk := await stream.receive_some():
                    out += chunk
            except trio.BrokenResourceError:
                pass
    return out


def port_of(base: str) -> int:
    return int(base.split(":")[2].split("/")[0])


async def test_json_over_2mib_is_413_while_streaming(base: str) -> None:
    """A chunked body is cut at the limit: the 413 comes back while the client still
    sends, and the connection closes without the rest being read."""
    port = port_of(base)
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    head = (
        "POST /__runner/task/echo HTTP/1.1\r\nHost: x\r\n"
        f"x-runner-token: {TOKEN}\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode()
    out = b""
    sent = 0
    async with stream:
        await stream.send_all(head)
        with trio.fail_after(20):
            try:
                for _ in range(4000):  # up to 256 MiB offered
                    await stream.send_all(b"10000\r\n" + b" " * 0x10000 + b"\r\n")
                    sent += 0x10000
            except trio.BrokenResourceError:
                pass
            try:
                while chunk := await stream.receive_some():
                    out += chunk
            except trio.BrokenResourceError:
                pass
    assert out.startswith(b"HTTP/1.1 413")
    body = out.partition(b"\r\n\r\n")[2]
    assert json.loads(body)["error"]["code"] == "PAYLOAD_TOO_LARGE"
    assert sent < 200 * 1024 * 1024


async def test_declared_length_over_limit_is_413_at_once(base: str) -> None:
    head = (
        "POST /__runner/task/echo HTTP/1.1\r\nHost: x\r\n"
        f"x-runner-token: {TOKEN}\r\nContent-Length: 3000000\r\n\r\n"
    ).encode()
    out = await raw(port_of(base), head + b"{")
    assert out.startswith(b"HTTP/1.1 413")
    assert b"PAYLOAD_TOO_LARGE" in out


async def test_just_under_the_limit_is_accepted(base: str, http: httpx.AsyncClient) -> None:
    text = ser.dumps({"input": "x" * (2 * 1024 * 1024 - 20)}).encode()
    assert len(text) <= 2 * 1024 * 1024
    r = await http.post(f"{base}/task/echo", content=text, headers=AUTH)
    assert r.status_code == 200


async def test_slow_body_is_cut(nursery: trio.Nursery) -> None:
    from pytunnel.tasks import HttpLimits

    server = make_server(http_limits=HttpLimits(body_timeout=0.5))
    listeners = await nursery.start(functools.partial(server.serve, "127.0.0.1", 0))
    port = listeners[0].socket.getsockname()[1]
    head = (
        "POST /__runner/task/echo HTTP/1.1\r\nHost: x\r\n"
        f"x-runner-token: {TOKEN}\r\nContent-Length: 100\r\n\r\n"
    ).encode()
    out = await raw(port, head + b'{"inp')
    assert out.startswith(b"HTTP/1.1 408")


async def test_bad_input_leaks_nothing(base: str) -> None:
    port = port_of(base)
    before = count_tasks()
    auth = f"x-runner-token: {TOKEN}\r\n"
    bad = [
        b"GARBAGE\r\n\r\n",
        f"POST /__runner/task/echo HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 1\r\n"
        "Connection: close\r\n\r\n{".encode(),
        f"POST /__runner/task/echo HTTP/1.1\r\nHost: x\r\n{auth}"
        "Transfer-Encoding: chunked\r\n\r\nzz\r\n".encode(),
        f"POST /__runner/task/%zz HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n".encode(),
        f"POST /__runner/task/boom HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n".encode(),
    ]
    async with trio.open_nursery() as inner:
        for _ in range(4):
            for data in bad:
                inner.start_soon(raw, port, data)
    await wait_until(lambda: count_tasks() <= before, 30, describe_tasks)


async def test_handle_stream_serves_one_connection_without_a_port() -> None:
    server = make_server()
    client, there = trio.testing.memory_stream_pair()
    request = (
        "POST /__runner/task/math.add HTTP/1.1\r\nHost: x\r\n"
        f"x-runner-token: {TOKEN}\r\nContent-Length: 24\r\nConnection: close\r\n\r\n"
        '{"input":{"a":1,"b":41}}'
    ).encode()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.handle_stream, there)
        await client.send_all(request)
        out = b""
        with trio.fail_after(10):
            while chunk := await client.receive_some():
                out += chunk
    assert out.startswith(b"HTTP/1.1 200")
    assert out.endswith(b'{"ok":true,"result":42}')


async def test_keepalive_many_calls_one_connection(base: str, http: httpx.AsyncClient) -> None:
    for i in range(20):
        r = await http.post(f"{base}/task/math.add", json={"input": {"a": i, "b": 1}}, headers=AUTH)
        assert body_of(r)["result"] == i + 1


@pytest.mark.parametrize(
    ("path", "result"),
    [
        ("/__runner/task/../task/math.add", 3),
        ("/__runner/./task/math.add", 3),
        ("/__runner/task/x/%2E%2E/math.add", 3),
        ("/../__runner/task/math.add", 3),
    ],
)
async def test_dot_segments_resolve_as_in_a_url_parser(
    base: str, http: httpx.AsyncClient, path: str, result: int
) -> None:
    """Node's ``new URL`` resolves ``.``/``..`` before Runner routes; so does the server (the
    raw target is sent: httpx would normalise it first)."""
    port = port_of(base)
    body = b'{"input":{"a":1,"b":2}}'
    head = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nx-runner-token: {TOKEN}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    out = await raw(port, head + body)
    assert out.startswith(b"HTTP/1.1 200"), out[:100]
    assert json.loads(out.partition(b"\r\n\r\n")[2]) == {"ok": True, "result": result}


async def test_dot_segments_reach_discovery_like_runner(base: str) -> None:
    head = (
        f"GET /__runner/task/../discovery HTTP/1.1\r\nHost: x\r\nx-runner-token: {TOKEN}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    out = await raw(port_of(base), head)
    assert json.loads(out.partition(b"\r\n\r\n")[2])["result"]["allowList"]["enabled"] is True


def _multipart(*parts: tuple[str, str | None, bytes]) -> tuple[str, bytes]:
    """A multipart body of (name, filename, content) parts, and its content type."""
    body = b""
    for name, filename, content in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        body += f"--b0undary\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + content
        body += b"\r\n"
    return "multipart/form-data; boundary=b0undary", body + b"--b0undary--\r\n"


def _request(path: str, body: bytes = b"", content_type: str = "application/json") -> bytes:
    return (
        f"POST /__runner/{path} HTTP/1.1\r\nHost: x\r\nx-runner-token: {TOKEN}\r\n"
        f"content-type: {content_type}\r\ncontent-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    ).encode() + body


async def test_bad_input_of_every_kind_is_its_answer_and_leaks_nothing(
    nursery: trio.Nursery,
) -> None:
    """Each kind of bad input the issue names, several connections of each at once: each
    gets its status and code, and afterwards no task and no descriptor is left over."""
    from pytunnel.tasks import HttpLimits

    server = make_server(http_limits=HttpLimits(head_timeout=0.5, body_timeout=0.5))
    listeners = await nursery.start(functools.partial(server.serve, "127.0.0.1", 0))
    port = listeners[0].socket.getsockname()[1]
    many_files = _multipart(
        ("__manifest", None, b"{}"), *[(f"file:{i}", "f.bin", b"x") for i in range(11)]
    )
    no_manifest = _multipart(("file:1", "a.txt", b"x"))
    cases: list[tuple[str, bytes, bytes, str | None]] = [
        ("malformed JSON", _request("task/echo", b'{"input":'), b"400", "INVALID_JSON"),
        ("wrong type", _request("task/math.add", b'{"input":"text"}'), b"500", "INTERNAL_ERROR"),
        (
            "unknown __type",
            _request("task/echo", b'{"input":{"__type":"Nope","value":1}}'),
            b"400",
            "INVALID_JSON",
        ),
        ("invalid percent-encoding", _request("task/%E0%A4%A"), b"404", "NOT_FOUND"),
        (
            "declared too large",
            _request("task/echo").replace(b"content-length: 0", b"content-length: 3000000"),
            b"413",
            "PAYLOAD_TOO_LARGE",
        ),
        (
            "slow head (slow-loris)",
            b"POST /__runner/task/echo HTTP/1.1\r\nHost: x\r\nx-runner-tok",
            b"408",
            None,
        ),
        (
            "slow body",
            _request("task/echo").replace(b"content-length: 0", b"content-length: 50") + b"{",
            b"408",
            "REQUEST_TIMEOUT",
        ),
        (
            "missing manifest",
            _request("task/echo", no_manifest[1], no_manifest[0]),
            b"400",
            "MISSING_MANIFEST",
        ),
        (
            "too many files",
            _request("task/echo", many_files[1], many_files[0]),
            b"413",
            "PAYLOAD_TOO_LARGE",
        ),
        (
            "slow multipart body",
            _request("task/echo", no_manifest[1][:40], no_manifest[0]).replace(
                b"content-length: 40", b"content-length: 400"
            ),
            b"408",
            "REQUEST_TIMEOUT",
        ),
    ]
    before_tasks, before_fds = count_tasks(), count_fds()
    answers: dict[tuple[str, int], bytes] = {}

    async def one(name: str, data: bytes, i: int) -> None:
        answers[name, i] = await raw(port, data)

    async with trio.open_nursery() as inner:
        for i in range(3):
            for name, data, _, _ in cases:
                inner.start_soon(one, name, data, i)
    for name, _, status, code in cases:
        for i in range(3):
            out = answers[name, i]
            assert out.startswith(b"HTTP/1.1 " + status), (name, out[:200])
            if code is not None:
                assert json.loads(out.partition(b"\r\n\r\n")[2])["error"]["code"] == code, name
    await wait_until(
        lambda: count_tasks() <= before_tasks and count_fds() <= before_fds, 30, describe_tasks
    )
    # and the server still serves
    out = await raw(port, _request("task/math.add", b'{"input":{"a":1,"b":2}}'))
    assert json.loads(out.partition(b"\r\n\r\n")[2]) == {"ok": True, "result": 3}


async def test_cors_credentials_without_origins_allow_no_origin(
    nursery: trio.Nursery, http: httpx.AsyncClient
) -> None:
    """Credentials need explicit origins: with none, no ``Access-Control-Allow-Origin`` at all
    (``*`` with credentials is refused by browsers), as Runner does; the configured
    allowed and exposed headers are sent as given."""
    server = make_server(
        cors=CorsConfig(
            credentials=True,
            allowed_headers=["x-runner-token"],
            exposed_headers=["x-runner-request-id"],
        )
    )
    listeners = await nursery.start(functools.partial(server.serve, "127.0.0.1", 0))
    base = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}/__runner"
    r = await http.post(f"{base}/task/echo", headers={**AUTH, "origin": "https://any.example"})
    assert r.status_code == 200
    assert "access-control-allow-origin" not in r.headers
    assert r.headers["access-control-allow-credentials"] == "true"
    assert r.headers["vary"] == "Origin"
    assert r.headers["access-control-expose-headers"] == "x-runner-request-id"
    r = await http.options(
        f"{base}/task/echo",
        headers={"origin": "https://any.example", "access-control-request-headers": "x-other"},
    )
    assert r.status_code == 204
    assert "access-control-allow-origin" not in r.headers
    assert r.headers["access-control-allow-headers"] == "x-runner-token"
    assert r.headers["access-control-allow-credentials"] == "true"


async def test_cors_default_is_on_every_answer(base: str, http: httpx.AsyncClient) -> None:
    """``*`` on errors too, before and after the route: 404 outside the base, 405, 401,
    403, 400, 500."""
    outside = base.replace("/__runner", "/elsewhere")
    for response in [
        await http.get(outside),
        await http.get(f"{base}/task/echo"),
        await http.post(f"{base}/task/echo"),
        await http.post(f"{base}/task/nothing", headers=AUTH),
        await http.post(f"{base}/task/echo", content=b"{", headers=AUTH),
        await http.post(f"{base}/task/boom", headers=AUTH),
    ]:
        assert response.status_code >= 400
        assert response.headers["access-control-allow-origin"] == "*", response.request.url


async def test_every_token_is_compared_in_constant_time(
    nursery: trio.Nursery, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The token check goes through ``hmac.compare_digest`` on digests of one length, for
    every configured token each time, whichever matches (no early exit): what the time
    taken could tell is neither the token's content nor its length nor which one matched."""
    import hmac

    from pytunnel.tasks import _server

    compared: list[tuple[int, int]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(_server.hmac, "compare_digest", spy)
    server = make_server(token=["first", "second-longer", "third"])
    listeners = await nursery.start(functools.partial(server.serve, "127.0.0.1", 0))
    base = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}/__runner"
    for token, status in [("first", 200), ("third", 200), ("x" * 500, 401), ("", 401)]:
        compared.clear()
        headers = {"x-runner-token": token} if token else {}
        r = await http.post(f"{base}/task/echo", headers=headers)
        assert r.status_code == status, token
        assert compared == [(32, 32)] * 3, token


async def test_discovery_disabled_is_404_before_any_other_check(
    nursery: trio.Nursery, http: httpx.AsyncClient
) -> None:
    """With discovery off, ``{base}/discovery`` is 404 ``NOT_FOUND`` whatever the method or
    token (as Runner checks it first); tasks are served as before."""
    server = make_server(disable_discovery=True)
    listeners = await nursery.start(functools.partial(server.serve, "127.0.0.1", 0))
    base = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}/__runner"
    for response in [
        await http.get(f"{base}/discovery", headers=AUTH),
        await http.get(f"{base}/discovery"),
        await http.post(f"{base}/discovery", headers=AUTH),
    ]:
        assert error_of(response)[:2] == (404, "NOT_FOUND")
        assert "x-runner-request-id" in response.headers
    r = await http.post(f"{base}/task/math.add", json={"input": {"a": 1, "b": 2}}, headers=AUTH)
    assert body_of(r)["result"] == 3


async def test_event_listeners_run_within_the_timeout_too(
    nursery: trio.Nursery, http: httpx.AsyncClient
) -> None:
    """The per-request bound covers an event's listeners as it covers a task: 504, and the
    server serves the next call."""
    server = TaskServer(token=TOKEN, task_timeout=0.3)

    @server.event("app.events.stuck")
    async def stuck(payload: Any) -> Any:
        await trio.sleep_forever()

    @server.event("app.events.quick")
    async def quick(payload: Any) -> Any:
        return {"quick": payload}

    listeners = await nursery.start(functools.partial(server.serve, "127.0.0.1", 0))
    base = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}/__runner"
    r = await http.post(f"{base}/event/app.events.stuck", json={"payload": 1}, headers=AUTH)
    assert error_of(r) == (504, "TIMEOUT", "event app.events.stuck timed out")
    r = await http.post(
        f"{base}/event/app.events.quick",
        json={"payload": 2, "returnPayload": True},
        headers=AUTH,
    )
    assert body_of(r) == {"ok": True, "result": {"quick": 2}}
