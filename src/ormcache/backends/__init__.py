"""Backends by URL scheme, imported lazily so memory-only users never import redis."""

from __future__ import annotations

from typing import Any

from ormcache.errors import ConfigurationError

from .base import Backend, Snapshot

__all__ = ["Backend", "Snapshot", "create_backend"]

SCHEMES = ("memory://", "redis://", "rediss://", "redis+sentinel://", "redis+cluster://")


def create_backend(url: str, namespace: str, **options: Any) -> Backend:
    """The backend for ``url``; ``options`` go to its constructor (timeouts, sizes)."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme == "memory":
        from .memory import MemoryBackend

        return MemoryBackend(namespace, **options)
    if scheme in ("redis", "rediss", "redis+sentinel", "redis+cluster"):
        try:
            from .redis import RedisBackend
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ConfigurationError(
                f"{scheme}:// needs the redis client: pip install 'ormcache[redis]'"
            ) from exc
        if scheme == "redis+cluster":
            from .redis_cluster import RedisClusterBackend

            return RedisClusterBackend.from_url(url, namespace, **options)
        return RedisBackend.from_url(url, namespace, **options)
    raise ConfigurationError(
        f"unsupported cache URL scheme {scheme or url!r}; use one of {', '.join(SCHEMES)}"
    )
