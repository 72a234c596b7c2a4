"""``pytunnel connect``: connect to a server, set up forwards, keep them up until interrupted.

Parses the forward specifications and the client's options into the library's ``connect``
call and prints one line per forward; reconnection and relaying are the library's.
"""

from __future__ import annotations

import attrs
import click
import trio

import pytunnel
from pytunnel._spec import ForwardSpec
from pytunnel._tls import parse_fingerprint
from pytunnel.protocol.messages import valid_client_id

from ._logs import setup_logging
from ._options import (
    CONTEXT,
    dynamic_specs,
    forward_specs,
    host_port,
    log_format_option,
    log_level_option,
)
from ._output import say
from ._run import run as run_command
from ._status import print_status
from ._tlsfiles import client_tls, client_tls_options
from ._token import read_token, token_file_option


@click.command(context_settings=CONTEXT)
@click.argument("server", callback=host_port, envvar="PYTUNNEL_SERVER")
@click.option(
    "--token",
    envvar="PYTUNNEL_TOKEN",
    show_envvar=True,
    help="Shared secret of the server (or --token-file).",
)
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
    "from here. Repeatable.",
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
@click.option(
    "--connect-timeout",
    type=float,
    default=pytunnel.DEFAULT_CONNECT_TIMEOUT,
    help="Seconds to reach the server, and for remote-forward dials here.",
)
@click.option(
    "--idle-timeout",
    type=float,
    default=pytunnel.DEFAULT_IDLE_TIMEOUT,
    help="Seconds a relayed connection may stay silent.",
)
@click.option(
    "--reconnect/--no-reconnect",
    default=True,
    help="Reconnect with exponential backoff when the connection is lost.",
)
@click.option(
    "--max-attempts",
    type=click.IntRange(min=0),
    default=0,
    help="Reconnection attempts in a row before giving up (0: unlimited).",
)
@click.option(
    "--backoff-max",
    type=float,
    default=16.0,
    help="Longest wait between reconnection attempts, in seconds.",
)
@click.option("--heartbeat-interval", type=float, default=10.0, help="Seconds between pings.")
@click.option(
    "--heartbeat-timeout",
    type=float,
    default=30.0,
    help="The link is dead when a ping is unanswered this long.",
)
@click.option(
    "--probe-interval",
    type=float,
    default=30.0,
    help="Health-probe remote forward targets this often, in seconds (0: off).",
)
@click.option(
    "--probe-failures",
    type=click.IntRange(min=1),
    default=3,
    help="Failed probes in a row that take a remote forward offline.",
)
@click.option(
    "--max-streams",
    type=click.IntRange(min=1),
    default=pytunnel.SessionConfig().max_streams,
    show_default=True,
    help="Concurrent streams on the tunnel connection; at the limit, local forwards stop "
    "accepting until one closes.",
)
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
    help="This client's identity at the server (1-64 of A-Z a-z 0-9 . _ : -; default: random "
    "per run). A new connection with it replaces the server's old session of this client at "
    "once, ports included; never give two clients the same one.",
)
@log_level_option
@log_format_option
@click.pass_context
def connect(
    ctx: click.Context,
    server: tuple[str, int],
    token: str | None,
    token_file: str | None,
    dynamic: list[tuple[str, int]],
    socks_auth: str | None,
    use_tls: bool,
    tls_ca: str | None,
    tls_fingerprint: str | None,
    tls_server_name: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    remote: list[ForwardSpec],
    local: list[ForwardSpec],
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
    status_interval: float,
    client_id: str | None,
    log_level: str,
    log_format: str,
) -> None:
    """Connect to a tunnel server and set up forwards; keep them up until interrupted."""
    setup_logging(log_level, log_format)
    secret = read_token(ctx, token, token_file)
    if secret is None:
        raise click.UsageError("a token is needed: --token, --token-file or PYTUNNEL_TOKEN")
    if tls_fingerprint is not None:
        try:
            parse_fingerprint(tls_fingerprint)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--tls-fingerprint") from None
    auth: tuple[str, str] | None = None
    if socks_auth is not None:
        user, sep, password = socks_auth.partition(":")
        if not sep or not user:
            raise click.BadParameter("expected USER:PASSWORD", param_hint="--socks-auth")
        auth = (user, password)
    if client_id is not None and (not client_id or not valid_client_id(client_id)):
        raise click.BadParameter(
            "expected 1-64 characters of letters, digits and . _ : -", param_hint="--client-id"
        )
    config = pytunnel.ClientConfig(
        token=secret,
        client_id=client_id,
        tls_fingerprint=tls_fingerprint,
        tls_server_hostname=tls_server_name,
        connect_timeout=connect_timeout,
        idle_timeout=idle_timeout,
        reconnect=reconnect,
        max_attempts=max_attempts or None,
        backoff_max=backoff_max,
        heartbeat_interval=heartbeat_interval,
        heartbeat_timeout=heartbeat_timeout,
        probe_interval=probe_interval,
        probe_failures=probe_failures,
        session=pytunnel.SessionConfig(max_streams=max_streams),
    )

    async def run() -> None:
        client_config = config
        context = await client_tls(use_tls, tls_ca, tls_cert, tls_key, tls_fingerprint)
        if context is not None:
            client_config = attrs.evolve(config, tls=context)
        async with pytunnel.connect(server, token=secret, config=client_config) as tunnel:
            say(f"connected to {pytunnel.format_target(*server)}")
            for spec in remote:
                fwd: pytunnel.Forward = await tunnel.forward_remote(
                    spec.target_host,
                    spec.target_port,
                    remote_port=spec.bind_port,
                    remote_host=spec.bind_host or "",
                    protocol=spec.protocol,
                )
                say(f"{fwd.kind} {pytunnel.format_target(*fwd.address)} -> {fwd.target}")
            for spec in local:
                fwd = await tunnel.forward_local(
                    spec.target_host,
                    spec.target_port,
                    local_port=spec.bind_port,
                    local_host=spec.bind_host or "127.0.0.1",
                    protocol=spec.protocol,
                )
                say(f"{fwd.kind} {pytunnel.format_target(*fwd.address)} -> {fwd.target}")
            for bind_host, bind_port in dynamic:
                fwd = await tunnel.forward_dynamic(
                    local_port=bind_port, local_host=bind_host, auth=auth
                )
                say(f"dynamic forward {pytunnel.format_target(*fwd.address)} -> SOCKS")
            async with trio.open_nursery() as nursery:
                if status_interval > 0:
                    nursery.start_soon(print_status, tunnel, status_interval)
                await tunnel.wait_closed()
                nursery.cancel_scope.cancel()
            if tunnel.failure is not None:
                raise tunnel.failure

    run_command(run)
