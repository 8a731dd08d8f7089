"""Bounded resources and a hung Redis (issue 12): debts stay small and are paid in one
bounded bump, and a commit never waits on a frozen Redis more than once. Every server
here is a private redis-server process of this module's own."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import create_engine, select, update
from sqlalchemy.orm import sessionmaker

from ormcache import Cache
from ormcache.protocol import MAX_TAGS, NAMESPACE_TAG, collapse_tags
from tests.fault_workers import lookup_fn
from tests.models import Base, User, key_hash, seed
from tests.redis_procs import PrivateRedis

TIMEOUT = 0.25


@pytest.fixture
def server(tmp_path: Any) -> Iterator[PrivateRedis]:
    proc = PrivateRedis(str(tmp_path / "redis"))
    proc.start()
    yield proc
    if proc.proc is not None:
        os.kill(proc.proc.pid, signal.SIGCONT)
    proc.kill()


@pytest.fixture
def Session(tmp_path: Any) -> Iterator[Any]:
    engine = create_engine(f"sqlite:///{tmp_path}/resources.sqlite")
    Base.metadata.create_all(engine)
    factory = sessionmaker(engine, expire_on_commit=False)
    seed(factory, n=3)
    yield factory
    engine.dispose()


def signal_redis(server: PrivateRedis, sig: signal.Signals) -> None:
    assert server.proc is not None
    os.kill(server.proc.pid, sig)


def test_collapse_keeps_what_every_entry_records() -> None:
    """Past the bound, partitions become their table's ``t:`` and ``a:`` tags (what
    every read of the table records), then the namespace; never just fewer tags."""
    small = ["t:users", "p:users:id:1"]
    assert collapse_tags(small) == sorted(small)
    many = [f"p:users:id:{i}" for i in range(5000)] + ["t:orders"]
    assert collapse_tags(many) == ["a:users", "t:orders", "t:users"]
    tables = [f"p:t{i}:id:1" for i in range(MAX_TAGS + 1)]
    assert collapse_tags(tables) == [NAMESPACE_TAG]
    assert collapse_tags([*many, NAMESPACE_TAG]) == [NAMESPACE_TAG]


def test_a_huge_debt_is_collapsed_and_paid_in_one_bounded_bump(
    server: PrivateRedis, Session: Any
) -> None:
    """Issue 12: 100k rows written during an outage left 200k owed tags; paying them was
    one script longer than the socket timeout, so the debt was never paid and the writer
    served no hits again. The debt is now bounded, and still invalidates what it must."""
    cache = Cache(
        server.url,
        namespace=f"debt-{uuid.uuid4().hex[:8]}",
        socket_timeout=TIMEOUT,
        breaker_cooldown=0.2,
    )
    cache.attach(Session)
    name_of = lookup_fn(cache, Session)
    assert name_of("key-0-secret") == "user0"
    assert name_of("key-0-secret") == "user0"
    hits = cache.stats().hits
    assert hits >= 1

    signal_redis(server, signal.SIGSTOP)
    try:
        with Session() as s:
            s.execute(update(User).where(User.id == 1).values(name="renamed"))
            s.commit()
        # A big write during the outage: thousands of partitions owed.
        with Session() as s:
            for i in range(4000):
                s.add(
                    User(
                        id=100 + i,
                        name=f"bulk{i}",
                        email=f"bulk{i}@example.com",
                        api_key_hash=key_hash(f"bulk-{i}"),
                        created_at=s.get(User, 1).created_at,  # type: ignore[union-attr]
                    )
                )
            s.commit()
        owed = cache._core.guard.owed_tags()
        assert 0 < len(owed) <= MAX_TAGS, f"{len(owed)} tags owed"
    finally:
        signal_redis(server, signal.SIGCONT)
    time.sleep(0.3)  # the breaker's cooldown
    started = time.perf_counter()
    assert name_of("key-0-secret") == "renamed"  # the collapsed bump invalidated it
    assert time.perf_counter() - started < TIMEOUT
    assert cache._core.guard.owed_tags() == []
    assert name_of("key-0-secret") == "renamed"
    assert cache.stats().hits > hits, "the writer serves hits again"
    cache.detach(Session)
    cache.close()


def test_a_commit_stops_waiting_on_a_frozen_redis_once_the_breaker_opens(
    server: PrivateRedis, Session: Any
) -> None:
    """Issue 12: with Redis frozen (SIGSTOP) every commit waited two socket timeouts
    (lease, then release), and still did after the breaker opened. Until the breaker
    opens a commit still tries its release after a lease that timed out (a busy Redis
    may run that lease after COMMIT; only the release undoes what others stored
    meanwhile), so it waits at most twice; with the breaker open a commit does not
    wait on Redis at all: its bumps are owed and paid when Redis is back."""
    cache = Cache(
        server.url,
        namespace=f"frozen-{uuid.uuid4().hex[:8]}",
        socket_timeout=TIMEOUT,
        breaker_threshold=3,
        breaker_cooldown=30,
    )
    cache.attach(Session)
    name_of = lookup_fn(cache, Session)
    assert name_of("key-1-secret") == "user1"

    signal_redis(server, signal.SIGSTOP)
    durations = []
    try:
        for i in range(6):
            started = time.perf_counter()
            with Session() as s:
                s.execute(update(User).where(User.id == 2).values(name=f"n{i}"))
                s.commit()
            durations.append(time.perf_counter() - started)
    finally:
        signal_redis(server, signal.SIGCONT)
    assert max(durations) < TIMEOUT * 2.6, f"commit durations: {durations}"
    assert max(durations[2:]) < TIMEOUT / 2, f"the breaker is open: {durations}"
    cache._core.guard.breaker.success()  # skip the 30 s cooldown: Redis is back
    assert name_of("key-1-secret") == "n5"
    cache.detach(Session)
    cache.close()


def test_stale_refreshes_run_on_a_bounded_pool(server: PrivateRedis) -> None:
    """Issue 12: ``stale_ttl`` started one thread per stale key (2000 stale hits made
    2001 threads). Refreshes now run on a small pool, and stale values are still served
    at once and refreshed."""
    from ormcache.readpath import REFRESH_WORKERS

    cache = Cache(server.url, namespace=f"stale-{uuid.uuid4().hex[:8]}")
    version = {"n": 0}

    @cache.memoize(ttl=0.3, stale_ttl=60)
    def slow(i: int) -> tuple[int, int]:
        time.sleep(0.02)
        return i, version["n"]

    n = 300
    assert [slow(i) for i in range(n)] == [(i, 0) for i in range(n)]
    version["n"] = 1
    time.sleep(0.4)
    before = threading.active_count()
    peak = before
    for i in range(n):
        assert slow(i)[0] == i
        peak = max(peak, threading.active_count())
    assert cache.stats().stale_hits >= n // 2
    assert peak <= before + REFRESH_WORKERS, f"{peak - before} threads started"
    deadline = time.monotonic() + 20
    while slow(0) != (0, 1) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert slow(0) == (0, 1), "the stale entry was refreshed"
    cache.close()


def test_the_memory_backend_is_bounded_in_bytes() -> None:
    """Issue 12: ``max_entries`` counted entries, not bytes: 3000 values of 100 KB grew
    the process by 288 MB. ``max_bytes`` bounds the payloads held; the most recently
    used entries stay and are served."""
    import tracemalloc

    limit = 8 * 2**20
    cache = Cache(namespace=f"bytes-{uuid.uuid4().hex[:8]}", max_bytes=limit)

    @cache.memoize(ttl=600)
    def blob(i: int) -> bytes:
        return bytes([i % 256]) * 100_000

    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for i in range(1500):
            assert blob(i)[0] == i % 256
        grown = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert grown < 2 * limit, f"grew by {grown / 2**20:.0f} MiB for a {limit / 2**20:.0f} MiB bound"
    hits = cache.stats().hits
    assert blob(1499)[0] == 1499 % 256
    assert cache.stats().hits == hits + 1
    cache.close()


def test_the_memory_bound_counts_tags_not_only_payloads() -> None:
    """A memoized call that read 300 rows carries 300 row tags and generations and a
    payload of a few bytes: counting payloads alone let a 1 MB bound hold 83 MB (found
    by review). Everything an entry keeps counts."""
    import tracemalloc

    from ormcache.backends.memory import MemoryBackend

    limit = 1_000_000
    backend = MemoryBackend("tags", max_bytes=limit)
    tags = [f"r:users:{i:06d}" for i in range(300)]
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for i in range(3000):
            snapshot = backend.snapshot(tags)
            assert snapshot is not None
            assert backend.set(f"k{i}", b"x" * 27, None, snapshot)
        grown = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert grown < 2 * limit, f"grew by {grown / 2**20:.1f} MiB for a 1 MB bound"
    assert backend.get("k2999") is not None, "the newest entry stays"


def test_generation_keys_live_about_as_long_as_their_entries(
    server: PrivateRedis, Session: Any
) -> None:
    """Issue 12: a generation key per distinct lookup lived 24 h while its entry lived
    30 s (3000 random bearer tokens left 3000 keys, about 5 GB a day at the service's
    rate). A store now makes its generations outlive the entry by ``generation_ttl``,
    a new generation lives ``generation_ttl``, and the namespace generation, extended
    by every store, never expires under a cache in use."""
    namespace = f"gens-{uuid.uuid4().hex[:8]}"
    cache = Cache(server.url, namespace=namespace, generation_ttl=1.0)
    cache.attach(Session)
    client = server.client()
    Session_ = Session

    @cache.memoize(ttl=1.0)
    def lookup(token: str) -> str | None:
        with Session_() as s:
            user = s.get(User, 1)
            assert user is not None
            return None if token != "key-0-secret" else user.name

    @cache.memoize(ttl=60)
    def long_lived(token: str) -> int:
        with Session_() as s:
            return len(s.scalars(select(User).where(User.api_key_hash == key_hash(token))).all())

    assert long_lived("key-0-secret") == 1
    for i in range(200):
        lookup(f"random-{i}")
        long_lived(f"random-{i}")
    gens = list(client.scan_iter(match=f"{namespace}:g:*", count=1000))
    assert len(gens) > 200
    ttls = [client.pttl(name) for name in gens]
    # At most the entry's TTL plus two generation TTLs (an extension's margin).
    assert all(0 < ms <= 62_000 for ms in ttls), sorted(ttls)[-3:]
    time.sleep(2.5)  # past the short entries and their generations' margin
    hits = cache.stats().hits
    assert long_lived("key-0-secret") == 1  # its generations were kept for it
    assert cache.stats().hits == hits + 1
    cache.detach(Session)
    cache.close()
