"""``pytunnel connect``: connect to a server, set up forwards, keep them up until interrupted.

Parses the forward specifications and the client's options into the library's ``connect``
call and prints one line per forward; reconnection and relaying are the library's.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
from collections.abc import Mapping
from typing import Any, Literal

import attrs
import click
import trio

import pytunnel

from . import _admin
from ._config import ConfigCommand, config_option, config_path, file_forwards, watch_reload
from ._config import reload as reload_config
from ._declared import Declared, DeclaredForwards, from_flags
from ._logs import setup_logging
from ._options import (
    CONTEXT,
    EXISTING_FILE,
    config_check,
    connect_timeout_option,
    dynamic_specs,
    forward_specs,
    heartbeat_timeout_option,
    idle_timeout_option,
    log_format_option,
    log_level_option,
    max_streams_option,
    metrics_option,
    parsed,
    receive_budget_option,
    server_endpoints,
    usage_errors,
)
from ._output import say
from ._run import run as run_command
from ._status import print_status
from ._tlsfiles import client_tls, client_tls_options
from ._token import read_secret_file, read_token, token_file_option, token_option
from ._transport import resolve_proxy, run_stdio, take_stdio, transport_options

# Every default shown is the config classes' own.
_CLIENT = attrs.fields(pytunnel.ClientConfig)
_SESSION = attrs.fields(pytunnel.SessionConfig)


def _credentials(value: str | None) -> tuple[str, str] | None:
    """``USER:PASSWORD`` of ``--socks-auth``; the password may contain ``:``."""
    if value is None:
        return None
    user, sep, password = value.partition(":")
    if not sep or not user:
        raise ValueError("expected USER:PASSWORD")
    return user, password


@click.command(cls=ConfigCommand, context_settings=CONTEXT)
@click.argument(
    "server", nargs=-1, required=True, callback=server_endpoints, envvar="PYTUNNEL_SERVER"
)
@config_option
@token_option(help="Shared secret of the server (or --token-file).")
@token_file_option
@click.option(
    "-D",
    "--dynamic",
    "dynamic",
    multiple=True,
    callback=dynamic_specs,
    metavar="[BIND:]PORT",
    help="Dynamic forward: a SOCKS5/4a proxy here on PORT (0: any) whose connections exit at "
    "the server, DNS included. Repeatable.",
)
@click.option(
    "--socks-auth",
    metavar="USER:PASSWORD",
    callback=parsed(_credentials),
    help="Require this username and password from SOCKS clients (RFC 1929).",
)
@client_tls_options
@click.option(
    "-R",
    "--remote",
    "remote",
    multiple=True,
    callback=forward_specs,
    metavar="[BIND:]PORT:HOST:HOSTPORT",
    help="Remote forward: the server listens on PORT (0: any), connections reach HOST:HOSTPORT "
    "from here. With a host name as BIND and PORT 80 or 443 (app:80:127.0.0.1:3000), a name "
    "route on the server's shared HTTP or HTTPS port instead. Repeatable.",
)
@click.option(
    "--limit",
    metavar="RATE",
    callback=parsed(lambda value: None if value is None else pytunnel.parse_rate(value)),
    help="Bandwidth limit of each TCP forward, per direction, all its connections together "
    "(10MB/s, 500KiB/s, 100Mbit/s).",
)
@click.option(
    "--proxy-protocol",
    type=click.Choice(["v1", "v2"]),
    default=None,
    help="Start each connection of the TCP remote forwards with a PROXY protocol header (v1 "
    "text, v2 binary) naming the public peer, for services that read it (nginx "
    "'listen ... proxy_protocol', HAProxy).",
)
@click.option(
    "--group",
    metavar="NAME",
    help="Join the remote forwards and name routes to the load-balanced group NAME: the "
    "server spreads their connections across every client of the group. Needs "
    "--group-key-file.",
)
@click.option(
    "--group-key-file",
    type=EXISTING_FILE,
    help="The group's secret, in a file: every member needs the same one.",
)
@click.option(
    "--forwarded-headers",
    is_flag=True,
    help="HTTP name routes: add X-Forwarded-For/-Proto/-Host and Forwarded naming the public "
    "peer to every request.",
)
@click.option(
    "--rewrite-host",
    metavar="HOST",
    help="HTTP name routes: replace each request's Host with HOST.",
)
@click.option(
    "--basic-auth",
    metavar="USER:PASSWORD",
    callback=parsed(_credentials),
    help="HTTP name routes: answer 401 to requests without this user and password (checked "
    "here, not passed on to the service).",
)
@click.option(
    "-L",
    "--local",
    "local",
    multiple=True,
    callback=forward_specs,
    metavar="[BIND:]PORT:HOST:HOSTPORT",
    help="Local forward: listen here on PORT (0: any), connections reach HOST:HOSTPORT from "
    "the server. Repeatable.",
)
@connect_timeout_option(
    default=_CLIENT.connect_timeout.default,
    help="Seconds to reach the server, and for remote-forward dials here.",
)
@idle_timeout_option(default=_CLIENT.idle_timeout.default)
@click.option(
    "--reconnect/--no-reconnect",
    default=_CLIENT.reconnect.default,
    help="Reconnect with exponential backoff when the connection is lost.",
)
@click.option(
    "--max-attempts",
    type=click.IntRange(min=0),
    default=_CLIENT.max_attempts.default or 0,  # 0 spells the config's None: never give up
    help="Reconnection attempts in a row before giving up (0: unlimited).",
)
@click.option(
    "--backoff-max",
    type=float,
    default=_CLIENT.backoff_max.default,
    help="Longest wait between reconnection attempts, in seconds.",
)
@click.option(
    "--heartbeat-interval",
    type=float,
    default=_CLIENT.heartbeat_interval.default,
    help="Seconds between pings.",
)
@heartbeat_timeout_option(
    default=_CLIENT.heartbeat_timeout.default,
    help="The link is dead when a ping is unanswered this long.",
)
@click.option(
    "--probe-interval",
    type=float,
    default=_CLIENT.probe_interval.default,
    help="Health-probe remote forward targets this often, in seconds (0: off).",
)
@click.option(
    "--probe-failures",
    type=click.IntRange(min=1),
    default=_CLIENT.probe_failures.default,
    help="Failed probes in a row that take a remote forward offline.",
)
@max_streams_option(
    default=_SESSION.max_streams.default,
    help="Concurrent streams on the tunnel connection; at the limit, local forwards stop "
    "accepting until one closes.",
)
@receive_budget_option(default=_SESSION.receive_budget.default)
@click.option(
    "--status-interval",
    type=float,
    default=0,
    help="Print a summary of every forward this often, in seconds (0: never).",
)
@click.option(
    "--client-id",
    envvar="PYTUNNEL_CLIENT_ID",
    show_envvar=True,
    metavar="ID",
    callback=config_check(pytunnel.ClientConfig, "client_id"),
    help="This client's identity at the server (1-64 of A-Z a-z 0-9 . _ : -; default: random "
    "per run). A new connection with it replaces the server's old session of this client at "
    "once, ports included; never give two clients the same one.",
)
@metrics_option
@_admin.serve_options
@click.option(
    "--quiet",
    is_flag=True,
    help="No live table of the forwards on a terminal (elsewhere there is none).",
)
@transport_options
@log_level_option
@log_format_option
@click.pass_context
def connect(
    ctx: click.Context,
    server: list[str | tuple[str, int]],
    token: str | None,
    token_file: str | None,
    dynamic: list[tuple[str, int]],
    socks_auth: tuple[str, str] | None,
    use_tls: bool,
    tls_ca: str | None,
    tls_fingerprint: str | None,
    tls_server_name: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    remote: list[pytunnel.ForwardSpec],
    forwarded_headers: bool,
    rewrite_host: str | None,
    basic_auth: tuple[str, str] | None,
    group: str | None,
    group_key_file: str | None,
    limit: float | None,
    proxy_protocol: Literal["v1", "v2"] | None,
    local: list[pytunnel.ForwardSpec],
    connect_timeout: float,
    idle_timeout: float,
    reconnect: bool,
    max_attempts: int,
    backoff_max: float,
    heartbeat_interval: float,
    heartbeat_timeout: float,
    probe_interval: float,
    probe_failures: int,
    max_streams: int,
    receive_budget: int,
    status_interval: float,
    client_id: str | None,
    metrics: tuple[str, int] | None,
    admin: _admin.AdminAddress,
    admin_token_file: str | None,
    quiet: bool,
    proxy: str | None,
    header: tuple[tuple[str, str], ...],
    host_header: str | None,
    ws_ping_interval: float,
    stdio: tuple[str, int] | None,
    log_level: str,
    log_format: str,
) -> None:
    """Connect to a tunnel server and set up forwards; keep them up until interrupted.

    SERVER is HOST:PORT, or a WebSocket URL (ws://HOST[:PORT]/PATH, wss://...) for a server
    behind a reverse proxy that forwards WebSocket upgrades. Several servers: each connection
    goes to the first that answers (tried in order, 250 ms apart), and the forwards are
    restored on whichever a reconnection reaches."""
    if stdio is not None and (local or remote or dynamic):
        raise click.UsageError("--stdio carries one connection: it takes no -L, -R or -D")
    # stdout carries the relayed bytes in --stdio mode: taken before anything is printed
    stdio_fds = take_stdio() if stdio is not None else None
    setup_logging(log_level, log_format)
    secret = read_token(ctx, token, token_file)
    if secret is None:
        raise click.UsageError("a token is needed: --token, --token-file or PYTUNNEL_TOKEN")
    if (group is None) != (group_key_file is None):
        raise click.UsageError("--group and --group-key-file go together")
    if group is not None and any(spec.protocol != "tcp" for spec in remote):
        raise click.UsageError("load-balanced groups (--group) are for TCP remote forwards")
    group_key = (
        None
        if group_key_file is None
        else read_secret_file(group_key_file, "--group-key-file", "group key")
    )
    config = client_config(ctx.params, secret)
    admin_token = _admin.read_admin_token(admin_token_file)
    if admin.tcp is not None and admin_token is None:
        raise click.UsageError(
            "--admin HOST:PORT needs a token: --admin-token-file or PYTUNNEL_ADMIN_TOKEN"
        )

    # before the event loop: a table's group key is read from its file, and a bad value is
    # a usage error before anything connects
    initial = declared_forwards(ctx, group, group_key)
    # what only some runs use is imported by those, and here: an import would block the loop
    live = not quiet and sys.stdout.isatty()
    if live:
        from ._live import show_live, show_waiting
    if metrics is not None:
        from pytunnel.metrics import TunnelCollector

        from ._metrics import start_metrics

    async def run() -> None:
        client_config = config
        context = await client_tls(use_tls, tls_ca, tls_cert, tls_key, tls_fingerprint)
        if context is not None:
            client_config = attrs.evolve(config, tls=context)
        async with contextlib.AsyncExitStack() as stack:
            opening = pytunnel.open_tunnel(server, config=client_config)
            if live:
                with show_waiting(f"connecting to {_servers(server)}"):
                    tunnel = await stack.enter_async_context(opening)
            else:
                tunnel = await stack.enter_async_context(opening)
            if stdio is not None and stdio_fds is not None:
                await run_stdio(tunnel, stdio, stdio_fds)
                return
            say(f"connected to {tunnel.server}")
            forwards = DeclaredForwards(tunnel)
            async with trio.open_nursery() as nursery:
                apply = functools.partial(_reload, ctx, forwards, group_key)
                if config_path(ctx) is not None:
                    await nursery.start(watch_reload, ctx, apply)
                await forwards.apply(initial)
                api = _admin.client_api(
                    tunnel,
                    forwards,
                    functools.partial(reload_config, ctx, apply),
                    tunnel.server or "",
                )
                where = await _admin.serve_admin(nursery, api, admin, admin_token)
                if where is not None:
                    logging.getLogger("pytunnel.cli").info("admin API on %s", where)
                if metrics is not None:
                    collector = TunnelCollector(tunnel, forwards.labelled)
                    await start_metrics(nursery, collector, metrics)
                if status_interval > 0:
                    nursery.start_soon(print_status, tunnel, status_interval)
                if live:
                    nursery.start_soon(show_live, tunnel, forwards, tunnel.server or "")
                await tunnel.wait_closed()
                nursery.cancel_scope.cancel()
            if tunnel.failure is not None:
                raise tunnel.failure

    run_command(run)


def _servers(endpoints: list[str | tuple[str, int]]) -> str:
    """The servers a connection may reach, as the user wrote them (``HOST:PORT``, a URL)."""
    return " or ".join(e if isinstance(e, str) else pytunnel.format_target(*e) for e in endpoints)


def client_config(params: Mapping[str, Any], secret: str) -> pytunnel.ClientConfig:
    """The client's config from the command's parsed options (TLS comes later, built from
    its files); a value the config class refuses is a usage error."""
    with usage_errors():
        return pytunnel.ClientConfig(
            token=secret,
            client_id=params["client_id"],
            tls_fingerprint=params["tls_fingerprint"],
            tls_server_hostname=params["tls_server_name"],
            connect_timeout=params["connect_timeout"],
            idle_timeout=params["idle_timeout"],
            reconnect=params["reconnect"],
            max_attempts=params["max_attempts"] or None,
            backoff_max=params["backoff_max"],
            heartbeat_interval=params["heartbeat_interval"],
            heartbeat_timeout=params["heartbeat_timeout"],
            probe_interval=params["probe_interval"],
            probe_failures=params["probe_failures"],
            session=pytunnel.SessionConfig(
                max_streams=params["max_streams"], receive_budget=params["receive_budget"]
            ),
            proxy=resolve_proxy(params["proxy"], params["server"][0]),
            ws_headers=params["header"],
            ws_host=params["host_header"],
            ws_ping_interval=params["ws_ping_interval"] or None,
        )


def _check(ctx: click.Context) -> None:
    client_config(ctx.params, "checked")
    declared_forwards(ctx, ctx.params["group"], "checked")


connect.check = _check

#: The settings a reload applies; a change to any other says that it needs a restart (the
#: group too: its key was read at start).
_FORWARD_PARAMS = (
    "remote",
    "local",
    "dynamic",
    "limit",
    "proxy_protocol",
    "socks_auth",
    "forwarded_headers",
    "rewrite_host",
    "basic_auth",
)


def declared_forwards(
    ctx: click.Context, group: str | None = None, group_key: str | None = None
) -> list[Declared]:
    """The forwards (port forwards and name routes) the options and the config file of
    ``ctx`` declare; the flags' forwards join ``group`` when its key is given. Blocking: a
    table's group key is read from its file."""
    params = ctx.params
    return from_flags(
        params["remote"],
        params["local"],
        params["dynamic"],
        limit=params["limit"],
        proxy_protocol=params["proxy_protocol"],
        socks_auth=params["socks_auth"],
        group=group if group_key is not None else None,
        group_key=group_key,
        forwarded_headers=params["forwarded_headers"],
        rewrite_host=params["rewrite_host"],
        basic_auth=params["basic_auth"],
        tables=file_forwards(ctx),
    )


async def _reload(
    running: click.Context,
    forwards: DeclaredForwards,
    group_key: str | None,
    fresh: click.Context,
) -> str:
    """Apply a reloaded file: the forwards change; other settings need a restart."""
    group = running.params["group"]
    declared = await trio.to_thread.run_sync(declared_forwards, fresh, group, group_key)
    summary = await forwards.apply(declared)
    stale = [
        name
        for name, value in fresh.params.items()
        if name not in _FORWARD_PARAMS and running.params.get(name) != value
    ]
    if stale:
        logging.getLogger("pytunnel.cli").warning(
            "changed settings take effect on restart only: %s", ", ".join(sorted(stale))
        )
    return summary
