"""The ``pytunnel`` command group: its version option and its commands.

Each command lives in its own module; this one only assembles them.
"""

from __future__ import annotations

import click

import pytunnel

from ._admin import forwards, reload, status
from ._cluster import cluster
from ._config import check_config
from ._connect import connect
from ._options import CONTEXT
from ._serve import serve
from ._tasks import tasks


@click.group(context_settings=CONTEXT)
@click.version_option(pytunnel.__version__, prog_name="pytunnel")
def main() -> None:
    """Expose local services and reach remote ones through one authenticated connection."""


main.add_command(serve)
main.add_command(connect)
main.add_command(check_config)
main.add_command(status)
main.add_command(forwards)
main.add_command(reload)
main.add_command(tasks)
main.add_command(cluster)
