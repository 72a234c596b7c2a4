"""The admin API of a running ``pytunnel connect`` and the verbs that talk to it.

``connect`` answers on a Unix socket (``--admin``, on by default) or a loopback port with a
token: its status, its forwards (list, add, remove, retry) and a reload of its config file,
all through the same :class:`DeclaredForwards` a reload uses. ``pytunnel status``,
``pytunnel forwards ...`` and ``pytunnel reload`` are thin clients of it: a table for
people, ``--json`` for scripts. docs/admin-api.md has the endpoints.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote

import attrs
import click
import trio

import pytunnel
import pytunnel.admin
from pytunnel.admin import AdminError, Request, Response

from ._options import EXISTING_FILE, parsed, stack
from ._output import fail, say
from ._run import describe

if TYPE_CHECKING:
    # the API's side (connect and serve) imports these where it uses them: the verbs
    # (``pytunnel status``...) do not need the forwards, the config files and cattrs
    from ._config import ForwardTable, ReloadResult
    from ._declared import DeclaredForwards, Running

    Reload = Callable[[], Awaitable[ReloadResult]]

__all__ = [
    "AdminAddress",
    "client_api",
    "forwards",
    "read_admin_token",
    "reload",
    "serve_admin",
    "server_api",
    "server_options",
    "serve_options",
    "status",
]


@attrs.frozen
class AdminAddress:
    """Where an admin API listens: a Unix socket path (``None``: the default one of this
    process) or a loopback ``host:port``; or nowhere (``off``)."""

    unix: Path | None = None
    tcp: tuple[str, int] | None = None
    off: bool = False


def parse_admin(value: str | None) -> AdminAddress:
    """``unix``, ``unix:PATH``, ``HOST:PORT`` or ``off``."""
    if value is None or value == "unix":
        return AdminAddress()
    if value == "off":
        return AdminAddress(off=True)
    if value.startswith("unix:"):
        return AdminAddress(unix=Path(value[5:]).expanduser())
    return AdminAddress(tcp=pytunnel.parse_host_port(value))


def read_admin_token(path: str | None) -> str | None:
    if path is None:
        return os.environ.get("PYTUNNEL_ADMIN_TOKEN") or None
    try:
        with open(path, encoding="utf-8") as handle:
            token = handle.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise click.BadParameter(
            f"cannot read it: {exc}", param_hint="--admin-token-file"
        ) from None
    if not token:
        raise click.BadParameter("the file is empty", param_hint="--admin-token-file")
    return token


# ------------------------------------------------------------------- the API of connect


def forward_view(entry: Running) -> dict[str, Any]:
    """One forward as the API shows it (OxideTerm's rule fields, and the counters)."""
    from ._declared import bind_of

    forward = entry.forward
    stats = forward.stats
    error = forward.reason if forward.status is pytunnel.ForwardStatus.ERROR else None
    return {
        "id": entry.id,
        "name": entry.declared.name,
        "kind": forward.kind.name.lower(),
        "spec": entry.declared.spec,
        "bind": bind_of(forward),
        "target": "socks" if forward.kind is pytunnel.ForwardKind.DYNAMIC else forward.target,
        "status": forward.status.value,
        "reason": forward.reason,
        "error": error,
        "since": forward.changed_at,
        "connections": stats.active_connections,
        "connections_total": stats.total_connections,
        "bytes_out": stats.bytes_out,
        "bytes_in": stats.bytes_in,
        "dial_errors": dict(stats.errors),
        "limit": forward.limit,
        "group": entry.declared.group,
        "origin": entry.origin,
    }


async def _json_body(request: Request) -> Any:
    raw = await request.read_body()
    try:
        value = json.loads(raw) if raw else None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        # RecursionError: nesting too deep for the parser (a 64 KiB body can hold 30,000
        # brackets), the peer's mistake like any other malformed body
        raise AdminError(400, "the body is not JSON") from None
    try:
        # JSON may spell a lone surrogate ("\ud800"), which no UTF-8 text can hold: kept in
        # a forward's name, it would break every later answer and metrics scrape that
        # writes the name
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise AdminError(400, "the body holds a lone surrogate (\\uD800-\\uDFFF)") from None
    return value


def _table_of(body: Any) -> ForwardTable:
    """A forward to add, from the same keys as a ``[[client.forwards]]`` table."""
    from ._config import ForwardTable, structure_table

    if not isinstance(body, dict):
        raise AdminError(400, "expected a JSON object with one of local, remote or dynamic")
    try:
        table: ForwardTable = structure_table(body, ForwardTable)
        return table
    except Exception as exc:  # cattrs collects what is wrong; say the first
        raise AdminError(400, _first_message(exc)) from None


def _first_message(exc: BaseException) -> str:
    import cattrs

    while isinstance(exc, cattrs.ClassValidationError):
        with_notes, without = exc.group_exceptions()
        if without:
            exc = without[0]
            continue
        inner, note = with_notes[0]
        return f"{note.name}: {inner}"
    if isinstance(exc, cattrs.ForbiddenExtraKeysError):
        return f"unknown key: {', '.join(sorted(exc.extra_fields))}"
    return str(exc)


def client_api(
    tunnel: pytunnel.Tunnel, declared: DeclaredForwards, reload: Reload, server: str
) -> pytunnel.admin.Handler:
    """The handler of ``connect``'s admin API."""
    from ._declared import TableError, declare_table

    started = time.time()

    def find(key: str) -> Running:
        entry = declared.find(key)
        if entry is None:
            raise AdminError(404, f"no forward has the id or name {key!r}")
        return entry

    async def handle(request: Request) -> Response:
        path, method = request.path.rstrip("/") or "/", request.method
        if path == "/api/status" and method == "GET":
            return Response.json(
                200,
                {
                    "role": "client",
                    "server": tunnel.server or server,
                    "connected": tunnel.connected,
                    "client_id": tunnel.client_id,
                    "rtt": tunnel.rtt,
                    "reconnects": tunnel.reconnects,
                    "uptime": time.time() - started,
                    "pid": os.getpid(),
                    "version": pytunnel.__version__,
                    "forwards": [forward_view(e) for e in declared.running],
                },
            )
        if path == "/api/forwards" and method == "GET":
            return Response.json(200, [forward_view(e) for e in declared.running])
        if path == "/api/forwards" and method == "POST":
            table = _table_of(await _json_body(request))
            try:
                # a group's key is read from its file: not on the event loop
                item = await trio.to_thread.run_sync(declare_table, table)
            except TableError as exc:
                raise AdminError(400, f"{exc.key}: {exc}") from None
            try:
                async with declared.lock:
                    entry = await declared.add(item, origin="api")
            except ValueError as exc:
                raise AdminError(409, str(exc)) from None
            except (pytunnel.TunnelError, OSError) as exc:
                raise AdminError(409, _describe(exc)) from None
            return Response.json(201, forward_view(entry))
        if path == "/" and method in ("GET", "HEAD"):
            return dashboard()
        match = re.fullmatch(r"/api/forwards/([^/]+)(/retry|/stop)?", path)
        key = unquote(match.group(1)) if match else ""
        if match and method == "DELETE" and match.group(2) is None:
            async with declared.lock:
                entry = find(key)
                await declared.remove(entry)
            return Response.json(200, forward_view(entry))
        if match and method == "POST" and match.group(2) == "/stop":
            async with declared.lock:
                entry = find(key)
                await declared.stop(entry)
            return Response.json(200, forward_view(entry))
        if match and method == "POST" and match.group(2) == "/retry":
            async with declared.lock:
                entry = find(key)
                try:
                    await declared.retry(entry)
                except (pytunnel.TunnelError, OSError) as exc:
                    raise AdminError(409, _describe(exc)) from None
            return Response.json(200, forward_view(entry))
        if path == "/api/reload" and method == "POST":
            result = await reload()
            if not result.ok:
                raise AdminError(422, result.message)
            return Response.json(200, {"ok": True, "message": result.message})
        if path in ("/api/status", "/api/forwards", "/api/reload") or match:
            raise AdminError(405, f"{method} is not allowed on {path}")
        raise AdminError(404, f"no such endpoint: {path}")

    return handle


def server_api(server: pytunnel.TunnelServer, reload: Reload) -> pytunnel.admin.Handler:
    """The handler of ``serve``'s admin API: its clients, their forwards, its limits."""
    started = time.time()

    def clients() -> list[dict[str, Any]]:
        return [
            {**attrs.asdict(c), "uptime": time.time() - c.connected_at}
            for c in sorted(server.clients, key=lambda c: c.connected_at)
        ]

    async def handle(request: Request) -> Response:
        path, method = request.path.rstrip("/") or "/", request.method
        if path == "/api/status" and method == "GET":
            config = server.config
            return Response.json(
                200,
                {
                    "role": "server",
                    "listen": pytunnel.format_target(*server.address),
                    "uptime": time.time() - started,
                    "pid": os.getpid(),
                    "version": pytunnel.__version__,
                    "sessions": server.session_count,
                    "streams_open": server.active_streams,
                    "streams_total": server.total_streams,
                    "pending_handshakes": server.pending_handshakes,
                    "auth_failures": server.auth_failures,
                    "throttled_addresses": server.throttled_addresses,
                    "limits_hit": dict(server.limits_hit),
                    "limits": {
                        "max_streams": config.max_streams,
                        "max_session_streams": config.session.max_streams,
                        "receive_budget": config.session.receive_budget,
                        "max_forwards_per_client": config.max_forwards_per_client,
                        "max_pending_handshakes": config.max_pending_handshakes,
                        "max_handshakes_per_address": config.max_handshakes_per_address,
                        "idle_timeout": config.idle_timeout,
                        "heartbeat_timeout": config.heartbeat_timeout,
                        "public_host": config.public_host,
                    },
                    "clients": clients(),
                },
            )
        if path == "/" and method in ("GET", "HEAD"):
            return dashboard()
        if path == "/api/clients" and method == "GET":
            return Response.json(200, clients())
        if path == "/api/reload" and method == "POST":
            result = await reload()
            if not result.ok:
                raise AdminError(422, result.message)
            return Response.json(200, {"ok": True, "message": result.message})
        if path == "/api/cluster" and method == "GET":
            return Response.json(200, await cluster_view(server))
        if path in ("/api/status", "/api/clients", "/api/reload", "/api/cluster"):
            raise AdminError(405, f"{method} is not allowed on {path}")
        raise AdminError(404, f"no such endpoint: {path}")

    return handle


async def cluster_view(server: pytunnel.TunnelServer) -> dict[str, Any]:
    """What ``GET /api/cluster`` answers: the registry as this node reads it, and this node's
    links to the others (``pytunnel cluster status --admin``)."""
    registry = server.config.cluster
    if registry is None:
        raise AdminError(409, "this server is not a node of a cluster (started without --cluster)")
    try:
        entries = await registry.entries()
    except pytunnel.ClusterUnavailableError as exc:
        raise AdminError(503, exc.message) from None
    view: dict[str, Any] = {
        "node_id": registry.node_id,
        "node_address": registry.node_address,
        "available": registry.available,
        "entries": entries,
        "links": None,
    }
    links = server.node_links
    if links is not None:
        view["links"] = {
            "up": links.linked_nodes,
            "mirrored_ports": links.mirrored_ports,
            "mirrored_udp_ports": links.mirrored_udp_ports,
            "streams_out": links.stats.streams_out,
            "streams_in": links.stats.streams_in,
        }
    return view


def dashboard() -> Response:
    """The dashboard page: static, no data of its own (it reads the API with the token)."""
    page = resources.files("pytunnel.cli").joinpath("dashboard/index.html").read_bytes()
    return Response(
        200,
        [
            ("content-type", "text/html; charset=utf-8"),
            ("cache-control", "no-store"),
            ("x-frame-options", "DENY"),
            ("x-content-type-options", "nosniff"),
            ("referrer-policy", "no-referrer"),
        ],
        page,
    )


def _describe(exc: pytunnel.TunnelError | OSError) -> str:
    return describe(exc)


async def serve_admin(
    nursery: trio.Nursery,
    handler: pytunnel.admin.Handler,
    where: AdminAddress,
    token: str | None,
    role: str = "connect",
) -> str | None:
    """Start the admin API in ``nursery`` where ``--admin`` says; returns its address as
    the verbs take it (``unix:PATH`` or ``HOST:PORT``), ``None`` when off."""
    if where.off:
        return None
    if where.tcp is not None:
        if token is None:
            raise click.UsageError(
                "--admin HOST:PORT needs a token: --admin-token-file or PYTUNNEL_ADMIN_TOKEN"
            )
        host, port = await nursery.start(
            functools.partial(
                pytunnel.admin.serve_admin_tcp,
                handler,
                where.tcp[0],
                where.tcp[1],
                token=token,
                public_paths=("/",),
            )
        )
        return pytunnel.format_target(host, port)
    if where.unix is not None:
        bound = await nursery.start(pytunnel.admin.serve_admin_unix, handler, where.unix)
        return f"unix:{bound}"
    # the default socket is a convenience: a runtime directory that cannot be used costs the
    # admin API (said once), never the tunnel
    path = pytunnel.admin.default_socket_dir() / f"{role}-{os.getpid()}.sock"
    try:
        bound = await nursery.start(pytunnel.admin.serve_admin_unix, handler, path)
    except (pytunnel.TunnelError, OSError) as exc:
        logging.getLogger("pytunnel.cli").warning(
            "no admin API: %s (choose a socket with --admin unix:PATH)", describe(exc)
        )
        return None
    return f"unix:{bound}"


#: ``connect``'s own ``--admin`` and ``--admin-token-file``.
serve_options = stack(
    click.option(
        "--admin",
        "admin",
        default="unix",
        metavar="unix[:PATH]|HOST:PORT|off",
        callback=parsed(parse_admin),
        help="Where this client's admin API listens: a Unix socket (mode 0600; default "
        "connect-PID.sock in $XDG_RUNTIME_DIR/pytunnel), a loopback port (needs "
        "--admin-token-file), or off.",
    ),
    click.option(
        "--admin-token-file",
        type=EXISTING_FILE,
        help="Token the admin API on a port requires (Authorization: Bearer); also "
        "PYTUNNEL_ADMIN_TOKEN.",
    ),
)


#: ``serve``'s ``--admin`` (off unless asked for) and ``--admin-token-file``.
server_options = stack(
    click.option(
        "--admin",
        "admin",
        default="off",
        metavar="unix[:PATH]|HOST:PORT|off",
        callback=parsed(parse_admin),
        help="Serve an admin API (clients, limits, reload): a Unix socket (mode 0600; unix: "
        "serve-PID.sock in $XDG_RUNTIME_DIR/pytunnel) or a loopback port (needs "
        "--admin-token-file).",
    ),
    click.option(
        "--admin-token-file",
        type=EXISTING_FILE,
        help="Token the admin API on a port requires (Authorization: Bearer); also "
        "PYTUNNEL_ADMIN_TOKEN.",
    ),
)


# ------------------------------------------------------------------- the verbs


def _client_options(function: Callable[..., Any]) -> Callable[..., Any]:
    function = click.option(
        "--json", "as_json", is_flag=True, help="Print the API's JSON instead of a table."
    )(function)
    function = click.option(
        "--admin-token-file",
        type=EXISTING_FILE,
        help="Token of an admin API on a port (also PYTUNNEL_ADMIN_TOKEN).",
    )(function)
    function = click.option(
        "--admin",
        "admin",
        metavar="unix:PATH|HOST:PORT",
        help="The admin API to talk to (default: the one running pytunnel connect of this user).",
    )(function)
    return function


def call_admin(
    admin: str | None, token_file: str | None, method: str, path: str, body: object = None
) -> Any:
    """One request to the running client's API; its JSON, or the command ends with the
    error it answered (status 1)."""
    token = read_admin_token(token_file)
    try:
        if admin is None:
            directory = pytunnel.admin.default_socket_dir()
            found = pytunnel.admin.find_sockets(directory, "connect-*.sock")
            if not found:
                fail(f"no running pytunnel connect found (no admin socket in {directory})")
            if len(found) > 1:
                names = ", ".join(f"unix:{p}" for p in found)
                fail(f"several pytunnel connect are running; pick one with --admin ({names})")
            admin = f"unix:{found[0]}"
        if admin.startswith("unix:"):
            status, answer = pytunnel.admin.request(
                method, path, body, unix_path=admin[5:], token=token
            )
        else:
            try:
                address = pytunnel.parse_host_port(admin, allow_zero=False)
            except ValueError as exc:
                raise click.BadParameter(str(exc), param_hint="--admin") from None
            status, answer = pytunnel.admin.request(
                method, path, body, address=address, token=token
            )
    except OSError as exc:
        fail(f"cannot reach the admin API at {admin}: {exc.strerror or exc}")
    except ValueError as exc:
        fail(str(exc))
    if status >= 400:
        message = answer.get("error") if isinstance(answer, dict) else None
        fail(f"{message or 'failed'} (HTTP {status})")
    return answer


def _size(value: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:g}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1000  # type: ignore[assignment]
    raise AssertionError  # pragma: no cover


def _trouble(row: dict[str, Any]) -> str:
    """The ERROR column: the error of a forward in error, and why one is suspended or
    offline (a name another client took meanwhile, a target down)."""
    if row["error"]:
        return str(row["error"])
    if row["status"] in ("suspended", "offline") and row["reason"]:
        return str(row["reason"])
    return "-"


def _table(rows: list[dict[str, Any]]) -> None:
    columns = ["id", "name", "kind", "bind", "target", "status", "conns", "out", "in", "error"]
    cells = [
        [
            row["id"],
            row["name"] or "-",
            row["kind"],
            row["bind"],
            row["target"],
            row["status"],
            f"{row['connections']}/{row['connections_total']}",
            _size(row["bytes_out"]),
            _size(row["bytes_in"]),
            _trouble(row),
        ]
        for row in rows
    ]
    widths = [max([len(c), *(len(str(r[i])) for r in cells)]) for i, c in enumerate(columns)]
    for line in [[c.upper() for c in columns], *cells]:
        say("  ".join(str(v).ljust(w) for v, w in zip(line, widths, strict=True)).rstrip())


@click.command()
@_client_options
def status(admin: str | None, admin_token_file: str | None, as_json: bool) -> None:
    """Show the link and the forwards of a running pytunnel connect (or the clients of a
    pytunnel serve, with --admin)."""
    answer = call_admin(admin, admin_token_file, "GET", "/api/status")
    if as_json:
        say(json.dumps(answer, indent=2))
        return
    if answer.get("role") == "server":
        _server_status(answer)
        return
    link = "up" if answer["connected"] else "down"
    rtt = f"{answer['rtt'] * 1000:.1f} ms" if answer["rtt"] is not None else "-"
    say(
        f"server {answer['server']}: link {link}, rtt {rtt}, reconnects {answer['reconnects']}, "
        f"pid {answer['pid']}"
    )
    _table(answer["forwards"])


def _server_status(answer: dict[str, Any]) -> None:
    hits = ",".join(f"{k}={v}" for k, v in sorted(answer["limits_hit"].items())) or "-"
    say(
        f"server {answer['listen']}: {answer['sessions']} clients, "
        f"{answer['streams_open']}/{answer['limits']['max_streams']} streams, "
        f"auth failures {answer['auth_failures']}, limits hit {hits}, pid {answer['pid']}"
    )
    columns = ["peer", "client_id", "version", "rtt", "forwards", "public_ports", "uptime"]
    cells = [
        [
            c["peer"],
            c["client_id"] or "-",
            c.get("version") or "-",
            "-" if c.get("rtt") is None else f"{c['rtt'] * 1000:.1f}ms",
            str(c["forwards"]),
            ",".join(c["public_ports"]) or "-",
            f"{c['uptime']:.0f}s",
        ]
        for c in answer["clients"]
    ]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    for line in [[c.upper() for c in columns], *cells]:
        say("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip())


@click.group()
def forwards() -> None:
    """List, add, remove and retry the forwards of a running pytunnel connect."""


@forwards.command("list")
@_client_options
def list_forwards(admin: str | None, admin_token_file: str | None, as_json: bool) -> None:
    """List the forwards."""
    answer = call_admin(admin, admin_token_file, "GET", "/api/forwards")
    if as_json:
        say(json.dumps(answer, indent=2))
    else:
        _table(answer)


@forwards.command("add")
@click.option("-L", "--local", metavar="[BIND:]PORT:HOST:HOSTPORT", help="A local forward.")
@click.option("-R", "--remote", metavar="[BIND:]PORT:HOST:HOSTPORT", help="A remote forward.")
@click.option("-D", "--dynamic", metavar="[BIND:]PORT", help="A dynamic (SOCKS) forward.")
@click.option("--name", help="A stable name to remove or retry it by.")
@click.option("--limit", metavar="RATE", help="Bandwidth limit (TCP), as connect --limit.")
@click.option("--proxy-protocol", type=click.Choice(["v1", "v2"]), help="As connect's.")
@click.option("--socks-auth", metavar="USER:PASSWORD", help="As connect's (-D).")
@click.option("--group", metavar="NAME", help="Join this load-balanced group (-R), as connect's.")
@click.option(
    "--group-key-file",
    type=EXISTING_FILE,
    help="The group's secret, in a file (read by the running client).",
)
@click.option(
    "--forwarded-headers", is_flag=True, default=None, help="As connect's (HTTP name routes)."
)
@click.option("--rewrite-host", metavar="HOST", help="As connect's (HTTP name routes).")
@click.option("--basic-auth", metavar="USER:PASSWORD", help="As connect's (HTTP name routes).")
@_client_options
def add_forward(
    local: str | None,
    remote: str | None,
    dynamic: str | None,
    name: str | None,
    limit: str | None,
    proxy_protocol: str | None,
    socks_auth: str | None,
    group: str | None,
    group_key_file: str | None,
    forwarded_headers: bool | None,
    rewrite_host: str | None,
    basic_auth: str | None,
    admin: str | None,
    admin_token_file: str | None,
    as_json: bool,
) -> None:
    """Add a forward (exactly one of -L, -R, -D); -R NAME:80:HOST:PORT adds a name route."""
    if sum(v is not None for v in (local, remote, dynamic)) != 1:
        raise click.UsageError("give exactly one of -L, -R, -D")
    body = {
        k: v
        for k, v in {
            "local": local,
            "remote": remote,
            "dynamic": dynamic,
            "name": name,
            "limit": limit,
            "proxy_protocol": proxy_protocol,
            "socks_auth": socks_auth,
            "group": group,
            # the running client reads it, from its own working directory
            "group_key_file": None if group_key_file is None else os.path.abspath(group_key_file),
            "forwarded_headers": forwarded_headers,
            "rewrite_host": rewrite_host,
            "basic_auth": basic_auth,
        }.items()
        if v is not None
    }
    answer = call_admin(admin, admin_token_file, "POST", "/api/forwards", body)
    if as_json:
        say(json.dumps(answer, indent=2))
    else:
        say(f"added {answer['id']}: {answer['kind']} {answer['bind']} -> {answer['target']}")


@forwards.command("remove")
@click.argument("forward", metavar="NAME|ID")
@_client_options
def remove_forward(
    forward: str, admin: str | None, admin_token_file: str | None, as_json: bool
) -> None:
    """Stop a forward and forget it."""
    answer = call_admin(admin, admin_token_file, "DELETE", f"/api/forwards/{_quote(forward)}")
    say(json.dumps(answer, indent=2) if as_json else f"removed {answer['id']}")


@forwards.command("stop")
@click.argument("forward", metavar="NAME|ID")
@_client_options
def stop_forward(
    forward: str, admin: str | None, admin_token_file: str | None, as_json: bool
) -> None:
    """Stop a forward but keep it, under its id, for a later retry."""
    answer = call_admin(admin, admin_token_file, "POST", f"/api/forwards/{_quote(forward)}/stop")
    say(json.dumps(answer, indent=2) if as_json else f"stopped {answer['id']}")


@forwards.command("retry")
@click.argument("forward", metavar="NAME|ID")
@_client_options
def retry_forward(
    forward: str, admin: str | None, admin_token_file: str | None, as_json: bool
) -> None:
    """Start a forward again (one in error, say), under the same id."""
    answer = call_admin(admin, admin_token_file, "POST", f"/api/forwards/{_quote(forward)}/retry")
    if as_json:
        say(json.dumps(answer, indent=2))
    else:
        say(f"{answer['id']}: {answer['status']} {answer['bind']} -> {answer['target']}")


@click.command()
@_client_options
def reload(admin: str | None, admin_token_file: str | None, as_json: bool) -> None:
    """Reload the config file of a running pytunnel connect (as SIGHUP does)."""
    answer = call_admin(admin, admin_token_file, "POST", "/api/reload")
    say(json.dumps(answer, indent=2) if as_json else f"reloaded: {answer['message']}")


def _quote(text: str) -> str:
    return quote(text, safe="")
