"""The example of docs/tasks.md ("a Node Runner client calling a Python task through a
tunnel") run as written: its files and its commands, each a real process. Only what cannot
run here is changed, and only in addresses: the public host is ``127.0.0.2`` (``0.0.0.0``
and ``public.example.com`` both become it), a loopback address other than the default
``127.0.0.1``, so a forward left on the default would not be reached, as from another
machine; the ports are any free ones (read back from what the commands print); and ``npm
install`` is the tests' shared install of the same version."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import CliProcess, address_in

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]

DOC = Path(__file__).resolve().parent.parent / "docs" / "tasks.md"
#: the public host's address: loopback, yet not where anything listens by default
PUBLIC = "127.0.0.2"
HEADING = "## Example: a Node Runner client calling a Python task through a tunnel"
SECTION = DOC.read_text().split(HEADING, 1)[1].split("\n## ", 1)[0]
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", SECTION, flags=re.DOTALL)


def commands(block: str) -> list[list[str]]:
    """A shell block's commands as words: continuation lines joined, comments dropped."""
    joined = block.replace("\\\n", " ")
    return [words for line in joined.splitlines() if (words := shlex.split(line, comments=True))]


def on_loopback(text: str, ports: dict[int, int]) -> str:
    """``text`` with the doc's public addresses on loopback and its ports replaced."""
    text = text.replace("0.0.0.0", PUBLIC).replace("public.example.com", PUBLIC)
    for written, actual in ports.items():
        text = re.sub(rf"(?<![\d.]){written}(?!\d)", str(actual), text)
    return text


def test_the_section_has_the_files_and_commands_this_test_runs() -> None:
    assert [kind for kind, _ in BLOCKS] == ["python", "sh", "js", "sh"]
    secret, serve, tasks = commands(BLOCKS[1][1])
    assert (secret[0], secret[-2:]) == ("python", [">", "tunnel.token"])
    assert serve[:2] == ["pytunnel", "serve"]
    assert tasks[:3] == ["pytunnel", "tasks", "serve"]
    assert commands(BLOCKS[3][1]) == [
        ["npm", "install", "@bluelibs/runner@5.5"],
        ["node", "call.mjs"],
    ]


def test_the_example_runs_as_written(runner_dir: Path, tmp_path: Path) -> None:
    python, shell, js, node = (text for _, text in BLOCKS)
    (tmp_path / "myapp.py").write_text(python)
    secret, serve, tasks = commands(shell)
    made = subprocess.run(
        [sys.executable, *secret[1:-2]], capture_output=True, check=True, timeout=60
    )
    (tmp_path / secret[-1]).write_bytes(made.stdout)

    server = CliProcess(*(on_loopback(w, {7000: 0}) for w in serve[1:]), cwd=tmp_path)
    try:
        host, tunnel_port = address_in(server.readline())
        assert host == PUBLIC
        ports = {7000: tunnel_port, 8080: 0}
        behind = CliProcess(*(on_loopback(w, ports) for w in tasks[1:]), cwd=tmp_path)
        try:
            line = behind.readline()
            match = re.fullmatch(
                rf"tasks through {PUBLIC}:{tunnel_port} on port (\d+)/__runner", line
            )
            assert match, line
            (tmp_path / "call.mjs").write_text(on_loopback(js, {8080: int(match.group(1))}))
            # `npm install` here is the shared install of the same version
            (tmp_path / "node_modules").symlink_to(runner_dir / "node_modules")
            run = commands(node)[1]
            done = subprocess.run(
                run, cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False
            )
            assert done.returncode == 0, done.stderr
            assert done.stdout == "true 2024-02-29T12:00:00.000Z\n"
            assert behind.stop() == 0
        finally:
            behind.kill()
        assert server.stop() == 0
    finally:
        server.kill()
