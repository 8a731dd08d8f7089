"""Redis (or Valkey) standalone backend: each protocol step is one Lua script.

Key layout, all under the namespace: ``{ns}:e:{key}`` entries, ``{ns}:g:{tag}``
generations (decimal strings), ``{ns}:l:{tag}`` leases (a sorted set of token → expiry in
ms, by the server's clock).

An entry's value is ``b"OCE1"``, a 2-byte header length, the header (``tag\\ngen\\n`` per
tag) and the payload. The ``get`` script checks every recorded generation against the
current one and returns the payload in the same round trip, so a hit costs one EVALSHA.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.commands.core import Script
from redis.connection import AbstractConnection
from redis.exceptions import NoScriptError, RedisClusterException, RedisError
from redis.retry import Retry

from ormcache.aio import LoopTwins
from ormcache.errors import BackendError, ConfigurationError

from .base import Snapshot, redact_url

__all__ = ["RedisBackend", "SentinelTarget", "parse_sentinel_url"]

T = TypeVar("T")

logger = logging.getLogger("ormcache")

_ENTRY_MAGIC = b"OCE1"
_MAX_HEADER = 65535

# A miss unless the entry exists, parses, and every generation it recorded is current.
_GET = """
local v = redis.call('GET', KEYS[1])
if not v or #v < 6 or string.sub(v, 1, 4) ~= 'OCE1' then return false end
local hl = string.byte(v, 5) * 256 + string.byte(v, 6)
if #v < 6 + hl then return false end
local header = string.sub(v, 7, 6 + hl)
local keys, gens, pos = {}, {}, 1
while pos <= hl do
  local a = string.find(header, '\\n', pos, true)
  if not a then return false end
  local b = string.find(header, '\\n', a + 1, true)
  if not b then return false end
  keys[#keys + 1] = ARGV[1] .. string.sub(header, pos, a - 1)
  gens[#gens + 1] = string.sub(header, a + 1, b - 1)
  pos = b + 1
end
if #keys > 0 then
  local cur = redis.call('MGET', unpack(keys))
  for i = 1, #keys do
    if cur[i] ~= gens[i] then return false end
  end
end
return v
"""

# Shared by the scripts below: is any of the lease keys KEYS[first..last] held?
_LEASED = """
local function leased(first, last)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  for i = first, last do
    if redis.call('EXISTS', KEYS[i]) == 1 then
      redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
      if redis.call('ZCARD', KEYS[i]) > 0 then return true end
    end
  end
  return false
end
"""

# KEYS: n generation keys, then n lease keys. ARGV: fresh value, generation ttl ms, n.
_SNAPSHOT = (
    _LEASED
    + """
local n = tonumber(ARGV[3])
if leased(n + 1, 2 * n) then return false end
local out = {}
for i = 1, n do
  local g = redis.call('GET', KEYS[i])
  if not g then
    g = ARGV[1]
    redis.call('SET', KEYS[i], g, 'PX', ARGV[2])
  end
  out[i] = g
end
return out
"""
)

# KEYS: entry, n generation keys, n lease keys. ARGV: value, ttl ms (0: none), n, gens...
_SET = (
    _LEASED
    + """
local n = tonumber(ARGV[3])
for i = 1, n do
  if redis.call('GET', KEYS[1 + i]) ~= ARGV[3 + i] then return 0 end
end
if leased(n + 2, 2 * n + 1) then return 0 end
if ARGV[2] == '0' then
  redis.call('SET', KEYS[1], ARGV[1])
else
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
end
return 1
"""
)

# A missing generation restarts at a fresh random value, never at INCR's 1, which could
# equal a generation recorded before the key vanished.
_BUMP_FN = """
local function bump(first, last, fresh, ttl)
  for i = first, last do
    if redis.call('EXISTS', KEYS[i]) == 1 then
      redis.call('INCR', KEYS[i])
    else
      redis.call('SET', KEYS[i], fresh)
    end
    redis.call('PEXPIRE', KEYS[i], ttl)
  end
end
"""

# KEYS: generation keys. ARGV: fresh value, generation ttl ms.
_BUMP = _BUMP_FN + "bump(1, #KEYS, ARGV[1], ARGV[2])\nreturn 1\n"

# KEYS: n generation keys, n lease keys. ARGV: fresh, gen ttl ms, n, token, lease ttl ms.
_ACQUIRE = (
    _BUMP_FN
    + """
local n = tonumber(ARGV[3])
bump(1, n, ARGV[1], ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[5])
for i = n + 1, 2 * n do
  redis.call('ZADD', KEYS[i], now + ttl, ARGV[4])
  if redis.call('PTTL', KEYS[i]) < ttl then redis.call('PEXPIRE', KEYS[i], ttl) end
end
return 1
"""
)

# KEYS: n generation keys, n lease keys. ARGV: fresh, gen ttl ms, n, token.
_RELEASE = (
    _BUMP_FN
    + """
local n = tonumber(ARGV[3])
bump(1, n, ARGV[1], ARGV[2])
for i = n + 1, 2 * n do
  redis.call('ZREM', KEYS[i], ARGV[4])
end
return 1
"""
)


_KNOWN_LIMIT = 100_000


def _parse_entry(value: Any) -> tuple[tuple[str, ...], tuple[bytes, ...], bytes] | None:
    """Split a stored entry into tags, recorded generations and payload; None if malformed."""
    if not isinstance(value, bytes) or len(value) < 6 or value[:4] != _ENTRY_MAGIC:
        return None
    length = int.from_bytes(value[4:6], "big")
    if len(value) < 6 + length:
        return None
    lines = value[6 : 6 + length].split(b"\n")
    if lines[-1] != b"" or len(lines) % 2 != 1:
        return None
    try:
        tags = tuple(t.decode("utf-8") for t in lines[0:-1:2])
    except UnicodeDecodeError:
        return None
    return tags, tuple(lines[1:-1:2]), value[6 + length :]


# Delete the lock only if we still hold it: after our TTL ran out it may be someone else's.
_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def run_redis(where: str, what: str, call: Callable[[], T]) -> T:
    """Run one Redis call, turning redis-py's errors into a BackendError that says what
    failed and what to check (the guard logs it and serves the call uncached)."""
    try:
        return call()
    except redis.exceptions.TimeoutError as exc:
        raise BackendError(
            f"{where} did not answer {what} in time ({exc}); it is overloaded or "
            "unreachable, or socket_timeout is too low"
        ) from exc
    except redis.exceptions.ConnectionError as exc:
        raise BackendError(
            f"{where} refused or dropped the connection during {what} ({exc}); "
            "check that it is running and that ORMCACHE_URL points at it"
        ) from exc
    except (RedisError, RedisClusterException, OSError) as exc:
        raise BackendError(f"{where} failed {what}: {type(exc).__name__}: {exc}") from exc
    except (BackendError, ConfigurationError):
        raise
    except Exception as exc:
        # Anything else from the client (a TypeError from an unknown URL option, met
        # only when the first connection is made) must not reach the application either.
        raise BackendError(f"{where} failed {what}: {type(exc).__name__}: {exc}") from exc


def _fresh() -> int:
    return secrets.randbits(62)


def _check_tag(tag: str) -> str:
    """Tags name tables and columns, in any script (keys and headers are UTF-8). Only a
    newline, the header's separator, cannot be stored: such a read or write then goes
    uncached, like any other backend failure, instead of failing the caller."""
    if "\n" in tag:
        raise BackendError(f"a table or column name with a newline cannot be a tag: {tag!r}")
    return tag


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
            # Not echoed: a password with an unencoded / ? or # ends up here.
            raise ConfigurationError(
                f"bad host:port in cache URL {redact_url(url)!r}; percent-encode / ? # @ "
                "in a password"
            ) from None
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


@dataclass(frozen=True)
class SentinelTarget:
    hosts: list[tuple[str, int]]
    service: str
    db: int
    username: str | None
    password: str | None
    sentinel_password: str | None
    wait_replicas: int
    wait_timeout: float


def parse_sentinel_url(url: str) -> SentinelTarget:
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


def _connect(
    url: str,
    socket_timeout: float,
    connect_timeout: float,
    options: dict[str, Any],
    *,
    aio: bool,
) -> tuple[Any, str, int, float]:
    """(client, where, wait_replicas, wait_timeout) for a standalone or Sentinel URL,
    with redis-py's sync or asyncio client: one place decides how both connect."""
    client_lib: Any
    retry_class: Any
    sentinel_class: Any
    if aio:
        import redis.asyncio as client_lib
        from redis.asyncio.retry import Retry as retry_class
        from redis.asyncio.sentinel import Sentinel as sentinel_class
    else:
        client_lib = redis
        retry_class = Retry
        from redis.sentinel import Sentinel as sentinel_class
    timeouts: dict[str, Any] = {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": connect_timeout,
    }
    # No client-side retries: each would add another timeout to a request.
    retry = retry_class(NoBackoff(), 0)
    if url[:17].lower() != "redis+sentinel://":
        parts = urlsplit(url)
        try:
            where = f"Redis at {parts.hostname or 'localhost'}:{parts.port or 6379}"
        except ValueError:
            raise ConfigurationError(
                f"bad host:port in cache URL {redact_url(url)!r}; percent-encode / ? # @ "
                "in a password"
            ) from None
        client = client_lib.Redis.from_url(url, retry=retry, **timeouts, **options)
        return client, where, 0, 0.1
    # Sentinel: every command goes to the master that the Sentinels name. A replica
    # lags, and a hit served from one could be older than a commit that returned.
    target = parse_sentinel_url(url)
    if target.wait_replicas and target.wait_timeout >= socket_timeout:
        raise ConfigurationError(
            f"wait_timeout ({target.wait_timeout} s) must be below socket_timeout "
            f"({socket_timeout} s), or the reply to WAIT times out first; lower it in "
            "the cache URL or raise socket_timeout"
        )
    sentinel_kwargs: dict[str, Any] = dict(timeouts)
    if target.sentinel_password:
        sentinel_kwargs["password"] = target.sentinel_password
    sentinel = sentinel_class(target.hosts, sentinel_kwargs=sentinel_kwargs, **timeouts)
    client = sentinel.master_for(
        target.service,
        db=target.db,
        username=target.username,
        password=target.password,
        retry=retry,
        **timeouts,
        **options,
    )
    hosts = ",".join(f"{h}:{p}" for h, p in target.hosts)
    where = f"Redis master {target.service!r} (Sentinel at {hosts})"
    return client, where, target.wait_replicas, target.wait_timeout


class _Lane(threading.local):
    """This thread's own connection for cache reads (see ``RedisBackend._read``)."""

    conn: AbstractConnection | None = None
    pid = 0


class RedisBackend:
    """One Redis connection pool, plus one read connection per thread; every method is one
    round trip."""

    def __init__(
        self,
        client: redis.Redis,
        namespace: str,
        *,
        generation_ttl: float = 86400.0,
        where: str = "Redis",
        wait_replicas: int = 0,
        wait_timeout: float = 0.1,
    ) -> None:
        self.client = client
        # Replication is asynchronous: after a failover the promoted replica may lack the
        # last bumps, which would make entries valid again that a commit invalidated.
        # With wait_replicas, every invalidation waits (WAIT, bounded) until that many
        # replicas have it, before COMMIT and before commit() returns.
        self.wait_replicas = wait_replicas
        self._wait_ms = max(1, int(wait_timeout * 1000))
        self._unacked_warned = 0.0
        self.namespace = namespace
        self.where = where
        self._gen_ttl_ms = str(int(generation_ttl * 1000))
        self._e = f"{namespace}:e:"
        self._g = f"{namespace}:g:"
        self._l = f"{namespace}:l:"
        self._get = client.register_script(_GET)
        self._snapshot = client.register_script(_SNAPSHOT)
        self._set = client.register_script(_SET)
        self._bump = client.register_script(_BUMP)
        self._acquire = client.register_script(_ACQUIRE)
        self._release = client.register_script(_RELEASE)
        self._unlock = client.register_script(_UNLOCK)
        self._k = f"{namespace}:k:"
        # entry key -> its tags, as last stored or read by this process
        self._known: dict[str, tuple[str, ...]] = {}
        self._lane = _Lane()
        self._lane_conns: weakref.WeakSet[AbstractConnection] = weakref.WeakSet()
        # Own read connections only beside a plain pool: a Sentinel or other managed pool
        # decides where connections go, so reads must go through it.
        self._twins: LoopTwins[RedisBackend] = LoopTwins()
        self._own_reads = type(client.connection_pool) in (
            redis.ConnectionPool,
            redis.BlockingConnectionPool,
        )

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
    ) -> RedisBackend:
        """``redis://``, ``rediss://`` or ``redis+sentinel://``. Timeouts default low: a
        cache that waits seconds for Redis is an outage. On an event loop (see
        :mod:`ormcache.aio`) the same URL gets a ``redis.asyncio`` twin per loop."""

        def build(aio: bool) -> RedisBackend:
            client, where, wait_replicas, wait_timeout = _connect(
                url, socket_timeout, connect_timeout, options, aio=aio
            )
            if aio:
                from ormcache.aio import AwaitingRedis

                client = AwaitingRedis(client)
            return cls(
                client,
                namespace,
                generation_ttl=generation_ttl,
                where=where,
                wait_replicas=wait_replicas,
                wait_timeout=wait_timeout,
            )

        backend = build(False)
        backend._twins.factory = lambda: build(True)
        return backend

    def for_event_loop(self) -> RedisBackend:
        """This backend as the running event loop should use it: the ``redis.asyncio``
        twin made for that loop (asyncio clients belong to one loop), or itself when it
        was built from a client rather than a URL."""
        return self._twins.get(self)

    # -- plumbing ---------------------------------------------------------------------
    def _run(self, what: str, call: Callable[[], T]) -> T:
        return run_redis(self.where, what, call)

    def _read(self, *args: str | bytes) -> Any:
        """One command on this thread's own connection, made like the pool's.

        Hits are the hot path, and on a pooled client about a third of a GET's time goes
        to checking a connection out and back in (a lock, a readiness poll, metrics). A
        connection per thread needs none of that. redis-py's connection still applies the
        timeouts and drops the socket after any error, so the next call reconnects.
        """
        if not self._own_reads:
            return self.client.execute_command(*args)  # type: ignore[no-untyped-call]
        lane = self._lane
        conn = lane.conn
        pid = os.getpid()
        if conn is None or lane.pid != pid:
            # A forked child must not share its parent's socket: make its own.
            pool = self.client.connection_pool
            conn = pool.connection_class(**pool.connection_kwargs)
            lane.conn, lane.pid = conn, pid
            self._lane_conns.add(conn)
        conn.send_command(*args)
        return conn.read_response()

    def _gen_keys(self, tags: Sequence[str]) -> list[str]:
        return [self._g + _check_tag(t) for t in tags]

    def _lease_keys(self, tags: Sequence[str]) -> list[str]:
        return [self._l + t for t in tags]

    # -- Backend ----------------------------------------------------------------------
    def get(self, key: str) -> bytes | None:
        """One round trip either way: a plain MGET of the entry and its generations when
        this process already knows the entry's tags, else the Lua script (which then
        teaches us the tags). MGET is atomic, so both read one consistent state."""
        entry_key = self._e + key
        known = self._known.get(key)
        if known is not None:
            names = [entry_key, *(self._g + t for t in known)]
            values = self._run("get", lambda: self._read("MGET", *names))
            parsed = _parse_entry(values[0])
            if parsed is None:
                return None
            tags, gens, payload = parsed
            if tags == known:
                current = values[1:]
                for gen, cur in zip(gens, current):
                    if cur is None or cur != gen:
                        return None
                return payload
            # The entry was rewritten with other tags: learn them through the script.
        value = self._run("get", lambda: self._get_script(entry_key))
        if value is None:
            return None
        parsed = _parse_entry(value)
        if parsed is None:
            return None
        self._learn(key, parsed[0])
        return parsed[2]

    def _get_script(self, entry_key: str) -> Any:
        try:
            return self._read("EVALSHA", self._get.sha, "1", entry_key, self._g)
        except NoScriptError:
            # A restarted or flushed server forgot the script: the pool's copy loads it.
            return self._get(keys=[entry_key], args=[self._g])

    def _learn(self, key: str, tags: tuple[str, ...]) -> None:
        if len(self._known) >= _KNOWN_LIMIT:
            self._known.clear()
        self._known[key] = tags

    def snapshot(self, tags: Sequence[str]) -> Snapshot | None:
        ordered = tuple(sorted(set(tags)))
        keys = self._gen_keys(ordered) + self._lease_keys(ordered)
        args: list[bytes | str | int] = [_fresh(), self._gen_ttl_ms, len(ordered)]
        gens = self._run("snapshot", lambda: self._snapshot(keys=keys, args=args))
        if gens is None:
            return None
        return Snapshot(ordered, tuple(int(g) for g in gens))

    def set(self, key: str, payload: bytes, ttl: float | None, snapshot: Snapshot) -> bool:
        header = b"".join(f"{t}\n{g}\n".encode() for t, g in zip(snapshot.tags, snapshot.gens))
        if len(header) > _MAX_HEADER:
            return False
        value = _ENTRY_MAGIC + len(header).to_bytes(2, "big") + header + payload
        ttl_ms = 0 if ttl is None else max(1, int(ttl * 1000))
        keys = [self._e + key, *self._gen_keys(snapshot.tags), *self._lease_keys(snapshot.tags)]
        args: list[bytes | str | int] = [value, ttl_ms, len(snapshot.tags), *snapshot.gens]
        stored = bool(self._run("set", lambda: self._set(keys=keys, args=args)))
        if stored:
            self._learn(key, snapshot.tags)
        return stored

    def delete(self, keys: Sequence[str]) -> None:
        if keys:
            self._run("delete", lambda: self.client.unlink(*[self._e + k for k in keys]))

    def _invalidate(self, what: str, script: Script, keys: list[str], args: list[Any]) -> None:
        """Run an invalidating script; with ``wait_replicas``, wait for the replicas in the
        same round trip (WAIT covers only the writes of its own connection)."""
        if not self.wait_replicas:
            self._run(what, lambda: script(keys=keys, args=args))
            return

        def run() -> int:
            # EVAL, not EVALSHA: a pipeline cannot fall back on NOSCRIPT; the server
            # still compiles each script body once.
            with self.client.pipeline(transaction=False) as pipe:
                pipe.eval(str(script.script), len(keys), *keys, *args)  # registered as str
                pipe.execute_command(  # type: ignore[no-untyped-call]
                    "WAIT", self.wait_replicas, self._wait_ms
                )
                return int(pipe.execute()[-1])

        acked = self._run(what, run)
        if acked < self.wait_replicas:
            now = time.monotonic()
            if now - self._unacked_warned > 60:
                self._unacked_warned = now
                logger.warning(
                    "ormcache: %s: %d of %d replicas acknowledged an invalidation within "
                    "%d ms; a failover now could lose it. Check the replicas, or lower "
                    "wait_replicas in the cache URL",
                    self.where,
                    acked,
                    self.wait_replicas,
                    self._wait_ms,
                )

    def bump(self, tags: Sequence[str]) -> None:
        if tags:
            self._invalidate("bump", self._bump, self._gen_keys(tags), [_fresh(), self._gen_ttl_ms])

    def acquire_lease(self, tags: Sequence[str], token: str, ttl: float) -> None:
        if not tags:
            return
        keys = self._gen_keys(tags) + self._lease_keys(tags)
        args: list[bytes | str | int] = [
            _fresh(),
            self._gen_ttl_ms,
            len(tags),
            token,
            max(1, int(ttl * 1000)),
        ]
        self._invalidate("lease", self._acquire, keys, args)

    def release_lease(self, tags: Sequence[str], token: str) -> None:
        if not tags:
            return
        keys = self._gen_keys(tags) + self._lease_keys(tags)
        args: list[bytes | str | int] = [_fresh(), self._gen_ttl_ms, len(tags), token]
        self._invalidate("release", self._release, keys, args)

    def lock(self, key: str, token: str, ttl: float) -> bool:
        ms = max(1, int(ttl * 1000))
        return bool(
            self._run("lock", lambda: self.client.set(self._k + key, token, nx=True, px=ms))
        )

    def unlock(self, key: str, token: str) -> None:
        self._run("unlock", lambda: self._unlock(keys=[self._k + key], args=[token]))

    def clear(self) -> None:
        """Delete this namespace's entries and generations in batches (SCAN + UNLINK,
        never FLUSHDB). Leases stay: a writer mid-commit must still block stores."""

        def run() -> None:
            batch: list[bytes] = []
            for prefix in (self._e, self._g):
                for key in self.client.scan_iter(match=f"{prefix}*", count=1000):
                    batch.append(key)
                    if len(batch) >= 1000:
                        self.client.unlink(*batch)
                        batch.clear()
            if batch:
                self.client.unlink(*batch)

        self._run("clear", run)

    def close(self) -> None:
        for conn in list(self._lane_conns):
            conn.disconnect()  # type: ignore[no-untyped-call]
        self.client.close()
