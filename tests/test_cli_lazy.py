"""The command line imports a command's module only when that command runs (click's lazy
group), and the heavy libraries only where they are used: ``pytunnel --help`` loads no
command, ``connect`` neither the server nor the metrics. What is imported is read from
``sys.modules`` of a fresh ``pytunnel`` process."""

from __future__ import annotations

import json
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from pytunnel.cli import main
from pytunnel.cli._main import COMMANDS, LazyGroup

pytestmark = pytest.mark.timeout(60)

_HEAVY = (
    "trio",
    "cattrs",
    "cryptography",
    "prometheus_client",
    "h11",
    "rich",
    "httpx",
    "pytunnel.client",
    "pytunnel.server",
    "pytunnel.metrics",
    "pytunnel.tasks",
)


def _modules_after(*args: str) -> tuple[str, set[str]]:
    """What ``pytunnel ARGS`` prints, and the modules (of ours and the heavy ones) it had
    imported by the time it exited."""
    code = (
        "import atexit, json, sys\n"
        "def report():\n"
        "    names = [m for m in sys.modules if m.startswith(('pytunnel', *HEAVY))]\n"
        "    sys.stderr.write('MODULES ' + json.dumps(names) + '\\n')\n"
        "atexit.register(report)\n"
        f"HEAVY = {_HEAVY!r}\n"
        f"sys.argv = ['pytunnel', *{list(args)!r}]\n"
        "from pytunnel.cli import main\n"
        "main()\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=45, check=False
    )
    assert result.returncode == 0, result.stderr
    line = next(x for x in result.stderr.splitlines() if x.startswith("MODULES "))
    return result.stdout, set(json.loads(line.removeprefix("MODULES ")))


def _heavy(modules: set[str]) -> set[str]:
    return {m for m in modules if m.split(".")[0] in _HEAVY or m.startswith(_HEAVY)}


def test_the_group_help_imports_no_command() -> None:
    out, modules = _modules_after("--help")
    assert "connect" in out
    assert _heavy(modules) == set()
    assert sorted(m for m in modules if m.startswith("pytunnel")) == [
        "pytunnel",
        # the build that --version names (compiled or pure): the standard library only
        "pytunnel._build",
        "pytunnel.cli",
        "pytunnel.cli._main",
        "pytunnel.cli._options",
    ]


def test_the_group_help_is_the_one_the_commands_would_give() -> None:
    """The summaries written in the table are the commands' own, as click shortens them."""
    lazy, _ = _modules_after("--help")
    code = (
        "import sys\n"
        "from pytunnel.cli import main\n"
        "for name in main.list_commands(None):\n"
        "    main.get_command(None, name)\n"
        "sys.argv = ['pytunnel', '--help']\n"
        "main()\n"
    )
    eager = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=45, check=True
    )
    assert lazy == eager.stdout


@pytest.mark.parametrize("name", sorted(COMMANDS))
@pytest.mark.parametrize("limit", [20, 45, 80, 200])
def test_each_summary_shortens_as_its_command_does(name: str, limit: int) -> None:
    assert isinstance(main, click.Group)
    command = main.get_command(click.Context(main), name)
    assert command is not None
    stand_in = click.Command(name, help=COMMANDS[name].summary)
    assert stand_in.get_short_help_str(limit) == command.get_short_help_str(limit)


def _every_command(group: click.Group, path: list[str]) -> list[list[str]]:
    ctx = click.Context(group)
    found = []
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        assert command is not None, name
        found.append([*path, name])
        if isinstance(command, click.Group):
            found += _every_command(command, [*path, name])
    return found


def test_every_command_and_subcommand_has_a_help() -> None:
    assert isinstance(main, LazyGroup)
    commands = _every_command(main, [])
    assert {c[0] for c in commands} == set(COMMANDS)
    assert ["forwards", "list"] in commands
    for command in commands:
        result = CliRunner().invoke(main, [*command, "--help"])
        assert result.exit_code == 0, (command, result.output)
        assert result.output.startswith("Usage: "), command


def test_an_unknown_command_is_still_a_usage_error() -> None:
    result = CliRunner().invoke(main, ["conect"])
    assert result.exit_code == 2
    assert "No such command 'conect'" in result.output


@pytest.mark.parametrize(
    ("command", "absent"),
    [
        (
            "connect",
            {"pytunnel.server", "pytunnel.metrics", "prometheus_client", "rich", "httpx"},
        ),
        # a server without --cluster needs neither the engine's client nor its HTTP stack
        (
            "serve",
            {
                "pytunnel.metrics",
                "prometheus_client",
                "pytunnel.tasks",
                "cryptography",
                "httpx",
                "pytunnel.cluster.etcd",
            },
        ),
        ("check-config", {"pytunnel.client", "pytunnel.server", "h11", "httpx", "rich"}),
        # the admin API's clients need none of what runs a tunnel
        ("status", {"pytunnel.session", "pytunnel.client", "pytunnel.server", "cattrs", "rich"}),
        ("reload", {"pytunnel.session", "pytunnel.client", "pytunnel.server", "cattrs", "rich"}),
    ],
)
def test_a_command_help_imports_only_what_the_command_declares(
    command: str, absent: set[str]
) -> None:
    out, modules = _modules_after(command, "--help")
    assert out.startswith(f"Usage: pytunnel {command} ")
    assert absent & modules == set()
    others = {f"pytunnel.cli.{entry.module[1:]}" for entry in COMMANDS.values()}
    own = f"pytunnel.cli.{COMMANDS[command].module[1:]}"
    assert own in modules
    assert "pytunnel.cli._tasks" not in modules or command == "tasks"
    assert others - modules, "every command was imported"
