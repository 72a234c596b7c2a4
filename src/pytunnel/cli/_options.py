"""Options and argument parsers both commands share, declared once.

Declarations only: what an option means is decided by the command that reads it, and its
default comes from that command's config class (``attrs.fields(...).x.default``), passed in,
so no default is written twice.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import click

import pytunnel

if TYPE_CHECKING:
    import attrs

_F = TypeVar("_F", bound=Callable[..., Any])
_T = TypeVar("_T")

#: Every option can also come from ``PYTUNNEL_<COMMAND>_<OPTION>``, and ``--help`` shows each
#: default: a user reads the defaults the library applies, not a copy that may drift.
CONTEXT = {"auto_envvar_prefix": "PYTUNNEL", "show_default": True, "max_content_width": 100}


def stack(*decorators: Callable[[Any], Any]) -> Callable[[_F], _F]:
    """Apply ``decorators`` as if written one above the other in this order, so a group of
    options reads (and shows in ``--help``) in the order it is declared."""

    def apply(function: _F) -> _F:
        for decorator in reversed(decorators):
            function = decorator(function)
        return function

    return apply


def parsed(parse: Callable[[Any], _T]) -> Callable[[click.Context, click.Parameter, Any], _T]:
    """A click callback that hands the command ``parse(value)``: the library's parser decides
    what is valid, and its ``ValueError`` becomes this option's usage error (status 2, naming
    the option)."""

    def callback(_ctx: click.Context, _param: click.Parameter, value: Any) -> _T:
        try:
            return parse(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from None

    return callback


def config_check(
    config: type[attrs.AttrsInstance], name: str
) -> Callable[[click.Context, click.Parameter, Any], Any]:
    """A click callback that checks a value with the validator of ``config``'s field
    ``name``: the rule stays in the config class, and a bad value is this option's usage
    error rather than a failure once the config is built."""
    import attrs  # not needed by ``pytunnel --help``, which imports this module

    field = attrs.fields_dict(config)[name]

    def check(value: Any) -> Any:
        if value is not None and field.validator is not None:
            field.validator(None, field, value)
        return value

    return parsed(check)


@contextlib.contextmanager
def usage_errors() -> Iterator[None]:
    """Turn a ``ValueError`` of a config class being built from the options into a usage
    error (status 2, the config's message), for the rules no option type expresses (a
    frame limit above 2**32 - 1, say): one clear line instead of a traceback."""
    try:
        yield
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


#: ``HOST:PORT`` to listen on (port 0: any free port) and to connect to (a real port).
listen_address = parsed(lambda value: pytunnel.parse_host_port(value))
server_address = parsed(lambda value: pytunnel.parse_host_port(value, allow_zero=False))


def _server_endpoint(value: str) -> str | tuple[str, int]:
    """A ``ws://`` / ``wss://`` URL as it is (checked), or ``HOST:PORT`` parsed."""
    if "://" in value:
        pytunnel.transports.parse_websocket_url(value)
        return value
    return pytunnel.parse_host_port(value, allow_zero=False)


#: What ``connect`` reaches: ``HOST:PORT`` or a WebSocket URL, one or several.
server_endpoints = parsed(lambda values: [_server_endpoint(v) for v in values])
#: ``-L``/``-R`` specifications and ``-D`` listening addresses, each repeatable.
forward_specs = parsed(lambda values: [pytunnel.parse_forward_spec(v) for v in values])
dynamic_specs = parsed(lambda values: [pytunnel.parse_host_port(v) for v in values])
#: ``--allow-ports`` and ``--permit-open``, parsed as the server config holds them.
port_ranges = parsed(lambda value: None if value is None else pytunnel.parse_port_ranges(value))
permit_open = parsed(lambda values: pytunnel.PermitOpen.parse(list(values) or None))


#: A file that must exist when the command starts (certificates, keys, CAs, token files).
EXISTING_FILE = click.Path(exists=True, dir_okay=False)


# The options both commands have. Each takes its default from the command's own config class
# (the server's and the client's could differ) and, where the meaning differs by side, its help.


def connect_timeout_option(*, default: float | None, help: str) -> Callable[[_F], _F]:
    """``--connect-timeout``: seconds a dial may take (the server's, or the client's)."""
    return click.option("--connect-timeout", type=float, default=default, help=help)


def idle_timeout_option(*, default: float | None) -> Callable[[_F], _F]:
    """``--idle-timeout``: the same meaning on both sides, so the same help."""
    return click.option(
        "--idle-timeout",
        type=float,
        default=default,
        help="Seconds a relayed connection may stay silent.",
    )


def heartbeat_timeout_option(*, default: float | None, help: str) -> Callable[[_F], _F]:
    """``--heartbeat-timeout``: how long silence (server) or an unanswered ping (client)
    may last."""
    return click.option("--heartbeat-timeout", type=float, default=default, help=help)


def max_streams_option(*, default: int | None, help: str) -> Callable[[_F], _F]:
    """``--max-streams``: the server's total across clients, the client's per session."""
    return click.option("--max-streams", type=click.IntRange(min=1), default=default, help=help)


def receive_budget_option(*, default: int | None) -> Callable[[_F], _F]:
    """``--receive-budget``: what the peer may make one session buffer, both commands."""
    return click.option(
        "--receive-budget",
        type=click.IntRange(min=1),
        default=default,
        help="Bytes the peer may make one session buffer, all its streams together (each "
        "stream still gets at least budget / (2 x streams per session)).",
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


#: ``--metrics HOST:PORT``: where Prometheus scrapes the command (port 0: any free port).
metrics_option = click.option(
    "--metrics",
    metavar="HOST:PORT",
    callback=parsed(lambda value: None if value is None else pytunnel.parse_host_port(value)),
    help="Serve Prometheus metrics at http://HOST:PORT/metrics (port 0: any free port).",
)
