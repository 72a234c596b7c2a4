"""The admin API's dashboard in a real browser: headless Chromium (Debian's, driven by
Playwright) against a real ``pytunnel connect``; traffic and a lost link made for real."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import closed_port

import pytunnel

playwright_sync = pytest.importorskip(
    "playwright.sync_api", reason="the playwright package drives the browser"
)
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.slow,  # a browser and two or three pytunnel processes: 10-20 s each
    pytest.mark.timeout(120),
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install chromium)"),
]
PYTUNNEL = [sys.executable, "-m", "pytunnel"]
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-dev-shm-usage",
    "--no-first-run",
]


def _line(proc: subprocess.Popen[str], prefix: str) -> str:
    assert proc.stdout is not None
    for _ in range(10):
        line = proc.stdout.readline()
        assert line, "the process ended"
        if line.startswith(prefix):
            return line.strip()
    raise AssertionError(f"no line starting with {prefix!r}")


@pytest.fixture
def echo() -> Iterator[int]:
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                while data := conn.recv(65536):
                    conn.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    yield int(listener.getsockname()[1])
    listener.close()


@pytest.fixture
def browser() -> Iterator[object]:
    with playwright_sync.sync_playwright() as p:
        instance = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            yield instance
        finally:
            instance.close()


def test_dashboard_shows_forwards_traffic_and_a_lost_link(
    browser: object, echo: int, tmp_path: Path
) -> None:
    expect = playwright_sync.expect
    server = subprocess.Popen(
        [*PYTUNNEL, "serve", "--listen", "127.0.0.1:0", "--token", "t"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    client = None
    try:
        address = _line(server, "pytunnel server listening on ").rsplit(" ", 1)[1]
        token_file = tmp_path / "admin-token"
        token_file.write_text("dash-token\n")
        admin = closed_port()
        args = ["-L", f"0:127.0.0.1:{echo}", "--admin", f"127.0.0.1:{admin}"]
        args += ["--admin-token-file", str(token_file)]
        client = subprocess.Popen(
            [*PYTUNNEL, "connect", address, "--token", "t", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env={**os.environ},
        )
        forward = _line(client, "local forward ")
        match = re.search(r"127\.0\.0\.1:(\d+)", forward)
        assert match
        port = int(match.group(1))

        page = browser.new_page()  # type: ignore[attr-defined]
        # everything the page loads comes from the admin API itself: no CDN, no font, no other
        requested: list[str] = []
        page.on("request", lambda request: requested.append(request.url))
        for _ in range(50):  # the admin port opens just after the forward line
            try:
                page.goto(f"http://127.0.0.1:{admin}/")
                break
            except playwright_sync.Error:
                page.wait_for_timeout(200)
        # no token yet: the page asks for one, and shows no data
        expect(page.locator("#login")).to_be_visible()
        page.fill("#token", "wrong")
        page.click("#login-form button")
        expect(page.locator("#login")).to_be_visible()
        page.fill("#token", "dash-token")
        page.click("#login-form button")

        row = page.locator('tr[data-id="f1"]')
        expect(row.locator(".status")).to_have_text("active")
        expect(page.locator("#link")).to_contain_text(f"link up to {address}")
        expect(row.locator(".out")).to_have_text("0B")

        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            conn.sendall(b"x" * 3000)
            got = b""
            while len(got) < 3000:
                got += conn.recv(65536)
        expect(row.locator(".out")).to_have_text("3.0KB")
        expect(row.locator(".conns")).to_have_text("0/1")

        # a forward added through the form appears; stop and remove through its buttons
        page.select_option("#add-kind", "local")
        page.fill("#add-spec", f"0:127.0.0.1:{echo}")
        page.fill("#add-name", "extra")
        page.click("#add button")
        extra = page.locator('tr[data-id="f2"]')
        expect(extra.locator(".status")).to_have_text("active")
        extra.locator('button[data-action="stop"]').click()
        expect(extra.locator(".status")).to_have_text("stopped")
        extra.locator('button[data-action="retry"]').click()
        expect(extra.locator(".status")).to_have_text("active")
        extra.locator('button[data-action="remove"]').click()
        expect(extra).to_have_count(0)

        # a forward whose target refuses: each failed connection is a dial error event
        page.fill("#add-spec", f"0:127.0.0.1:{closed_port()}")
        page.fill("#add-name", "dead")
        page.click("#add button")
        dead = page.locator('tr[data-id="f3"]')
        expect(dead.locator(".status")).to_have_text("active")
        dead_port = int(dead.locator("td").nth(3).inner_text().rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", dead_port), timeout=10) as conn:
            conn.settimeout(30)
            with contextlib.suppress(ConnectionResetError):  # closed or reset, as it fails
                assert conn.recv(1) == b""
        expect(page.locator("#events")).to_contain_text("f3 dead: 1 dial error NODE_UNSTABLE")

        # the link drops: the forward turns suspended, the page says the link is down
        server.kill()
        server.wait()
        expect(row.locator(".status")).to_have_text("suspended", timeout=30_000)
        expect(page.locator("#link")).to_contain_text("link down")
        expect(page.locator("#events")).to_contain_text("f1 : active -> suspended")
        expect(page.locator("#events")).to_contain_text(f"link to {address} down: reconnecting")

        # a server on the same address again: the client reconnects, the forward is back
        server = subprocess.Popen(
            [*PYTUNNEL, "serve", "--listen", address, "--token", "t"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        _line(server, "pytunnel server listening on ")
        expect(row.locator(".status")).to_have_text("active", timeout=60_000)
        expect(page.locator("#events")).to_contain_text(
            f"reconnected to {address} (reconnection 1)", timeout=30_000
        )
        expect(page.locator("#events")).to_contain_text("f1 : suspended -> active")
        assert requested
        foreign = [u for u in requested if not u.startswith(f"http://127.0.0.1:{admin}/")]
        assert foreign == []
    finally:
        for proc in (client, server):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()


def test_server_dashboard_shows_clients_come_and_go(
    browser: object, echo: int, tmp_path: Path
) -> None:
    expect = playwright_sync.expect
    token_file = tmp_path / "admin-token"
    token_file.write_text("srv-token\n")
    admin = closed_port()
    args = ["--admin", f"127.0.0.1:{admin}", "--admin-token-file", str(token_file)]
    server = subprocess.Popen(
        [*PYTUNNEL, "serve", "--listen", "127.0.0.1:0", "--token", "t", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    client = None
    # a second forward's target, closed later: its health probes take the forward offline
    probed = socket.create_server(("127.0.0.1", 0))
    try:
        address = _line(server, "pytunnel server listening on ").rsplit(" ", 1)[1]
        page = browser.new_page()  # type: ignore[attr-defined]
        for _ in range(50):
            try:
                page.goto(f"http://127.0.0.1:{admin}/")
                break
            except playwright_sync.Error:
                page.wait_for_timeout(200)
        page.fill("#token", "srv-token")
        page.click("#login-form button")
        expect(page.locator("#role")).to_have_text("server")
        expect(page.locator("#link")).to_contain_text("0 clients")

        remote = ["-R", f"0:127.0.0.1:{echo}", "--client-id", "laptop", "--admin", "off"]
        remote += ["-R", f"0:127.0.0.1:{probed.getsockname()[1]}"]
        remote += ["--probe-interval", "0.5", "--probe-failures", "1"]
        remote += ["-R", f"0:127.0.0.1:{echo}/udp"]  # nothing answers there: none is sent
        client = subprocess.Popen(
            [*PYTUNNEL, "connect", address, "--token", "t", *remote],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        public = _line(client, "remote forward ").split()[2]
        probed_public = _line(client, "remote forward ").split()[2]
        udp_public = _line(client, "remote udp forward ").split()[3]
        row = page.locator("#forwards tbody tr")
        expect(row).to_have_count(1)  # the clients table
        expect(row).to_contain_text("laptop")
        expect(row).to_contain_text(public)
        # the version the client named and the round-trip time the server measured
        expect(row.locator(".version")).to_have_text(f"pytunnel/{pytunnel.__version__}")
        expect(row.locator(".rtt")).to_have_text(re.compile(r"^\d+\.\d ms$"))
        expect(page.locator("#link")).to_contain_text("1 clients")
        expect(page.locator("#events")).to_contain_text("client laptop connected")
        forward_row = page.locator(f'#ports tr[data-port="{public}"]')
        expect(forward_row.locator(".status")).to_have_text("active")
        expect(forward_row.locator(".out")).to_have_text("0B")
        host, port = public.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=10) as conn:
            conn.sendall(b"z" * 2000)
            got = b""
            while len(got) < 2000:
                got += conn.recv(65536)
        expect(forward_row.locator(".out")).to_have_text("2.0KB")
        expect(forward_row.locator(".conns")).to_have_text("0/1")

        # a UDP remote forward is a row too, its bind marked /udp
        udp_row = page.locator(f'#ports tr[data-port="{udp_public}/udp"]')
        expect(udp_row.locator(".status")).to_have_text("active")
        expect(udp_row.locator(".conns")).to_have_text("0/0")

        # a status change of a client's forward is an event
        probed_row = page.locator(f'#ports tr[data-port="{probed_public}"]')
        expect(probed_row.locator(".status")).to_have_text("active")
        probed.close()
        expect(probed_row.locator(".status")).to_have_text("offline", timeout=30_000)
        expect(page.locator("#events")).to_contain_text(
            f"laptop {probed_public}: active -> offline"
        )

        client.kill()
        client.wait()
        expect(row).to_have_count(0, timeout=30_000)
        expect(page.locator("#events")).to_contain_text("disconnected")
    finally:
        probed.close()
        for proc in (client, server):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()


def test_name_routes_on_both_dashboards(browser: object, echo: int, tmp_path: Path) -> None:
    """A name route added through the client's form is a row of its forwards (kind ``name``,
    its public URL) and, on the server's dashboard, a row of that client's routes; Remove
    takes it off both."""
    expect = playwright_sync.expect
    token_file = tmp_path / "admin-token"
    token_file.write_text("names-token\n")
    server_admin, client_admin = closed_port(), closed_port()
    server = subprocess.Popen(
        [
            *PYTUNNEL, "serve", "--listen", "127.0.0.1:0", "--token", "t",
            "--http-listen", "127.0.0.1:0", "--domain", "tunnel.test",
            "--admin", f"127.0.0.1:{server_admin}", "--admin-token-file", str(token_file),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )  # fmt: skip
    client = None
    try:
        address = _line(server, "pytunnel server listening on ").rsplit(" ", 1)[1]
        shared = _line(server, "routing HTTP by name on ").rsplit(":", 1)[1]
        client = subprocess.Popen(
            [
                *PYTUNNEL, "connect", address, "--token", "t", "--client-id", "laptop",
                "--admin", f"127.0.0.1:{client_admin}", "--admin-token-file", str(token_file),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )  # fmt: skip
        _line(client, "connected to ")
        pages = []
        for port in (client_admin, server_admin):
            page = browser.new_page()  # type: ignore[attr-defined]
            for _ in range(50):
                try:
                    page.goto(f"http://127.0.0.1:{port}/")
                    break
                except playwright_sync.Error:
                    page.wait_for_timeout(200)
            page.fill("#token", "names-token")
            page.click("#login-form button")
            pages.append(page)
        mine, theirs = pages
        expect(mine.locator("#role")).to_have_text("client")
        mine.select_option("#add-kind", "remote")
        mine.fill("#add-spec", f"app:80:127.0.0.1:{echo}")
        mine.fill("#add-name", "app")
        mine.click("#add button")
        row = mine.locator('tr[data-id="f1"]')
        expect(row.locator(".status")).to_have_text("active")
        expect(row).to_contain_text("name")
        expect(row).to_contain_text(f"http://app.tunnel.test:{shared}")

        route = theirs.locator('#ports tr[data-port="http://app.tunnel.test"]')
        expect(route.locator(".status")).to_have_text("active")
        expect(route).to_contain_text("laptop")
        with socket.create_connection(("127.0.0.1", int(shared)), timeout=10) as conn:
            head = b"GET / HTTP/1.1\r\nHost: app.tunnel.test\r\n\r\n"
            conn.sendall(head)
            got = b""
            while len(got) < len(head):
                got += conn.recv(65536)
        expect(route.locator(".conns")).to_have_text("0/1")
        expect(row.locator(".conns")).to_have_text("0/1")

        row.locator('button[data-action="remove"]').click()
        expect(row).to_have_count(0)
        expect(route).to_have_count(0)
    finally:
        for proc in (client, server):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
