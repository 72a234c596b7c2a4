"""``--config FILE``: a TOML file whose keys are the command's own options, and its reload.

The file is not a second description of the settings: its schema is generated from the
command's click options (one key per option, named like the long option: ``--max-streams`` is
``max_streams``), structured with cattrs into an attrs class so an unknown key or a wrong TOML
type is one error naming the key and its line, then every value goes through the option's own
type and callback, so it is checked exactly as the flag would be. The values become the
command's ``default_map``: a flag (or a ``PYTUNNEL_*`` variable) on top of the file overrides
it, as click orders them. The client's file also holds a list of named forwards
(``[[client.forwards]]``), the one thing no single option expresses.

A reload parses the command line again (the same arguments, the file read anew) in a fresh
context: the new settings come out of the very path that made the running ones, and a bad file
fails there, before anything running is touched.
"""

from __future__ import annotations

import difflib
import functools
import logging
import re
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import attrs
import cattrs
import click
import trio
from cattrs.gen import make_dict_structure_fn

import pytunnel

from ._options import EXISTING_FILE
from ._run import describe

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib  # type: ignore[import-not-found, unused-ignore]

__all__ = [
    "ConfigCommand",
    "ConfigFileError",
    "ForwardTable",
    "check_config",
    "config_option",
    "file_forwards",
    "load_section",
    "reparse",
    "watch_reload",
]

log = logging.getLogger("pytunnel.cli")

#: The top-level table each command reads; a file may hold both (one file for a test setup).
SECTIONS = {"serve": "server", "connect": "client"}

#: Where a command keeps its arguments, so that a reload can parse them again, and the path
#: of its config file.
_ARGS = "pytunnel.config.args"
_PATH = "pytunnel.config.path"


class ConfigFileError(click.ClickException):
    """A config file that cannot be used: one line naming the file, line and key; status 2
    like every other bad argument."""

    exit_code = 2


class ConfigCommand(click.Command):
    """A command that remembers its arguments, so that :func:`reparse` can read them again
    with a fresh copy of its config file."""

    #: Builds what the command would run with from a parsed context (its config classes'
    #: own rules apply), so ``check-config`` finds what only the command would find.
    check: Callable[[click.Context], object] | None = None

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta[f"{_ARGS}.{id(ctx)}"] = list(args)
        return super().parse_args(ctx, args)


# ----------------------------------------------------------------- the schema


@attrs.frozen(kw_only=True)
class ForwardTable:
    """One ``[[client.forwards]]`` table: exactly one of ``local``, ``remote``, ``dynamic``
    (each written as its flag's argument; ``remote = "app:80:HOST:PORT"`` is a name route),
    with an optional stable ``name`` a reload and the admin API know it by, and the
    per-forward settings the flags apply to all forwards."""

    name: str | None = None
    local: str | None = None
    remote: str | None = None
    dynamic: str | None = None
    #: Bandwidth limit, as ``--limit`` (TCP forwards).
    limit: str | None = None
    #: ``"v1"`` or ``"v2"``, as ``--proxy-protocol`` (TCP remote forwards).
    proxy_protocol: str | None = None
    #: ``USER:PASSWORD``, as ``--socks-auth`` (dynamic forwards).
    socks_auth: str | None = attrs.field(default=None, repr=False)
    #: A load-balanced group to join and the file holding its secret, as ``--group`` and
    #: ``--group-key-file`` (TCP remote forwards with a fixed port, and name routes).
    group: str | None = None
    group_key_file: str | None = None
    #: HTTP name routes (``remote = "app:80:HOST:PORT"``) only, as the flags of that name.
    forwarded_headers: bool | None = None
    rewrite_host: str | None = None
    basic_auth: str | None = attrs.field(default=None, repr=False)


def option_key(param: click.Parameter) -> str:
    """The file key of ``param``: its long option without dashes (``--tls`` is ``tls``, not
    the ``use_tls`` the code calls it), or an argument's name."""
    if isinstance(param, click.Option):
        for opt in param.opts:
            if opt.startswith("--"):
                return opt[2:].replace("-", "_")
    assert param.name is not None
    return param.name


class _OneOrMore(list[str]):
    """The type of an argument that takes several values (``server``): a string for the
    usual one, or an array."""


def _toml_type(param: click.Parameter) -> Any:
    """The TOML type a key holds: a list for repeatable options, else the option's type."""
    if isinstance(param, click.Argument) and param.nargs == -1:
        return _OneOrMore
    if param.multiple or param.nargs != 1:
        return list[str]
    if isinstance(param, click.Option) and param.is_flag:
        return bool
    if isinstance(param.type, click.types.BoolParamType):
        return bool
    if isinstance(param.type, click.types.IntParamType):
        return int
    if isinstance(param.type, click.types.FloatParamType):
        return float
    return str


def _file_params(command: click.Command) -> dict[str, click.Parameter]:
    """Every option of ``command`` that a file may set, by key (not ``--config`` itself)."""
    return {
        option_key(p): p
        for p in command.params
        if p.expose_value and p.name not in ("help", "version")
    }


@functools.cache
def _schema(command: click.Command) -> type[Any]:
    """An attrs class with one optional field per option of ``command``, plus the named
    forwards for ``connect``. Made from the options, so a new option has its key at once."""
    fields: dict[str, Any] = {
        key: attrs.field(type=_toml_type(param) | None, default=None)
        for key, param in _file_params(command).items()
    }
    if command.name == "connect":
        fields["forwards"] = attrs.field(type=list[ForwardTable], factory=list)
    return attrs.make_class(f"{command.name}_file", fields, frozen=True, kw_only=True)


def _strict(kind: type[Any], name: str) -> Callable[[Any, Any], Any]:
    """A structure hook that takes TOML's own type only: ``"5"`` is not a number and ``1`` is
    not ``true`` (cattrs would convert both), though an integer is a fine float."""

    def hook(value: Any, _type: Any) -> Any:
        if kind is bool:
            ok = isinstance(value, bool)
        elif kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        else:
            ok = isinstance(value, kind) and not isinstance(value, bool)
        if not ok:
            raise TypeError(f"expected {name}, got {_toml_name(value)}")
        return float(value) if kind is float else value

    return hook


def _toml_name(value: Any) -> str:
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, (int, float)):
        return f"a number ({value!r})"
    if isinstance(value, str):
        return f"a string ({value!r})"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return f"a {type(value).__name__}"


class _AtIndex(Exception):
    """A problem in item ``index`` of an array of tables."""

    def __init__(self, index: int, error: BaseException) -> None:
        super().__init__(index, error)
        self.index = index
        self.error = error


def _string_list(value: Any, _type: Any) -> list[str]:
    if not isinstance(value, list):
        raise TypeError(f"expected an array of strings, got {_toml_name(value)}")
    for item in value:
        if not isinstance(item, str):
            raise TypeError(f"expected an array of strings, got {_toml_name(item)} in it")
    return list(value)


def _one_or_more(value: Any, _type: Any) -> list[str]:
    return [value] if isinstance(value, str) else _string_list(value, _type)


def _table_list(value: Any, _type: Any) -> list[ForwardTable]:
    if not isinstance(value, list):
        raise TypeError(
            f"expected an array of tables ([[client.forwards]]), got {_toml_name(value)}"
        )
    tables = []
    for index, item in enumerate(value):
        try:
            tables.append(structure_table(item, ForwardTable))
        except Exception as exc:
            raise _AtIndex(index, exc) from None
    return tables


_converter = cattrs.Converter(forbid_extra_keys=True)
_converter.register_structure_hook(str, _strict(str, "a string"))
_converter.register_structure_hook(int, _strict(int, "an integer"))
_converter.register_structure_hook(float, _strict(float, "a number"))
_converter.register_structure_hook(bool, _strict(bool, "true or false"))
_converter.register_structure_hook_func(lambda t: t == list[str], _string_list)
_converter.register_structure_hook(_OneOrMore, _one_or_more)
_converter.register_structure_hook_func(lambda t: t == list[ForwardTable], _table_list)


_structurers: dict[type[Any], Callable[[Any, Any], Any]] = {}


def _table_structurer(cls: type[Any]) -> Callable[[Any, Any], Any]:
    if cls not in _structurers:
        _structurers[cls] = make_dict_structure_fn(cls, _converter, _cattrs_forbid_extra_keys=True)
    return _structurers[cls]


def structure_table(value: Any, cls: type[Any]) -> Any:
    """``value`` as ``cls``, if it is a table with ``cls``'s keys only."""
    if not isinstance(value, dict):
        raise TypeError(f"expected a table, got {_toml_name(value)}")
    return _table_structurer(cls)(value, cls)


# ----------------------------------------------------------------- errors with lines


_HEADER = re.compile(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(r'^\s*"?([A-Za-z0-9_-]+)"?\s*=')
Path = Sequence[str | int]


def _line_of(text: str, table: Path, key: str | None) -> int | None:
    """The line (1-based) where ``key`` is set in ``table`` (``("client", "forwards", 2)``),
    or the table's header when ``key`` is None; ``None`` where the file is written in a way
    this simple reader does not follow (dotted keys, inline tables)."""
    want = ".".join(str(p) for p in table if not isinstance(p, int))
    index = next((p for p in table if isinstance(p, int)), None)
    current = ""
    seen: dict[str, int] = {}
    subtable = f"{want}.{key}".lstrip(".") if key is not None else None
    for number, line in enumerate(text.splitlines(), 1):
        header = _HEADER.match(line)
        if header:
            current = header.group(1).replace(" ", "")
            seen[current] = seen.get(current, -1) + 1
            if key is None and current == want and index in (None, seen[current]):
                return number
            if current == subtable:  # the key is a table of its own
                return number
            continue
        match = _KEY.match(line)
        in_table = current == want and index in (None, seen.get(current))
        if key is not None and match and match.group(1) == key and in_table:
            return number
    return None


def _problem(source: str, text: str, table: Path, key: str | None, message: str) -> ConfigFileError:
    """One error: ``FILE:LINE: client.forwards[1].limit: message``."""
    line = _line_of(text, table, key)
    where = f"{source}:{line}" if line is not None else source
    parts = [*table, *([key] if key is not None else [])]
    path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts).lstrip(".")
    return ConfigFileError(f"{where}: {path}: {message}" if path else f"{where}: {message}")


def _first_problem(
    exc: BaseException, path: list[str | int]
) -> tuple[BaseException, list[str | int]]:
    """The first leaf error cattrs collected, and the key path it belongs to."""
    if isinstance(exc, _AtIndex):
        return _first_problem(exc.error, [*path, exc.index])
    if isinstance(exc, cattrs.ClassValidationError):
        with_notes, without = exc.group_exceptions()
        if without:  # unknown keys are the table's, not a field's
            return _first_problem(without[0], path)
        inner, note = with_notes[0]
        return _first_problem(inner, [*path, note.name])
    return exc, path


def _structure_error(
    source: str, text: str, section: str, exc: BaseException, schema: type[Any]
) -> ConfigFileError:
    """The first problem cattrs found, as one error naming its key and line."""
    leaf, path = _first_problem(exc, [section])
    if any(isinstance(p, int) for p in path):
        schema = ForwardTable
    if isinstance(leaf, cattrs.ForbiddenExtraKeysError):
        extra = sorted(leaf.extra_fields)
        known = [f.name for f in attrs.fields(schema)] if schema is not None else []
        close = difflib.get_close_matches(extra[0], known, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        also = f"; also unknown: {', '.join(extra[1:])}" if len(extra) > 1 else ""
        return _problem(source, text, path, extra[0], f"unknown key{hint}{also}")
    *table, last = path
    if isinstance(last, int):
        return _problem(source, text, path, None, str(leaf))
    return _problem(source, text, table, str(last), str(leaf))


# ----------------------------------------------------------------- loading


@attrs.frozen
class Section:
    """One command's table of a config file, checked: the ``default_map`` it gives the
    command, and the named forwards (``connect`` only)."""

    defaults: dict[str, Any]
    forwards: list[ForwardTable]
    #: Where each forward table starts, for errors found when it is used.
    source: str


def read_document(path: str) -> tuple[str, dict[str, Any]]:
    """The text of ``path`` and the TOML document in it; :class:`ConfigFileError` if it is
    unreadable, not UTF-8 or not TOML (tomllib's message has the line and column)."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except OSError as exc:
        raise ConfigFileError(f"{path}: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
        return text, tomllib.loads(text)
    except UnicodeDecodeError:
        raise ConfigFileError(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigFileError(f"{path}: invalid TOML: {exc}") from None


def load_section(ctx: click.Context, path: str) -> Section:
    """Read ``path`` and check the table of ``ctx``'s command in it: TOML syntax, keys,
    TOML types, then each value through its option's type and callback.

    Raises :class:`ConfigFileError` for the first problem, naming the file, line and key.
    """
    command = ctx.command
    section = SECTIONS[str(command.name)]
    text, document = read_document(path)
    unknown = sorted(set(document) - set(SECTIONS.values()))
    if unknown:
        raise _problem(path, text, [], unknown[0], "unknown table (expected [server] or [client])")
    if section not in document:
        raise ConfigFileError(
            f"{path}: no [{section}] table (pytunnel {command.name} reads [{section}])"
        )
    try:
        parsed = structure_table(document[section], _schema(command))
    except Exception as exc:  # cattrs collects what is wrong; the first one is said
        raise _structure_error(path, text, section, exc, _schema(command)) from None
    params = _file_params(command)
    defaults: dict[str, Any] = {}
    for key, param in params.items():
        value = getattr(parsed, key)
        if value is None:
            continue
        if isinstance(value, _OneOrMore):
            value = list(value)
        try:
            param.process_value(ctx, value)
        except click.BadParameter as exc:
            raise _problem(path, text, [section], key, exc.message) from None
        assert param.name is not None
        defaults[param.name] = value
    forwards: list[ForwardTable] = list(getattr(parsed, "forwards", []))
    _check_forwards(path, text, forwards)
    return Section(defaults, forwards, path)


def _check_forwards(path: str, text: str, forwards: list[ForwardTable]) -> None:
    """Each table declares one forward, by a spec its flag would take; names are unique."""
    from ._declared import declare_table  # the parsing rules of forwards live with them

    names: set[str] = set()
    for index, table in enumerate(forwards):
        where: list[str | int] = ["client", "forwards", index]
        try:
            declare_table(table)
        except (ValueError, click.BadParameter) as exc:
            key = getattr(exc, "key", None)
            message = exc.format_message() if isinstance(exc, click.BadParameter) else str(exc)
            raise _problem(path, text, where, key, message) from None
        if table.name is not None:
            if table.name in names:
                raise _problem(path, text, where, "name", f"name {table.name!r} is used twice")
            names.add(table.name)


def _load_into_defaults(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    if value is None or ctx.resilient_parsing:
        return
    ctx.meta[f"{_PATH}.{id(ctx)}"] = value  # from the command line or PYTUNNEL_*_CONFIG
    section = load_section(ctx, value)
    ctx.default_map = {**(ctx.default_map or {}), **section.defaults, "forwards": section.forwards}


#: ``--config FILE``, processed before every other option so the file's values are there
#: as defaults when they are.
config_option = click.option(
    "--config",
    type=EXISTING_FILE,
    is_eager=True,
    expose_value=False,
    callback=_load_into_defaults,
    help="Read settings from this TOML file (keys named like the options); flags override "
    "it. SIGHUP reloads it.",
)


def file_forwards(ctx: click.Context) -> list[ForwardTable]:
    """The ``[[client.forwards]]`` tables of the file ``ctx`` was made with (none without
    ``--config``)."""
    forwards = (ctx.default_map or {}).get("forwards", [])
    assert isinstance(forwards, list)
    return forwards


def config_path(ctx: click.Context) -> str | None:
    """The ``--config`` file ``ctx`` was made with, if any."""
    path = ctx.meta.get(f"{_PATH}.{id(ctx)}")
    return None if path is None else str(path)


def reparse(ctx: click.Context) -> click.Context:
    """A new context of ``ctx``'s command from the same arguments, its file read again.

    Blocking (it reads files): run it in a thread. Raises ``click.ClickException`` for a file
    (or anything else) that is now wrong; nothing of ``ctx`` changes either way.
    """
    args = ctx.meta[f"{_ARGS}.{id(ctx)}"]
    return ctx.command.make_context(ctx.info_name, list(args), parent=ctx.parent)


@attrs.frozen
class ReloadResult:
    """What a reload did, or why it was rejected (``ok`` false: nothing changed)."""

    ok: bool
    message: str


Apply = Callable[[click.Context], Awaitable[str]]


async def reload(ctx: click.Context, apply: Apply) -> ReloadResult:
    """Read the config file again and hand the new context to ``apply``; a file that is now
    wrong, or that ``apply`` refuses (``ValueError`` or a ``ClickException``), changes
    nothing and is logged as the reason."""
    if config_path(ctx) is None:
        return ReloadResult(False, "nothing to reload: the command was started without --config")
    try:
        fresh = await trio.to_thread.run_sync(reparse, ctx)
        message = await apply(fresh)
    except click.ClickException as exc:
        log.error("reload rejected, the running configuration stays: %s", exc.format_message())
        return ReloadResult(False, exc.format_message())
    except (ValueError, pytunnel.TunnelError, OSError) as exc:
        reason = describe(exc) if isinstance(exc, (pytunnel.TunnelError, OSError)) else str(exc)
        log.error("reload rejected, the running configuration stays: %s", reason)
        return ReloadResult(False, reason)
    log.info("configuration reloaded: %s", message)
    return ReloadResult(True, message)


async def watch_reload(
    ctx: click.Context,
    apply: Apply,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Reload on every SIGHUP until cancelled (only started with ``--config``: without one,
    SIGHUP keeps its usual meaning). Started once the signal is caught, so a SIGHUP sent
    after the command printed its first lines is never the default one that ends it."""
    with trio.open_signal_receiver(signal.SIGHUP) as signals:
        task_status.started()
        async for _ in signals:
            log.info("received SIGHUP, reloading %s", config_path(ctx))
            await reload(ctx, apply)


# ----------------------------------------------------------------- check-config


@click.command("check-config", context_settings={"show_default": True})
@click.argument("file", type=EXISTING_FILE)
@click.option(
    "--kind",
    type=click.Choice(["server", "client", "auto"]),
    default="auto",
    help="Which table to check; auto: every one the file has.",
)
@click.pass_context
def check_config(ctx: click.Context, file: str, kind: str) -> None:
    """Check a config file as serve/connect would read it, without running anything."""
    assert ctx.parent is not None
    group = ctx.parent.command
    assert isinstance(group, click.Group)
    if kind == "auto":
        _, document = read_document(file)
        kinds: list[str] = [k for k in ("server", "client") if k in document]
        if not kinds:
            raise ConfigFileError(f"{file}: neither a [server] nor a [client] table")
    else:
        kinds = [kind]
    for section in kinds:
        name = next(c for c, s in SECTIONS.items() if s == section)
        command = group.get_command(ctx, name)
        assert command is not None
        try:
            sub = command.make_context(name, ["--config", file], parent=ctx.parent)
            if isinstance(command, ConfigCommand) and command.check is not None:
                command.check(sub)
        except ConfigFileError:
            raise
        except click.UsageError as exc:  # a rule of the config classes, a missing argument
            raise ConfigFileError(f"{file}: [{section}]: {exc.message}") from None
        count = len(file_forwards(sub))
        extra = f", {count} named forward{'s' if count != 1 else ''}" if section == "client" else ""
        click.echo(f"{file}: [{section}] ok{extra}")
