"""What a node or a command needs of the engine before it talks to it: the address syntax and
the lease default. Kept apart from :mod:`pytunnel.cluster.etcd` so that checking a command's
options (``serve --cluster``, its ``--lease-ttl`` default) does not load the HTTP client."""

from __future__ import annotations

from urllib.parse import urlsplit

__all__ = ["DEFAULT_LEASE_TTL", "parse_etcd_url"]

#: Seconds a dead node's ports and names stay taken. Short enough for a failover that people
#: do not notice as an outage, long enough that a busy engine or a GC pause does not expire a
#: live node (it renews every third of it).
DEFAULT_LEASE_TTL = 10


def parse_etcd_url(url: str) -> tuple[tuple[str, ...], str]:
    """``etcd://host:port[,host:port...][/prefix]`` -> (the members' gateway URLs, the key
    prefix); ``etcds://`` for members that serve TLS (``https://`` gateway URLs).

    Every member of a multi-member etcd can be listed: requests go to the first that answers
    (see :class:`pytunnel.cluster.etcd.EtcdRegistry`). The prefix keeps several services
    apart on one engine (default ``/pytunnel/``)."""
    parts = urlsplit(url)
    usage = (
        f"a cluster address is etcd://HOST:PORT[,HOST:PORT...][/PREFIX] (etcds:// for TLS), "
        f"not {url!r}"
    )
    schemes = {"etcd": "http", "etcds": "https"}
    if parts.scheme not in schemes or not parts.netloc or parts.query or parts.fragment:
        raise ValueError(usage)
    endpoints = []
    for member in parts.netloc.split(","):
        one = urlsplit(f"//{member}")
        try:
            port = one.port or 2379
        except ValueError:
            raise ValueError(usage) from None
        if not one.hostname or one.username is not None or one.password is not None:
            raise ValueError(usage)
        host = f"[{one.hostname}]" if ":" in one.hostname else one.hostname
        endpoints.append(f"{schemes[parts.scheme]}://{host}:{port}")
    prefix = parts.path.strip("/")
    return tuple(endpoints), f"/{prefix}/" if prefix else "/pytunnel/"
