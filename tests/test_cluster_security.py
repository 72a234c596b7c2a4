"""The connection to the cluster's engine: etcd over TLS (a CA, a client certificate) and etcd
authentication (a user, a token renewed when etcd says it is stale), against real etcd
servers started that way; a wrong CA, a refused certificate, a wrong password are one typed
error at start, and neither the password nor a token is ever logged."""

from __future__ import annotations

import base64
import functools
import logging
import os
import re
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path

import httpx
import pytest
import trio
import trustme
from helpers import EtcdServer, LinkProxy, needs_etcd, wait_until
from test_cluster_cli import PYTUNNEL, TOKEN, Process

import pytunnel
from pytunnel.cluster import Change, EtcdRegistry
from pytunnel.errors import ClusterAuthError, ClusterUnavailableError, ErrorCode

pytestmark = needs_etcd

PASSWORD = "correct horse battery staple"


class FlaggedEtcd(EtcdServer):
    """A private etcd started with flags of its own (``extra``), on ``scheme`` for clients;
    started and stopped by pid like the plain one."""


class TlsEtcd(FlaggedEtcd):
    """An etcd whose clients must speak TLS to it and show a certificate of ``ca``."""

    scheme = "https"

    def __init__(self, files: Path, ca: trustme.CA) -> None:
        super().__init__(str(files / "etcd"))
        self.files = files
        ca.cert_pem.write_to_path(str(files / "ca.pem"))
        served = ca.issue_cert("127.0.0.1")
        served.private_key_pem.write_to_path(str(files / "etcd-key.pem"))
        served.cert_chain_pems[0].write_to_path(str(files / "etcd.pem"))
        client = ca.issue_cert("node-1")
        client.private_key_pem.write_to_path(str(files / "client-key.pem"))
        client.cert_chain_pems[0].write_to_path(str(files / "client.pem"))

    def extra(self) -> list[str]:
        return [
            f"--cert-file={self.files / 'etcd.pem'}",
            f"--key-file={self.files / 'etcd-key.pem'}",
            f"--trusted-ca-file={self.files / 'ca.pem'}",
            "--client-cert-auth",
        ]

    async def context(self, *, with_cert: bool = True) -> ssl.SSLContext:
        return await pytunnel.tls.client_tls_context(
            ca_file=self.files / "ca.pem",
            cert_file=self.files / "client.pem" if with_cert else None,
            key_file=self.files / "client-key.pem" if with_cert else None,
        )

    async def wait_healthy(self) -> None:
        tls = await self.context()
        async with httpx.AsyncClient(timeout=1.0, verify=tls) as http:
            with trio.fail_after(30):
                while True:
                    assert self.process is not None
                    assert self.process.poll() is None, "etcd exited at start"
                    with suppress(httpx.HTTPError):
                        if (await http.get(f"{self.endpoint}/health")).status_code == 200:
                            return
                    await trio.sleep(0.1)


class AuthEtcd(FlaggedEtcd):
    """A plain etcd with authentication enabled: ``root``, and ``node`` whose role may use
    ``/pytunnel/`` only. Its tokens live ``token_ttl`` seconds unused (and none survives a
    restart: simple tokens are kept in memory)."""

    def __init__(self, data_dir: str, token_ttl: int) -> None:
        super().__init__(data_dir)
        self.token_ttl = token_ttl

    def extra(self) -> list[str]:
        return [f"--auth-token-ttl={self.token_ttl}", "--bcrypt-cost=4"]

    async def put_as_root(self, key: str, value: str) -> None:
        def b64(text: str) -> str:
            return base64.b64encode(text.encode()).decode()

        async with httpx.AsyncClient(timeout=10.0) as http:
            reply = await http.post(
                f"{self.endpoint}/v3/auth/authenticate",
                json={"name": "root", "password": "root password"},
            )
            token = reply.json()["token"]
            reply = await http.post(
                f"{self.endpoint}/v3/kv/put",
                json={"key": b64(key), "value": b64(value)},
                headers={"Authorization": token},
            )
            assert reply.status_code == 200, reply.text

    async def enable_auth(self) -> None:
        def b64(text: str) -> str:
            return base64.b64encode(text.encode()).decode()

        async with httpx.AsyncClient(timeout=10.0) as http:
            for path, body in (
                ("user/add", {"name": "root", "password": "root password"}),
                ("user/grant", {"user": "root", "role": "root"}),
                ("user/add", {"name": "node", "password": PASSWORD}),
                ("role/add", {"name": "pytunnel"}),
                (
                    "role/grant",
                    {
                        "name": "pytunnel",
                        "perm": {
                            "key": b64("/pytunnel/"),
                            "range_end": b64("/pytunnel0"),
                            "permType": "READWRITE",
                        },
                    },
                ),
                ("user/grant", {"user": "node", "role": "pytunnel"}),
                ("enable", {}),
            ):
                reply = await http.post(f"{self.endpoint}/v3/auth/{path}", json=body)
                assert reply.status_code == 200, reply.text


@pytest.fixture
async def auth_etcd(tmp_path: Path) -> AsyncIterator[AuthEtcd]:
    server = AuthEtcd(f"{tmp_path}/etcd", token_ttl=2)
    await server.start()
    try:
        await server.enable_auth()
        yield server
    finally:
        await server.kill()


@pytest.fixture
async def tls_etcd(tmp_path: Path) -> AsyncIterator[TlsEtcd]:
    server = TlsEtcd(tmp_path, trustme.CA())
    await server.start()
    try:
        yield server
    finally:
        await server.kill()


def _port_in(line: str) -> int:
    found = re.search(r"remote forward 127\.0\.0\.1:(\d+)", line)
    assert found is not None, line
    return int(found.group(1))


@asynccontextmanager
async def _a_node_a_client_and_its_status(
    url: str, access: list[str], echo_port: int
) -> AsyncIterator[None]:
    """Node ``a`` on the engine at ``url`` with the ``access`` flags, a client with one remote
    forward through it, and ``cluster status`` with the same flags showing that port; both
    processes are killed when the block ends."""
    node = await Process.start(
        "serve", *("--listen", "127.0.0.1:0", "--cluster", url, "--node-id", "a"), *access
    )
    client: Process | None = None
    try:
        address = (await node.line_with("listening on")).rsplit(" ", 1)[1]
        await node.line_with(f"node a of the cluster at {url}")
        client = await Process.start("connect", address, "-R", f"0:127.0.0.1:{echo_port}")
        port = _port_in(await client.line_with("remote forward 127.0.0.1:"))
        with trio.fail_after(30):
            out = await trio.run_process(
                [*PYTUNNEL, "cluster", "status", "--cluster", url, *access],
                capture_stdout=True,
                capture_stderr=True,
            )
        assert f"  tcp/{port}  a/" in out.stdout.decode()
        yield
    finally:
        if client is not None:
            await client.kill()
        await node.kill()


def _secrets_in(caplog: pytest.LogCaptureFixture, *secrets: str | None) -> list[str]:
    text = caplog.text + "".join(str(r.args) for r in caplog.records)
    return [s for s in secrets if s and s in text]


# ------------------------------------------------------------------ TLS


async def test_a_node_reaches_etcd_over_tls_with_its_client_certificate(
    tls_etcd: TlsEtcd, nursery: trio.Nursery
) -> None:
    tls = await tls_etcd.context()
    registry = EtcdRegistry.from_url(tls_etcd.url, "n1", lease_ttl=3, tls=tls)
    assert registry.endpoints == (tls_etcd.endpoint,)
    await nursery.start(registry.run)
    seen: list[Change] = []
    await nursery.start(functools.partial(registry.watch, "tcp/", seen.append))
    assert await registry.claim("tcp/1", "n1/a") == "n1/a"
    await wait_until(lambda: Change("tcp/1", "n1/a") in seen, seconds=20, what=lambda: str(seen))
    await trio.sleep(1.5)  # renewals over TLS too
    assert registry.available
    assert set(await registry.nodes()) == {"n1"}


@pytest.mark.parametrize("wrong", ["another CA", "no client certificate", "plain HTTP"])
async def test_a_wrong_ca_or_a_refused_certificate_is_one_typed_error_at_start(
    tls_etcd: TlsEtcd, wrong: str
) -> None:
    endpoint = tls_etcd.endpoint
    tls: ssl.SSLContext | None = None
    if wrong == "another CA":
        other = tls_etcd.files / "other-ca.pem"
        trustme.CA().cert_pem.write_to_path(str(other))
        tls = await pytunnel.tls.client_tls_context(ca_file=other)
    elif wrong == "no client certificate":
        tls = await tls_etcd.context(with_cert=False)
    else:  # the scheme the member does not speak: an outage, not a refusal
        endpoint = endpoint.replace("https:", "http:")
    registry = EtcdRegistry(endpoint, "n1", request_timeout=2.0, tls=tls)
    with trio.fail_after(30):  # a hang detector
        async with trio.open_nursery() as nursery:
            with pytest.raises(ClusterUnavailableError) as info:
                await nursery.start(registry.run)
    assert info.value.code == ErrorCode.CLUSTER_UNAVAILABLE
    assert endpoint in info.value.message
    if wrong == "plain HTTP":
        assert not isinstance(info.value, ClusterAuthError)
        return
    if wrong == "another CA":  # verified here: always told apart from an outage
        assert isinstance(info.value, ClusterAuthError), info.value
        assert "refused this node" in info.value.message
        assert "CERTIFICATE_VERIFY_FAILED" in info.value.message
    # a member refusing a missing certificate sends an alert, which may or may not arrive
    # before the connection is gone: refused, or unreachable, never served
    expected = ClusterAuthError if wrong == "another CA" else ClusterUnavailableError
    watcher = EtcdRegistry(endpoint, "n2", tls=tls)
    with trio.fail_after(30), pytest.raises(expected, match="cannot watch"):
        await watcher.watch("", lambda change: None)
    await watcher.aclose()


async def test_serve_and_cluster_status_over_tls_through_the_cli(
    tls_etcd: TlsEtcd, echo_port: int, tmp_path: Path
) -> None:
    files = tls_etcd.files
    access = [
        *("--cluster-ca", str(files / "ca.pem")),
        *("--cluster-cert", str(files / "client.pem")),
        *("--cluster-key", str(files / "client-key.pem")),
    ]
    async with _a_node_a_client_and_its_status(tls_etcd.url, access, echo_port):
        # a CA that did not sign the members' certificates: one line, at start
        other = tmp_path / "other-ca.pem"
        trustme.CA().cert_pem.write_to_path(str(other))
        for command in (
            ["serve", "--listen", "127.0.0.1:0", "--node-id", "b"],
            ["cluster", "status"],
        ):
            with trio.fail_after(60):
                refused = await trio.run_process(
                    [*PYTUNNEL, *command, "--cluster", tls_etcd.url, "--cluster-ca", str(other)],
                    capture_stdout=True,
                    capture_stderr=True,
                    check=False,
                    env={**os.environ, "PYTUNNEL_TOKEN": TOKEN},
                )
            stderr = refused.stderr.decode()
            assert refused.returncode == 1, stderr
            assert "certificate verify failed" in stderr.lower(), stderr
            assert "Traceback" not in stderr
            last = stderr.strip().splitlines()[-1]
            assert last.startswith("pytunnel: error: "), last
            assert "cluster engine refused this node" in last, last


# ------------------------------------------------------------------ authentication


async def test_a_watch_opened_again_with_an_expired_token_takes_a_new_one(
    auth_etcd: AuthEtcd, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    """An open watch is not asked for its token again; when it must be opened again (its
    connection cut) after the token expired unused, etcd cancels it for the token: the node
    takes a new one and the watch goes on from where it was, missing nothing."""
    caplog.set_level(logging.DEBUG)
    proxy = LinkProxy(("127.0.0.1", auth_etcd.client_port))
    await proxy.start(nursery)
    # renewals every 10 s: nothing uses the 2 s token while the test waits
    registry = EtcdRegistry(
        f"http://127.0.0.1:{proxy.port}", "n1", lease_ttl=30, user="node", password=PASSWORD
    )
    await nursery.start(registry.run)
    seen: list[Change] = []
    await nursery.start(functools.partial(registry.watch, "tcp/", seen.append))
    assert await registry.claim("tcp/1", "n1/a") == "n1/a"
    await wait_until(lambda: Change("tcp/1", "n1/a") in seen, seconds=20, what=lambda: str(seen))
    first = registry._auth_token
    await trio.sleep(4)  # the token expires

    proxy.cut()
    await auth_etcd.put_as_root("/pytunnel/tcp/9", "elsewhere/x")  # while the watch is away
    await wait_until(lambda: registry._auth_token not in (first, None), seconds=30)
    await wait_until(
        lambda: Change("tcp/9", "elsewhere/x") in seen, seconds=30, what=lambda: str(seen)
    )
    authenticated = [r for r in caplog.records if "authenticated to the engine" in r.getMessage()]
    assert len(authenticated) == 2
    assert _secrets_in(caplog, PASSWORD, first, registry._auth_token) == []
    proxy.close()


async def test_a_token_that_expired_is_replaced(
    auth_etcd: AuthEtcd, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    # renewals every 10 s: the 2 s token expires unused between two claims
    registry = EtcdRegistry(auth_etcd.endpoint, "n1", lease_ttl=30, user="node", password=PASSWORD)
    await nursery.start(registry.run)
    assert await registry.claim("tcp/1", "n1/a") == "n1/a"
    first = registry._auth_token
    await trio.sleep(4)
    assert await registry.claim("tcp/2", "n1/a") == "n1/a"
    assert registry._auth_token not in (None, first)
    assert _secrets_in(caplog, PASSWORD, first, registry._auth_token) == []


@pytest.mark.parametrize(
    ("user", "password", "prefix", "message"),
    [
        ("node", "not the password", "/pytunnel/", "user node refused"),
        ("nobody", PASSWORD, "/pytunnel/", "user nobody refused"),
        (None, None, "/pytunnel/", "requires authentication"),
        ("node", PASSWORD, "/elsewhere/", "permission denied"),
    ],
)
async def test_wrong_credentials_are_one_typed_error_at_start(
    auth_etcd: AuthEtcd,
    caplog: pytest.LogCaptureFixture,
    user: str | None,
    password: str | None,
    prefix: str,
    message: str,
) -> None:
    caplog.set_level(logging.DEBUG)
    registry = EtcdRegistry(auth_etcd.endpoint, "n1", prefix=prefix, user=user, password=password)
    with trio.fail_after(30):  # a hang detector
        async with trio.open_nursery() as nursery:
            with pytest.raises(ClusterAuthError, match=message) as info:
                await nursery.start(registry.run)
    assert password is None or password not in info.value.message
    assert _secrets_in(caplog, password) == []


async def test_serve_with_an_etcd_user_through_the_cli(
    auth_etcd: AuthEtcd, echo_port: int, tmp_path: Path
) -> None:
    password_file = tmp_path / "etcd-password"
    password_file.write_text(PASSWORD + "\n")
    access = ["--cluster-user", "node", "--cluster-password-file", str(password_file)]
    async with _a_node_a_client_and_its_status(auth_etcd.url, access, echo_port):
        wrong = tmp_path / "wrong-password"
        wrong.write_text("hunter2\n")
        with trio.fail_after(60):
            refused = await trio.run_process(
                [
                    *PYTUNNEL,
                    *("serve", "--listen", "127.0.0.1:0", "--node-id", "b"),
                    *("--cluster", auth_etcd.url, "--cluster-user", "node"),
                    *("--cluster-password-file", str(wrong), "--log-level", "debug"),
                ],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
                env={**os.environ, "PYTUNNEL_TOKEN": TOKEN},
            )
        stderr = refused.stderr.decode()
        assert refused.returncode == 1, stderr
        assert "[CLUSTER_UNAVAILABLE]" in stderr
        assert "user node refused" in stderr
        assert "hunter2" not in stderr + refused.stdout.decode()
        assert "Traceback" not in stderr
