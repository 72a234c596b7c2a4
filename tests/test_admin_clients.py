"""What the server's admin API, dashboard data and metrics say of each connected client: the
version it named, the round-trip time the server measured, its name routes and group
memberships. A real ``pytunnel serve`` and real ``pytunnel connect`` processes, read with
curl over the admin socket and prometheus-client's parser; in-process servers for the
protocol cases (a client that never names its version, a server that predates the route)."""

from __future__ import annotations

import functools
import json
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from helpers import TOKEN, CliProcess, wait_until
from prometheus_client.parser import text_string_to_metric_families

import pytunnel
from pytunnel._handshake import client_handshake
from pytunnel.errors import ErrorCode
from pytunnel.protocol import routes
from pytunnel.protocol.mux import Role

pytestmark = pytest.mark.timeout(120)
CURL = shutil.which("curl")
DOMAIN = "tunnel.test"


def _curl_json(sock: Path, path: str) -> Any:
    assert CURL is not None
    out = subprocess.run(
        [CURL, "-sS", "--fail", "--unix-socket", str(sock), f"http://pytunnel{path}"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.fixture
def web() -> Iterator[int]:
    """An HTTP service answering every request with ``web <path>`` (one request a
    connection, as curl sends it)."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                head = b""
                while b"\r\n\r\n" not in head and (data := conn.recv(65536)):
                    head += data
                path = head.split(b" ", 2)[1] if head.count(b" ") >= 2 else b"?"
                body = b"web " + path + b"\n"
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                    % len(body)
                    + body
                )

    threading.Thread(target=serve, daemon=True).start()
    yield int(listener.getsockname()[1])
    listener.close()


@pytest.mark.skipif(CURL is None, reason="curl is not installed")
def test_server_api_shows_version_rtt_and_name_routes(tmp_path: Path, web: int) -> None:
    sock = tmp_path / "run" / "serve.sock"
    sock.parent.mkdir(mode=0o700)
    server = CliProcess(
        "serve", "--listen", "127.0.0.1:0", "--token", "t",
        "--admin", f"unix:{sock}", "--metrics", "127.0.0.1:0",
        "--http-listen", "127.0.0.1:0", "--domain", DOMAIN,
    )  # fmt: skip
    client = None
    try:
        address = server.line_with("pytunnel server listening on ").rsplit(" ", 1)[1]
        shared = server.line_with("routing HTTP by name on ").rsplit(" ", 1)[1]
        metrics = server.line_with("metrics at ").rsplit(" ", 1)[1]
        client = CliProcess(
            "connect", address, "--token", "t", "--client-id", "laptop",
            "--admin", "off", "-R", f"app:80:127.0.0.1:{web}",
        )  # fmt: skip
        assert client.line_with("name route ").startswith(f"name route http://app.{DOMAIN}")

        def laptop() -> dict[str, Any]:
            clients = _curl_json(sock, "/api/clients")
            assert [c["client_id"] for c in clients] == ["laptop"]
            return dict(clients[0])

        deadline = time.monotonic() + 20
        while (info := laptop())["rtt"] is None or info["version"] is None:
            assert time.monotonic() < deadline, info
            time.sleep(0.1)
        assert info["version"] == f"pytunnel/{pytunnel.__version__}"
        assert info["rtt"] > 0
        assert info["uptime"] >= 0
        assert info["routes"] == [
            {
                "forward_id": info["routes"][0]["forward_id"],
                "address": f"app.{DOMAIN}",
                "kind": "http",
                "group": None,
                "status": "active",
                "connections": 0,
                "connections_total": 0,
                "bytes_out": 0,
                "bytes_in": 0,
            }
        ]
        assert info["routes"][0]["forward_id"] > 0

        # a request through the route is counted on it
        assert CURL is not None
        got = subprocess.run(
            [CURL, "-sS", "--resolve", f"app.{DOMAIN}:{shared.rsplit(':', 1)[1]}:127.0.0.1",
             f"http://app.{DOMAIN}:{shared.rsplit(':', 1)[1]}/hello"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert got.stdout == "web /hello\n", got.stderr
        deadline = time.monotonic() + 20
        while (route := laptop()["routes"][0])["connections_total"] < 1:
            assert time.monotonic() < deadline, route
            time.sleep(0.1)
        assert route["bytes_out"] > 0
        assert route["bytes_in"] > 0

        status = _curl_json(sock, "/api/status")
        assert status["clients"][0]["version"] == info["version"]

        with urllib.request.urlopen(f"{metrics}", timeout=10) as answer:
            text = answer.read().decode()
        samples = {
            (s.name, s.labels.get("client")): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }
        assert samples[("pytunnel_server_client_heartbeat_rtt_seconds", "laptop")] > 0
    finally:
        if client is not None:
            client.stop()
        server.stop()


async def test_a_client_that_never_names_its_version_is_shown_without_one() -> None:
    """A client of an older release sends no CLIENT_INFO: the server still measures its RTT
    and shows its version as unknown."""
    async with pytunnel.open_server(token=TOKEN) as server:
        stream = await trio.open_tcp_stream(*server.address)
        result = await client_handshake(stream, TOKEN, max_frame_size=1 << 20)
        config = pytunnel.SessionConfig()
        async with result.open_session(stream, Role.CLIENT, config, name="old client"):
            await wait_until(lambda: [c.rtt is not None for c in server.clients] == [True])
            (info,) = server.clients
            assert info.version is None
            assert info.rtt is not None
            assert info.rtt > 0


async def test_a_server_that_predates_the_route_is_no_problem() -> None:
    """A server that refuses CLIENT_INFO as an unknown route (as releases before it do)
    costs the client nothing: its tunnel and its forwards work as ever."""
    from pytunnel._handshake import server_handshake

    refused: list[int] = []

    async def old_server(stream: trio.SocketStream) -> None:
        result = await server_handshake(stream, TOKEN, max_frame_size=1 << 20)
        config = pytunnel.SessionConfig()
        async with result.open_session(stream, Role.SERVER, config, name="old") as session:
            while True:
                try:
                    incoming = await session.accept_stream()
                except pytunnel.SessionClosedError:
                    return
                refused.append(incoming.tag)
                incoming.refuse(ErrorCode.PROTOCOL_ERROR, f"unknown route {incoming.tag}")

    async with trio.open_nursery() as nursery:
        serve = functools.partial(trio.serve_tcp, old_server, 0, host="127.0.0.1")
        (listener,) = await nursery.start(serve)
        port = listener.socket.getsockname()[1]
        async with pytunnel.open_tunnel(("127.0.0.1", port), token=TOKEN) as tunnel:
            await wait_until(lambda: refused == [routes.CLIENT_INFO])
            assert tunnel.connected
            with pytest.raises(pytunnel.StreamRefusedError):
                await tunnel.open_stream("127.0.0.1", 9)
            assert tunnel.connected
        nursery.cancel_scope.cancel()
