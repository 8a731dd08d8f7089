"""A conformance suite every backend must pass, shipped for third-party backends.

Subclass :class:`BackendContract` in a test module and provide two pytest fixtures:
``backend`` (a fresh backend in an unused namespace) and ``make_backend`` (a callable
returning another backend on the same namespace, as a second process would see it).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from .backends.base import Backend

__all__ = ["BackendContract"]

MakeBackend = Callable[[], Backend]


def _store(
    backend: Backend, key: str, payload: bytes, tags: list[str], ttl: float | None = 60
) -> bool:
    snap = backend.snapshot(tags)
    assert snap is not None
    return backend.set(key, payload, ttl, snap)


def _payload(backend: Backend, key: str) -> bytes | None:
    entry = backend.get(key)
    return None if entry is None else entry.payload


class BackendContract:
    """Each test states one guarantee of :mod:`ormcache.backends.base`."""

    def test_round_trip_exact_bytes(self, backend: Backend) -> None:
        """Payloads come back byte for byte, including empty and large ones."""
        for i, payload in enumerate([b"", b"\x00\xff" * 10, bytes(range(256)) * 4096]):
            assert _store(backend, f"k{i}", payload, ["*"])
            assert _payload(backend, f"k{i}") == payload

    def test_get_returns_what_it_checked(self, backend: Backend) -> None:
        """A hit carries the tags and generations it was checked against, exactly as the
        store's snapshot had them: the read path binds a signature to them."""
        snap = backend.snapshot(["*", "t:users"])
        assert snap is not None
        assert backend.set("k", b"v", 60, snap)
        entry = backend.get("k")
        assert entry is not None
        assert entry.payload == b"v"
        assert entry.tags == snap.tags
        assert tuple(int(g) for g in entry.gens) == snap.gens

    def test_missing_key_is_none(self, backend: Backend) -> None:
        assert backend.get("absent") is None

    def test_ttl_expiry(self, backend: Backend) -> None:
        assert _store(backend, "short", b"v", ["*"], ttl=0.05)
        time.sleep(0.15)
        assert backend.get("short") is None

    def test_delete(self, backend: Backend) -> None:
        _store(backend, "a", b"1", ["*"])
        _store(backend, "b", b"2", ["*"])
        backend.delete(["a"])
        assert backend.get("a") is None
        assert _payload(backend, "b") == b"2"

    def test_bump_invalidates_dependents_only(self, backend: Backend) -> None:
        """A bump of a tag invalidates exactly the entries that recorded it."""
        _store(backend, "users", b"u", ["*", "t:users"])
        _store(backend, "orders", b"o", ["*", "t:orders"])
        backend.bump(["t:users"])
        assert backend.get("users") is None
        assert _payload(backend, "orders") == b"o"

    def test_stale_snapshot_cannot_store(self, backend: Backend) -> None:
        """The compare-and-set: a value read before a bump is never stored as current."""
        snap = backend.snapshot(["t:users"])
        assert snap is not None
        backend.bump(["t:users"])
        assert not backend.set("k", b"old", 60, snap)
        assert backend.get("k") is None
        fresh = backend.snapshot(["t:users"])
        assert fresh is not None
        assert fresh.gens != snap.gens

    def test_lease_blocks_snapshots_and_stores_until_released(
        self, backend: Backend, make_backend: MakeBackend
    ) -> None:
        """While a writer holds a lease (another process), readers neither snapshot nor
        store its tags; the lease's bump also invalidated existing entries."""
        other = make_backend()
        _store(backend, "k", b"v", ["t:users"])
        snap = backend.snapshot(["t:users"])
        assert snap is not None
        other.acquire_lease(["t:users"], "writer-1", 5.0)
        assert backend.get("k") is None
        assert backend.snapshot(["t:users"]) is None
        assert not backend.set("k2", b"v", 60, snap)
        other.release_lease(["t:users"], "writer-1")
        assert backend.snapshot(["t:users"]) is not None
        assert _store(backend, "k3", b"v", ["t:users"])

    def test_lease_expires_on_its_own(self, backend: Backend) -> None:
        """A crashed writer never releases: stores resume once its lease expires."""
        backend.acquire_lease(["t:x"], "crashed", 0.1)
        assert backend.snapshot(["t:x"]) is None
        time.sleep(0.25)
        assert _store(backend, "k", b"v", ["t:x"])

    def test_two_leases_on_one_tag(self, backend: Backend) -> None:
        """Releasing one writer's lease leaves another writer's lease in force."""
        backend.acquire_lease(["t:x"], "w1", 5.0)
        backend.acquire_lease(["t:x"], "w2", 5.0)
        backend.release_lease(["t:x"], "w1")
        assert backend.snapshot(["t:x"]) is None
        backend.release_lease(["t:x"], "w2")
        assert backend.snapshot(["t:x"]) is not None

    def test_release_bumps(self, backend: Backend) -> None:
        """Reads that snapshotted during the lease window can never store afterwards."""
        backend.acquire_lease(["t:x"], "w", 5.0)
        backend.release_lease(["t:x"], "w")
        snap = backend.snapshot(["t:x"])
        assert snap is not None
        backend.bump(["t:x"])
        assert not backend.set("k", b"v", 60, snap)

    def test_zero_and_many_tags(self, backend: Backend) -> None:
        assert _store(backend, "none", b"v", [])
        assert _payload(backend, "none") == b"v"
        tags = [f"p:t:c:{i}" for i in range(100)]
        assert _store(backend, "many", b"v", tags)
        assert _payload(backend, "many") == b"v"
        backend.bump([tags[57]])
        assert backend.get("many") is None

    def test_tags_in_any_script(self, backend: Backend) -> None:
        """Tags name tables and columns, which may be in any script."""
        tags = ["t:café", "t:ユーザー", "p:t:naïve:0f"]
        assert _store(backend, "k", b"v", tags)
        assert _payload(backend, "k") == b"v"
        backend.bump(["t:ユーザー"])
        assert backend.get("k") is None

    def test_clear_empties_the_namespace(self, backend: Backend) -> None:
        _store(backend, "k", b"v", ["*"])
        backend.clear()
        assert backend.get("k") is None

    def test_concurrent_bumps_never_leave_stale_entries(self, backend: Backend) -> None:
        """Threads storing while others bump: after a final bump nothing stored is valid."""
        stop = threading.Event()
        errors: list[BaseException] = []

        def reader(n: int) -> None:
            try:
                i = 0
                while not stop.is_set():
                    snap = backend.snapshot(["t:hot"])
                    if snap is not None:
                        backend.set(f"r{n}-{i % 20}", b"v", 60, snap)
                    i += 1
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        def writer() -> None:
            try:
                while not stop.is_set():
                    backend.bump(["t:hot"])
            except BaseException as exc:  # pragma: no cover
                errors.append(exc)

        threads = [threading.Thread(target=reader, args=(n,)) for n in range(3)]
        threads.append(threading.Thread(target=writer))
        for t in threads:
            t.start()
        time.sleep(0.3)
        stop.set()
        for t in threads:
            t.join()
        assert not errors
        backend.bump(["t:hot"])
        assert all(backend.get(f"r{n}-{i}") is None for n in range(3) for i in range(20))

    def test_vanished_generation_never_resurrects(
        self, backend: Backend, make_backend: Any
    ) -> None:
        """After every generation is lost and bumped again, old entries stay misses."""
        assert _store(backend, "k", b"v", ["t:gone"])
        backend.clear()
        backend.bump(["t:gone"])
        assert backend.get("k") is None
