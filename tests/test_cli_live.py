"""The live table of ``pytunnel connect`` on a terminal: run under a pseudo-terminal (pexpect)
and read off the screen; off with ``--quiet`` and on anything that is not a terminal."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

pexpect = pytest.importorskip("pexpect", reason="pexpect is needed to run a pseudo-terminal")

pytestmark = pytest.mark.timeout(90)
PYTUNNEL = [sys.executable, "-m", "pytunnel"]
_ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.fixture
def server() -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    proc = subprocess.Popen(
        [*PYTUNNEL, "serve", "--listen", "127.0.0.1:0", "--token", "t"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        match = re.search(r"127\.0\.0\.1:\d+", line)
        assert match, line
        yield proc, match.group()
    finally:
        proc.kill()
        proc.wait()


def _spawn(address: str, *args: str) -> pexpect.spawn:
    return pexpect.spawn(
        sys.executable,
        ["-m", "pytunnel", "connect", address, "--token", "t", "--admin", "off", *args],
        env={**os.environ, "COLUMNS": "160"},
        dimensions=(30, 160),
        timeout=30,
    )


def _screen(child: pexpect.spawn) -> str:
    """What was drawn since the last match, without the terminal's escape codes."""
    return _ANSI.sub(b"", child.before or b"").decode(errors="replace")


def test_the_table_follows_traffic_and_the_link(
    server: tuple[subprocess.Popen[bytes], str],
) -> None:
    proc, address = server
    echo = socket.create_server(("127.0.0.1", 0))
    target = f"127.0.0.1:{echo.getsockname()[1]}"
    child = _spawn(address, "-L", f"0:{target}")
    try:
        child.expect(r"local forward 127\.0\.0\.1:(\d+)")
        port = int(child.match.group(1))
        child.expect(f"link up to {address} since")
        child.expect(r"last error")
        child.expect(r"\r\n")
        # the forward's row: id, name, kind, bind, target, status, connections
        child.expect("active")
        row = _screen(child)
        assert "f1" in row
        assert f"127.0.0.1:{port}" in row
        assert target in row

        with socket.create_connection(("127.0.0.1", port)) as conn:
            accepted, _ = echo.accept()
            conn.sendall(b"x" * 5000)
            got = b""
            while len(got) < 5000:
                got += accepted.recv(65536)
            # the next redraws count the connection and its bytes, and a rate
            child.expect(r"1/1\s+5\.0KB\s+0B\s+[\d.]+K?B/s")
            accepted.close()

        proc.kill()
        proc.wait()
        child.expect(f"link down since [0-9:]+: reconnecting to {address}")
        child.expect("suspended")
    finally:
        child.sendintr()
        child.expect(pexpect.EOF)
        child.close()
        echo.close()
    assert child.exitstatus == 0


@pytest.mark.slow  # waits for the periodic status line, twice
def test_quiet_and_non_terminals_get_no_table(
    server: tuple[subprocess.Popen[bytes], str],
) -> None:
    _, address = server
    child = _spawn(address, "-L", "0:127.0.0.1:9", "--quiet", "--status-interval", "2.5")
    try:
        child.expect("local forward")
        # the periodic status line arrives after at least one redraw would have happened
        child.expect("status link up")
        assert "link up to" not in _screen(child)
        assert "last error" not in _screen(child)
    finally:
        child.sendintr()
        child.expect(pexpect.EOF)
        child.close()

    args = ["--admin", "off", "-L", "0:127.0.0.1:9", "--status-interval", "2.5"]
    piped = subprocess.Popen(
        [*PYTUNNEL, "connect", address, "--token", "t", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert piped.stdout is not None
        lines = [piped.stdout.readline().decode() for _ in range(3)]
    finally:
        piped.kill()
        piped.wait()
    assert lines[0].startswith("connected to")
    assert lines[1].startswith("local forward")
    assert lines[2].startswith("status local forward")


def test_the_wait_for_the_server_says_what_and_since_when() -> None:
    """Before the first connection (a server that accepts and never answers), the terminal
    says which server is awaited, since when, and counts the seconds; the line goes away
    with the wait, before the error that ends it."""
    silent = socket.create_server(("127.0.0.1", 0))  # the kernel accepts; nobody answers
    address = f"127.0.0.1:{silent.getsockname()[1]}"
    child = _spawn(address, "-L", "0:127.0.0.1:9")
    try:
        child.expect(rf"connecting to {address} since ([0-9:]+) \(0 s\)")
        since = child.match.group(1).decode()
        child.expect(rf"connecting to {address} since {since} \(1 s\)")
        silent.close()  # the connection waiting in the backlog is reset
        child.expect("pytunnel: error: ")
        # the last thing drawn before the error erased the waiting line (ESC [2K)
        drawn = child.before or b""
        assert b"\x1b[2K" in drawn[drawn.rindex(b" s)") :]
        child.expect(pexpect.EOF)
    finally:
        child.close()
        silent.close()
    assert child.exitstatus == 1
