"""Cache URLs of the Redis family, parsed and checked before anything connects.

A bad URL fails when the cache is built, with a message that says what to write and
never echoes a password (see :func:`~ormcache.backends.base.redact_url`). Sentinel and
Cluster URLs list several hosts where urllib expects one, so they are split here;
``redis://`` and ``rediss://`` URLs go to redis-py as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from ormcache.backends.base import redact_url
from ormcache.errors import ConfigurationError

__all__ = [
    "ClusterTarget",
    "SentinelTarget",
    "parse_cluster_url",
    "parse_query",
    "parse_sentinel_url",
    "split_hosts",
    "split_userinfo",
    "standalone_where",
]


def _bad_host_port(url: str) -> ConfigurationError:
    # The URL's text is not echoed: a password with an unencoded / ? or # ends up here.
    return ConfigurationError(
        f"bad host:port in cache URL {redact_url(url)!r}; percent-encode / ? # @ in a password"
    )


def split_hosts(netloc: str, default_port: int, url: str) -> list[tuple[str, int]]:
    """``host[:port],host[:port]...`` (IPv6 in brackets), as Sentinel and Cluster URLs
    list several nodes where urllib expects one."""
    hosts: list[tuple[str, int]] = []
    for item in netloc.split(","):
        item = item.strip()
        if not item:
            continue
        if item.startswith("["):
            host, _, rest = item[1:].partition("]")
            port_text = rest[1:] if rest.startswith(":") else ""
        elif item.count(":") > 1:
            raise ConfigurationError(
                f"put the IPv6 address in brackets in cache URL {redact_url(url)!r}, "
                "e.g. [::1]:26379"
            )
        else:
            host, _, port_text = item.rpartition(":") if ":" in item else (item, "", "")
        try:
            port = int(port_text) if port_text else default_port
        except ValueError:
            raise _bad_host_port(url) from None
        hosts.append((host or "127.0.0.1", port))
    if not hosts:
        raise ConfigurationError(f"cache URL {redact_url(url)!r} names no host")
    return hosts


def parse_query(query: str) -> dict[str, str]:
    """``a=1&b=2``, percent-decoded; a ``+`` stays a plus (it may be in a password),
    unlike in form decoding."""
    pairs = (item.partition("=") for item in query.split("&") if item)
    return {unquote(k): unquote(v) for k, _, v in pairs}


def split_userinfo(netloc: str) -> tuple[str | None, str | None, str]:
    """(username, password, the rest): the password may itself contain ``@``."""
    if "@" not in netloc:
        return None, None, netloc
    userinfo, _, rest = netloc.rpartition("@")
    user, sep, password = userinfo.partition(":")
    return (unquote(user) or None), (unquote(password) if sep else None), rest


def standalone_where(url: str) -> str:
    """``Redis at host:port``, for messages, from a ``redis://`` or ``rediss://`` URL."""
    parts = urlsplit(url)
    try:
        return f"Redis at {parts.hostname or 'localhost'}:{parts.port or 6379}"
    except ValueError:
        raise _bad_host_port(url) from None


@dataclass(frozen=True)
class SentinelTarget:
    """What a ``redis+sentinel://`` URL names: the Sentinels, and the master's service."""

    hosts: list[tuple[str, int]]
    service: str
    db: int
    username: str | None
    password: str | None
    sentinel_password: str | None
    wait_replicas: int
    wait_timeout: float


def parse_sentinel_url(url: str) -> SentinelTarget:
    """``redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/service[/db]``
    with options ``sentinel_password``, ``wait_replicas`` (default 1) and
    ``wait_timeout`` (seconds, default 0.1)."""
    parts = urlsplit(url)
    username, password, hostlist = split_userinfo(parts.netloc)
    hosts = split_hosts(hostlist, 26379, url)
    path = [p for p in parts.path.split("/") if p]
    if not path or len(path) > 2:
        raise ConfigurationError(
            f"{redact_url(url)!r} must name the master's service after the hosts, e.g. "
            "redis+sentinel://127.0.0.1:26379/mymaster/0"
        )
    query = parse_query(parts.query)
    unknown = set(query) - {"sentinel_password", "wait_replicas", "wait_timeout"}
    if unknown:
        raise ConfigurationError(
            f"unknown options {sorted(unknown)} in {redact_url(url)!r}; "
            "known: sentinel_password, wait_replicas, wait_timeout"
        )
    try:
        db = int(path[1]) if len(path) == 2 else 0
        wait_replicas = int(query.get("wait_replicas", "1"))
        wait_timeout = float(query.get("wait_timeout", "0.1"))
    except ValueError as exc:
        raise ConfigurationError(f"bad number in cache URL {redact_url(url)!r}: {exc}") from None
    if wait_replicas < 0 or wait_timeout <= 0:
        raise ConfigurationError(
            f"wait_replicas must be >= 0 and wait_timeout > 0 seconds in {redact_url(url)!r}"
        )
    return SentinelTarget(
        hosts=hosts,
        service=unquote(path[0]),
        db=db,
        username=username,
        password=password,
        sentinel_password=query.get("sentinel_password"),
        wait_replicas=wait_replicas,
        wait_timeout=wait_timeout,
    )


@dataclass(frozen=True)
class ClusterTarget:
    """What a ``redis+cluster://`` URL names: some nodes (the client finds the rest)."""

    hosts: list[tuple[str, int]]
    username: str | None
    password: str | None
    ssl: bool


def parse_cluster_url(url: str) -> ClusterTarget:
    """``redis+cluster://[[user]:password@]host[:port][,host[:port]...][?ssl=true]``."""
    parts = urlsplit(url)
    username, password, hostlist = split_userinfo(parts.netloc)
    hosts = split_hosts(hostlist, 6379, url)
    query = parse_query(parts.query)
    unknown = set(query) - {"ssl"}
    if unknown or parts.path.strip("/"):
        raise ConfigurationError(
            f"{redact_url(url)!r}: a cluster URL takes hosts and ?ssl=true only (a "
            "cluster has one database, so no /db path)"
        )
    ssl = query.get("ssl", "false").lower() in ("1", "true", "yes")
    return ClusterTarget(hosts=hosts, username=username, password=password, ssl=ssl)
