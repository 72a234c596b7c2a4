"""``pytunnel tasks serve`` as a real subprocess: on a local port, and through a real
``pytunnel serve`` with no local port; a bad MODULE:ATTR or missing option is a usage error."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import PYTUNNEL, CliProcess, closed_port

from pytunnel.tasks import ForbiddenError, SyncTaskClient

pytestmark = pytest.mark.timeout(90)
HTTP_TOKEN = "http-token-7"

APP = """
from pytunnel.tasks import TaskServer

server = TaskServer(token="http-token-7")
not_a_server = 42


@server.task("math.add")
async def add(value):
    return value["a"] + value["b"]


def make():
    return server
"""


def listening_ports(pid: int) -> set[int]:
    """The TCP ports a process listens on: its socket descriptors' inodes, looked up in the
    kernel's tables (``/proc/net/tcp``, ``tcp6``) among the sockets in the listen state."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as lines:
            for line in list(lines)[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    (tmp_path / "taskapp.py").write_text(APP)
    return tmp_path


@pytest.fixture
def tunnel_server() -> Iterator[tuple[str, str]]:
    proc = CliProcess("serve", "--listen", "127.0.0.1:0")
    try:
        listening = proc.readline()
        token = proc.readline().split("--token ")[1].strip()
        match = re.search(r"(\d+\.\d+\.\d+\.\d+:\d+)", listening)
        assert match, listening
        yield match.group(1), token
    finally:
        proc.kill()


def test_tasks_through_the_tunnel_and_locally(
    app_dir: Path, tunnel_server: tuple[str, str]
) -> None:
    address, token = tunnel_server
    token_file = app_dir / "token"
    token_file.write_text(token)
    wanted = closed_port()
    proc = CliProcess(
        "tasks",
        "serve",
        "taskapp:make",
        "--listen",
        "127.0.0.1:0",
        "--tunnel",
        address,
        "--remote-port",
        str(wanted),
        "--token-file",
        str(token_file),
        cwd=app_dir,
    )
    try:
        local = proc.readline()
        remote = proc.readline()
        assert local.startswith("tasks listening on http://127.0.0.1:")
        assert local.endswith("/__runner")
        port = int(re.search(r"on port (\d+)/__runner$", remote).group(1))  # type: ignore[union-attr]
        assert port == wanted  # --remote-port is the port the tunnel server opened
        # the one port of its own is --listen's: the tunnel needs none
        local_port = int(local.rsplit(":", 1)[1].split("/")[0])
        assert listening_ports(proc.pid) == {local_port}
        for base in (local.split(" on ")[1], f"http://127.0.0.1:{port}/__runner"):
            with SyncTaskClient(base, token=HTTP_TOKEN) as client:
                assert client.task("math.add", {"a": 40, "b": 2}) == 42
                with pytest.raises(ForbiddenError):
                    client.task("other")
        assert proc.stop() == 0
    finally:
        proc.kill()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nocolon"], "MODULE:ATTR"),
        (["no_such_module_xyz:app", "--listen", "0"], "cannot import"),
        (["taskapp:missing", "--listen", "0"], "no attribute"),
        (["taskapp:not_a_server", "--listen", "0"], "not a pytunnel.tasks.TaskServer"),
        (["taskapp:server"], "--listen, --tunnel"),
        (["taskapp:server", "--tunnel", "127.0.0.1:1"], "tunnel's token"),
    ],
)
def test_usage_errors(app_dir: Path, args: list[str], message: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTUNNEL_TOKEN"}
    out = subprocess.run(
        [*PYTUNNEL, "tasks", "serve", *args],
        capture_output=True,
        cwd=app_dir,
        env=env,
        timeout=60,
        check=False,
    )
    assert out.returncode == 2, out.stderr
    assert message in out.stderr.decode()


def test_tasks_through_a_tls_tunnel_pinned(app_dir: Path) -> None:
    """The tunnel's TLS options are connect's: a self-signed server, its pinned fingerprint."""
    server = CliProcess(
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--tls-self-signed",
        "--tls-dir",
        str(app_dir / "tls"),
    )
    try:
        listening = server.readline()
        fingerprint = server.readline().split(": ")[1]
        token = server.readline().split("--token ")[1].split()[0]
        address = re.search(r"(\d+\.\d+\.\d+\.\d+:\d+)", listening).group(1)  # type: ignore[union-attr]
        proc = CliProcess(
            "tasks",
            "serve",
            "taskapp:server",
            "--tunnel",
            address,
            "--tls-fingerprint",
            fingerprint,
            cwd=app_dir,
            env={"PYTUNNEL_TOKEN": token},
        )
        try:
            port = int(re.search(r"on port (\d+)/", proc.readline()).group(1))  # type: ignore[union-attr]
            assert listening_ports(proc.pid) == set()  # served with no local port at all
            with SyncTaskClient(f"http://127.0.0.1:{port}/__runner", token=HTTP_TOKEN) as client:
                assert client.task("math.add", {"a": 1, "b": 1}) == 2
            assert proc.stop() == 0
        finally:
            proc.kill()
    finally:
        server.kill()
