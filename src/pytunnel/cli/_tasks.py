"""``pytunnel tasks serve MODULE:ATTR``: a task server on a local port, through a tunnel with
no local port, or both.

``ATTR`` names a :class:`pytunnel.tasks.TaskServer` (or a callable returning one) in an
importable module, as ASGI servers name their app; the module configures the server (its
tasks, its HTTP token). The tunnel's own token comes as for ``pytunnel connect``.
"""

from __future__ import annotations

import importlib
import os
import sys

import click
import trio

import pytunnel
from pytunnel.tasks import TaskServer

from ._logs import setup_logging
from ._options import CONTEXT, log_format_option, log_level_option, parsed, server_address
from ._output import say
from ._run import run as run_command
from ._token import read_token, token_file_option, token_option


def load_server(spec: str) -> TaskServer:
    """The :class:`TaskServer` that ``MODULE:ATTR`` names; ``ValueError`` saying what is
    wrong otherwise. The working directory is importable, as for ``python -m``."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"expected MODULE:ATTR, not {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import {module_name!r}: {exc}") from None
    value: object = module
    for part in attr.split("."):
        try:
            value = getattr(value, part)
        except AttributeError:
            raise ValueError(f"{module_name!r} has no attribute {attr!r}") from None
    if not isinstance(value, TaskServer) and callable(value):
        value = value()
    if not isinstance(value, TaskServer):
        raise ValueError(f"{spec} is a {type(value).__name__}, not a pytunnel.tasks.TaskServer")
    return value


def _listen(value: str | None) -> tuple[str, int] | None:
    if value is None:
        return None
    return pytunnel.parse_host_port(value, default_host="127.0.0.1")


@click.group(context_settings=CONTEXT)
def tasks() -> None:
    """Serve Python tasks and events over Runner's HTTP protocol."""


@tasks.command(context_settings=CONTEXT)
@click.argument("app", metavar="MODULE:ATTR", callback=parsed(load_server))
@click.option(
    "--listen",
    metavar="[HOST:]PORT",
    callback=parsed(_listen),
    help="Serve on this local address (port 0: any).",
)
@click.option(
    "--tunnel",
    "tunnel_server",
    metavar="SERVER",
    callback=lambda ctx, param, value: None if value is None else server_address(ctx, param, value),
    help="Serve through this tunnel server (HOST:PORT), with no local port.",
)
@click.option(
    "--remote-port",
    type=click.IntRange(0, 65535),
    default=0,
    help="The port the tunnel server listens on for the tasks (0: any).",
)
@click.option(
    "--remote-host",
    default="",
    help="The address the tunnel server binds for the tasks (default: the server's choice).",
)
@token_option(help="Shared secret of the tunnel server (or --token-file).")
@token_file_option
@log_level_option
@log_format_option
@click.pass_context
def serve(
    ctx: click.Context,
    app: TaskServer,
    listen: tuple[str, int] | None,
    tunnel_server: tuple[str, int] | None,
    remote_port: int,
    remote_host: str,
    token: str | None,
    token_file: str | None,
    log_level: str,
    log_format: str,
) -> None:
    """Serve the TaskServer MODULE:ATTR on --listen, through --tunnel, or both."""
    setup_logging(log_level, log_format)
    if listen is None and tunnel_server is None:
        raise click.UsageError("say where to serve: --listen, --tunnel, or both")
    secret = read_token(ctx, token, token_file) if tunnel_server is not None else None
    if tunnel_server is not None and secret is None:
        raise click.UsageError(
            "--tunnel needs the tunnel's token: --token, --token-file or PYTUNNEL_TOKEN"
        )

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            if listen is not None:
                listeners = await nursery.start(app.serve, *listen)
                host, port = listeners[0].socket.getsockname()[:2]
                say(
                    f"tasks listening on http://{pytunnel.format_target(host, port)}{app.base_path}"
                )
            if tunnel_server is not None:
                assert secret is not None
                async with pytunnel.open_tunnel(tunnel_server, token=secret) as tunnel:
                    forward = await tunnel.forward_remote(
                        remote_port=remote_port, remote_host=remote_host, handler=app.handle_stream
                    )
                    say(
                        f"tasks through {pytunnel.format_target(*tunnel_server)} on port "
                        f"{forward.listen_port}{app.base_path}"
                    )
                    await tunnel.wait_closed()
                    if tunnel.failure is not None:
                        raise tunnel.failure
                nursery.cancel_scope.cancel()

    run_command(run)
