"""What the commands print for people and scripts: result lines on stdout, one error line on
stderr. Logs are not here (``_logs``): these lines are the commands' interface, and scripts
parse them.
"""

from __future__ import annotations

import sys
from typing import NoReturn

import click


def say(line: str) -> None:
    """User-facing output on stdout, flushed at once (scripts wait for these lines)."""
    click.echo(line)
    sys.stdout.flush()


def fail(message: str) -> NoReturn:
    """End the command with ``pytunnel: error: message`` on stderr and status 1 (bad
    arguments are click's usage errors, status 2; this is for what went wrong after)."""
    click.echo(f"pytunnel: error: {message}", err=True)
    sys.exit(1)
