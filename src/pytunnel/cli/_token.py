"""The shared secret: from ``--token-file``, ``--token`` or ``PYTUNNEL_TOKEN``.

Never logs or prints the token itself (``serve`` prints a token it generated, on purpose).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

import click

from ._options import EXISTING_FILE
from ._output import fail
from ._run import describe


def read_token(ctx: click.Context, token: str | None, token_file: str | None) -> str | None:
    """The token from --token-file, or --token / PYTUNNEL_TOKEN; warn when it was typed on
    the command line, where every user of the machine can read it in ``ps``."""
    if token_file is not None:
        return read_secret_file(token_file, "--token-file", "token")
    if (
        token is not None
        and ctx.get_parameter_source("token") is click.core.ParameterSource.COMMANDLINE
    ):
        logging.getLogger("pytunnel.cli").warning(
            "--token on the command line is visible to other users in ps; "
            "prefer --token-file or PYTUNNEL_TOKEN"
        )
    return token


def read_secret_file(path: str, option: str, what: str) -> str:
    """A secret kept in a file (trailing white space dropped); one line and exit 1 when it
    cannot be read, a usage error when it is empty."""
    try:
        with open(path, encoding="utf-8") as handle:
            secret = handle.read().strip()
    except OSError as exc:
        fail(f"{describe(exc)} ({option})")
    except UnicodeDecodeError:
        fail(f"[INVALID_FIELD] {path}: the {what} file is not UTF-8 text")
    if not secret:
        raise click.BadParameter(f"the {what} file is empty", param_hint=option)
    return secret


_F = TypeVar("_F", bound=Callable[..., Any])


def token_option(*, help: str) -> Callable[[_F], _F]:
    """``--token``, also ``PYTUNNEL_TOKEN`` (shown in ``--help``: the way to keep it out of
    ``ps``); only the help differs between the commands."""
    return click.option("--token", envvar="PYTUNNEL_TOKEN", show_envvar=True, help=help)


token_file_option = click.option(
    "--token-file",
    type=EXISTING_FILE,
    help="Read the shared secret from this file (keeps it out of ps).",
)
