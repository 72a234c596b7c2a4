"""Shared fixtures only: echo service, tunnel server and client, black hole, transports.

Plain helpers (constants, pair builders, counters) live in ``helpers.py``; test files import
them from there, never from this module.
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio
from helpers import RUNNER_DIR, RUNNER_VERSION, TOKEN, Blackhole, EtcdServer, echo_handler

import pytunnel


@pytest.fixture(params=["memory", "tcp"])
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def echo_port(nursery: trio.Nursery) -> int:
    """A real TCP echo service on loopback."""
    listeners = await nursery.start(
        functools.partial(trio.serve_tcp, echo_handler, 0, host="127.0.0.1")
    )
    return int(listeners[0].socket.getsockname()[1])


@pytest.fixture
def receive_calls(monkeypatch: pytest.MonkeyPatch) -> list[trio.SocketStream]:
    """Each stream ``trio.SocketStream.receive_some`` is called on (the real method still
    runs), for tests that show a path reads its socket directly instead."""
    calls: list[trio.SocketStream] = []
    real = trio.SocketStream.receive_some

    async def spy(self: trio.SocketStream, max_bytes: int | None = None) -> bytes:
        calls.append(self)
        return await real(self, max_bytes)

    monkeypatch.setattr(trio.SocketStream, "receive_some", spy)
    return calls


@pytest.fixture
async def tunnel_server(nursery: trio.Nursery) -> pytunnel.TunnelServer:
    server: pytunnel.TunnelServer = await nursery.start(
        functools.partial(pytunnel.serve, 0, token=TOKEN)
    )
    return server


@pytest.fixture
async def tunnel(nursery: trio.Nursery, tunnel_server: pytunnel.TunnelServer) -> pytunnel.Tunnel:
    return await pytunnel.connect_tunnel(nursery, tunnel_server.address, token=TOKEN)


def pytest_configure(config: pytest.Config) -> None:
    """Admin sockets of the clients and servers the tests start go to a runtime folder of
    this run's own, not the user's: a test that looks for "the only running client" must
    not find one of another run, or of a parallel worker."""
    os.environ["XDG_RUNTIME_DIR"] = config.stash.setdefault(
        _RUNTIME, tempfile.mkdtemp(prefix="pytunnel-tests-")
    )


def pytest_unconfigure(config: pytest.Config) -> None:
    if _RUNTIME in config.stash:
        shutil.rmtree(config.stash[_RUNTIME], ignore_errors=True)


_RUNTIME = pytest.StashKey[str]()


@pytest.fixture
def blackhole() -> Iterator[Blackhole]:
    hole = Blackhole()
    yield hole
    hole.close()


@pytest.fixture(scope="session")
def runner_dir() -> Path:
    """``@bluelibs/runner`` installed once per machine under ``RUNNER_DIR``."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are not installed (Debian: apt-get install nodejs npm)")
    package = RUNNER_DIR / "node_modules" / "@bluelibs" / "runner" / "package.json"
    RUNNER_DIR.mkdir(parents=True, exist_ok=True)
    # one install at a time: parallel test workers share the folder
    with open(RUNNER_DIR / ".install-lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not package.exists() or not json.loads(package.read_text())["version"].startswith(
            RUNNER_VERSION + "."
        ):
            _npm_install_runner()
    return RUNNER_DIR


def _npm_install_runner() -> None:
    """``npm install`` into ``RUNNER_DIR``; a failure skips the tests that need it."""
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


@pytest.fixture
async def etcd(tmp_path: object) -> AsyncIterator[EtcdServer]:
    """A private etcd on loopback (the cluster tests' engine); skips without the binary."""
    if shutil.which("etcd") is None:
        pytest.skip("etcd is not installed (.ci/run installs etcd-server)")
    server = EtcdServer(f"{tmp_path}/etcd")
    await server.start()
    try:
        yield server
    finally:
        await server.kill()
