"""``pytunnel serve`` and ``pytunnel connect``: parse arguments, call the library, report.

Everything here is presentation: the library does the work inside ``trio.run``. Every option is
also read from a ``PYTUNNEL_*`` environment variable (shown in ``--help``).
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import secrets
import signal
import ssl
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, NoReturn

import attrs
import click
import trio

import pytunnel
from pytunnel._policy import PermitOpen, parse_port_ranges
from pytunnel._spec import ForwardSpec, parse_forward_spec, parse_host_port
from pytunnel._tls import parse_fingerprint
from pytunnel.protocol.messages import valid_client_id

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup  # type: ignore[import-not-found, unused-ignore]

CONTEXT = {"auto_envvar_prefix": "PYTUNNEL", "show_default": True, "max_content_width": 100}


class _JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def _setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def _say(line: str) -> None:
    """User-facing output on stdout, flushed at once (scripts wait for these lines)."""
    click.echo(line)
    sys.stdout.flush()


def _startup_error(exc: BaseException) -> pytunnel.TunnelError | OSError | None:
    """The typed error behind ``exc``, looking through exception groups (nurseries wrap
    what a task raised): the first TunnelError or OSError if the group holds nothing else,
    ``None`` if it holds anything else (a bug, whose traceback must not be hidden)."""
    if isinstance(exc, BaseExceptionGroup):
        found: pytunnel.TunnelError | OSError | None = None
        for inner in exc.exceptions:
            typed = _startup_error(inner)
            if typed is None:
                return None
            found = found or typed
        return found
    if isinstance(exc, (pytunnel.TunnelError, OSError)):
        return exc
    return None


_ERRNO_CODES = {
    errno.EADDRINUSE: pytunnel.ErrorCode.ADDRESS_IN_USE,
    errno.EACCES: pytunnel.ErrorCode.PERMISSION_DENIED,
    errno.EPERM: pytunnel.ErrorCode.PERMISSION_DENIED,
}


def _describe(error: pytunnel.TunnelError | OSError) -> str:
    """``[CODE_NAME] message``: the error code's name, or for an OS error the matching
    code's name if there is one, else the errno's."""
    if isinstance(error, pytunnel.TunnelError):
        return str(error)
    code = _ERRNO_CODES.get(error.errno or 0)
    if code is not None:
        name = code.name
    elif isinstance(error, ssl.SSLError):
        name = pytunnel.ErrorCode.TLS_FAILED.name
    else:
        name = errno.errorcode.get(error.errno or 0, "OS_ERROR")
    reason = error.strerror or str(error)
    if error.filename is not None:
        reason = f"{error.filename}: {reason}"
    return f"[{name}] {reason}"


def _fail(message: str) -> NoReturn:
    click.echo(f"pytunnel: error: {message}", err=True)
    sys.exit(1)


def _run(main: Callable[[], Awaitable[None]]) -> None:
    """Run ``main`` under trio; SIGINT/SIGTERM end it cleanly with status 0, a TunnelError
    or OSError (however deeply nested in exception groups) ends it with one line on stderr
    and status 1."""
    failure: list[pytunnel.TunnelError | OSError] = []

    async def wrapper() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:

                async def watch() -> None:
                    async for signum in signals:
                        logging.getLogger("pytunnel").info(
                            "received %s, shutting down", signal.Signals(signum).name
                        )
                        nursery.cancel_scope.cancel()
                        return

                nursery.start_soon(watch)
                try:
                    await main()
                except (pytunnel.TunnelError, OSError, BaseExceptionGroup) as exc:
                    typed = _startup_error(exc)
                    if typed is None:
                        raise
                    failure.append(typed)
                nursery.cancel_scope.cancel()

    trio.run(wrapper)
    if failure:
        _fail(_describe(failure[0]))


def _host_port(_ctx: click.Context, _param: click.Parameter, value: str) -> tuple[str, int]:
    try:
        return parse_host_port(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _forward_specs(
    _ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]
) -> list[ForwardSpec]:
    try:
        return [parse_forward_spec(v) for v in values]
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _dynamic_specs(
    _ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]
) -> list[tuple[str, int]]:
    try:
        return [parse_host_port(v) for v in values]
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _port_ranges(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    if value is not None:
        try:
            parse_port_ranges(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from None
    return value


def _permit_open(
    _ctx: click.Context, _param: click.Parameter, value: tuple[str, ...]
) -> tuple[str, ...]:
    try:
        PermitOpen.parse(list(value))
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    return value


def _read_token(ctx: click.Context, token: str | None, token_file: str | None) -> str | None:
    """The token from --token-file, or --token / PYTUNNEL_TOKEN; warn when it was typed on
    the command line, where every user of the machine can read it in ``ps``."""
    if token_file is not None:
        try:
            with open(token_file, encoding="utf-8") as handle:
                token = handle.read().strip()
        except OSError as exc:
            _fail(f"{_describe(exc)} (--token-file)")
        except UnicodeDecodeError:
            _fail(f"[INVALID_FIELD] {token_file}: the token file is not UTF-8 text")
        if not token:
            raise click.BadParameter("the token file is empty", param_hint="--token-file")
        return token
    if (
        token is not None
        and ctx.get_parameter_source("token") is click.core.ParameterSource.COMMANDLINE
    ):
        logging.getLogger("pytunnel.cli").warning(
            "--token on the command line is visible to other users in ps; "
            "prefer --token-file or PYTUNNEL_TOKEN"
        )
    return token


token_file_option = click.option(
    "--token-file",
    type=click.Path(exists=True, dir_okay=False),
    help="Read the shared secret from this file (keeps it out of ps).",
)


log_level_option = click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    default="info",
    help="Least severe log level shown.",
)
log_format_option = click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    help="Log line format on stderr.",
)


@click.group(context_settings=CONTEXT)
@click.version_option(pytunnel.__version__, prog_name="pytunnel")
def main() -> None:
    """Expose local services and reach remote ones through one authenticated connection."""


@main.command(context_settings=CONTEXT)
@click.option(
    "--listen",
    default="127.0.0.1:7000",
    callback=_host_port,
    help="Address clients connect to.",
)
@click.option(
    "--token",
    envvar="PYTUNNEL_TOKEN",
    show_envvar=True,
    help="Shared secret. Without one, a random token is made and printed.",
)
@click.option(
    "--public-host",
    default="127.0.0.1",
    help="Address remote forwards listen on (0.0.0.0 exposes them on all interfaces).",
)
@click.option(
    "--allow-ports",
    callback=_port_ranges,
    help="Ports remote forwards may use, e.g. 8000,9000-9100. Default: any.",
)
@click.option(
    "--permit-open",
    multiple=True,
    callback=_permit_open,
    help="Targets clients may open, OpenSSH PermitOpen style: NAME:PORT (* wildcards, matched "
    "against the name asked for) or IP:PORT, 10.0.0.*:PORT, 10.0.0.0/24:PORT (matched "
    "against the address the name resolves to, which is the address dialled); PORT is a "
    "number, LOW-HIGH or *. Repeatable. Default: any.",
)
@click.option(
    "--connect-timeout",
    type=float,
    default=pytunnel.DEFAULT_CONNECT_TIMEOUT,
    help="Seconds a dial may take (then NODE_TIMEOUT).",
)
@click.option(
    "--idle-timeout",
    type=float,
    default=pytunnel.DEFAULT_IDLE_TIMEOUT,
    help="Seconds a relayed connection may stay silent.",
)
@click.option(
    "--heartbeat-timeout",
    type=float,
    default=30.0,
    help="Drop a client silent for this many seconds.",
)
@click.option(
    "--max-forwards-per-client",
    type=click.IntRange(min=0),
    default=64,
    help="Remote forwards one client may hold.",
)
@click.option(
    "--max-streams",
    type=click.IntRange(min=1),
    default=16384,
    help="Relayed connections across all clients (lowered to what the file descriptor "
    "limit allows; the soft limit is raised to the hard one at start).",
)
@click.option(
    "--max-session-streams",
    type=click.IntRange(min=1),
    default=4096,
    help="Concurrent streams in one client's session.",
)
@click.option(
    "--max-pending-handshakes",
    type=click.IntRange(min=1),
    default=128,
    help="Connections allowed in their handshake at once.",
)
@click.option(
    "--max-handshakes-per-address",
    type=click.IntRange(min=1),
    default=8,
    help="Connections one source address may have in their handshake at once.",
)
@click.option(
    "--first-frame-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=3.0,
    help="Seconds a new connection has to send its first frame (after TLS, if any).",
)
@click.option(
    "--auth-failure-burst",
    type=click.IntRange(min=1),
    default=10,
    help="Failed authentications one address may make in a burst before it is refused.",
)
@click.option(
    "--auth-failure-interval",
    type=click.FloatRange(min=0),
    default=6.0,
    help="Seconds after which one more failed authentication is forgiven (the refill rate).",
)
@click.option(
    "--max-frame-size",
    type=click.IntRange(min=4096),
    default=1024 * 1024,
    help="Largest protocol frame accepted, in bytes.",
)
@token_file_option
@click.option(
    "--tls-cert",
    type=click.Path(exists=True, dir_okay=False),
    help="TLS certificate (PEM) for the control connection.",
)
@click.option(
    "--tls-key",
    type=click.Path(exists=True, dir_okay=False),
    help="Private key (PEM) of --tls-cert.",
)
@click.option(
    "--tls-self-signed",
    is_flag=True,
    help="Use TLS with a self-signed certificate, made on first start in --tls-dir "
    "and reused; prints the fingerprint clients pin.",
)
@click.option(
    "--tls-dir",
    type=click.Path(file_okay=False),
    default=lambda: str(Path.home() / ".config" / "pytunnel" / "tls"),
    show_default="~/.config/pytunnel/tls",
    help="Where --tls-self-signed keeps its certificate and key (0600).",
)
@click.option(
    "--tls-client-ca",
    type=click.Path(exists=True, dir_okay=False),
    help="Require client certificates signed by this CA (mutual TLS).",
)
@log_level_option
@log_format_option
@click.pass_context
def serve(
    ctx: click.Context,
    listen: tuple[str, int],
    token: str | None,
    public_host: str,
    allow_ports: str | None,
    permit_open: tuple[str, ...],
    connect_timeout: float,
    idle_timeout: float,
    heartbeat_timeout: float,
    max_forwards_per_client: int,
    max_streams: int,
    max_session_streams: int,
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
    log_level: str,
    log_format: str,
) -> None:
    """Run a tunnel server."""
    _setup_logging(log_level, log_format)
    token = _read_token(ctx, token, token_file)
    generated = token is None
    secret = token or secrets.token_urlsafe(24)
    if (tls_cert is None) != (tls_key is None):
        raise click.UsageError("--tls-cert and --tls-key go together")
    if tls_cert and tls_self_signed:
        raise click.UsageError("--tls-cert and --tls-self-signed exclude each other")

    async def run() -> None:
        tls: ssl.SSLContext | None = None
        fingerprint: str | None = None
        cert, key = tls_cert, tls_key
        if tls_self_signed:
            cert_path, key_path, fingerprint = await pytunnel.ensure_self_signed(tls_dir)
            cert, key = str(cert_path), str(key_path)
        if cert is not None and key is not None:
            tls = await pytunnel.server_tls_context(cert, key, client_ca_file=tls_client_ca)
            if fingerprint is None:
                der = ssl.PEM_cert_to_DER_cert(await trio.Path(cert).read_text())
                fingerprint = pytunnel.certificate_fingerprint(der)
        async with trio.open_nursery() as nursery:
            server: pytunnel.TunnelServer = await nursery.start(
                functools.partial(
                    pytunnel.serve,
                    secret,
                    listen[1],
                    host=listen[0],
                    public_host=public_host,
                    allow_ports=allow_ports,
                    permit_open=list(permit_open) or None,
                    connect_timeout=connect_timeout,
                    idle_timeout=idle_timeout,
                    heartbeat_timeout=heartbeat_timeout,
                    max_forwards_per_client=max_forwards_per_client,
                    max_streams=max_streams,
                    max_pending_handshakes=max_pending_handshakes,
                    max_handshakes_per_address=max_handshakes_per_address,
                    first_frame_timeout=first_frame_timeout,
                    auth_failure_burst=auth_failure_burst,
                    auth_failure_interval=auth_failure_interval,
                    session=pytunnel.SessionConfig(
                        max_streams=max_session_streams, max_frame_size=max_frame_size
                    ),
                    tls=tls,
                )
            )
            address = pytunnel.format_target(*server.address)
            _say(f"pytunnel server listening on {address}" + (" (TLS)" if tls else ""))
            if fingerprint is not None:
                _say(f"TLS certificate fingerprint: {fingerprint}")
            if generated:
                pin = f" --tls-fingerprint {fingerprint}" if tls_self_signed else ""
                tls_flag = " --tls" if tls and not tls_self_signed else ""
                _say(f"connect with: pytunnel connect {address} --token {secret}{tls_flag}{pin}")

    _run(run)


@main.command(context_settings=CONTEXT)
@click.argument("server", callback=_host_port, envvar="PYTUNNEL_SERVER")
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
    callback=_dynamic_specs,
    metavar="[BIND:]PORT",
    help="Dynamic forward: a SOCKS5/4a proxy here on PORT (0: any) whose connections exit at "
    "the server, DNS included. Repeatable.",
)
@click.option(
    "--socks-auth",
    metavar="USER:PASSWORD",
    help="Require this username and password from SOCKS clients (RFC 1929).",
)
@click.option(
    "--tls",
    "use_tls",
    is_flag=True,
    help="Use TLS, verifying the server against the system trust store.",
)
@click.option(
    "--tls-ca",
    type=click.Path(exists=True, dir_okay=False),
    help="Use TLS, verifying the server against this CA bundle instead.",
)
@click.option(
    "--tls-fingerprint",
    metavar="SHA256:...",
    help="Use TLS and pin the server certificate (for self-signed servers).",
)
@click.option(
    "--tls-server-name",
    help="Name the server certificate must carry (default: the host connected to).",
)
@click.option(
    "--tls-cert",
    type=click.Path(exists=True, dir_okay=False),
    help="Client certificate (PEM) for mutual TLS.",
)
@click.option(
    "--tls-key", type=click.Path(exists=True, dir_okay=False), help="Private key of --tls-cert."
)
@click.option(
    "-R",
    "--remote",
    "remote",
    multiple=True,
    callback=_forward_specs,
    metavar="[BIND:]PORT:HOST:HOSTPORT",
    help="Remote forward: the server listens on PORT (0: any), connections reach HOST:HOSTPORT "
    "from here. Repeatable.",
)
@click.option(
    "-L",
    "--local",
    "local",
    multiple=True,
    callback=_forward_specs,
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
    _setup_logging(log_level, log_format)
    secret = _read_token(ctx, token, token_file)
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
        if use_tls or tls_ca or tls_cert:
            context = await pytunnel.client_tls_context(
                ca_file=tls_ca,
                cert_file=tls_cert,
                key_file=tls_key,
                pinned=tls_fingerprint is not None,
            )
            client_config = attrs.evolve(config, tls=context)
        async with pytunnel.connect(server, token=secret, config=client_config) as tunnel:
            _say(f"connected to {pytunnel.format_target(*server)}")
            for spec in remote:
                fwd: pytunnel.Forward = await tunnel.forward_remote(
                    spec.target_host,
                    spec.target_port,
                    remote_port=spec.bind_port,
                    remote_host=spec.bind_host or "",
                    protocol=spec.protocol,
                )
                _say(f"{fwd.kind} {pytunnel.format_target(*fwd.address)} -> {fwd.target}")
            for spec in local:
                fwd = await tunnel.forward_local(
                    spec.target_host,
                    spec.target_port,
                    local_port=spec.bind_port,
                    local_host=spec.bind_host or "127.0.0.1",
                    protocol=spec.protocol,
                )
                _say(f"{fwd.kind} {pytunnel.format_target(*fwd.address)} -> {fwd.target}")
            for bind_host, bind_port in dynamic:
                fwd = await tunnel.forward_dynamic(
                    local_port=bind_port, local_host=bind_host, auth=auth
                )
                _say(f"dynamic forward {pytunnel.format_target(*fwd.address)} -> SOCKS")
            async with trio.open_nursery() as nursery:
                if status_interval > 0:
                    nursery.start_soon(_print_status, tunnel, status_interval)
                await tunnel.wait_closed()
                nursery.cancel_scope.cancel()
            if tunnel.failure is not None:
                raise tunnel.failure

    _run(run)


def format_status(tunnel: pytunnel.Tunnel) -> list[str]:
    """One compact line per forward: status, connections, bytes each way, errors."""
    lines = []
    for fwd in sorted(tunnel.forwards, key=lambda f: (f.kind, f.listen_port)):
        stats = fwd.stats
        errors = ",".join(f"{k}={v}" for k, v in sorted(stats.errors.items())) or "-"
        dropped = f" dropped={stats.datagrams_dropped}" if "udp" in fwd.kind else ""
        lines.append(
            f"status {fwd.kind} {pytunnel.format_target(*fwd.address)} -> {fwd.target}: "
            f"{fwd.status.value} conns={stats.active_connections}/{stats.total_connections} "
            f"out={stats.bytes_out} in={stats.bytes_in} errors={errors}{dropped}"
        )
    link = "up" if tunnel.connected else "down"
    rtt = f"{tunnel.rtt * 1000:.1f} ms" if tunnel.rtt is not None else "-"
    lines.append(f"status link {link} rtt={rtt} reconnects={tunnel.reconnects}")
    return lines


async def _print_status(tunnel: pytunnel.Tunnel, interval: float) -> None:
    while True:
        await trio.sleep(interval)
        for line in format_status(tunnel):
            _say(line)


if __name__ == "__main__":  # pragma: no cover
    main()
