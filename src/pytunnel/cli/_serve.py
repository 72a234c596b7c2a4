"""``pytunnel serve``: run a tunnel server until interrupted.

Parses the server's options into the library's ``serve`` call and reports where it listens
(and how to connect); the serving itself is the library's.
"""

from __future__ import annotations

import functools
import inspect
import logging
import secrets
from collections.abc import Mapping
from typing import Any

import attrs
import click
import trio

import pytunnel
import pytunnel.admin

from . import _admin
from ._cluster import (
    DEFAULT_LEASE_TTL,
    EngineAccess,
    check_cluster_options,
    engine_options,
    node_registry,
)
from ._config import ConfigCommand, config_option, config_path, watch_reload
from ._config import reload as reload_config
from ._logs import setup_logging
from ._metrics import open_metrics
from ._options import (
    CONTEXT,
    config_check,
    connect_timeout_option,
    heartbeat_timeout_option,
    idle_timeout_option,
    listen_address,
    log_format_option,
    log_level_option,
    max_streams_option,
    metrics_option,
    parsed,
    permit_open,
    port_ranges,
    receive_budget_option,
    usage_errors,
)
from ._output import say
from ._run import run as run_command
from ._tlsfiles import check_server_tls, server_tls, server_tls_options
from ._token import read_secret_file, read_token, token_file_option, token_option

# Every default shown comes from the library: the config classes' fields, and ``serve``'s own
# parameters for the address it listens on.
_SERVER = attrs.fields(pytunnel.ServerConfig)
_SESSION = attrs.fields(pytunnel.SessionConfig)
_SERVE = inspect.signature(pytunnel.serve).parameters


@click.command(cls=ConfigCommand, context_settings=CONTEXT)
@config_option
@click.option(
    "--listen",
    default=pytunnel.format_target(_SERVE["host"].default, _SERVE["port"].default),
    callback=listen_address,
    help="Address clients connect to.",
)
@token_option(help="Shared secret. Without one, a random token is made and printed.")
@click.option(
    "--public-host",
    default=_SERVER.public_host.default,
    help="Address remote forwards listen on (0.0.0.0 exposes them on all interfaces).",
)
@click.option(
    "--allow-ports",
    callback=port_ranges,
    help="Ports remote forwards may use, e.g. 8000,9000-9100. Default: any.",
)
@click.option(
    "--http-listen",
    default=None,
    callback=parsed(lambda value: None if value is None else pytunnel.parse_host_port(value)),
    metavar="HOST:PORT",
    help="A shared HTTP port: each connection goes to the client whose name route holds its "
    "Host (clients: -R app:80:HOST:PORT). Default: none.",
)
@click.option(
    "--https-listen",
    default=None,
    callback=parsed(lambda value: None if value is None else pytunnel.parse_host_port(value)),
    metavar="HOST:PORT",
    help="A shared HTTPS port, routed by the TLS server name and passed through untouched: "
    "the client's service holds the certificate (clients: -R app:443:HOST:PORT).",
)
@click.option(
    "--domain",
    default=_SERVER.domain.default,
    help="Name routes for a single label (app) get app.DOMAIN.",
)
@click.option(
    "--allow-domains",
    multiple=True,
    help="Full names clients may route besides DOMAIN's subdomains: shop.example.org or "
    "*.example.org. Comma lists or repeated.",
)
@click.option(
    "--trusted-proxies",
    multiple=True,
    metavar="ADDRESS|CIDR",
    help="A proxy in front of the server (HAProxy, nginx stream) that starts each connection "
    "with a PROXY protocol header naming the real client; its connections must. Comma lists "
    "or repeated.",
)
@click.option(
    "--max-names-per-client",
    type=click.IntRange(min=0),
    default=_SERVER.max_names_per_client.default,
    help="Name routes one client may hold.",
)
@click.option(
    "--name-head-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=_SERVER.name_head_timeout.default,
    help="Seconds a connection on a shared port has to send its request head or TLS hello.",
)
@click.option(
    "--max-name-pending",
    type=click.IntRange(min=1),
    default=_SERVER.max_name_pending.default,
    help="Connections each shared HTTP/HTTPS port lets send their head at once.",
)
@click.option(
    "--max-name-head",
    type=click.IntRange(min=1024),
    default=_SERVER.max_name_head.default,
    help="Largest request head or TLS hello read to learn a connection's name, in bytes.",
)
@click.option(
    "--permit-open",
    multiple=True,
    callback=permit_open,
    help="Targets clients may open, OpenSSH PermitOpen style: NAME:PORT (* wildcards, matched "
    "against the name asked for) or IP:PORT, 10.0.0.*:PORT, 10.0.0.0/24:PORT (matched "
    "against the address the name resolves to, which is the address dialled); PORT is a "
    "number, LOW-HIGH or *. Repeatable. Default: any.",
)
@connect_timeout_option(
    default=_SERVER.connect_timeout.default, help="Seconds a dial may take (then NODE_TIMEOUT)."
)
@idle_timeout_option(default=_SERVER.idle_timeout.default)
@heartbeat_timeout_option(
    default=_SERVER.heartbeat_timeout.default,
    help="Drop a client silent for this many seconds.",
)
@click.option(
    "--max-forwards-per-client",
    type=click.IntRange(min=0),
    default=_SERVER.max_forwards_per_client.default,
    help="Remote forwards one client may hold.",
)
@max_streams_option(
    default=_SERVER.max_streams.default,
    help="Relayed connections across all clients (lowered to what the file descriptor "
    "limit allows; the soft limit is raised to the hard one at start).",
)
@click.option(
    "--max-session-streams",
    type=click.IntRange(min=1),
    default=_SESSION.max_streams.default,
    help="Concurrent streams in one client's session.",
)
@receive_budget_option(default=_SESSION.receive_budget.default)
@click.option(
    "--max-pending-handshakes",
    type=click.IntRange(min=1),
    default=_SERVER.max_pending_handshakes.default,
    help="Connections allowed in their handshake at once.",
)
@click.option(
    "--max-handshakes-per-address",
    type=click.IntRange(min=1),
    default=_SERVER.max_handshakes_per_address.default,
    help="Connections one source address may have in their handshake at once.",
)
@click.option(
    "--first-frame-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=_SERVER.first_frame_timeout.default,
    help="Seconds a new connection has to send its first frame (after TLS, if any).",
)
@click.option(
    "--auth-failure-burst",
    type=click.IntRange(min=1),
    default=_SERVER.auth_failure_burst.default,
    help="Failed authentications one address may make in a burst before it is refused.",
)
@click.option(
    "--auth-failure-interval",
    type=click.FloatRange(min=0),
    default=_SERVER.auth_failure_interval.default,
    help="Seconds after which one more failed authentication is forgiven (the refill rate).",
)
@click.option(
    "--max-frame-size",
    type=click.IntRange(min=pytunnel.MIN_MAX_FRAME_SIZE),
    default=_SESSION.max_frame_size.default,
    help="Largest protocol frame accepted, in bytes.",
)
@token_file_option
@server_tls_options
@metrics_option
@_admin.server_options
@click.option(
    "--ws-path",
    metavar="PATH",
    callback=config_check(pytunnel.ServerConfig, "ws_path"),
    help="Also accept clients as WebSocket upgrades at this path (/tunnel), on the same "
    "listener, e.g. behind a reverse proxy; raw clients are still served.",
)
@click.option(
    "--ws-ping-interval",
    metavar="SECONDS",
    type=click.FloatRange(min=0),
    default=_SERVER.ws_ping_interval.default,
    help="Ping a WebSocket client that sent nothing for this many seconds (0: never), so "
    "proxies in front never see the WebSocket idle.",
)
@click.option(
    "--cluster",
    metavar="etcd[s]://HOST:PORT[,HOST:PORT...][/PREFIX]",
    help="Be a node of the cluster whose registry is this etcd (list every member; etcds:// "
    "for TLS): ports, names and client identities are owned cluster-wide (see "
    "docs/cluster.md).",
)
@engine_options
@click.option(
    "--node-id",
    metavar="NAME",
    help="This node's name in the cluster (unique; needed with --cluster).",
)
@click.option(
    "--node-address",
    metavar="HOST:PORT",
    help="Where the other nodes reach this one (default: the address --listen bound).",
)
@click.option(
    "--cluster-secret-file",
    metavar="FILE",
    help="The secret the nodes share (one line): with it, public traffic reaching this node "
    "for another node's client is relayed there over a node link (see docs/cluster.md).",
)
@click.option(
    "--cluster-tls-ca",
    metavar="FILE",
    help="With --tls-cert: the CA that signed the other nodes' certificates, which node links "
    "verify (default: the system's trust store); with --tls-client-ca, links present this "
    "node's own --tls-cert.",
)
@click.option(
    "--cluster-lease-ttl",
    type=click.IntRange(min=2),
    default=DEFAULT_LEASE_TTL,
    help="Seconds a dead node's ports and names stay taken (the lease it renews).",
)
@log_level_option
@log_format_option
@click.pass_context
def serve(
    ctx: click.Context,
    listen: tuple[str, int],
    token: str | None,
    public_host: str,
    allow_ports: tuple[pytunnel.PortRange, ...] | None,
    http_listen: tuple[str, int] | None,
    https_listen: tuple[str, int] | None,
    domain: str | None,
    allow_domains: tuple[str, ...],
    trusted_proxies: tuple[str, ...],
    max_names_per_client: int,
    name_head_timeout: float,
    max_name_pending: int,
    max_name_head: int,
    permit_open: pytunnel.PermitOpen,
    connect_timeout: float,
    idle_timeout: float,
    heartbeat_timeout: float,
    max_forwards_per_client: int,
    max_streams: int,
    max_session_streams: int,
    receive_budget: int,
    max_pending_handshakes: int,
    max_handshakes_per_address: int,
    first_frame_timeout: float,
    auth_failure_burst: int,
    auth_failure_interval: float,
    max_frame_size: int,
    token_file: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    tls_self_signed: bool,
    tls_dir: str,
    tls_client_ca: str | None,
    metrics: tuple[str, int] | None,
    admin: _admin.AdminAddress,
    admin_token_file: str | None,
    ws_path: str | None,
    ws_ping_interval: float,
    cluster: str | None,
    node_id: str | None,
    node_address: str | None,
    cluster_lease_ttl: int,
    cluster_secret_file: str | None,
    cluster_tls_ca: str | None,
    log_level: str,
    log_format: str,
    engine: EngineAccess,
) -> None:
    """Run a tunnel server."""
    setup_logging(log_level, log_format)
    check_cluster_options(cluster, node_id, node_address)
    engine_password = engine.check(cluster)
    if cluster_secret_file is not None and cluster is None:
        raise click.UsageError("--cluster-secret-file is for a node of a --cluster")
    token = read_token(ctx, token, token_file)
    generated = token is None
    secret = token or secrets.token_urlsafe(24)
    check_server_tls(tls_cert, tls_key, tls_self_signed)
    config = server_config(ctx.params, secret)
    admin_token = _admin.read_admin_token(admin_token_file)
    if admin.tcp is not None and admin_token is None:
        raise click.UsageError(
            "--admin HOST:PORT needs a token: --admin-token-file or PYTUNNEL_ADMIN_TOKEN"
        )
    if metrics is not None:  # only then, and here: an import would block the event loop
        from pytunnel.metrics import ServerCollector

    async def run() -> None:
        # a node's self-signed certificate also names the host other nodes link to
        names = None
        if node_address:
            host = node_address.rsplit(":", 1)[0].strip("[]")
            names = list(dict.fromkeys([host, "localhost", "127.0.0.1", "::1"]))
        tls, fingerprint = await server_tls(
            tls_cert, tls_key, tls_self_signed, tls_dir, tls_client_ca, names
        )
        node = await node_registry(
            cluster, node_id, node_address or "", cluster_lease_ttl, engine, engine_password
        )
        links_tls = None
        if tls is not None and config.cluster_secret is not None:
            mutual = tls_client_ca is not None
            links_tls = await pytunnel.tls.client_tls_context(
                ca_file=cluster_tls_ca,
                cert_file=tls_cert if mutual else None,
                key_file=tls_key if mutual else None,
            )
        async with trio.open_nursery() as nursery:
            # the node's own listeners first: serving starts mirroring the ports other
            # nodes' clients hold, which must never take --metrics or --admin from it
            metrics_at = None if metrics is None else await open_metrics(nursery, metrics)
            api: list[pytunnel.admin.Handler] = []

            async def admin_handler(request: pytunnel.admin.Request) -> pytunnel.admin.Response:
                if not api:
                    return pytunnel.admin.error_response(503, "the server is starting")
                return await api[0](request)

            where = await _admin.serve_admin(
                nursery, admin_handler, admin, admin_token, role="serve"
            )
            server: pytunnel.TunnelServer = await nursery.start(
                functools.partial(
                    pytunnel.serve,
                    listen[1],
                    host=listen[0],
                    config=attrs.evolve(config, tls=tls, cluster=node, cluster_tls=links_tls),
                    http_listen=http_listen,
                    https_listen=https_listen,
                )
            )
            apply = functools.partial(_reload, ctx, server, secret)
            if config_path(ctx) is not None:
                await nursery.start(watch_reload, ctx, apply)
            address = pytunnel.format_target(*server.address)
            say(f"pytunnel server listening on {address}" + (" (TLS)" if tls else ""))
            if node is not None:
                say(f"node {node_id} of the cluster at {cluster}")
            for what, shared in (("HTTP", server.http_address), ("HTTPS", server.https_address)):
                if shared is not None:
                    say(f"routing {what} by name on {pytunnel.format_target(*shared)}")
            if ws_path is not None:
                scheme = "wss" if tls else "ws"
                say(f"WebSocket clients: {scheme}://{address}{ws_path}")
            if fingerprint is not None:
                say(f"TLS certificate fingerprint: {fingerprint}")
            if generated:
                pin = f" --tls-fingerprint {fingerprint}" if tls_self_signed else ""
                tls_flag = " --tls" if tls and not tls_self_signed else ""
                say(f"connect with: pytunnel connect {address} --token {secret}{tls_flag}{pin}")
            if metrics_at is not None:
                metrics_at[0].register(ServerCollector(server))
                say(metrics_at[1])
            api.append(_admin.server_api(server, functools.partial(reload_config, ctx, apply)))
            if where is not None:
                logging.getLogger("pytunnel.cli").info("admin API on %s", where)

    run_command(run)


def server_config(params: Mapping[str, Any], secret: str) -> pytunnel.ServerConfig:
    """The server's config from the command's parsed options (TLS comes later, built from
    its files); a value the config class refuses is a usage error."""
    with usage_errors():
        return pytunnel.ServerConfig(
            token=secret,
            public_host=params["public_host"],
            allow_ports=params["allow_ports"],
            permit_open=params["permit_open"],
            connect_timeout=params["connect_timeout"],
            idle_timeout=params["idle_timeout"],
            heartbeat_timeout=params["heartbeat_timeout"],
            max_forwards_per_client=params["max_forwards_per_client"],
            max_streams=params["max_streams"],
            max_pending_handshakes=params["max_pending_handshakes"],
            max_handshakes_per_address=params["max_handshakes_per_address"],
            first_frame_timeout=params["first_frame_timeout"],
            auth_failure_burst=params["auth_failure_burst"],
            auth_failure_interval=params["auth_failure_interval"],
            domain=params["domain"],
            allow_domains=[p for value in params["allow_domains"] for p in value.split(",")],
            trusted_proxies=[
                p for value in params["trusted_proxies"] for p in value.split(",") if p.strip()
            ],
            max_names_per_client=params["max_names_per_client"],
            name_head_timeout=params["name_head_timeout"],
            max_name_pending=params["max_name_pending"],
            max_name_head=params["max_name_head"],
            ws_path=params["ws_path"],
            ws_ping_interval=params["ws_ping_interval"] or None,
            cluster_secret=_cluster_secret(params.get("cluster_secret_file")),
            session=pytunnel.SessionConfig(
                max_streams=params["max_session_streams"],
                max_frame_size=params["max_frame_size"],
                receive_budget=params["receive_budget"],
            ),
        )


def _cluster_secret(path: str | None) -> str | None:
    """The nodes' shared secret from ``--cluster-secret-file`` (``None`` without one)."""
    if path is None:
        return None
    return read_secret_file(path, "--cluster-secret-file", "cluster secret")


#: Settings a running server cannot change (its listener, its TLS, its logging).
_RESTART_ONLY = (
    "listen",
    "tls_cert",
    "tls_key",
    "tls_self_signed",
    "tls_dir",
    "tls_client_ca",
    "cluster",
    "node_id",
    "node_address",
    "cluster_lease_ttl",
    "cluster_secret_file",
    "cluster_tls_ca",
    "cluster_ca",
    "cluster_cert",
    "cluster_key",
    "cluster_user",
    "cluster_password_file",
)


async def _reload(
    running: click.Context, server: pytunnel.TunnelServer, secret: str, fresh: click.Context
) -> str:
    """Apply a reloaded file to the connections accepted from now on; the token too (a
    generated one stays when the file names none)."""
    params = fresh.params
    if params["token"] is None and params["token_file"] is None:
        token = secret
    else:
        token = await trio.to_thread.run_sync(_read_token_file, params)
    running_config = server.config
    # the node's membership, its links' secret and TLS are the running process's
    config = attrs.evolve(
        server_config({**params, "cluster_secret_file": None}, token),
        tls=running_config.tls,
        cluster=running_config.cluster,
        cluster_secret=running_config.cluster_secret,
        cluster_tls=running_config.cluster_tls,
    )
    server.reconfigure(config)
    stale = [n for n in _RESTART_ONLY if running.params.get(n) != params.get(n)]
    if stale:
        logging.getLogger("pytunnel.cli").warning(
            "changed settings take effect on restart only: %s", ", ".join(stale)
        )
    return "limits and policy apply to new connections"


def _read_token_file(params: Mapping[str, Any]) -> str:
    """The token a reloaded file names (its own value, or its token file's content)."""
    if params["token_file"] is None:
        return str(params["token"])
    try:
        with open(params["token_file"], encoding="utf-8") as handle:
            token = handle.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"the token file cannot be read: {exc}") from None
    if not token:
        raise ValueError("the token file is empty")
    return token


serve.check = lambda ctx: server_config(ctx.params, "checked")
