"""``pytunnel tasks serve`` as a real subprocess: on a local port, and through a real
``pytunnel serve`` with no local port; a bad MODULE:ATTR or missing option is a usage error."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytunnel.tasks import ForbiddenError, SyncTaskClient

pytestmark = pytest.mark.timeout(90)
PYTUNNEL = [sys.executable, "-m", "pytunnel"]
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


class Proc:
    """A pytunnel subprocess whose stdout lines can be awaited with a deadline."""

    def __init__(self, *args: str, cwd: Path | None = None, env: dict[str, str] | None = None):
        self.popen = subprocess.Popen(
            [*PYTUNNEL, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=cwd,
            env={**os.environ, **(env or {})},
        )
        self._pending = b""

    def readline(self, timeout: float = 20) -> str:
        assert self.popen.stdout is not None
        deadline = time.monotonic() + timeout
        while b"\n" not in self._pending:
            ready, _, _ = select.select(
                [self.popen.stdout], [], [], max(0, deadline - time.monotonic())
            )
            if not ready:
                raise TimeoutError("no output line")
            chunk = os.read(self.popen.stdout.fileno(), 4096)
            if not chunk:
                raise EOFError(f"exited: {self.popen.communicate()[1].decode()}")
            self._pending += chunk
        line, _, self._pending = self._pending.partition(b"\n")
        return line.decode()

    def stop(self) -> int:
        self.popen.send_signal(signal.SIGINT)
        try:
            self.popen.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.communicate()
            raise AssertionError("did not exit after SIGINT") from None
        return self.popen.returncode

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.communicate()


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    (tmp_path / "taskapp.py").write_text(APP)
    return tmp_path


@pytest.fixture
def tunnel_server() -> Iterator[tuple[str, str]]:
    proc = Proc("serve", "--listen", "127.0.0.1:0")
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
    proc = Proc(
        "tasks",
        "serve",
        "taskapp:make",
        "--listen",
        "127.0.0.1:0",
        "--tunnel",
        address,
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
