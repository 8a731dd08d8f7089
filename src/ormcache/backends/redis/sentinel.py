"""Redis behind Sentinel: the standalone protocol, on the master the Sentinels name.

Every command goes to the master, reads included: a replica lags, and a hit served from
one could be older than a commit that returned. What differs from a single server is
how to connect, and that invalidations can wait for replicas (``wait_replicas``).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis
from redis.commands.core import Script

from ormcache.errors import ConfigurationError

from .core import GENERATION_TTL, Endpoint, no_retry, timeouts
from .standalone import RedisBackend
from .urls import parse_sentinel_url

__all__ = ["RedisSentinelBackend"]

logger = logging.getLogger("ormcache")


class RedisSentinelBackend(RedisBackend):
    """:class:`RedisBackend` on the master of a Sentinel-monitored service.

    Replication is asynchronous: after a failover the promoted replica may lack the last
    bumps, which would make entries valid again that a commit invalidated. With
    ``wait_replicas``, every invalidation waits (``WAIT``, at most ``wait_timeout``
    seconds) until that many replicas have it, before COMMIT and before ``commit()``
    returns; a replica that does not acknowledge in time is logged, at most once a
    minute.
    """

    def __init__(
        self,
        client: redis.Redis,
        namespace: str,
        *,
        generation_ttl: float = GENERATION_TTL,
        where: str = "Redis (Sentinel)",
        wait_replicas: int = 0,
        wait_timeout: float = 0.1,
    ) -> None:
        super().__init__(client, namespace, generation_ttl=generation_ttl, where=where)
        self.wait_replicas = wait_replicas
        self._wait_ms = max(1, int(wait_timeout * 1000))
        self._unacked_warned = 0.0

    @classmethod
    def endpoint(
        cls, url: str, socket_timeout: float, connect_timeout: float, options: dict[str, Any]
    ) -> Endpoint:
        """``redis+sentinel://`` (see :func:`~.urls.parse_sentinel_url`)."""
        target = parse_sentinel_url(url)
        if target.wait_replicas and target.wait_timeout >= socket_timeout:
            raise ConfigurationError(
                f"wait_timeout ({target.wait_timeout} s) must be below socket_timeout "
                f"({socket_timeout} s), or the reply to WAIT times out first; lower it in "
                "the cache URL or raise socket_timeout"
            )
        limits = timeouts(socket_timeout, connect_timeout)
        sentinel_kwargs: dict[str, Any] = dict(limits)
        if target.sentinel_password:
            sentinel_kwargs["password"] = target.sentinel_password

        def connect(aio: bool) -> Any:
            sentinel_class: Any
            if aio:
                from redis.asyncio.sentinel import Sentinel as sentinel_class
            else:
                from redis.sentinel import Sentinel as sentinel_class
            sentinel = sentinel_class(target.hosts, sentinel_kwargs=sentinel_kwargs, **limits)
            client = sentinel.master_for(
                target.service,
                db=target.db,
                username=target.username,
                password=target.password,
                retry=no_retry(aio=aio),
                **limits,
                **options,
            )
            if not aio:
                return client
            from ormcache.aio import AwaitingRedis

            return AwaitingRedis(client)

        hosts = ",".join(f"{h}:{p}" for h, p in target.hosts)
        return Endpoint(
            where=f"Redis master {target.service!r} (Sentinel at {hosts})",
            connect=connect,
            options={"wait_replicas": target.wait_replicas, "wait_timeout": target.wait_timeout},
        )

    _tracks_master = True

    def _invalidate(self, what: str, script: Script, keys: list[str], args: list[Any]) -> None:
        """The script, then ``WAIT`` in the same round trip: WAIT covers only the writes
        of its own connection, so both go down one pipeline."""
        if not self.wait_replicas:
            super()._invalidate(what, script, keys, args)
            return

        def run() -> int:
            # EVAL, not EVALSHA: a pipeline cannot fall back on NOSCRIPT; the server
            # still compiles each script body once.
            with self.client.pipeline(transaction=False) as pipe:
                pipe.eval(str(script.script), len(keys), *keys, *args)  # registered as str
                pipe.execute_command("WAIT", self.wait_replicas, self._wait_ms)
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
