"""TLS on the control connection: chains, names, pins, expiry, mutual TLS, wrong protocols.

Every failure must be fast, typed (TLSError, code 1011, or another ConnectError) and carry
one clear sentence.
"""

from __future__ import annotations

import datetime
import functools
import logging
import os
import re
import shutil
import signal
import ssl
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme
from helpers import TOKEN

import pytunnel
from pytunnel._tls_stream import TLSSocketStream
from pytunnel.protocol.frames import encode_message
from pytunnel.protocol.messages import NONCE_SIZE, Hello

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def _server_ctx(cert: trustme.LeafCert, client_ca: trustme.CA | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    if client_ca is not None:
        client_ca.configure_trust(ctx)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def _client_ctx(trusted: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    trusted.configure_trust(ctx)
    return ctx


async def _start(nursery: trio.Nursery, ctx: ssl.SSLContext | None) -> pytunnel.TunnelServer:
    server: pytunnel.TunnelServer = await nursery.start(
        functools.partial(pytunnel.serve, 0, token=TOKEN, tls=ctx)
    )
    return server


async def _roundtrip(tunnel: pytunnel.Tunnel, echo_port: int) -> None:
    forward = await tunnel.forward_local("127.0.0.1", echo_port)
    stream = await trio.open_tcp_stream(*forward.address)
    await stream.send_all(b"over tls")
    assert await stream.receive_some() == b"over tls"
    await stream.aclose()


async def test_valid_chain(nursery: trio.Nursery, ca: trustme.CA, echo_port: int) -> None:
    server = await _start(nursery, _server_ctx(ca.issue_cert("localhost", "127.0.0.1")))
    tunnel = await pytunnel.connect_tunnel(
        nursery, server.address, token=TOKEN, tls=_client_ctx(ca), reconnect=False
    )
    assert isinstance(tunnel.session._transport, TLSSocketStream)  # type: ignore[union-attr]
    await _roundtrip(tunnel, echo_port)
    await tunnel.aclose()


async def _expect_tls_error(server: pytunnel.TunnelServer, **options: object) -> pytunnel.TLSError:
    with trio.fail_after(10), pytest.raises(pytunnel.TLSError) as info:
        async with pytunnel.open_tunnel(server.address, token=TOKEN, reconnect=False, **options):
            pass  # pragma: no cover
    assert info.value.code == pytunnel.ErrorCode.TLS_FAILED
    assert "\n" not in str(info.value)
    return info.value


async def test_wrong_ca(nursery: trio.Nursery, ca: trustme.CA) -> None:
    server = await _start(nursery, _server_ctx(ca.issue_cert("127.0.0.1")))
    error = await _expect_tls_error(server, tls=_client_ctx(trustme.CA()))
    assert "certificate verification failed" in str(error)


async def test_wrong_host_name(nursery: trio.Nursery, ca: trustme.CA) -> None:
    server = await _start(nursery, _server_ctx(ca.issue_cert("example.org")))
    error = await _expect_tls_error(server, tls=_client_ctx(ca))
    assert "Hostname mismatch" in str(error) or "IP address mismatch" in str(error)


async def test_expired_certificate(nursery: trio.Nursery, ca: trustme.CA) -> None:
    past = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=30)
    cert = ca.issue_cert("127.0.0.1", not_before=past - datetime.timedelta(days=30), not_after=past)
    server = await _start(nursery, _server_ctx(cert))
    error = await _expect_tls_error(server, tls=_client_ctx(ca))
    assert "expired" in str(error)


async def test_pinned_self_signed(nursery: trio.Nursery, tmp_path: Path, echo_port: int) -> None:
    cert, key, fingerprint = await pytunnel.tls.ensure_self_signed(tmp_path / "tls")
    server = await _start(nursery, await pytunnel.tls.server_tls_context(cert, key))
    tunnel = await pytunnel.connect_tunnel(
        nursery, server.address, token=TOKEN, tls_fingerprint=fingerprint, reconnect=False
    )
    await _roundtrip(tunnel, echo_port)
    await tunnel.aclose()
    wrong = "SHA256:" + "A" * 43
    error = await _expect_tls_error(server, tls_fingerprint=wrong)
    assert "fingerprint mismatch" in str(error)
    assert fingerprint in str(error)


async def test_self_signed_files_are_private_and_reused(tmp_path: Path) -> None:
    cert, key, first = await pytunnel.tls.ensure_self_signed(tmp_path / "tls")
    for path in (cert, key):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    again = await pytunnel.tls.ensure_self_signed(tmp_path / "tls")
    assert again == (cert, key, first)
    assert first.startswith("SHA256:")
    assert len(first) == 7 + 43


async def test_plain_client_against_tls_server(
    nursery: trio.Nursery, ca: trustme.CA, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    server = await _start(nursery, _server_ctx(ca.issue_cert("127.0.0.1")))
    with trio.fail_after(10), pytest.raises(pytunnel.ConnectError) as info:
        async with pytunnel.open_tunnel(server.address, token=TOKEN, reconnect=False):
            pass  # pragma: no cover
    assert "TLS server" in str(info.value)
    await trio.sleep(0.05)
    assert any("not speaking TLS" in r.getMessage() for r in caplog.records)


async def test_tls_client_against_plain_server(nursery: trio.Nursery, ca: trustme.CA) -> None:
    server = await _start(nursery, None)
    error = await _expect_tls_error(server, tls=_client_ctx(ca))
    assert "not speaking TLS" in str(error)


async def test_mutual_tls(nursery: trio.Nursery, ca: trustme.CA, echo_port: int) -> None:
    client_ca = trustme.CA()
    server = await _start(nursery, _server_ctx(ca.issue_cert("127.0.0.1"), client_ca=client_ca))
    with_cert = _client_ctx(ca)
    client_ca.issue_cert("client@example").configure_cert(with_cert)
    tunnel = await pytunnel.connect_tunnel(
        nursery, server.address, token=TOKEN, tls=with_cert, reconnect=False
    )
    await _roundtrip(tunnel, echo_port)
    await tunnel.aclose()
    # without a client certificate the server ends the connection: typed, fast
    with trio.fail_after(10), pytest.raises(pytunnel.ConnectError):
        async with pytunnel.open_tunnel(
            server.address, token=TOKEN, tls=_client_ctx(ca), reconnect=False
        ):
            pass  # pragma: no cover


def test_fingerprint_formats() -> None:
    from pytunnel._tls import parse_fingerprint

    digest = bytes(range(32))
    import base64

    b64 = "SHA256:" + base64.b64encode(digest).decode().rstrip("=")
    assert parse_fingerprint(b64) == digest
    assert parse_fingerprint(digest.hex()) == digest
    assert parse_fingerprint(":".join(f"{b:02X}" for b in digest)) == digest
    for bad in ("SHA256:!!", "abcd", "SHA256:" + "A" * 10):
        with pytest.raises(ValueError, match="bad fingerprint"):
            parse_fingerprint(bad)


# ------------------------------------------------ contexts built once, off the loop; key files


async def test_reconnects_reuse_one_tls_context_built_off_the_loop(
    nursery: trio.Nursery, tmp_path: Path, echo_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Building a context reads the system CA store from disk: it must happen in a worker
    thread, once per tunnel, not on the event loop at every reconnection."""
    import threading

    import pytunnel._supervisor
    import pytunnel._tls

    built_in: list[bool] = []
    used: list[ssl.SSLContext] = []
    base_context = pytunnel._tls._base_context
    tls_connect = pytunnel._supervisor.tls_connect

    def spy_base_context(*args: Any, **kwargs: Any) -> ssl.SSLContext:
        built_in.append(threading.current_thread() is threading.main_thread())
        return base_context(*args, **kwargs)

    async def spy_tls_connect(stream: Any, context: ssl.SSLContext, **kwargs: Any) -> Any:
        used.append(context)
        return await tls_connect(stream, context, **kwargs)

    monkeypatch.setattr(pytunnel._tls, "_base_context", spy_base_context)
    monkeypatch.setattr(pytunnel._supervisor, "tls_connect", spy_tls_connect)
    cert, key, fingerprint = await pytunnel.tls.ensure_self_signed(tmp_path / "tls")
    server = await _start(nursery, await pytunnel.tls.server_tls_context(cert, key))
    built_in.clear()  # the server's own context
    tunnel = await pytunnel.connect_tunnel(
        nursery,
        server.address,
        token=TOKEN,
        tls_fingerprint=fingerprint,
        backoff_initial=0.02,
        backoff_max=0.1,
    )
    for reconnects in (1, 2):
        assert tunnel.session is not None
        await tunnel.session.abort(pytunnel.SessionClosedError("cut by the test"))
        with trio.fail_after(10):
            while tunnel.reconnects < reconnects or not tunnel.connected:
                await trio.sleep(0.01)
    await _roundtrip(tunnel, echo_port)
    assert built_in == [False], "one context, built in a worker thread"
    assert len(used) == 3
    assert all(context is used[0] for context in used)
    await tunnel.aclose()


async def test_self_signed_key_path_symlink_is_refused_not_followed(tmp_path: Path) -> None:
    directory = tmp_path / "tls"
    directory.mkdir()
    victim = tmp_path / "victim"
    (directory / "server.key").symlink_to(victim)  # dangling: "does not exist" to exists()
    with pytest.raises(pytunnel.TLSError, match="refusing to write"):
        await pytunnel.tls.ensure_self_signed(directory)
    assert not victim.exists()
    victim.write_text("precious")
    (directory / "server.crt").unlink(missing_ok=True)
    with pytest.raises(pytunnel.TLSError, match="refusing to write"):
        await pytunnel.tls.ensure_self_signed(directory)
    assert victim.read_text() == "precious"
    assert (directory / "server.key").is_symlink()


async def test_self_signed_files_are_0600_whatever_the_umask(tmp_path: Path) -> None:
    previous = os.umask(0o277)  # would leave 0400 if the mode came from open() alone
    try:
        cert, key, _ = await pytunnel.tls.ensure_self_signed(tmp_path / "tls")
    finally:
        os.umask(previous)
    for path in (cert, key):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


async def test_self_signed_pair_half_missing_is_made_anew(tmp_path: Path) -> None:
    cert, key, first = await pytunnel.tls.ensure_self_signed(tmp_path / "tls")
    cert.unlink()
    again_cert, again_key, second = await pytunnel.tls.ensure_self_signed(tmp_path / "tls")
    assert (again_cert, again_key) == (cert, key)
    assert second != first
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600


async def test_unloadable_tls_files_are_one_typed_error(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    with pytest.raises(pytunnel.TLSError, match="cannot load the certificate"):
        await pytunnel.tls.server_tls_context(garbage, garbage)
    cert, key, _ = await pytunnel.tls.ensure_self_signed(tmp_path / "tls")
    with pytest.raises(pytunnel.TLSError, match="cannot load the client CA"):
        await pytunnel.tls.server_tls_context(cert, key, client_ca_file=garbage)
    with pytest.raises(pytunnel.TLSError, match="cannot load the CA"):
        await pytunnel.tls.client_tls_context(ca_file=garbage)
    with pytest.raises(pytunnel.TLSError, match="cannot set up the self-signed"):
        await pytunnel.tls.ensure_self_signed(garbage / "inside a file")


# ------------------------------------------------- mutual TLS through the library's own contexts


@pytest.fixture
def mtls_files(tmp_path: Path, ca: trustme.CA) -> dict[str, Path]:
    """PEM files as a user has them: the server's chain and key, the CA that signs client
    certificates, a client certificate from it, and one from a CA the server does not trust."""
    client_ca = trustme.CA()
    stranger_ca = trustme.CA()
    files = {
        "ca": tmp_path / "ca.pem",
        "server_cert": tmp_path / "server.pem",
        "server_key": tmp_path / "server.key",
        "client_ca": tmp_path / "client-ca.pem",
        "client_cert": tmp_path / "client.pem",
        "client_key": tmp_path / "client.key",
        "stranger_cert": tmp_path / "stranger.pem",
        "stranger_key": tmp_path / "stranger.key",
    }
    ca.cert_pem.write_to_path(files["ca"])
    server_leaf = ca.issue_cert("127.0.0.1", "localhost")
    server_leaf.cert_chain_pems[0].write_to_path(files["server_cert"])
    for pem in server_leaf.cert_chain_pems[1:]:
        pem.write_to_path(files["server_cert"], append=True)
    server_leaf.private_key_pem.write_to_path(files["server_key"])
    client_ca.cert_pem.write_to_path(files["client_ca"])
    for name, issuer in (("client", client_ca), ("stranger", stranger_ca)):
        leaf = issuer.issue_cert(f"{name}@example")
        leaf.cert_chain_pems[0].write_to_path(files[f"{name}_cert"])
        leaf.private_key_pem.write_to_path(files[f"{name}_key"])
    return files


async def _mtls_server(nursery: trio.Nursery, files: dict[str, Path]) -> pytunnel.TunnelServer:
    context = await pytunnel.tls.server_tls_context(
        files["server_cert"], files["server_key"], client_ca_file=files["client_ca"]
    )
    return await _start(nursery, context)


async def _client_context(files: dict[str, Path], who: str | None) -> ssl.SSLContext:
    if who is None:
        return await pytunnel.tls.client_tls_context(ca_file=files["ca"])
    return await pytunnel.tls.client_tls_context(
        ca_file=files["ca"], cert_file=files[f"{who}_cert"], key_file=files[f"{who}_key"]
    )


#: What the server logs when it refuses a client in the TLS handshake, per reason.
NO_CLIENT_CERT = "PEER_DID_NOT_RETURN_A_CERTIFICATE"
UNTRUSTED_CLIENT_CERT = "certificate verification failed"


async def _refused_by_mtls_server(
    server: pytunnel.TunnelServer,
    context: ssl.SSLContext,
    caplog: pytest.LogCaptureFixture,
    reason: str,
) -> None:
    """The connection fails, typed and fast, and it is the server that refused it in the TLS
    handshake for ``reason`` (so the refusal is the certificate check, not anything later)."""
    caplog.set_level(logging.WARNING, logger="pytunnel")
    with trio.fail_after(10), pytest.raises(pytunnel.ConnectError):
        async with pytunnel.open_tunnel(server.address, token=TOKEN, tls=context, reconnect=False):
            pass  # pragma: no cover

    def refusals() -> list[str]:
        return [m for r in caplog.records if "TLS handshake with" in (m := r.getMessage())]

    with trio.fail_after(10):
        while not refusals():
            await trio.sleep(0.01)
    assert reason in refusals()[0]
    assert server.session_count == 0


async def test_server_tls_context_with_client_ca_requires_a_client_certificate(
    nursery: trio.Nursery,
    mtls_files: dict[str, Path],
    echo_port: int,
    caplog: pytest.LogCaptureFixture,
) -> None:
    context = await pytunnel.tls.server_tls_context(
        mtls_files["server_cert"], mtls_files["server_key"], client_ca_file=mtls_files["client_ca"]
    )
    assert context.verify_mode == ssl.CERT_REQUIRED
    server = await _mtls_server(nursery, mtls_files)
    tunnel = await pytunnel.connect_tunnel(
        nursery,
        server.address,
        token=TOKEN,
        tls=await _client_context(mtls_files, "client"),
        reconnect=False,
    )
    await _roundtrip(tunnel, echo_port)
    await tunnel.aclose()
    await _refused_by_mtls_server(
        server, await _client_context(mtls_files, None), caplog, NO_CLIENT_CERT
    )


async def test_server_tls_context_with_client_ca_refuses_a_certificate_from_another_ca(
    nursery: trio.Nursery, mtls_files: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    server = await _mtls_server(nursery, mtls_files)
    await _refused_by_mtls_server(
        server, await _client_context(mtls_files, "stranger"), caplog, UNTRUSTED_CLIENT_CERT
    )


async def test_server_tls_context_without_client_ca_asks_for_no_certificate(
    mtls_files: dict[str, Path],
) -> None:
    context = await pytunnel.tls.server_tls_context(
        mtls_files["server_cert"], mtls_files["server_key"]
    )
    assert context.verify_mode == ssl.CERT_NONE


def _serve_cli(*args: str) -> tuple[subprocess.Popen[bytes], tuple[str, int]]:
    """``pytunnel serve`` as a user runs it, with its listening address read from stdout."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytunnel", "serve", "--listen", "127.0.0.1:0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTUNNEL_TOKEN": TOKEN},
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    match = re.search(r"listening on (\S+):(\d+) \(TLS\)", line)
    if match is None:
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"no listening line: {line!r} {err.decode()!r}")
    return proc, (match.group(1), int(match.group(2)))


def _stop_when_logged(proc: subprocess.Popen[bytes], needle: str, timeout: float = 10) -> str:
    """Stop the server once its log has ``needle`` (or after a generous ``timeout``): it
    logs a refused handshake when the handshake ends, which may be after the client quit."""
    assert proc.stderr is not None
    os.set_blocking(proc.stderr.fileno(), False)
    seen = b""
    deadline = time.monotonic() + timeout
    while needle.encode() not in seen and time.monotonic() < deadline and proc.poll() is None:
        chunk = proc.stderr.read()
        if chunk:
            seen += chunk
        else:
            time.sleep(0.02)
    os.set_blocking(proc.stderr.fileno(), True)
    return seen.decode() + _stop(proc)


def _stop(proc: subprocess.Popen[bytes]) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return err.decode()


@pytest.fixture
def mtls_cli_server(
    mtls_files: dict[str, Path],
) -> Iterator[tuple[subprocess.Popen[bytes], tuple[str, int]]]:
    proc, address = _serve_cli(
        "--tls-cert",
        str(mtls_files["server_cert"]),
        "--tls-key",
        str(mtls_files["server_key"]),
        "--tls-client-ca",
        str(mtls_files["client_ca"]),
    )
    try:
        yield proc, address
    finally:
        _stop(proc)


def _connect_cli(address: tuple[str, int], *args: str) -> subprocess.CompletedProcess[str]:
    """``pytunnel connect`` that exits after connecting: a forward to nothing, no reconnect,
    so the outcome is the exit status and stderr."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytunnel",
            "connect",
            f"{address[0]}:{address[1]}",
            "--no-reconnect",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PYTUNNEL_TOKEN": TOKEN},
        check=False,
    )


def test_cli_tls_client_ca_admits_a_client_certificate(
    mtls_cli_server: tuple[subprocess.Popen[bytes], tuple[str, int]],
    mtls_files: dict[str, Path],
) -> None:
    _, address = mtls_cli_server
    client = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pytunnel",
            "connect",
            f"{address[0]}:{address[1]}",
            "--no-reconnect",
            "--tls-ca",
            str(mtls_files["ca"]),
            "--tls-cert",
            str(mtls_files["client_cert"]),
            "--tls-key",
            str(mtls_files["client_key"]),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTUNNEL_TOKEN": TOKEN},
    )
    try:
        assert client.stdout is not None
        line = client.stdout.readline().decode().strip()
        assert line == f"connected to {address[0]}:{address[1]}", _stop(client)
    finally:
        err = _stop(client)
    assert client.returncode == 0, err


@pytest.mark.parametrize("who", [None, "stranger"])
def test_cli_tls_client_ca_refuses_clients_without_a_trusted_certificate(
    mtls_cli_server: tuple[subprocess.Popen[bytes], tuple[str, int]],
    mtls_files: dict[str, Path],
    who: str | None,
) -> None:
    proc, address = mtls_cli_server
    cert_args = (
        []
        if who is None
        else [
            "--tls-cert",
            str(mtls_files[f"{who}_cert"]),
            "--tls-key",
            str(mtls_files[f"{who}_key"]),
        ]
    )
    out = _connect_cli(address, "--tls-ca", str(mtls_files["ca"]), *cert_args)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "connected to" not in out.stdout
    assert "Traceback" not in out.stderr
    assert out.stderr.startswith("pytunnel: error: [")
    expected = NO_CLIENT_CERT if who is None else UNTRUSTED_CLIENT_CERT
    err = _stop_when_logged(proc, expected)
    assert "TLS handshake with 127.0.0.1" in err
    assert expected in err


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
@pytest.mark.parametrize("version", ["-tls1_2", "-tls1_3"])
def test_openssl_client_without_certificate_is_refused(
    mtls_cli_server: tuple[subprocess.Popen[bytes], tuple[str, int]],
    mtls_files: dict[str, Path],
    version: str,
) -> None:
    """Another TLS implementation, not ours, gets the same answer: no certificate, no entry.

    ``s_client`` sends a valid pytunnel Hello once connected: a server that let it in would
    answer with a Challenge, so silence plus the server's refusal line prove the refusal."""
    proc, address = mtls_cli_server
    hello = encode_message(Hello((1,), bytes(NONCE_SIZE)))
    out = subprocess.run(
        [
            "openssl",
            "s_client",
            version,
            "-quiet",
            "-ign_eof",
            "-connect",
            f"{address[0]}:{address[1]}",
            "-CAfile",
            str(mtls_files["ca"]),
            "-verify_return_error",
        ],
        input=hello,
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert b"challenge" not in out.stdout, out.stdout
    err = _stop_when_logged(proc, NO_CLIENT_CERT)
    assert "TLS handshake with 127.0.0.1" in err, err
    assert NO_CLIENT_CERT in err


def test_a_malformed_pin_is_refused_when_the_config_is_made() -> None:
    with pytest.raises(ValueError, match="bad fingerprint"):
        pytunnel.ClientConfig(token=TOKEN, tls_fingerprint="SHA256:!!")
