"""Multipart uploads and octet-stream bodies at the task server, over real sockets: files
handed to the task as streams with their metadata, each limit and malformed body its answer,
and Runner's own Node clients uploading (skipped without node/npm)."""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from helpers import count_fds, count_tasks, describe_tasks, wait_until

from pytunnel._http import HttpLimits
from pytunnel.tasks import BodyStream, InputFile, MultipartLimits, TaskServer
from pytunnel.tasks import serializer as ser

TOKEN = "upload-token"
AUTH = {"x-runner-token": TOKEN}
seen_files: list[InputFile] = []


def build(limits: MultipartLimits | None = None) -> TaskServer:
    server = TaskServer(token=TOKEN, multipart_limits=limits)

    @server.task("files.describe")
    async def describe(value: Any) -> Any:
        out: dict[str, Any] = {}
        for key, item in value.items():
            if isinstance(item, InputFile):
                seen_files.append(item)
                data = await item.read()
                again = b"".join([chunk async for chunk in item.chunks(1000)])
                assert again == data
                out[key] = {
                    "name": item.name,
                    "type": item.type,
                    "size": len(data),
                    "head": data[:5].decode(),
                    "extra": None if item.extra is ser.UNDEFINED else item.extra,
                }
            else:
                out[key] = item
        return out

    @server.task("files.received")
    async def received(value: Any) -> Any:
        return {key: item.received for key, item in value.items() if isinstance(item, InputFile)}

    @server.task("raw.count")
    async def count(value: Any) -> Any:
        assert isinstance(value, BodyStream)
        total = 0
        async for chunk in value.chunks():
            total += len(chunk)
        return {"bytes": total, "type": value.content_type}

    return server


@pytest.fixture
async def base(nursery: trio.Nursery) -> str:
    listeners = await nursery.start(functools.partial(build().serve, "127.0.0.1", 0))
    return f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}/__runner"


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=30) as client:
        yield client


def manifest(value: Any) -> str:
    return ser.dumps({"input": value})


def sentinel(file_id: str, **meta: Any) -> dict[str, Any]:
    return {"$runnerFile": "File", "id": file_id, "meta": meta}


def error_of(response: httpx.Response) -> tuple[int, str, str]:
    body = json.loads(response.content)
    return response.status_code, body["error"]["code"], body["error"]["message"]


async def test_files_reach_the_task_with_metadata(base: str, http: httpx.AsyncClient) -> None:
    seen_files.clear()
    big = b"b" * (3 * 1024 * 1024)  # spooled past memory to disk
    r = await http.post(
        f"{base}/task/files.describe",
        headers=AUTH,
        data={
            "__manifest": manifest(
                {
                    "label": "x",
                    "doc": sentinel("1", name="from-manifest.txt", extra={"k": 1}),
                    "blob": sentinel("2"),
                }
            )
        },
        files=[
            ("file:1", ("part-name.txt", b"hello world", "text/plain")),
            ("file:2", ("big.bin", big, "application/x-big")),
            ("file:unlisted", ("u.bin", b"ignored", "application/octet-stream")),
        ],
    )
    assert r.status_code == 200, r.content
    assert ser.loads(r.content)["result"] == {
        "label": "x",
        "doc": {
            "name": "from-manifest.txt",
            "type": "text/plain",
            "size": 11,
            "head": "hello",
            "extra": {"k": 1},
        },
        "blob": {
            "name": "big.bin",
            "type": "application/x-big",
            "size": len(big),
            "head": "bbbbb",
            "extra": None,
        },
    }
    # the spools are released once the call is answered
    assert seen_files
    assert all(file.closed for file in seen_files)


async def test_octet_stream_body_is_a_stream(base: str, http: httpx.AsyncClient) -> None:
    async def parts() -> AsyncIterator[bytes]:
        for _ in range(40):
            yield b"z" * 100_000

    r = await http.post(
        f"{base}/task/raw.count",
        headers={**AUTH, "content-type": "application/octet-stream"},
        content=parts(),
    )
    assert ser.loads(r.content)["result"] == {
        "bytes": 4_000_000,
        "type": "application/octet-stream",
    }


@pytest.mark.parametrize(
    ("data", "files", "expected"),
    [
        (
            {},
            [("file:1", ("a", b"x", "text/plain"))],
            (400, "MISSING_MANIFEST", "Missing manifest"),
        ),
        ({"__manifest": "5"}, [], (400, "MISSING_MANIFEST", "Missing manifest")),
        ({"__manifest": "{"}, [], (400, "INVALID_MULTIPART", "Invalid manifest")),
        (
            {"__manifest": '{"input": {"__type": "Nope", "value": 1}}'},
            [],
            (400, "INVALID_MULTIPART", "Invalid manifest"),
        ),
        (
            {"__manifest": manifest({"f": sentinel("9")})},
            [("file:1", ("a", b"x", "text/plain"))],
            (500, "MISSING_FILE_PART", "Internal Error"),
        ),
        # nested deeper than the serializer goes, yet within what the JSON parser reads
        (
            {"__manifest": '{"input":' + "[" * 800 + "]" * 800 + "}"},
            [],
            (400, "INVALID_MULTIPART", "Invalid manifest"),
        ),
        (
            {"__manifest": '{"input":' + '{"a":' * 800 + "1" + "}" * 800 + "}"},
            [],
            (400, "INVALID_MULTIPART", "Invalid manifest"),
        ),
    ],
)
async def test_manifest_errors(
    base: str, http: httpx.AsyncClient, data: dict[str, str], files: list[Any], expected: Any
) -> None:
    # a file part that is no upload (not named file:ID) makes httpx send multipart
    files = files or [("other", ("o", b"", "text/plain"))]
    r = await http.post(f"{base}/task/files.describe", headers=AUTH, data=data, files=files)
    assert error_of(r) == expected


@pytest.fixture
async def small(nursery: trio.Nursery) -> str:
    limits = MultipartLimits(file_size=1000, files=2, fields=3, field_size=200)
    listeners = await nursery.start(functools.partial(build(limits).serve, "127.0.0.1", 0))
    return f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}/__runner"


@pytest.mark.parametrize(
    ("data", "files", "message"),
    [
        (
            {"__manifest": manifest({})},
            [("file:1", ("a", b"x" * 1001, "text/plain"))],
            "File size limit exceeded",
        ),
        (
            {"__manifest": manifest({})},
            [(f"file:{i}", ("a", b"x", "text/plain")) for i in range(3)],
            "Files limit exceeded",
        ),
        (
            {"__manifest": manifest({"a": sentinel("1"), "b": sentinel("2"), "c": sentinel("3")})},
            [],
            "Files limit exceeded",
        ),
        ({"__manifest": manifest({}), "a": "1", "b": "2", "c": "3"}, [], "Fields limit exceeded"),
        ({"__manifest": manifest("x" * 300)}, [], "Field limit exceeded"),
        ({"__manifest": manifest({}), "other": "y" * 300}, [], "Field limit exceeded"),
    ],
)
async def test_limits_are_413(
    small: str, http: httpx.AsyncClient, data: dict[str, str], files: list[Any], message: str
) -> None:
    files = files or [("x", ("o", b"", "text/plain"))]
    r = await http.post(f"{small}/task/files.describe", headers=AUTH, data=data, files=files)
    assert error_of(r) == (413, "PAYLOAD_TOO_LARGE", message)


async def raw(port: int, data: bytes) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    out = b""
    async with stream:
        await stream.send_all(data)
        with trio.fail_after(15):
            try:
                while chunk := await stream.receive_some():
                    out += chunk
            except trio.BrokenResourceError:
                pass
    return out


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("multipart/form-data", b"--x\r\n"),  # no boundary
        ("multipart/form-data; boundary=x", b"garbage without boundary"),
        (
            "multipart/form-data; boundary=x",
            b"--x\r\nContent-Disposition: form-data\r\n\r\nv\r\n--x--\r\n",
        ),
        (
            "multipart/form-data; boundary=x",
            b'--x\r\nContent-Disposition: form-data; name="__manifest"\r\n\r\n{}',
        ),
    ],
)
async def test_malformed_multipart_is_400(base: str, content_type: str, body: bytes) -> None:
    port = int(base.split(":")[2].split("/")[0])
    head = (
        f"POST /__runner/task/files.describe HTTP/1.1\r\nHost: x\r\nx-runner-token: {TOKEN}\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    out = await raw(port, head + body)
    assert out.startswith(b"HTTP/1.1 400"), out[:200]
    assert b"INVALID_MULTIPART" in out


async def test_uploads_leak_nothing(base: str, small: str) -> None:
    """Uploads answered, refused at a limit, and refused after a file was spooled to disk
    (a manifest naming a part that never came): afterwards no task and no descriptor (the
    spools' temporary files) is left over."""
    before_tasks, before_fds = count_tasks(), count_fds()
    spooled = b"s" * (2 * 1024 * 1024)  # past what is kept in memory: a temporary file
    async with httpx.AsyncClient(timeout=30) as client:
        for _ in range(3):
            r = await client.post(
                f"{base}/task/files.received",
                headers=AUTH,
                data={"__manifest": manifest({"f": sentinel("1")})},
                files=[("file:1", ("a", spooled, "text/plain"))],
            )
            assert ser.loads(r.content)["result"] == {"f": len(spooled)}
            r = await client.post(
                f"{small}/task/files.describe",
                headers=AUTH,
                data={"__manifest": manifest({})},
                files=[("file:1", ("a", b"x" * 5000, "text/plain"))],
            )
            assert error_of(r)[:2] == (413, "PAYLOAD_TOO_LARGE")
            r = await client.post(
                f"{base}/task/files.received",
                headers=AUTH,
                data={"__manifest": manifest({"f": sentinel("1"), "g": sentinel("2")})},
                files=[("file:1", ("a", spooled, "text/plain"))],
            )
            assert error_of(r)[:2] == (500, "MISSING_FILE_PART")
    await wait_until(
        lambda: count_tasks() <= before_tasks and count_fds() <= before_fds, 30, describe_tasks
    )


@pytest.mark.timeout(240)
async def test_runner_node_clients_upload_files_and_streams(base: str, runner_dir: Path) -> None:
    result = await trio.run_process(
        ["node", str(Path(__file__).parent / "node" / "runner_upload.mjs")],
        env={
            **os.environ,
            "RUNNER_DIR": str(runner_dir),
            "RUNNER_BASE": base,
            "RUNNER_TOKEN": TOKEN,
        },
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    out = json.loads(result.stdout.decode().strip().splitlines()[-1])
    for name in ("smart", "mixed"):
        assert out[name]["files"] == {
            "label": "two files",
            "doc": {
                "name": "a.txt",
                "type": "text/plain",
                "size": 5,
                "head": "hello",
                "extra": None,
            },
            "blob": {
                "name": "big.bin",
                "type": "application/octet-stream",
                "size": 3 * 1024 * 1024,
                "head": "aaaaa",
                "extra": None,
            },
        }, name
        assert out[name]["raw"] == {"bytes": 7, "type": "application/octet-stream"}, name


async def test_octet_stream_body_refused_while_the_task_reads_it(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    """A body the task reads as a stream and the HTTP layer refuses (over the task's limit,
    too slow, malformed chunks) is the peer's mistake: 413, 408 or 400 as for a JSON body,
    never a 500 logged as the task's failure."""
    server = TaskServer(token=TOKEN, http_limits=HttpLimits(body_timeout=1.0))

    @server.task("raw.capped")
    async def capped(value: BodyStream) -> int:
        return len(await value.read(limit=10))

    listeners = await nursery.start(functools.partial(server.serve, "127.0.0.1", 0))
    port = listeners[0].socket.getsockname()[1]

    async def exchange(head: bytes, body: bytes) -> bytes:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(
                b"POST /__runner/task/raw.capped HTTP/1.1\r\nhost: x\r\n"
                b"x-runner-token: " + TOKEN.encode() + b"\r\n"
                b"content-type: application/octet-stream\r\n" + head + b"\r\n" + body
            )
            answer = b""
            with trio.fail_after(30):
                while chunk := await stream.receive_some(65536):
                    answer += chunk
            return answer

    def status_and_code(answer: bytes) -> tuple[bytes, Any]:
        status_line, _, rest = answer.partition(b"\r\n")
        payload = rest.partition(b"\r\n\r\n")[2]
        if b"application/json" not in rest.partition(b"\r\n\r\n")[0]:
            return status_line, payload
        return status_line, ser.loads(payload)["error"]["code"]

    with caplog.at_level(logging.WARNING, logger="pytunnel"):
        big = await exchange(b"content-length: 20\r\n", b"a" * 20)
        too_large = (b"HTTP/1.1 413 Request Entity Too Large", "PAYLOAD_TOO_LARGE")
        assert status_and_code(big) == too_large
        assert b"connection: close" in big
        slow = await exchange(b"content-length: 5\r\n", b"ab")  # the rest never comes
        assert status_and_code(slow) == (b"HTTP/1.1 408 Request Timeout", "REQUEST_TIMEOUT")
        bad = await exchange(b"transfer-encoding: chunked\r\n", b"zz\r\n")
        assert status_and_code(bad) == (b"HTTP/1.1 400 Bad Request", b"Bad Request")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert sum("request body refused" in r.getMessage() for r in caplog.records) == 3
    fine = await exchange(b"content-length: 3\r\nconnection: close\r\n", b"abc")
    assert fine.startswith(b"HTTP/1.1 200 OK")
    assert ser.loads(fine.partition(b"\r\n\r\n")[2]) == {"ok": True, "result": 3}


async def test_octet_stream_reaches_the_task_while_it_is_still_sent(nursery: trio.Nursery) -> None:
    """The task reads the body as it arrives, not once it is all there: the client sends the
    rest only after the task has seen the first piece (a server that buffered the body
    first would wait for the rest forever, and the bound below would fail the test)."""
    server = TaskServer(token=TOKEN)
    first_seen = trio.Event()

    @server.task("raw.progressive")
    async def progressive(value: BodyStream) -> Any:
        pieces = []
        async for chunk in value.chunks():
            pieces.append(chunk)
            first_seen.set()
        return b"".join(pieces).decode()

    listeners = await nursery.start(functools.partial(server.serve, "127.0.0.1", 0))
    port = listeners[0].socket.getsockname()[1]
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(
            b"POST /__runner/task/raw.progressive HTTP/1.1\r\nhost: x\r\n"
            b"x-runner-token: " + TOKEN.encode() + b"\r\n"
            b"content-type: application/octet-stream\r\ntransfer-encoding: chunked\r\n"
            b"connection: close\r\n\r\n5\r\nfirst\r\n"
        )
        with trio.fail_after(20):
            await first_seen.wait()
            await stream.send_all(b"5\r\n,rest\r\n0\r\n\r\n")
            answer = b""
            while chunk := await stream.receive_some():
                answer += chunk
    assert answer.startswith(b"HTTP/1.1 200")
    assert ser.loads(answer.partition(b"\r\n\r\n")[2]) == {"ok": True, "result": "first,rest"}


@pytest.mark.parametrize(
    ("data", "files", "message"),
    [
        (
            {"__manifest": manifest({})},
            [("file:1", ("a", b"x" * (20 * 1024 * 1024 + 1), "text/plain"))],
            "File size limit exceeded",
        ),
        (
            {"__manifest": manifest({})},
            [(f"file:{i}", ("a", b"x", "text/plain")) for i in range(11)],
            "Files limit exceeded",
        ),
        (
            {"__manifest": manifest({}), **{f"f{i}": "v" for i in range(100)}},
            [],
            "Fields limit exceeded",
        ),
    ],
    ids=["20-MiB-file", "10-files", "100-fields"],
)
async def test_default_limits_are_runners(
    base: str, http: httpx.AsyncClient, data: dict[str, str], files: list[Any], message: str
) -> None:
    """Runner's defaults: 20 MiB per file, 10 files, 100 fields (the manifest is one); one
    more of each is 413."""
    files = files or [("x", ("o", b"", "text/plain"))]
    r = await http.post(f"{base}/task/files.describe", headers=AUTH, data=data, files=files)
    assert error_of(r) == (413, "PAYLOAD_TOO_LARGE", message)


async def test_default_limits_allow_what_runner_allows(base: str, http: httpx.AsyncClient) -> None:
    """At the defaults exactly (a 20 MiB file among 10, 100 fields) the call runs."""
    fields = {"__manifest": manifest({"f": sentinel("0")}), **{f"f{i}": "v" for i in range(99)}}
    files = [("file:0", ("big", b"x" * (20 * 1024 * 1024), "text/plain"))]
    files += [(f"file:{i}", ("a", b"x", "text/plain")) for i in range(1, 10)]
    r = await http.post(f"{base}/task/files.received", headers=AUTH, data=fields, files=files)
    assert r.status_code == 200, r.content
    assert ser.loads(r.content)["result"] == {"f": 20 * 1024 * 1024}
