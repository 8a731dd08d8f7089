"""Redis Cluster: the same protocol, laid out so tags spread over slots.

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
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from redis.cluster import ClusterNode, RedisCluster

from ormcache.backends.base import Entry, Snapshot
from ormcache.errors import ConfigurationError

from .cluster_tracking import ClusterChannel
from .core import (
    ACQUIRE,
    BUMP,
    GENERATION_TTL,
    RELEASE,
    SNAPSHOT,
    Endpoint,
    RedisCore,
    check_tag,
    frame_entry,
    fresh_generation,
    is_current,
    keep_ms,
    lua,
    no_retry,
    parse_entry,
    timeouts,
    unframed,
    wrong_type,
)
from .tracking import Listener
from .urls import parse_cluster_url

__all__ = ["RedisClusterBackend"]

CHECK = lua("gen", "leased", "check")

# Connection settings that belong to the node a pool was made for, not to another node.
_NODE_SPECIFIC = frozenset(
    {
        "host",
        "port",
        "protocol",
        "orig_host_address",
        "maint_notifications_config",
        "oss_cluster_maint_notifications_handler",
    }
)

# A GET of a key holding another Redis type: never equal to a generation, and not an
# entry (see RedisClusterBackend._values).
_WRONG = b"\x00wrong type"


def _write_probe(name: str) -> str:
    """A key never set, in the slot of ``name``: its hash tag, or the whole name."""
    start = name.find("{")
    if start >= 0:
        end = name.find("}", start + 1)
        if end > start + 1:
            return name[: end + 1] + ":w"
    return "{" + name + "}:w"


class RedisClusterBackend(RedisCore):
    """The :class:`~ormcache.backends.base.Backend` protocol on a Redis Cluster."""

    def __init__(
        self,
        client: RedisCluster | Callable[[], Any],
        namespace: str,
        *,
        generation_ttl: float = GENERATION_TTL,
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
        self._factory: Callable[[], Any] | None = None
        if isinstance(client, RedisCluster):
            super().__init__(client, namespace, generation_ttl=generation_ttl, where=where)
        else:
            super().__init__(None, namespace, generation_ttl=generation_ttl, where=where)
            self._factory = client
        self._client_lock = threading.Lock()

    @classmethod
    def endpoint(
        cls, url: str, socket_timeout: float, connect_timeout: float, options: dict[str, Any]
    ) -> Endpoint:
        """``redis+cluster://[[user]:password@]host[:port][,host[:port]...]``: any nodes
        of the cluster; the client discovers the rest. ``?ssl=true`` for TLS. The client
        is made on first use (see the constructor)."""
        target = parse_cluster_url(url)
        settings: dict[str, Any] = {
            "username": target.username,
            "password": target.password,
            "ssl": target.ssl,
            **timeouts(socket_timeout, connect_timeout),
            **options,
        }

        def sync_cluster() -> RedisCluster:
            nodes = [ClusterNode(h, p) for h, p in target.hosts]  # type: ignore[no-untyped-call]
            return RedisCluster(startup_nodes=nodes, retry=no_retry(aio=False), **settings)

        def async_cluster() -> Any:
            from redis.asyncio.cluster import ClusterNode as AsyncNode
            from redis.asyncio.cluster import RedisCluster as AsyncCluster

            from ormcache.aio import AwaitingCluster

            nodes = [AsyncNode(h, p) for h, p in target.hosts]
            return AwaitingCluster(
                AsyncCluster(startup_nodes=nodes, retry=no_retry(aio=True), **settings)
            )

        return Endpoint(
            where="Redis Cluster at " + ",".join(f"{h}:{p}" for h, p in target.hosts),
            connect=lambda aio: async_cluster if aio else sync_cluster,
        )

    @property
    def client(self) -> Any:
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
        return f"{{{self.namespace}:{check_tag(tag)}}}:g"

    def _lease_key(self, tag: str) -> str:
        return f"{{{self.namespace}:{tag}}}:l"

    def _clear_patterns(self) -> Sequence[str]:
        return (f"{self._e}*", f"{{{self.namespace}:*}}:g")

    # -- near cache -------------------------------------------------------------------
    def gen_name(self, tag: str) -> str:
        """The generation key of ``tag`` (what a tracking push names)."""
        return f"{{{self.namespace}:{tag}}}:g"

    def tracking_channel(self, listener: Listener, **options: Any) -> ClusterChannel:
        """The push channel a near cache in front of this backend listens to: one
        tracking connection per primary, each on every generation key of the namespace
        (prefix ``{ns:``, which also covers the leases: harmless) and every entry key.
        Nothing connects until the channel's health thread does (the client too is made
        on first use)."""

        def discover() -> list[str]:
            return [f"{node.host}:{node.port}" for node in self.client.get_nodes()]

        def connect(host: str, port: int) -> Any:
            client = self.client
            pool = client.get_redis_connection(client.get_random_node()).connection_pool
            kwargs = {k: v for k, v in pool.connection_kwargs.items() if k not in _NODE_SPECIFIC}
            return pool.connection_class(**kwargs, host=host, port=port, protocol=3)

        return ClusterChannel(
            discover,
            connect,
            (f"{{{self.namespace}:", self._e),
            listener,
            where=self.where,
            **options,
        )

    def fence(self) -> None:
        """A ``PING`` to every primary, all sent before any reply is read (one round
        trip): an invalidation may have bumped keys on any of them, and each node orders
        only its own pushes before its own later replies."""
        ping_primaries = getattr(self.client, "ping_primaries", None)
        if ping_primaries is not None:  # the event loop's twin (ormcache.aio)
            self._run("fence", ping_primaries)
            return

        def run() -> None:
            client = self.client
            taken = []
            try:
                for node in client.get_primaries():
                    pool = client.get_redis_connection(node).connection_pool
                    conn = pool.get_connection()
                    taken.append((pool, conn))
                    conn.send_command("PING")
                for _pool, conn in taken:
                    conn.read_response()
            except BaseException:
                for _pool, conn in taken:
                    conn.disconnect()  # a reply may be left unread on it
                raise
            finally:
                for pool, conn in taken:
                    pool.release(conn)

        self._run("fence", run)

    def _nodes(self) -> Iterable[Any]:
        client = self.client
        return [client.get_redis_connection(n) for n in client.get_primaries()]

    def _batch(self, what: str, fill: Callable[[Any], object]) -> list[Any]:
        """One pipelined batch: the commands go out to every node before any reply is
        read, so a batch costs one round trip however many nodes it touches. Scripts go
        as EVAL (a cluster pipeline refuses EVALSHA); each server compiles a body once."""
        return self._run(what, lambda: self._pipelined(fill))

    def _pipelined(self, fill: Callable[[Any], object], *, raise_on_error: bool = True) -> Any:
        with self.client.pipeline() as pipe:
            fill(pipe)
            return list(pipe.execute(raise_on_error=raise_on_error))

    def _per_tag(
        self,
        what: str,
        script: str,
        tags: Sequence[str],
        args: Callable[[str], list[Any]],
        parse: Callable[[list[Any]], Any] = list,
    ) -> Any:
        """``script`` once per tag, on that tag's generation and lease keys; the replies
        go through ``parse`` inside the error handling."""

        def fill(pipe: Any) -> None:
            for tag in tags:
                pipe.execute_command(
                    "EVAL", script, 2, self._gen_key(tag), self._lease_key(tag), *args(tag)
                )

        return self._run(what, lambda: parse(self._pipelined(fill)))

    def _values(self, names: Sequence[str]) -> list[Any]:
        """GET of each name in one batch. A key of another Redis type reads as
        ``_WRONG`` instead of failing the batch, as a plain GET would.

        Each GET follows a no-op write in its slot (PEXPIRE of a key never set): while a
        node refuses writes (MISCONF, NOREPLICAS), no invalidation reaches it, so its
        reads must fail too (see the standalone get.lua)."""

        def queue(pipe: Any) -> list[Any]:
            for name in names:
                pipe.pexpire(_write_probe(name), 1)
                pipe.get(name)
            return []

        def run() -> list[Any]:
            replies = self._pipelined(queue, raise_on_error=False)
            for reply in replies:
                if isinstance(reply, Exception) and not wrong_type(reply):
                    raise reply
            values = replies[1::2]
            return [_WRONG if isinstance(r, Exception) else r for r in values]

        return self._run("get", run)

    # -- Backend ----------------------------------------------------------------------
    def get(self, key: str) -> Entry | None:
        entry_key = self._e + key
        known = self._known.get(key)
        if known is None:
            value = self._values([entry_key])[0]
            parsed = parse_entry(value)
            if parsed is None:
                return unframed(value)
            current = self._values([self._gen_key(t) for t in parsed.tags])
        else:
            values = self._values([entry_key, *map(self._gen_key, known)])
            parsed = parse_entry(values[0])
            if parsed is None:
                return unframed(values[0])
            if parsed.tags != known:
                self._known.pop(key, None)  # rewritten with other tags: learn them anew
                return self.get(key)
            current = values[1:]
        if not is_current(parsed.gens, current):
            return None
        self._known.learn(key, parsed.tags)
        return parsed

    def snapshot(self, tags: Sequence[str]) -> Snapshot | None:
        ordered = tuple(sorted(set(tags)))
        fresh, ttl = fresh_generation(), self._gen_ttl_ms

        def parse(replies: list[Any]) -> Snapshot | None:
            if any(r is None for r in replies):
                return None  # a tag is leased: a commit is under way
            return Snapshot(ordered, tuple(int(r[0]) for r in replies))

        snap: Snapshot | None = self._per_tag(
            "snapshot", SNAPSHOT, ordered, lambda _t: [fresh, ttl, 1], parse
        )
        return snap

    def set(self, key: str, payload: bytes, ttl: float | None, snapshot: Snapshot) -> bool:
        value = frame_entry(snapshot, payload)
        if value is None:
            return False
        gens = dict(zip(snapshot.tags, snapshot.gens))
        keep = keep_ms(ttl, self._gen_ttl)
        checks = self._per_tag("set", CHECK, snapshot.tags, lambda t: [gens[t], keep])
        if not all(checks):
            return False
        px = None if ttl is None else max(1, int(ttl * 1000))
        self._run("set", lambda: self.client.set(self._e + key, value, px=px))
        self._known.learn(key, snapshot.tags)
        return True

    def delete(self, keys: Sequence[str]) -> None:
        if keys:
            # execute_command, not pipe.unlink: redis.asyncio's cluster pipeline defines
            # unlink as a coroutine (it splits keys by slot), which queued nothing there.
            self._batch(
                "delete", lambda pipe: [pipe.execute_command("UNLINK", self._e + k) for k in keys]
            )

    def bump(self, tags: Sequence[str]) -> None:
        if tags:
            fresh, ttl = fresh_generation(), self._gen_ttl_ms

            def fill(pipe: Any) -> None:
                for tag in tags:
                    pipe.execute_command("EVAL", BUMP, 1, self._gen_key(tag), fresh, ttl)

            self._batch("bump", fill)

    def acquire_lease(self, tags: Sequence[str], token: str, ttl: float) -> None:
        if tags:
            fresh, gttl, lttl = fresh_generation(), self._gen_ttl_ms, max(1, int(ttl * 1000))
            self._per_tag("lease", ACQUIRE, tags, lambda _t: [fresh, gttl, 1, token, lttl])

    def release_lease(self, tags: Sequence[str], token: str) -> None:
        if tags:
            fresh, gttl = fresh_generation(), self._gen_ttl_ms
            self._per_tag("release", RELEASE, tags, lambda _t: [fresh, gttl, 1, token])

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
