"""The Redis family: one server, Sentinel and Cluster, over one shared core.

* :mod:`.core` — the entry format, the Lua scripts (in ``lua/``), known tags, locks,
  clearing, the per-event-loop twins, and how a URL becomes a backend;
* :mod:`.errors` — redis-py's exceptions as ``BackendError``, from one table;
* :mod:`.urls` — parsing and checking the cache URLs;
* :mod:`.standalone` — :class:`RedisBackend`, each protocol step one Lua script;
* :mod:`.sentinel` — :class:`RedisSentinelBackend`, the same on the Sentinels' master,
  optionally waiting for replicas;
* :mod:`.cluster` — :class:`RedisClusterBackend`, per-tag scripts so that tags spread
  over slots.

Importing this package imports redis-py; :func:`ormcache.backends.create_backend`
imports it only for a Redis URL.
"""

from __future__ import annotations

from .cluster import RedisClusterBackend
from .sentinel import RedisSentinelBackend
from .standalone import RedisBackend
from .urls import SentinelTarget, parse_sentinel_url

__all__ = [
    "RedisBackend",
    "RedisClusterBackend",
    "RedisSentinelBackend",
    "SentinelTarget",
    "parse_sentinel_url",
]
