"""The cluster options of ``pytunnel serve`` (checked together, turned into a registry) and
``pytunnel cluster status``, which reads the registry without joining it."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import attrs
import click
import trio

import pytunnel

from ..cluster import (
    DEFAULT_LEASE_TTL,
    check_node_id,
    is_group,
    parse_etcd_url,
    parse_member_key,
)
from ..errors import printable
from ._admin import call_admin
from ._options import CONTEXT, EXISTING_FILE, stack
from ._output import fail, say
from ._token import read_secret_file

if TYPE_CHECKING:
    from ..cluster import EtcdRegistry

__all__ = [
    "DEFAULT_LEASE_TTL",
    "EngineAccess",
    "check_cluster_options",
    "cluster",
    "engine_options",
    "node_registry",
]

_F = TypeVar("_F", bound=Callable[..., Any])


@attrs.frozen
class EngineAccess:
    """How a node (or ``cluster status``) reaches etcd: TLS files, an etcd user and its
    password file; given to the command as one ``engine`` argument."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    user: str | None = None
    password_file: str | None = None

    def check(self, cluster: str | None) -> str | None:
        """One usage error for options that do not fit together; the password (read now,
        before anything starts: a file that cannot be read is one line at once)."""
        tls = self.ca is not None or self.cert is not None or self.key is not None
        if cluster is None:
            if tls or self.user is not None or self.password_file is not None:
                raise click.UsageError(
                    "--cluster-ca, --cluster-cert, --cluster-key, --cluster-user and "
                    "--cluster-password-file are for a --cluster"
                )
            return None
        if tls and not cluster.startswith("etcds://"):
            raise click.UsageError(
                "--cluster-ca, --cluster-cert and --cluster-key are for a TLS engine: "
                "--cluster etcds://HOST:PORT"
            )
        if self.key is not None and self.cert is None:
            raise click.UsageError("--cluster-key needs --cluster-cert")
        if (self.user is None) != (self.password_file is None):
            raise click.UsageError("--cluster-user and --cluster-password-file go together")
        if self.password_file is None:
            return None
        return read_secret_file(self.password_file, "--cluster-password-file", "etcd password")

    async def registry_options(self, password: str | None) -> dict[str, Any]:
        """The ``EtcdRegistry`` keyword arguments (its TLS context built off the loop)."""
        options: dict[str, Any] = {"user": self.user, "password": password}
        if self.ca is not None or self.cert is not None:
            options["tls"] = await pytunnel.tls.client_tls_context(
                ca_file=self.ca, cert_file=self.cert, key_file=self.key
            )
        return options


_ENGINE_OPTIONS = (
    click.option(
        "--cluster-ca",
        metavar="FILE",
        type=EXISTING_FILE,
        help="With --cluster etcds://: the CA that signed the etcd members' certificates "
        "(default: the system's trust store).",
    ),
    click.option(
        "--cluster-cert",
        metavar="FILE",
        type=EXISTING_FILE,
        help="With --cluster etcds://: this node's client certificate for etcd (PEM; the key "
        "too, or in --cluster-key), for members started with --client-cert-auth.",
    ),
    click.option(
        "--cluster-key",
        metavar="FILE",
        type=EXISTING_FILE,
        help="The key of --cluster-cert, if not in the same file.",
    ),
    click.option(
        "--cluster-user",
        metavar="NAME",
        help="An etcd user to authenticate as (etcd with authentication enabled).",
    ),
    click.option(
        "--cluster-password-file",
        metavar="FILE",
        help="The password of --cluster-user (one line; never logged).",
    ),
)


def engine_options(command: _F) -> _F:
    """The options of how to reach etcd, handed to ``command`` as one ``engine``."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        engine = EngineAccess(
            kwargs.pop("cluster_ca"),
            kwargs.pop("cluster_cert"),
            kwargs.pop("cluster_key"),
            kwargs.pop("cluster_user"),
            kwargs.pop("cluster_password_file"),
        )
        return command(*args, engine=engine, **kwargs)

    return stack(*_ENGINE_OPTIONS)(wrapper)  # type: ignore[return-value]


def check_cluster_options(
    cluster: str | None, node_id: str | None, node_address: str | None
) -> None:
    """One usage error for options that cannot go together, before anything starts."""
    if cluster is None:
        if node_id is not None or node_address is not None:
            raise click.UsageError("--node-id and --node-address are for a node of a --cluster")
        return
    try:
        parse_etcd_url(cluster)
    except ValueError as exc:
        raise click.UsageError(f"--cluster: {exc}") from None
    if not node_id:
        raise click.UsageError("--cluster needs --node-id NAME (unique in the cluster)")
    try:
        check_node_id(node_id)
    except ValueError as exc:
        raise click.UsageError(f"--node-id: {printable(str(exc))}") from None


async def node_registry(
    cluster: str | None,
    node_id: str | None,
    node_address: str,
    lease_ttl: int,
    engine: EngineAccess = EngineAccess(),
    password: str | None = None,
) -> EtcdRegistry | None:
    """The registry of this node (made on the event loop, where its HTTP client lives)."""
    if cluster is None or node_id is None:
        return None
    from ..cluster import EtcdRegistry  # the HTTP client, only for a node of a cluster

    options = await engine.registry_options(password)
    return EtcdRegistry.from_url(cluster, node_id, node_address, lease_ttl=lease_ttl, **options)


@click.group(context_settings=CONTEXT)
def cluster() -> None:
    """Look at a cluster of servers (see docs/cluster.md)."""


@cluster.command(context_settings=CONTEXT)
@click.option(
    "--cluster",
    "url",
    metavar="etcd[s]://HOST:PORT[,HOST:PORT...][/PREFIX]",
    help="The cluster's etcd, as given to its nodes' --cluster (read directly).",
)
@click.option(
    "--admin",
    metavar="unix:PATH|HOST:PORT",
    help="Or a node's admin API (serve --admin): the registry as that node reads it, with "
    "its links to the other nodes.",
)
@click.option(
    "--admin-token-file",
    type=EXISTING_FILE,
    help="Token of an admin API on a port (also PYTUNNEL_ADMIN_TOKEN).",
)
@engine_options
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of text.")
def status(
    url: str | None,
    admin: str | None,
    admin_token_file: str | None,
    as_json: bool,
    engine: EngineAccess,
) -> None:
    """The live nodes and what each one's clients hold: identities, ports, names, groups."""
    if (url is None) == (admin is None):
        raise click.UsageError("give one of --cluster URL (the engine) or --admin (a node)")
    password = engine.check(url)
    links: dict[str, Any] | None = None
    seen_by = ""
    if admin is not None:
        answer = call_admin(admin, admin_token_file, "GET", "/api/cluster")
        entries: dict[str, str] = answer["entries"]
        links = answer["links"]
        seen_by = f"node {printable(answer['node_id'])}"
    else:
        assert url is not None
        try:
            endpoints, prefix = parse_etcd_url(url)
        except ValueError as exc:
            raise click.UsageError(f"--cluster: {exc}") from None

        async def read() -> dict[str, str]:
            from ..cluster import EtcdRegistry

            options = await engine.registry_options(password)
            registry = EtcdRegistry(endpoints, "status", prefix=prefix, **options)
            try:
                return await registry.entries()
            finally:
                await registry.aclose()

        try:
            entries = trio.run(read)
        except pytunnel.ClusterUnavailableError as exc:
            fail(exc.message)
    nodes: dict[str, dict[str, object]] = {}
    for key, value in entries.items():
        if key.startswith("nodes/"):
            nodes[key[len("nodes/") :]] = {"address": value, "holds": {}}
    orphans: dict[str, str] = {}
    #: Keys held by load-balanced groups (whose members may be on any node).
    groups: dict[str, str] = {}
    for key, value in entries.items():
        if key.startswith("nodes/"):
            continue
        member = parse_member_key(key)
        if is_group(value) and member is None:
            groups[key] = value
            continue
        node = nodes.get(member[1] if member is not None else value.split("/", 1)[0])
        holds = node["holds"] if node is not None else orphans
        assert isinstance(holds, dict)
        holds[key] = value
    if as_json:
        view: dict[str, Any] = {"nodes": nodes, "unowned": orphans, "groups": groups}
        if admin is not None:
            view["links"] = links
        say(json.dumps(view, sort_keys=True))
        return
    where = f"as {seen_by} sees it" if seen_by else f"at {url}"
    say(f"{len(nodes)} node(s) in the cluster {where}")
    for name, node in sorted(nodes.items()):
        holds = node["holds"]
        assert isinstance(holds, dict)
        address = printable(str(node["address"]) or "?")
        say(f"node {printable(name)} at {address}: {len(holds)} key(s)")
        for key, owner in sorted(holds.items()):
            say(f"  {printable(key)}  {printable(owner)}")
    for key, owner in sorted(groups.items()):  # its members are listed under their nodes
        say(f"held by a load-balanced group: {printable(key)}  {printable(owner)}")
    for key, owner in sorted(orphans.items()):  # a node's key expired, not yet its claims
        say(f"without a live node: {printable(key)}  {printable(owner)}")
    if links is not None:
        up = ", ".join(printable(n) for n in links["up"]) or "none"
        mirrored = ", ".join(str(p) for p in links["mirrored_ports"]) or "none"
        say(
            f"{seen_by}: links up to {up}; mirrored TCP ports {mirrored}; "
            f"{links['streams_out']} connection(s) relayed out, {links['streams_in']} in"
        )
