"""Options and argument parsers both commands share, declared once.

Declarations only: what an option means is decided by the command that reads it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from pytunnel._policy import PermitOpen, parse_port_ranges
from pytunnel._spec import ForwardSpec, parse_forward_spec, parse_host_port

_F = TypeVar("_F", bound=Callable[..., Any])

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


def host_port(_ctx: click.Context, _param: click.Parameter, value: str) -> tuple[str, int]:
    try:
        return parse_host_port(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def forward_specs(
    _ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]
) -> list[ForwardSpec]:
    try:
        return [parse_forward_spec(v) for v in values]
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def dynamic_specs(
    _ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]
) -> list[tuple[str, int]]:
    try:
        return [parse_host_port(v) for v in values]
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def port_ranges(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    if value is not None:
        try:
            parse_port_ranges(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from None
    return value


def permit_open(
    _ctx: click.Context, _param: click.Parameter, value: tuple[str, ...]
) -> tuple[str, ...]:
    try:
        PermitOpen.parse(list(value))
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    return value


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
