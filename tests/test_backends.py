"""The backend contract, on the embedded memory backend and on real Redis."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from ormcache.backends import create_backend
from ormcache.backends.memory import MemoryBackend
from ormcache.backends.redis import RedisBackend
from ormcache.errors import BackendError, ConfigurationError
from ormcache.testing import BackendContract


class TestMemoryBackend(BackendContract):
    @pytest.fixture
    def backend(self) -> MemoryBackend:
        return MemoryBackend("m")

    @pytest.fixture
    def make_backend(self, backend: MemoryBackend) -> Any:
        # One process: "another process" is the same in-memory store.
        return lambda: backend

    def test_evicted_generation_is_safe(self) -> None:
        """A generation evicted from the bounded LRU comes back fresh, never equal."""
        backend = MemoryBackend("m", max_tags=2)
        snap = backend.snapshot(["a"])
        assert snap is not None
        assert backend.set("k", b"v", 60, snap)
        backend.snapshot(["b", "c"])  # evicts "a"
        assert backend.get("k") is None


class TestRedisBackend(BackendContract):
    @pytest.fixture
    def backend(self, redis_url: str, namespace: str) -> Iterator[RedisBackend]:
        backend = RedisBackend.from_url(redis_url, namespace)
        yield backend
        backend.clear()
        for key in backend.client.scan_iter(f"{namespace}:*"):
            backend.client.delete(key)
        backend.close()

    @pytest.fixture
    def make_backend(self, redis_url: str, namespace: str) -> Iterator[Any]:
        made: list[RedisBackend] = []

        def make() -> RedisBackend:
            made.append(RedisBackend.from_url(redis_url, namespace))
            return made[-1]

        yield make
        for b in made:
            b.close()

    def test_incr_from_missing_does_not_resurrect(self, backend: RedisBackend) -> None:
        """Deleting a generation key and bumping must not land on a recorded value
        (INCR of a missing key gives 1, which an old entry could have recorded)."""
        backend.client.set(f"{backend.namespace}:g:t:x", 1)
        snap = backend.snapshot(["t:x"])
        assert snap is not None
        assert snap.gens == (1,)
        assert backend.set("k", b"v", 60, snap)
        backend.client.delete(f"{backend.namespace}:g:t:x")
        backend.bump(["t:x"])
        assert backend.get("k") is None

    def test_key_names_hold_no_payload(self, backend: RedisBackend) -> None:
        snap = backend.snapshot(["t:users"])
        assert snap is not None
        backend.set("m:f:abc", b"SECRET-PAYLOAD", 60, snap)
        names = [k.decode() for k in backend.client.scan_iter(f"{backend.namespace}:*")]
        assert names
        assert all("SECRET" not in n for n in names)
        assert all(n.startswith(f"{backend.namespace}:") for n in names)

    def test_garbage_entry_is_a_miss(self, backend: RedisBackend) -> None:
        for garbage in [b"", b"OCE1", b"OCE1\xff\xff", b"OCE1\x00\x05ab\nc", b"\x80\x04pickle"]:
            backend.client.set(f"{backend.namespace}:e:g", garbage)
            assert backend.get("g") is None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unreachable_redis_raises_backend_error_quickly() -> None:
    """Nothing listening: every call fails fast with a BackendError that says what to do."""
    backend = RedisBackend.from_url(f"redis://127.0.0.1:{_free_port()}/0", "x", connect_timeout=0.2)
    start = time.monotonic()
    for call in (
        lambda: backend.get("k"),
        lambda: backend.snapshot(["t"]),
        lambda: backend.bump(["t"]),
        lambda: backend.delete(["k"]),
    ):
        with pytest.raises(BackendError) as info:
            call()
        assert "ORMCACHE_URL" in str(info.value) or "Redis at" in str(info.value)
    assert time.monotonic() - start < 2.0


def test_create_backend_schemes() -> None:
    assert isinstance(create_backend("memory://", "n"), MemoryBackend)
    with pytest.raises(ConfigurationError, match="memory://"):
        create_backend("memcached://host", "n")
    with pytest.raises(ConfigurationError, match="not supported yet"):
        create_backend("redis+cluster://host", "n")
