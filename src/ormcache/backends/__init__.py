"""Backends by URL scheme, imported lazily so memory-only users never import redis."""

from __future__ import annotations

from typing import Any

from ormcache.errors import ConfigurationError

from .base import Backend, Entry, Snapshot, redact_url

__all__ = ["Backend", "Entry", "Snapshot", "create_backend"]

SCHEMES = ("memory://", "redis://", "rediss://", "redis+sentinel://", "redis+cluster://")

# Scheme -> class in ormcache.backends.redis, which imports redis-py.
_REDIS = {
    "redis": "RedisBackend",
    "rediss": "RedisBackend",
    "redis+sentinel": "RedisSentinelBackend",
    "redis+cluster": "RedisClusterBackend",
}


def create_backend(url: str, namespace: str, **options: Any) -> Backend:
    """The backend for ``url``; ``options`` go to its constructor (timeouts, sizes)."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme == "memory":
        from .memory import MemoryBackend

        return MemoryBackend(namespace, **options)
    if scheme in _REDIS:
        try:
            from . import redis
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ConfigurationError(
                f"{scheme}:// needs the redis client: pip install 'ormcache[redis]'"
            ) from exc
        backend: Backend = getattr(redis, _REDIS[scheme]).from_url(url, namespace, **options)
        return backend
    raise ConfigurationError(
        f"unsupported cache URL {redact_url(url)}: it must start with one of "
        f"{', '.join(SCHEMES)} (for example redis://127.0.0.1:6379/0)"
    )
