"""Redis Cluster backend: the same protocol, laid out so tags spread over slots.

A Lua script may only touch keys of one slot, so the standalone backend's scripts, which
read an entry and all its generations at once, cannot run on a cluster. Here each tag's
generation and lease keys share a slot (the hash tag ``{ns:tag}``), so every per-tag step
stays one atomic script, and different tags land on different slots and nodes. Entries
hash on their own key.

Why per-tag atomicity is enough:

* A commit's lease (bump, then lease) and its release (bump, then unlease) are each
  atomic per tag, as on a single server.
* ``snapshot`` refuses a tag under lease and records its generation, per tag.
* ``get`` reads the entry and its tags' current generations in one pipelined batch (one
  round trip, spread over the nodes), and serves the entry only if every generation it
  recorded is current. Generations only move forward (or restart at a random value), so
  an entry recorded before a bump can never match again, whatever order the nodes answer
  in; a read that starts after ``commit()`` returned sees both bumps.
* ``set`` checks the snapshot per tag, then writes the entry. A bump between the two
  leaves an entry whose recorded generations are already old: ``get`` refuses it.

Costs: a hit is one pipelined batch once the process knows the entry's tags (two round
trips the first time); a store is two; commands never use ``KEYS`` or cross-slot scripts.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit

from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.retry import Retry

from ormcache.aio import LoopTwins
from ormcache.errors import ConfigurationError

from .base import Snapshot, redact_url
from .redis import (
    _ACQUIRE,
    _BUMP,
    _ENTRY_MAGIC,
    _KNOWN_LIMIT,
    _MAX_HEADER,
    _RELEASE,
    _SNAPSHOT,
    _UNLOCK,
    _check_tag,
    _fresh,
    _parse_entry,
    parse_query,
    run_redis,
    split_hosts,
    split_userinfo,
)

__all__ = ["RedisClusterBackend"]

T = TypeVar("T")

# KEYS: one generation key, its lease key. ARGV: the generation the snapshot recorded.
# 1 if that generation is still current and the tag is not leased.
_CHECK = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  if redis.call('ZCARD', KEYS[2]) > 0 then return 0 end
end
return 1
"""


class RedisClusterBackend:
    """The :class:`~ormcache.backends.base.Backend` protocol on a Redis Cluster."""

    def __init__(
        self,
        client: RedisCluster | Callable[[], Any],
        namespace: str,
        *,
        generation_ttl: float = 86400.0,
        where: str = "Redis Cluster",
    ) -> None:
        if "{" in namespace or "}" in namespace:
            raise ConfigurationError(
                f"namespace {namespace!r} must not contain braces on Redis Cluster: they "
                "would pick the hash slot of every key"
            )
        # A RedisCluster connects as it is built. Built on first use instead, inside the
        # error handling, so an unreachable cluster at start-up is an outage the cache
        # rides out, not an application that fails to start.
        self._client: RedisCluster | None = None
        self._factory: Callable[[], Any] | None = None
        if isinstance(client, RedisCluster):
            self._client = client
        else:
            self._factory = client
        self._client_lock = threading.Lock()
        self.namespace = namespace
        self.where = where
        self._gen_ttl_ms = str(int(generation_ttl * 1000))
        self._e = f"{namespace}:e:"
        self._k = f"{namespace}:k:"
        self._known: dict[str, tuple[str, ...]] = {}
        self._twins: LoopTwins[RedisClusterBackend] = LoopTwins()

    @classmethod
    def from_url(
        cls,
        url: str,
        namespace: str,
        *,
        socket_timeout: float = 0.25,
        connect_timeout: float = 0.25,
        generation_ttl: float = 86400.0,
        **options: Any,
    ) -> RedisClusterBackend:
        """``redis+cluster://[[user]:password@]host[:port][,host[:port]...]``: any nodes
        of the cluster; the client discovers the rest. ``?ssl=true`` for TLS."""
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
        settings: dict[str, Any] = {
            "username": username,
            "password": password,
            "ssl": query.get("ssl", "false").lower() in ("1", "true", "yes"),
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": connect_timeout,
            **options,
        }

        def connect() -> RedisCluster:
            return RedisCluster(
                startup_nodes=[ClusterNode(h, p) for h, p in hosts],  # type: ignore[no-untyped-call]
                # One attempt, as on a single server: each retry would add a timeout to a
                # request. Redirections after a resharding are still followed.
                retry=Retry(NoBackoff(), 0),
                **settings,
            )

        def connect_async() -> Any:
            from redis.asyncio.cluster import ClusterNode as AsyncNode
            from redis.asyncio.cluster import RedisCluster as AsyncCluster
            from redis.asyncio.retry import Retry as AsyncRetry

            from ormcache.aio import AwaitingCluster

            nodes = [AsyncNode(h, p) for h, p in hosts]
            return AwaitingCluster(
                AsyncCluster(startup_nodes=nodes, retry=AsyncRetry(NoBackoff(), 0), **settings)
            )

        where = "Redis Cluster at " + ",".join(f"{h}:{p}" for h, p in hosts)
        backend = cls(connect, namespace, generation_ttl=generation_ttl, where=where)
        backend._twins.factory = lambda: cls(
            connect_async, namespace, generation_ttl=generation_ttl, where=where
        )
        return backend

    def for_event_loop(self) -> RedisClusterBackend:
        """The ``redis.asyncio`` twin for the running event loop (see
        ``RedisBackend.for_event_loop``)."""
        return self._twins.get(self)

    @property
    def client(self) -> RedisCluster:
        client = self._client
        if client is None:
            with self._client_lock:
                if self._client is None:
                    assert self._factory is not None
                    self._client = self._factory()
                client = self._client
        return client

    # -- layout -----------------------------------------------------------------------
    def _gen_key(self, tag: str) -> str:
        return f"{{{self.namespace}:{_check_tag(tag)}}}:g"

    def _lease_key(self, tag: str) -> str:
        return f"{{{self.namespace}:{tag}}}:l"

    def _run(self, what: str, call: Callable[[], T]) -> T:
        return run_redis(self.where, what, call)

    def _batch(self, what: str, fill: Callable[[Any], object]) -> list[Any]:
        """One pipelined batch: the commands go out to every node before any reply is
        read, so a batch costs one round trip however many nodes it touches. Scripts go
        as EVAL (a cluster pipeline refuses EVALSHA); each server compiles a body once."""

        def run() -> list[Any]:
            with self.client.pipeline() as pipe:  # type: ignore[no-untyped-call]
                fill(pipe)
                return list(pipe.execute())

        return self._run(what, run)

    def _per_tag(
        self, what: str, script: str, tags: Sequence[str], args: Callable[[str], list[Any]]
    ) -> list[Any]:
        """``script`` once per tag, on that tag's generation and lease keys."""

        def fill(pipe: Any) -> None:
            for tag in tags:
                pipe.execute_command(
                    "EVAL", script, 2, self._gen_key(tag), self._lease_key(tag), *args(tag)
                )

        return self._batch(what, fill)

    # -- Backend ----------------------------------------------------------------------
    def get(self, key: str) -> bytes | None:
        entry_key = self._e + key
        known = self._known.get(key)
        if known is None:
            value = self._run("get", lambda: self.client.get(entry_key))
            parsed = _parse_entry(value)
            if parsed is None:
                return None
            tags = parsed[0]
            current = self._batch("get", lambda pipe: [pipe.get(self._gen_key(t)) for t in tags])
        else:
            values = self._batch(
                "get",
                lambda pipe: [pipe.get(k) for k in (entry_key, *map(self._gen_key, known))],
            )
            parsed = _parse_entry(values[0])
            if parsed is None:
                return None
            if parsed[0] != known:
                self._known.pop(key, None)  # rewritten with other tags: learn them anew
                return self.get(key)
            current = values[1:]
        tags, gens, payload = parsed
        for gen, cur in zip(gens, current, strict=True):
            if cur is None or cur != gen:
                return None
        self._learn(key, tags)
        return payload

    def _learn(self, key: str, tags: tuple[str, ...]) -> None:
        if len(self._known) >= _KNOWN_LIMIT:
            self._known.clear()
        self._known[key] = tags

    def snapshot(self, tags: Sequence[str]) -> Snapshot | None:
        ordered = tuple(sorted(set(tags)))
        fresh, ttl = _fresh(), self._gen_ttl_ms
        replies = self._per_tag("snapshot", _SNAPSHOT, ordered, lambda _t: [fresh, ttl, 1])
        if any(r is None for r in replies):
            return None  # a tag is leased: a commit is under way
        return Snapshot(ordered, tuple(int(r[0]) for r in replies))

    def set(self, key: str, payload: bytes, ttl: float | None, snapshot: Snapshot) -> bool:
        header = b"".join(f"{t}\n{g}\n".encode() for t, g in zip(snapshot.tags, snapshot.gens))
        if len(header) > _MAX_HEADER:
            return False
        gens = dict(zip(snapshot.tags, snapshot.gens))
        checks = self._per_tag("set", _CHECK, snapshot.tags, lambda t: [gens[t]])
        if not all(checks):
            return False
        value = _ENTRY_MAGIC + len(header).to_bytes(2, "big") + header + payload
        px = None if ttl is None else max(1, int(ttl * 1000))
        self._run("set", lambda: self.client.set(self._e + key, value, px=px))
        self._learn(key, snapshot.tags)
        return True

    def delete(self, keys: Sequence[str]) -> None:
        if keys:
            self._batch("delete", lambda pipe: [pipe.unlink(self._e + k) for k in keys])

    def bump(self, tags: Sequence[str]) -> None:
        if tags:
            fresh, ttl = _fresh(), self._gen_ttl_ms

            def fill(pipe: Any) -> None:
                for tag in tags:
                    pipe.execute_command("EVAL", _BUMP, 1, self._gen_key(tag), fresh, ttl)

            self._batch("bump", fill)

    def acquire_lease(self, tags: Sequence[str], token: str, ttl: float) -> None:
        if tags:
            fresh, gttl, lttl = _fresh(), self._gen_ttl_ms, max(1, int(ttl * 1000))
            self._per_tag("lease", _ACQUIRE, tags, lambda _t: [fresh, gttl, 1, token, lttl])

    def release_lease(self, tags: Sequence[str], token: str) -> None:
        if tags:
            fresh, gttl = _fresh(), self._gen_ttl_ms
            self._per_tag("release", _RELEASE, tags, lambda _t: [fresh, gttl, 1, token])

    def lock(self, key: str, token: str, ttl: float) -> bool:
        ms = max(1, int(ttl * 1000))
        return bool(
            self._run("lock", lambda: self.client.set(self._k + key, token, nx=True, px=ms))
        )

    def unlock(self, key: str, token: str) -> None:
        self._run("unlock", lambda: self.client.eval(_UNLOCK, 1, self._k + key, token))

    def clear(self) -> None:
        """Delete this namespace's entries and generations on every primary (SCAN +
        UNLINK, never FLUSHALL). Leases stay: a writer mid-commit must still block
        stores."""

        def run() -> None:
            patterns = (f"{self._e}*", f"{{{self.namespace}:*}}:g")
            for node in self.client.get_primaries():  # type: ignore[no-untyped-call]
                conn = self.client.get_redis_connection(node)
                for pattern in patterns:
                    batch = list(conn.scan_iter(match=pattern, count=1000))
                    for start in range(0, len(batch), 1000):
                        # One key per UNLINK: keys of one node may still span slots.
                        with conn.pipeline(transaction=False) as pipe:
                            for name in batch[start : start + 1000]:
                                pipe.unlink(name)
                            pipe.execute()

        self._run("clear", run)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
