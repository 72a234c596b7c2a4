"""Interoperability with the real Runner (``@bluelibs/runner`` 5.5 from npm): Runner's own
HTTP clients (``createHttpClient``, ``createHttpMixedClient``, ``createHttpSmartClient``) call
the Python server directly and through a tunnel; the Python client calls a real Runner Node
server (``nodeExposure``). Skipped, saying why, when node/npm or the package are missing."""

from __future__ import annotations

import datetime as dt
import functools
import json
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

import pytunnel
from pytunnel.tasks import (
    UNDEFINED,
    ForbiddenError,
    InternalError,
    RegExp,
    RunnerMap,
    TaskClient,
    TaskError,
    TaskServer,
)

pytestmark = pytest.mark.timeout(240)

NODE_DIR = Path(__file__).parent / "node"
RUNNER_DIR = Path(os.environ.get("PYTUNNEL_NPM_RUNNER", "/tmp/pytunnel-npm-runner"))
RUNNER_VERSION = "5.5"
HTTP_TOKEN = "interop-token"


@pytest.fixture(scope="session")
def runner_dir() -> Path:
    """``@bluelibs/runner`` installed once per machine under ``RUNNER_DIR``."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are not installed (Debian: apt-get install nodejs npm)")
    package = RUNNER_DIR / "node_modules" / "@bluelibs" / "runner" / "package.json"
    if not package.exists() or not json.loads(package.read_text())["version"].startswith(
        RUNNER_VERSION + "."
    ):
        RUNNER_DIR.mkdir(parents=True, exist_ok=True)
        manifest = RUNNER_DIR / "package.json"
        if not manifest.exists():
            manifest.write_text('{"name": "pytunnel-runner-interop", "private": true}\n')
        try:
            subprocess.run(
                ["npm", "install", "--no-audit", "--no-fund", f"@bluelibs/runner@{RUNNER_VERSION}"],
                cwd=RUNNER_DIR,
                capture_output=True,
                timeout=300,
                check=True,
            )
        except (subprocess.SubprocessError, OSError) as exc:
            pytest.skip(f"npm install @bluelibs/runner@{RUNNER_VERSION} failed: {exc}")
    return RUNNER_DIR


def python_server() -> TaskServer:
    server = TaskServer(token=HTTP_TOKEN)

    @server.task("math.add")
    async def add(value: Any) -> Any:
        return value["a"] + value["b"]

    @server.task("clock.shift")
    async def shift(value: dt.datetime) -> dt.datetime:
        assert value.tzinfo is not None
        return value + dt.timedelta(days=1)

    @server.task("echo")
    async def echo(value: Any) -> Any:
        return value

    @server.task("typed")
    async def typed(value: Any) -> Any:
        raise TaskError('{"left":0}', id="app.errors.stock", data={"left": 0}, http_code=409)

    @server.task("boom")
    async def boom(value: Any) -> Any:
        raise RuntimeError("secret detail")

    @server.event("app.events.ping")
    async def ping(payload: Any) -> Any:
        return {**payload, "seen": True}

    return server


async def node_clients(runner_dir: Path, base: str) -> dict[str, Any]:
    result = await trio.run_process(
        ["node", str(NODE_DIR / "runner_clients.mjs")],
        env={
            **os.environ,
            "RUNNER_DIR": str(runner_dir),
            "RUNNER_BASE": base,
            "RUNNER_TOKEN": HTTP_TOKEN,
        },
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    return json.loads(result.stdout.decode().strip().splitlines()[-1])  # type: ignore[no-any-return]


def check_clients(out: dict[str, Any]) -> None:
    assert set(out) == {"fetch", "mixed", "smart"}
    for name, calls in out.items():
        assert calls["add"] == {"ok": True, "value": 42}, name
        assert calls["shift"] == {"ok": True, "date": "2024-02-29T12:00:00.000Z"}, name
        assert calls["typedCheck"] == dict.fromkeys(calls["typedCheck"], True), name
        assert calls["forbidden"]["ok"] is False
        assert calls["forbidden"]["code"] == "FORBIDDEN", name
        assert calls["forbidden"]["message"] == "Task not.exposed not exposed", name
        app = calls["appError"]
        assert (app["code"], app["httpCode"], app["id"], app["data"]) == (
            "INTERNAL_ERROR",
            409,
            "app.errors.stock",
            {"left": 0},
        ), name
        assert calls["internal"]["code"] == "INTERNAL_ERROR", name
        assert calls["internal"]["message"] == "Internal Error", name
        assert calls["event"] == {"ok": True, "value": "<undefined>"}, name
        assert calls["eventResult"] == {"ok": True, "value": {"n": 2, "seen": True}}, name


async def test_runner_clients_call_the_python_server(
    runner_dir: Path, nursery: trio.Nursery
) -> None:
    listeners = await nursery.start(functools.partial(python_server().serve, "127.0.0.1", 0))
    base = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}/__runner"
    check_clients(await node_clients(runner_dir, base))


async def test_runner_clients_call_the_python_server_through_a_tunnel(
    runner_dir: Path, tunnel: pytunnel.Tunnel
) -> None:
    forward = await tunnel.forward_remote(handler=python_server().handle_stream)
    base = f"http://127.0.0.1:{forward.listen_port}/__runner"
    check_clients(await node_clients(runner_dir, base))


@pytest.fixture
async def node_server(runner_dir: Path) -> AsyncIterator[str]:
    """A real Runner server (``nodeExposure``); its base URL."""
    proc = await trio.lowlevel.open_process(
        ["node", str(NODE_DIR / "runner_server.mjs")],
        env={**os.environ, "RUNNER_DIR": str(runner_dir), "RUNNER_TOKEN": HTTP_TOKEN},
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = b""
        with trio.fail_after(60):
            while not line.endswith(b"\n"):
                chunk = await proc.stdout.receive_some(1)
                assert chunk, "the Runner server exited before listening"
                line += chunk
        port = int(line.decode().split()[1])
        yield f"http://127.0.0.1:{port}/__runner"
    finally:
        proc.terminate()
        with trio.move_on_after(10):
            await proc.wait()
        proc.kill()
        await proc.wait()


async def test_python_client_calls_a_runner_node_server(node_server: str) -> None:
    when = dt.datetime(2024, 2, 28, 12, 0, tzinfo=dt.timezone.utc)
    async with TaskClient(node_server, token=HTTP_TOKEN) as client:
        assert await client.task("math.add", {"a": 1, "b": 2}) == 3
        assert await client.task("clock.shift", when) == when + dt.timedelta(days=1)
        value = {
            "big": 2**70,
            "set": {1, 2},
            "map": RunnerMap({"k": 1}),
            "re": RegExp("a+b", "gi"),
            "undef": UNDEFINED,
            "none": None,
            "__type": "user key",
        }
        assert await client.task("echo", value) == value
        with pytest.raises(ForbiddenError) as forbidden:
            await client.task("hidden")
        assert forbidden.value.message == "Task hidden not exposed"
        with pytest.raises(InternalError) as typed:
            await client.task("typed")
        assert (typed.value.status, typed.value.id, typed.value.data) == (
            409,
            "app.errors.stock",
            {"left": 0},
        )
        with pytest.raises(InternalError) as boom:
            await client.task("boom")
        assert boom.value.message == "Internal Error"
        await client.event("app.events.ping", {"n": 1})
        assert await client.event_with_result("app.events.ping", {"n": 2}) == {
            "n": 2,
            "seen": True,
        }
        found = await client.discovery()
        assert found.tasks == ("math.add", "clock.shift", "echo", "boom", "typed")
        assert found.events == ("app.events.ping",)
