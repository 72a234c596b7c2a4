"""The forwards a ``pytunnel connect`` declares, and how a new declaration is applied to the
running tunnel.

A :class:`Declared` forward is what a flag or a ``[[client.forwards]]`` table says, parsed;
:class:`DeclaredForwards` keeps the running forward of each, under a stable id. Applying a new
list diffs it against the running one by name (by the whole declaration when unnamed): it
starts the added, closes the removed, replaces a named one whose declaration changed, and does
not touch the rest, so their listeners and live connections carry on.
"""

from __future__ import annotations

import itertools
import logging
import re
from collections.abc import Iterable, Sequence
from typing import Literal

import attrs
import click
import trio

import pytunnel
from pytunnel.forwards.name import HttpRouteOptions

from ._config import ForwardTable
from ._output import say

__all__ = ["Declared", "DeclaredForwards", "Running", "bind_of", "declare_table", "from_flags"]

log = logging.getLogger("pytunnel.cli")

Kind = Literal["local", "remote", "dynamic"]


#: the form of the ids forwards get (``f1``, ``f2``, ...), which no name may take
_ID = re.compile(r"f[0-9]+")


class TableError(ValueError):
    """A forward table's value that cannot be used; ``key`` is the offending key."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


@attrs.frozen(kw_only=True)
class Declared:
    """One forward as declared: two with equal fields are the same forward."""

    kind: Kind
    bind_host: str | None
    bind_port: int
    target_host: str = ""
    target_port: int = 0
    protocol: str = "tcp"
    name: str | None = None
    limit: float | None = None
    proxy_protocol: Literal["v1", "v2"] | None = None
    socks_auth: tuple[str, str] | None = attrs.field(default=None, repr=False)
    #: A load-balanced group of TCP remote forwards and name routes (``--group``) and its key.
    group: str | None = None
    group_key: str | None = attrs.field(default=None, repr=False)
    #: HTTP name routes only: what the client changes in each request (``--forwarded-headers``,
    #: ``--rewrite-host``, ``--basic-auth``).
    forwarded_headers: bool = False
    rewrite_host: str | None = None
    basic_auth: tuple[str, str] | None = attrs.field(default=None, repr=False)

    @property
    def name_route(self) -> bool:
        """Whether it is a name route (``-R app:80:HOST:PORT``) rather than a port forward."""
        return (
            self.kind == "remote"
            and pytunnel.ForwardSpec(
                self.bind_host, self.bind_port, self.target_host, self.target_port, self.protocol
            ).name_route
        )

    @property
    def key(self) -> object:
        """What a reload matches it by: its name, or all of it when it has none."""
        return ("name", self.name) if self.name is not None else self

    @property
    def spec(self) -> str:
        """The declaration as its flag would take it (``-L 8080:web:80``)."""
        bind = f"{self.bind_host}:" if self.bind_host else ""
        if self.kind == "dynamic":
            return f"-D {bind}{self.bind_port}"
        flag = "-L" if self.kind == "local" else "-R"
        udp = "/udp" if self.protocol == "udp" else ""
        target = pytunnel.format_target(self.target_host, self.target_port)
        return f"{flag} {bind}{self.bind_port}:{target}{udp}"

    async def start(self, tunnel: pytunnel.Tunnel) -> pytunnel.Forward:
        """Set the forward up on ``tunnel``; raises what the tunnel raises (a port in use, a
        port the server does not allow, ...)."""
        tcp = self.protocol == "tcp"
        limit = self.limit if tcp else None
        if self.name_route:
            assert self.bind_host is not None
            return await tunnel.forward_name(
                self.bind_host,
                self.target_host,
                self.target_port,
                tls=self.bind_port == 443,
                proxy_protocol=self.proxy_protocol,
                limit=limit,
                forwarded_headers=self.forwarded_headers,
                rewrite_host=self.rewrite_host,
                basic_auth=self.basic_auth,
                group=self.group,
                group_key=self.group_key,
            )
        if self.kind == "remote":
            return await tunnel.forward_remote(
                self.target_host,
                self.target_port,
                remote_port=self.bind_port,
                remote_host=self.bind_host or "",
                protocol=self.protocol,
                proxy_protocol=self.proxy_protocol if tcp else None,
                limit=limit,
                group=self.group if tcp else None,
                group_key=self.group_key if tcp else None,
            )
        if self.kind == "local":
            return await tunnel.forward_local(
                self.target_host,
                self.target_port,
                local_port=self.bind_port,
                local_host=self.bind_host or "127.0.0.1",
                protocol=self.protocol,
                limit=limit,
            )
        return await tunnel.forward_dynamic(
            local_port=self.bind_port,
            local_host=self.bind_host or "127.0.0.1",
            auth=self.socks_auth,
            limit=self.limit,
        )


def _credentials(value: str) -> tuple[str, str]:
    user, sep, password = value.partition(":")
    if not sep or not user:
        raise ValueError("expected USER:PASSWORD")
    return user, password


def declare_table(table: ForwardTable) -> Declared:
    """The forward a ``[[client.forwards]]`` table declares; :class:`TableError` naming the
    key otherwise."""
    given = [k for k in ("local", "remote", "dynamic") if getattr(table, k) is not None]
    if len(given) != 1:
        raise TableError(
            given[1] if len(given) > 1 else "local",
            "a forward has exactly one of local, remote or dynamic"
            + (f" (this one has {' and '.join(given)})" if given else ""),
        )
    kind: Kind = given[0]  # type: ignore[assignment]
    value = str(getattr(table, kind))
    common: dict[str, object] = {}
    if table.name is not None and not table.name:
        raise TableError("name", "a name is not empty")
    if table.name is not None and _ID.fullmatch(table.name):
        # ``f<n>`` are the ids the forwards get: a name like one would shadow another forward
        raise TableError("name", f"{table.name!r} has the form of a forward id (f1, f2, ...)")
    try:
        if table.limit is not None:
            common["limit"] = pytunnel.parse_rate(table.limit)
    except ValueError as exc:
        raise TableError("limit", str(exc)) from None
    if table.proxy_protocol is not None:
        if kind != "remote" or table.proxy_protocol not in ("v1", "v2"):
            raise TableError("proxy_protocol", "'v1' or 'v2', on a remote forward only")
        common["proxy_protocol"] = table.proxy_protocol
    if table.socks_auth is not None:
        if kind != "dynamic":
            raise TableError("socks_auth", "socks_auth belongs to a dynamic forward")
        try:
            common["socks_auth"] = _credentials(table.socks_auth)
        except ValueError as exc:
            raise TableError("socks_auth", str(exc)) from None
    try:
        if kind == "dynamic":
            host, port = pytunnel.parse_host_port(value)
            _no_route_keys(table, "a dynamic forward")
            return Declared(kind=kind, bind_host=host, bind_port=port, name=table.name, **common)  # type: ignore[arg-type]
        spec = pytunnel.parse_forward_spec(value)
    except ValueError as exc:
        raise TableError(kind, str(exc)) from None
    if "limit" in common and spec.protocol != "tcp":
        raise TableError("limit", "a bandwidth limit applies to TCP forwards only")
    http_route = kind == "remote" and spec.name_route and spec.bind_port == 80
    if not http_route:
        what = "a TLS name route" if kind == "remote" and spec.name_route else "a port forward"
        _no_http_keys(table, what)
    else:
        common.update(_http_options(table))
    if table.group is not None or table.group_key_file is not None:
        if kind != "remote" or spec.protocol != "tcp":
            raise TableError("group", "groups are for TCP remote forwards and name routes")
        if not spec.name_route and not spec.bind_port:
            raise TableError("group", "a load-balanced group needs a fixed port, not 0")
        common.update(_group_of(table))
    return Declared(
        kind=kind,
        bind_host=spec.bind_host,
        bind_port=spec.bind_port,
        target_host=spec.target_host,
        target_port=spec.target_port,
        protocol=spec.protocol,
        name=table.name,
        **common,  # type: ignore[arg-type]
    )


#: The keys of a ``[[client.forwards]]`` table that only an HTTP name route takes.
_HTTP_KEYS = ("forwarded_headers", "rewrite_host", "basic_auth")


def _no_http_keys(table: ForwardTable, what: str) -> None:
    for key in _HTTP_KEYS:
        if getattr(table, key) not in (None, False):
            raise TableError(
                key, f'{key} applies to HTTP name routes (remote = "NAME:80:HOST:PORT"), not {what}'
            )


def _no_route_keys(table: ForwardTable, what: str) -> None:
    _no_http_keys(table, what)
    if table.group is not None or table.group_key_file is not None:
        raise TableError("group", "groups are for TCP remote forwards and name routes")


def _http_options(table: ForwardTable) -> dict[str, object]:
    """An HTTP route's request changes, checked as ``forward_name`` checks them."""
    options: dict[str, object] = {}
    if table.forwarded_headers:
        options["forwarded_headers"] = True
    if table.rewrite_host is not None:
        try:
            HttpRouteOptions(rewrite_host=table.rewrite_host)
        except ValueError as exc:
            raise TableError("rewrite_host", str(exc)) from None
        options["rewrite_host"] = table.rewrite_host
    if table.basic_auth is not None:
        try:
            options["basic_auth"] = _credentials(table.basic_auth)
        except ValueError as exc:
            raise TableError("basic_auth", str(exc)) from None
    return options


def _group_of(table: ForwardTable) -> dict[str, object]:
    """The group a table joins and its key, read from ``group_key_file`` (blocking: tables
    are declared before the event loop runs, or in a thread)."""
    if table.group is None or table.group_key_file is None:
        missing = "group_key_file" if table.group is not None else "group"
        raise TableError(missing, "group and group_key_file go together")
    if not table.group:
        raise TableError("group", "a group name is not empty")
    try:
        with open(table.group_key_file, encoding="utf-8") as handle:
            key = handle.read().strip()
    except OSError as exc:
        raise TableError("group_key_file", f"cannot read it: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise TableError("group_key_file", "the group key file is not UTF-8 text") from None
    if not key:
        raise TableError("group_key_file", "the group key file is empty")
    return {"group": table.group, "group_key": key}


def from_flags(
    remote: Sequence[pytunnel.ForwardSpec],
    local: Sequence[pytunnel.ForwardSpec],
    dynamic: Sequence[tuple[str, int]],
    *,
    limit: float | None,
    proxy_protocol: Literal["v1", "v2"] | None,
    socks_auth: tuple[str, str] | None,
    group: str | None = None,
    group_key: str | None = None,
    forwarded_headers: bool = False,
    rewrite_host: str | None = None,
    basic_auth: tuple[str, str] | None = None,
    tables: Iterable[ForwardTable] = (),
) -> list[Declared]:
    """Every forward the options declare, in the order they are started: ``-R`` (port
    forwards and name routes), ``-L``, ``-D`` (with the flags' shared settings: the HTTP
    options go to the HTTP name routes only), then the file's tables."""
    try:
        HttpRouteOptions(rewrite_host=rewrite_host)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--rewrite-host") from None
    declared: list[Declared] = []
    for spec in remote:
        tcp = spec.protocol == "tcp"
        http = spec.name_route and spec.bind_port == 80
        if group is not None and tcp and not spec.name_route and not spec.bind_port:
            raise click.UsageError(
                f"a load-balanced group (--group) needs a fixed port, not 0 (-R {spec.bind_port}:"
                f"{pytunnel.format_target(spec.target_host, spec.target_port)})"
            )
        declared.append(
            Declared(
                kind="remote",
                bind_host=spec.bind_host,
                bind_port=spec.bind_port,
                target_host=spec.target_host,
                target_port=spec.target_port,
                protocol=spec.protocol,
                limit=limit,
                proxy_protocol=proxy_protocol,
                group=group if tcp else None,
                group_key=group_key if tcp else None,
                forwarded_headers=forwarded_headers and http,
                rewrite_host=rewrite_host if http else None,
                basic_auth=basic_auth if http else None,
            )
        )
    declared += [
        Declared(
            kind="local",
            bind_host=spec.bind_host,
            bind_port=spec.bind_port,
            target_host=spec.target_host,
            target_port=spec.target_port,
            protocol=spec.protocol,
            limit=limit,
        )
        for spec in local
    ]
    declared += [
        Declared(kind="dynamic", bind_host=host, bind_port=port, limit=limit, socks_auth=socks_auth)
        for host, port in dynamic
    ]
    for table in tables:
        try:
            declared.append(declare_table(table))
        except TableError as exc:
            raise click.BadParameter(str(exc), param_hint=f"forwards.{exc.key}") from None
    return declared


@attrs.define
class Running:
    """A declared forward and the forward running for it, under an id that stays."""

    id: str
    declared: Declared
    forward: pytunnel.Forward
    #: ``"config"`` (flags and file: a reload manages it) or ``"api"`` (added at run time:
    #: a reload leaves it alone, as ``ssh -O forward`` does).
    origin: str = "config"


def bind_of(forward: pytunnel.Forward) -> str:
    """Where a forward takes its connections: ``host:port``, or a name route's public URL
    (the full name the server gave, and the shared listener's port)."""
    if isinstance(forward, pytunnel.NameForward):
        return forward.url
    return pytunnel.format_target(*forward.address)


def describe(forward: pytunnel.Forward) -> str:
    """The line printed when a forward starts (scripts read the port from it)."""
    if forward.kind is pytunnel.ForwardKind.DYNAMIC:
        return f"dynamic forward {pytunnel.format_target(*forward.address)} -> SOCKS"
    if isinstance(forward, pytunnel.NameForward):
        return f"{forward.kind} {forward.url} -> {forward.target}"
    return f"{forward.kind} {pytunnel.format_target(*forward.address)} -> {forward.target}"


class DeclaredForwards:
    """The running forwards of one tunnel, by declaration, with stable ids (``f1``, ...)."""

    def __init__(self, tunnel: pytunnel.Tunnel) -> None:
        self.tunnel = tunnel
        self._running: dict[object, Running] = {}
        self._ids = (f"f{n}" for n in itertools.count(1))
        #: One change at a time (a reload, an admin request): each sees the last one done.
        self.lock = trio.Lock()

    @property
    def running(self) -> list[Running]:
        return list(self._running.values())

    def labelled(self) -> list[tuple[str, str, pytunnel.Forward]]:
        """Each running forward with its id and name (the metrics' labels)."""
        return [(e.id, e.declared.name or "", e.forward) for e in self._running.values()]

    def find(self, name_or_id: str) -> Running | None:
        """The forward with this id, else the one with this name."""
        for entry in self._running.values():
            if entry.id == name_or_id:
                return entry
        for entry in self._running.values():
            if entry.declared.name == name_or_id:
                return entry
        return None

    async def add(self, declared: Declared, origin: str = "config") -> Running:
        """Start one more forward; ``ValueError`` if one with its name (or the same
        unnamed declaration) already runs, else what starting it raises."""
        if declared.key in self._running:
            what = f"name {declared.name!r}" if declared.name else f"declaration {declared.spec}"
            raise ValueError(f"a forward with the {what} already exists")
        forward = await declared.start(self.tunnel)
        entry = Running(next(self._ids), declared, forward, origin)
        self._running[declared.key] = entry
        say(describe(forward))
        return entry

    async def remove(self, entry: Running) -> None:
        """Close one forward and forget it."""
        self._running.pop(entry.declared.key, None)
        await entry.forward.aclose()
        log.info("forward %s (%s) removed", entry.id, entry.declared.spec)

    async def stop(self, entry: Running) -> None:
        """Close one forward but keep it (stopped) under its id: retry starts it again."""
        await entry.forward.aclose()
        log.info("forward %s (%s) stopped", entry.id, entry.declared.spec)

    async def retry(self, entry: Running) -> Running:
        """Start the declaration of a forward again, under the same id (a forward that ended
        in error, or any other: it is closed first)."""
        await entry.forward.aclose()
        entry.forward = await entry.declared.start(self.tunnel)
        say(describe(entry.forward))
        return entry

    async def apply(self, declared: Sequence[Declared]) -> str:
        """Make the running forwards those of ``declared``, changing only what differs.

        Forwards added through the admin API are not the file's: they are left alone.
        Additions come first: if one cannot start, the ones this call started are closed
        again and the error is raised, with the running forwards as they were. Then the
        forwards no longer declared are closed, then each named forward whose declaration
        changed is replaced (closed, started anew: it may want its old port), and any forward
        that ended (error, stopped) is started again. Returns a summary.
        """
        async with self.lock:
            return await self._apply(declared)

    async def _apply(self, declared: Sequence[Declared]) -> str:
        wanted = {d.key: d for d in declared}
        if len(wanted) != len(declared):
            raise ValueError("the same forward is declared twice")
        clash = [e for k, e in self._running.items() if k in wanted and e.origin != "config"]
        if clash:
            raise ValueError(
                f"forward {clash[0].id} was added through the admin API with the same name or "
                "declaration; remove it first"
            )
        added = [d for k, d in wanted.items() if k not in self._running]
        started: list[Running] = []
        try:
            for item in added:
                started.append(await self.add(item))
        except BaseException:
            for entry in started:
                await self.remove(entry)
            raise
        removed = [e for k, e in self._running.items() if k not in wanted and e.origin == "config"]
        for entry in removed:
            await self.remove(entry)
        changed = 0
        restarted = 0
        for key, item in wanted.items():
            entry = self._running[key]
            if entry in started:
                continue
            if entry.declared != item:
                entry.declared = item
                await self.retry(entry)
                changed += 1
            elif entry.forward.status in (
                pytunnel.ForwardStatus.ERROR,
                pytunnel.ForwardStatus.STOPPED,
            ):
                await self.retry(entry)
                restarted += 1
        kept = len(wanted) - len(started) - changed - restarted
        return (
            f"{len(started)} added, {len(removed)} removed, {changed} changed, "
            f"{restarted} restarted, {kept} unchanged"
        )
