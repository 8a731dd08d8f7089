"""Redis (or Valkey) on one server: each protocol step is one Lua script.

Generations are ``{ns}:g:{tag}``, leases ``{ns}:l:{tag}`` (see :mod:`.core` for the rest
of the layout). All keys live on one server, so one script can check an entry against
all its generations, or compare-and-set a store against all of them, atomically: a hit
costs one round trip.
"""

from __future__ import annotations

import contextlib
import os
import threading
import weakref
from collections.abc import Sequence
from typing import Any

import redis
from redis.commands.core import Script
from redis.connection import AbstractConnection
from redis.exceptions import NoScriptError, ResponseError

from ormcache.backends.base import UNREADABLE, Entry, Snapshot, redact_url
from ormcache.errors import ConfigurationError

from .core import (
    ACQUIRE,
    BOOT,
    BUMP,
    GENERATION_TTL,
    RELEASE,
    SNAPSHOT,
    Endpoint,
    RedisCore,
    check_boot_on_connect,
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
)
from .tracking import Listener, TrackingChannel
from .urls import standalone_where

__all__ = ["RedisBackend"]

GET = lua("get")
SET = lua("gen", "leased", "set")


class _Lane(threading.local):
    """This thread's own connection for cache reads (see ``RedisBackend._read``)."""

    conn: AbstractConnection | None = None
    pid = 0


class RedisBackend(RedisCore):
    """One Redis connection pool, plus one read connection per thread; every method is
    one round trip."""

    def __init__(
        self,
        client: redis.Redis,
        namespace: str,
        *,
        generation_ttl: float = GENERATION_TTL,
        where: str = "Redis",
    ) -> None:
        super().__init__(client, namespace, generation_ttl=generation_ttl, where=where)
        self._g = f"{namespace}:g:"
        self._l = f"{namespace}:l:"
        # Never set: a read writes to it (PEXPIRE, a no-op) so that it fails while the
        # server refuses writes, and invalidations with them (see get.lua).
        self._w = f"{namespace}:w"
        # "*": the namespace tag (ormcache.protocol.NAMESPACE_TAG), which every entry records.
        self._boot_keys = (f"{namespace}:boot", self._g + "*")
        check_boot_on_connect(client, *self._boot_keys, self._gen_ttl_ms)
        self._get = client.register_script(GET)
        self._snapshot = client.register_script(SNAPSHOT)
        self._set = client.register_script(SET)
        self._bump = client.register_script(BUMP)
        self._acquire = client.register_script(ACQUIRE)
        self._release = client.register_script(RELEASE)
        self._lane = _Lane()
        self._lane_conns: weakref.WeakSet[AbstractConnection] = weakref.WeakSet()
        # Own read connections only beside a plain pool: a Sentinel or other managed pool
        # decides where connections go, so reads must go through it.
        self._own_reads = type(client.connection_pool) in (
            redis.ConnectionPool,
            redis.BlockingConnectionPool,
        )

    @classmethod
    def endpoint(
        cls, url: str, socket_timeout: float, connect_timeout: float, options: dict[str, Any]
    ) -> Endpoint:
        """``redis://`` or ``rediss://``, handed to redis-py's ``from_url``."""
        if url[:6].lower() == "redis+":
            raise ConfigurationError(
                f"{redact_url(url)!r} is not a redis:// or rediss:// URL; "
                "create_backend() picks the backend for redis+sentinel:// and "
                "redis+cluster://"
            )
        where = standalone_where(url)

        def connect(aio: bool) -> Any:
            settings = {**timeouts(socket_timeout, connect_timeout), **options}
            if not aio:
                return redis.Redis.from_url(url, retry=no_retry(aio=False), **settings)
            from redis.asyncio import Redis as AsyncRedis

            from ormcache.aio import AwaitingRedis

            return AwaitingRedis(AsyncRedis.from_url(url, retry=no_retry(aio=True), **settings))

        return Endpoint(where, connect)

    # -- plumbing ---------------------------------------------------------------------
    def _read(self, *args: str | bytes, probe: bool = True) -> Any:
        """One command on this thread's own connection, made like the pool's, after the
        write probe in the same round trip (``probe``; the get script probes itself):
        nothing is read while the server refuses writes (see get.lua).

        Hits are the hot path, and on a pooled client about a third of a GET's time goes
        to checking a connection out and back in (a lock, a readiness poll, metrics). A
        connection per thread needs none of that. redis-py's connection still applies the
        timeouts and drops the socket after any error, so the next call reconnects.
        """
        if not self._own_reads:
            if not probe:
                return self.client.execute_command(*args)
            with self.client.pipeline(transaction=False) as pipe:
                pipe.execute_command("PEXPIRE", self._w, 1)
                pipe.execute_command(*args)
                return pipe.execute()[1]
        lane = self._lane
        conn = lane.conn
        pid = os.getpid()
        if conn is None or lane.pid != pid:
            # A forked child must not share its parent's socket: make its own.
            pool = self.client.connection_pool
            conn = pool.connection_class(**pool.connection_kwargs)
            lane.conn, lane.pid = conn, pid
            self._lane_conns.add(conn)
        if not probe:
            conn.send_command(*args)
            return conn.read_response()
        conn.send_packed_command(conn.pack_commands([("PEXPIRE", self._w, 1), args]))
        try:
            conn.read_response()
        except ResponseError:
            # Refused: writes are (see get.lua). Read the command's reply too, so the
            # connection stays in step, then fail the read.
            with contextlib.suppress(ResponseError):
                conn.read_response()
            raise
        return conn.read_response()

    def _gen_keys(self, tags: Sequence[str]) -> list[str]:
        return [self._g + check_tag(t) for t in tags]

    def _lease_keys(self, tags: Sequence[str]) -> list[str]:
        return [self._l + t for t in tags]

    def _clear_patterns(self) -> Sequence[str]:
        return (f"{self._e}*", f"{self._g}*")

    def notices_restarts(self) -> bool:
        """Whether the restart check (``boot.lua``, run on every new connection) can
        work here: False if the server refuses it ``INFO`` (an ACL user without it)."""
        args = [*self._boot_keys, fresh_generation(), self._gen_ttl_ms]
        answer: int = self._run("boot", lambda: self.client.eval(BOOT, 2, *args))
        return answer != -1

    # -- near cache -------------------------------------------------------------------
    def gen_name(self, tag: str) -> str:
        """The generation key of ``tag`` (what a tracking push names)."""
        return self._g + tag

    def tracking_channel(self, listener: Listener, **options: Any) -> TrackingChannel:
        """The push channel a near cache in front of this backend listens to: every
        generation and entry key of the namespace, on the server this client uses."""
        pool = self.client.connection_pool

        def connect() -> Any:
            return pool.connection_class(**{**pool.connection_kwargs, "protocol": 3})

        return TrackingChannel(
            connect,
            (self._g, self._e),
            listener,
            where=self.where,
            check_role=self._tracks_master,
            write_probe=self._w,
            **options,
        )

    #: Whether the channel must check that its server is still the master (Sentinel).
    _tracks_master = False

    # -- Backend ----------------------------------------------------------------------
    def get(self, key: str) -> Entry | None:
        """One round trip either way: a plain MGET of the entry and its generations when
        this process already knows the entry's tags, else the Lua script (which then
        teaches us the tags). MGET is atomic, so both read one consistent state."""
        entry_key = self._e + key
        known = self._known.get(key)
        if known is not None:
            names = [entry_key, *(self._g + t for t in known)]
            values = self._run("get", lambda: self._read("MGET", *names))
            parsed = parse_entry(values[0])
            if parsed is None:
                return unframed(values[0])
            if parsed.tags == known:
                return parsed if is_current(parsed.gens, values[1:]) else None
            # The entry was rewritten with other tags: learn them through the script.
        value = self._run("get", lambda: self._get_script(entry_key))
        if value is None:
            return None
        if value == 0:  # the key holds no entry (see get.lua)
            return UNREADABLE
        parsed = parse_entry(value)
        if parsed is None:
            return unframed(value)
        self._known.learn(key, parsed.tags)
        return parsed

    def _get_script(self, entry_key: str) -> Any:
        try:
            return self._read(
                "EVALSHA", self._get.sha, "2", entry_key, self._w, self._g, probe=False
            )
        except NoScriptError:
            # A restarted or flushed server forgot the script: the pool's copy loads it.
            return self._get(keys=[entry_key, self._w], args=[self._g])

    def snapshot(self, tags: Sequence[str]) -> Snapshot | None:
        ordered = tuple(sorted(set(tags)))
        keys = self._gen_keys(ordered) + self._lease_keys(ordered)
        args: list[bytes | str | int] = [fresh_generation(), self._gen_ttl_ms, len(ordered)]

        def run() -> Snapshot | None:
            gens = self._snapshot(keys=keys, args=args)
            # Parsed inside the error handling, though the script returns usable ones.
            return None if gens is None else Snapshot(ordered, tuple(int(g) for g in gens))

        return self._run("snapshot", run)

    def set(self, key: str, payload: bytes, ttl: float | None, snapshot: Snapshot) -> bool:
        value = frame_entry(snapshot, payload)
        if value is None:
            return False
        ttl_ms = 0 if ttl is None else max(1, int(ttl * 1000))
        keys = [self._e + key, *self._gen_keys(snapshot.tags), *self._lease_keys(snapshot.tags)]
        keep = keep_ms(ttl, self._gen_ttl)
        args: list[bytes | str | int] = [value, ttl_ms, len(snapshot.tags), keep, *snapshot.gens]
        stored = bool(self._run("set", lambda: self._set(keys=keys, args=args)))
        if stored:
            self._known.learn(key, snapshot.tags)
        return stored

    def delete(self, keys: Sequence[str]) -> None:
        if keys:
            self._run("delete", lambda: self.client.unlink(*[self._e + k for k in keys]))

    def _invalidate(self, what: str, script: Script, keys: list[str], args: list[Any]) -> None:
        """Run a script that bumps generations (a variant may wait for replicas too)."""
        self._run(what, lambda: script(keys=keys, args=args))

    def bump(self, tags: Sequence[str]) -> None:
        if tags:
            args = [fresh_generation(), self._gen_ttl_ms]
            self._invalidate("bump", self._bump, self._gen_keys(tags), args)

    def acquire_lease(self, tags: Sequence[str], token: str, ttl: float) -> None:
        if not tags:
            return
        keys = self._gen_keys(tags) + self._lease_keys(tags)
        lease_ms = max(1, int(ttl * 1000))
        args = [fresh_generation(), self._gen_ttl_ms, len(tags), token, lease_ms]
        self._invalidate("lease", self._acquire, keys, args)

    def release_lease(self, tags: Sequence[str], token: str) -> None:
        if not tags:
            return
        keys = self._gen_keys(tags) + self._lease_keys(tags)
        args = [fresh_generation(), self._gen_ttl_ms, len(tags), token]
        self._invalidate("release", self._release, keys, args)

    def close(self) -> None:
        for conn in list(self._lane_conns):
            conn.disconnect()  # type: ignore[no-untyped-call]
        self.client.close()
