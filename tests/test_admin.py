"""The admin API's transport: Unix socket (mode, private directory, stale and live files),
loopback port with a token; exercised with the module's own client and with curl."""

from __future__ import annotations

import functools
import re
import shutil
import socket
import stat
from pathlib import Path

import pytest
import trio

import pytunnel
import pytunnel.admin
from pytunnel.admin import AdminError, Request, Response

pytestmark = pytest.mark.timeout(60)


async def _hello(request: Request) -> Response:
    if request.path == "/missing":
        raise AdminError(404, "no such thing")
    return Response.json(200, {"path": request.path, "method": request.method})


@pytest.fixture
def sockdir(tmp_path: Path) -> Path:
    path = tmp_path / "run"
    path.mkdir(mode=0o700)
    return path


async def _request(*args: object, **kwargs: object) -> tuple[int, object]:
    return await trio.to_thread.run_sync(
        functools.partial(pytunnel.admin.request, *args, **kwargs)  # type: ignore[arg-type]
    )


async def test_unix_socket_is_private_and_removed_at_the_end(sockdir: Path) -> None:
    path = sockdir / "a.sock"
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(pytunnel.admin.serve_admin_unix, _hello, path)
        assert bound == path
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        status, body = await _request("GET", "/x", unix_path=str(path))
        assert (status, body) == (200, {"path": "/x", "method": "GET"})
        status, body = await _request("GET", "/missing", unix_path=str(path))
        assert (status, body) == (404, {"error": "no such thing", "status": 404})
        assert pytunnel.admin.find_sockets(sockdir) == [path]
        nursery.cancel_scope.cancel()
    assert not path.exists()


async def test_a_stale_socket_is_replaced_and_a_live_one_refused(sockdir: Path) -> None:
    path = sockdir / "a.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # the file stays, as a killed process leaves it
    assert path.exists()
    async with trio.open_nursery() as nursery:
        await nursery.start(pytunnel.admin.serve_admin_unix, _hello, path)
        assert (await _request("GET", "/", unix_path=str(path)))[0] == 200
        with pytest.raises(pytunnel.AddressInUseError, match="another process serves"):
            await pytunnel.admin.serve_admin_unix(_hello, path)
        assert (await _request("GET", "/", unix_path=str(path)))[0] == 200
        nursery.cancel_scope.cancel()


async def test_find_sockets_removes_stale_ones(sockdir: Path) -> None:
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(sockdir / "old.sock"))
    stale.close()
    assert pytunnel.admin.find_sockets(sockdir) == []
    assert not (sockdir / "old.sock").exists()


async def test_a_directory_open_to_others_or_a_plain_file_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(pytunnel.PermissionDeniedError, match="not a private directory"):
        await pytunnel.admin.serve_admin_unix(_hello, shared / "a.sock")
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    (private / "a.sock").write_text("not a socket")
    with pytest.raises(pytunnel.AddressInUseError, match="is not a socket"):
        await pytunnel.admin.serve_admin_unix(_hello, private / "a.sock")
    assert (private / "a.sock").read_text() == "not a socket"


async def test_a_port_needs_loopback_and_the_token() -> None:
    with pytest.raises(pytunnel.PermissionDeniedError, match="loopback only"):
        await pytunnel.admin.serve_admin_tcp(_hello, "0.0.0.0", 0, token="t")
    with pytest.raises(ValueError, match="needs a token"):
        await pytunnel.admin.serve_admin_tcp(_hello, "127.0.0.1", 0, token="")
    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(
            functools.partial(pytunnel.admin.serve_admin_tcp, _hello, "127.0.0.1", 0, token="s3")
        )
        address = (host, port)
        assert await _request("GET", "/a", address=address, token="s3") == (
            200,
            {"path": "/a", "method": "GET"},
        )
        for token in (None, "wrong", "s3x", "S3"):
            status, body = await _request("GET", "/a", address=address, token=token)
            assert status == 401
            assert isinstance(body, dict)
            assert "admin token" in body["error"]
        nursery.cancel_scope.cancel()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_curl_over_the_unix_socket(sockdir: Path) -> None:
    path = sockdir / "a.sock"
    async with trio.open_nursery() as nursery:
        await nursery.start(pytunnel.admin.serve_admin_unix, _hello, path)
        out = await trio.run_process(
            ["curl", "-sS", "--unix-socket", str(path), "-X", "POST", "http://pytunnel/api/x"],
            capture_stdout=True,
        )
        assert out.stdout == b'{"path":"/api/x","method":"POST"}'
        nursery.cancel_scope.cancel()


def test_request_to_nothing_is_an_os_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        pytunnel.admin.request("GET", "/", unix_path=str(tmp_path / "none.sock"))
    with pytest.raises(ValueError, match="give unix_path or address"):
        pytunnel.admin.request("GET", "/")


async def _raw(port: int, head: str) -> tuple[int, bytes]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(head.encode() + b"\r\n")
    data = b""
    with trio.fail_after(10):
        while chunk := await stream.receive_some():
            data += chunk
            if b"\r\n\r\n" in data and data.endswith(b"}"):
                break
    await stream.aclose()
    return int(data.split()[1]), data


async def test_foreign_pages_and_rebound_names_are_refused() -> None:
    """CSRF and DNS rebinding: the token is not even looked at for a request another site
    made a browser send."""
    async with trio.open_nursery() as nursery:
        _, port = await nursery.start(
            functools.partial(
                pytunnel.admin.serve_admin_tcp,
                _hello,
                "127.0.0.1",
                0,
                token="s3",
                public_paths=("/",),
            )
        )
        auth = "authorization: Bearer s3\r\nconnection: close\r\n"
        here = f"host: 127.0.0.1:{port}\r\n"
        assert (await _raw(port, f"GET /a HTTP/1.1\r\n{here}{auth}"))[0] == 200
        # the public page needs no token, the API does
        assert (await _raw(port, f"GET / HTTP/1.1\r\n{here}connection: close\r\n"))[0] == 200
        assert (await _raw(port, f"GET /a HTTP/1.1\r\n{here}connection: close\r\n"))[0] == 401
        assert (await _raw(port, f"POST / HTTP/1.1\r\n{here}connection: close\r\n"))[0] == 401
        same = f"origin: http://127.0.0.1:{port}\r\n"
        assert (await _raw(port, f"POST /a HTTP/1.1\r\n{here}{same}{auth}"))[0] == 200
        for extra in (
            "origin: http://evil.example\r\n",
            f"origin: http://localhost:{port}\r\n",
            "sec-fetch-site: cross-site\r\n",
        ):
            status, data = await _raw(port, f"POST /a HTTP/1.1\r\n{here}{extra}{auth}")
            assert status == 403, data
            assert b"refused" in data
        status, data = await _raw(port, f"GET /a HTTP/1.1\r\nhost: evil.example:{port}\r\n{auth}")
        assert status == 403
        assert b"loopback names only" in data
        nursery.cancel_scope.cancel()


async def test_a_body_over_the_limit_is_refused_unread(sockdir: Path) -> None:
    path = sockdir / "a.sock"

    async def reads(request: Request) -> Response:
        return Response.json(200, {"size": len(await request.read_body())})

    async with trio.open_nursery() as nursery:
        await nursery.start(pytunnel.admin.serve_admin_unix, reads, path)
        status, body = await _request("POST", "/", {"x": "y" * 1000}, unix_path=str(path))
        assert (status, body) == (200, {"size": len('{"x": ""}') + 1000})
        # a declared 70 kB body is refused from its head alone, none of it sent
        stream = await trio.open_unix_socket(str(path))
        await stream.send_all(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 70000\r\n\r\n")
        with trio.fail_after(10):
            answer = await stream.receive_some()
        await stream.aclose()
        assert answer.startswith(b"HTTP/1.1 413 ")
        nursery.cancel_scope.cancel()


def test_the_dashboard_page_loads_nothing_from_elsewhere() -> None:
    """The page is one file with its script and style inline: no URL of another host, no
    second file to fetch (its Content-Security-Policy would block one anyway)."""
    from importlib import resources

    page = resources.files("pytunnel.cli").joinpath("dashboard/index.html").read_text()
    assert "default-src 'self'" in page
    assert re.findall(r"""(?:src|href)\s*=|@import|url\(|https?://|//[a-z0-9.-]+\.""", page) == []
