"""The ``pytunnel`` command group: its version option and its commands.

Each command lives in its own module; this one only names them. A command's module is
imported when the command runs (or its own ``--help`` is asked for), not before: ``pytunnel
connect`` has no use for the server, the cluster engine or the task server, and ``pytunnel
--help`` none for any of them (click's lazy group pattern).
"""

from __future__ import annotations

import importlib
from typing import Any

import click

import pytunnel

from ._options import CONTEXT


class LazyCommand:
    """Where a command is defined, and the summary ``pytunnel --help`` shows for it without
    importing it (``tests/test_cli_lazy.py`` checks it against the command's docstring)."""

    def __init__(self, module: str, attribute: str, summary: str) -> None:
        self.module = module
        self.attribute = attribute
        self.summary = summary

    def load(self) -> click.Command:
        command = getattr(importlib.import_module(self.module, __package__), self.attribute)
        if not isinstance(command, click.Command):  # pragma: no cover - a wrong table entry
            raise TypeError(f"{self.module}.{self.attribute} is not a click command")
        return command


#: The commands of the group, by name, in the order ``--help`` lists them.
COMMANDS: dict[str, LazyCommand] = {
    "check-config": LazyCommand(
        "._config",
        "check_config",
        "Check a config file as serve/connect would read it, without running anything.",
    ),
    "cluster": LazyCommand(
        "._cluster", "cluster", "Look at a cluster of servers (see docs/cluster.md)."
    ),
    "connect": LazyCommand(
        "._connect",
        "connect",
        "Connect to a tunnel server and set up forwards; keep them up until interrupted.",
    ),
    "forwards": LazyCommand(
        "._admin",
        "forwards",
        "List, add, remove and retry the forwards of a running pytunnel connect.",
    ),
    "reload": LazyCommand(
        "._admin",
        "reload",
        "Reload the config file of a running pytunnel connect (as SIGHUP does).",
    ),
    "serve": LazyCommand("._serve", "serve", "Run a tunnel server."),
    "status": LazyCommand(
        "._admin",
        "status",
        "Show the link and the forwards of a running pytunnel connect (or the clients of a "
        "pytunnel serve, with --admin).",
    ),
    "tasks": LazyCommand(
        "._tasks", "tasks", "Serve Python tasks and events over Runner's HTTP protocol."
    ),
}


class LazyGroup(click.Group):
    """A group whose commands are imported the first time one is looked up by name."""

    def __init__(self, *args: Any, lazy: dict[str, LazyCommand], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = lazy

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in self.lazy:
            self.add_command(self.lazy[cmd_name].load(), cmd_name)
        return super().get_command(ctx, cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The command list, from the summaries of the commands not yet imported (importing
        every command to read its docstring would cost what the laziness saves)."""
        names = self.list_commands(ctx)
        if not names:  # pragma: no cover - the group has commands
            return
        limit = formatter.width - 6 - max(len(name) for name in names)
        rows = []
        for name in names:
            # a stand-in with the summary as its help shortens it as the command would
            command = self.commands.get(name) or click.Command(name, help=self.lazy[name].summary)
            if not command.hidden:
                rows.append((name, command.get_short_help_str(limit)))
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, lazy=COMMANDS, context_settings=CONTEXT)
# the build (pure Python, or the hot modules compiled by mypyc) follows the version
@click.version_option(
    pytunnel.__version__,
    prog_name="pytunnel",
    message="%(prog)s, version %(version)s "
    + ("(compiled by mypyc)" if pytunnel.__compiled__ else "(pure Python)"),
)
def main() -> None:
    """Expose local services and reach remote ones through one authenticated connection."""
