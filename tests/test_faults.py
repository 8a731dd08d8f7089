"""The cache never takes the app down: real Redis processes killed, hung, flushed and
restarted under load; and stampedes (README "Failure modes")."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from sqlalchemy import create_engine, select
from sqlalchemy.orm import sessionmaker

from ormcache import Cache
from tests import stampede_workers
from tests.fault_workers import lookup_fn
from tests.models import User, key_hash, seed
from tests.redis_procs import PrivateRedis

TIMEOUT = 0.2


@pytest.fixture
def private_redis(tmp_path: Any) -> Iterator[PrivateRedis]:
    server = PrivateRedis(str(tmp_path))
    server.start()
    yield server
    server.kill()


def test_killed_and_restarted_redis_costs_no_failed_call(
    private_redis: PrivateRedis, sqlite_engine: Any
) -> None:
    """Threads serve through a Redis that is killed, then restarted: 0 failed calls,
    correct data, every call bounded, and caching resumes by itself."""
    Session = sessionmaker(sqlite_engine, expire_on_commit=False)
    keys = seed(Session, n=5)
    cache = Cache(
        private_redis.url,
        namespace="faults",
        socket_timeout=TIMEOUT,
        connect_timeout=TIMEOUT,
        breaker_cooldown=0.3,
    )
    cache.attach(Session)
    name_of = lookup_fn(cache, Session)
    failures: list[BaseException] = []
    wrong: list[object] = []
    slowest = [0.0]
    stop = threading.Event()
    lock = threading.Lock()

    def worker(n: int) -> None:
        i = n
        while not stop.is_set():
            key = keys[i % len(keys)]
            start = time.perf_counter()
            try:
                got = name_of(key)
            except BaseException as exc:
                failures.append(exc)
                continue
            took = time.perf_counter() - start
            with lock:
                slowest[0] = max(slowest[0], took)
            if got != f"user{keys.index(key)}":
                wrong.append(got)
            i += 1

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    private_redis.kill()
    time.sleep(1.0)
    errors_while_down = cache.stats().errors
    private_redis.start()
    deadline = time.monotonic() + 5
    hits_after_restart = cache.stats().hits
    while time.monotonic() < deadline and cache.stats().hits <= hits_after_restart + 20:
        time.sleep(0.1)
    stop.set()
    for t in threads:
        t.join()
    assert failures == []
    assert wrong == []
    assert errors_while_down > 0
    assert cache.stats().hits > hits_after_restart + 20, "caching did not resume"
    # Connection refused is immediate; the bound is one timeout plus the query itself.
    assert slowest[0] < TIMEOUT + 0.5, slowest[0]
    cache.close()


def test_hanging_redis_adds_at_most_one_timeout_per_call(
    private_redis: PrivateRedis, sqlite_engine: Any
) -> None:
    """A Redis that stops answering (SIGSTOP: connections stay open, nothing replies)
    delays a call by at most the socket timeout, and the breaker then skips it."""
    Session = sessionmaker(sqlite_engine, expire_on_commit=False)
    keys = seed(Session, n=3)
    cache = Cache(
        private_redis.url,
        namespace="hang",
        socket_timeout=TIMEOUT,
        connect_timeout=TIMEOUT,
        breaker_cooldown=5,
    )
    cache.attach(Session)
    name_of = lookup_fn(cache, Session)
    assert name_of(keys[0]) == "user0"
    assert private_redis.proc is not None
    os.kill(private_redis.proc.pid, signal.SIGSTOP)
    durations = []
    try:
        for i in range(12):
            start = time.perf_counter()
            assert name_of(keys[i % 3]) == f"user{i % 3}"
            durations.append(time.perf_counter() - start)
    finally:
        os.kill(private_redis.proc.pid, signal.SIGCONT)
    assert max(durations) < TIMEOUT + 0.3, durations
    assert sum(d > TIMEOUT / 2 for d in durations) <= 3  # then the breaker is open
    assert cache.bypassing
    cache.close()


def test_flush_and_restart_never_make_old_entries_valid(
    private_redis: PrivateRedis, sqlite_engine: Any
) -> None:
    """After FLUSHALL or a restart, nothing cached before comes back as a valid hit, and
    a commit made while the cache was empty is seen."""
    Session = sessionmaker(sqlite_engine, expire_on_commit=False)
    keys = seed(Session, n=2)
    cache = Cache(private_redis.url, namespace="flush", socket_timeout=TIMEOUT)
    cache.attach(Session)
    name_of = lookup_fn(cache, Session)
    assert name_of(keys[0]) == name_of(keys[0]) == "user0"
    hits = cache.stats().hits
    client = redis.Redis(port=private_redis.port)
    client.flushall()
    assert name_of(keys[0]) == "user0"
    assert cache.stats().hits == hits  # a miss
    with Session() as s:
        s.get(User, 1).name = "renamed"  # type: ignore[union-attr]
        s.commit()
    assert name_of(keys[0]) == "renamed"
    private_redis.kill()
    private_redis.start()
    assert name_of(keys[0]) == "renamed"
    assert name_of(keys[0]) == "renamed"
    client.close()
    cache.close()


@pytest.mark.slow
@pytest.mark.parametrize("lock", [True, False])
def test_stampede_of_50_callers_in_4_processes(redis_url: str, lock: bool) -> None:
    """50 concurrent callers (4 processes x 12-13 threads) miss one cold key whose
    computation takes 200 ms: with locking on, it is computed exactly once."""
    ctx = mp.get_context("spawn")
    namespace = f"stampede-{uuid.uuid4().hex[:8]}"
    computations = ctx.Value("i", 0)
    go = ctx.Event()
    results = ctx.Queue()
    sizes = [13, 13, 12, 12]
    procs = [
        ctx.Process(
            target=stampede_workers.run,
            args=(redis_url, namespace, lock, n, computations, go, results),
        )
        for n in sizes
    ]
    for p in procs:
        p.start()
    time.sleep(3.0)  # let every process import and start its threads
    go.set()
    answered = sum(results.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    print(f"\nstampede, lock={lock}: {computations.value} computations for 50 callers")
    assert answered == 50
    if lock:
        assert computations.value == 1
    else:
        assert computations.value > 1
    Cache(redis_url, namespace=namespace).clear()


def test_stale_while_revalidate_serves_expired_but_never_invalidated_values(
    cache: Cache, sqlite_engine: Any
) -> None:
    """Past its TTL an entry is served at once while one background refresh runs; an
    entry a commit invalidated is never served stale."""
    Session = sessionmaker(sqlite_engine, expire_on_commit=False)
    keys = seed(Session, n=1)
    cache.attach(Session)
    calls = {"n": 0}

    @cache.memoize(ttl=0.3, stale_ttl=30)
    def slow_name(api_key: str) -> str:
        calls["n"] += 1
        time.sleep(0.2)
        with Session() as s:
            user = s.scalars(select(User).where(User.api_key_hash == key_hash(api_key))).one()
            return f"{user.name}#{calls['n']}"

    assert slow_name(keys[0]) == "user0#1"
    time.sleep(0.4)
    start = time.perf_counter()
    assert slow_name(keys[0]) == "user0#1"  # stale, served without waiting
    assert time.perf_counter() - start < 0.15
    assert cache.stats().stale_hits == 1
    deadline = time.monotonic() + 3
    while slow_name(keys[0]) != "user0#2" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert slow_name(keys[0]) == "user0#2"
    with Session() as s:
        s.get(User, 1).name = "renamed"  # type: ignore[union-attr]
        s.commit()
    assert slow_name(keys[0]).startswith("renamed#")  # invalidated: recomputed, not stale


def test_early_refresh_recomputes_before_expiry(
    cache: Cache, monkeypatch: pytest.MonkeyPatch
) -> None:
    """XFetch: with a large beta and a slow computation, a hit shortly before expiry
    becomes a recomputation for that caller, and a draw that puts the refresh past
    expiry serves the hit. The draw is pinned: XFetch is random by design, and an
    unpinned draw made this test fail about one run in 25."""
    import ormcache.readpath

    draws = iter([0.5, 0.999999])  # gaps of 0.69 and 1e-6 times took * beta
    monkeypatch.setattr(ormcache.readpath.random, "random", lambda: next(draws))
    calls = {"n": 0}

    @cache.memoize(ttl=2.0, early_refresh=1000.0)
    def slow() -> int:
        calls["n"] += 1
        time.sleep(0.05)
        return calls["n"]

    assert slow() == 1
    assert slow() == 2  # gap 0.05 * 1000 * 0.69 = 35 s, well past the 2 s expiry
    assert cache.stats().early_refreshes == 1
    assert slow() == 2  # gap ~0.05 ms: served
    assert cache.stats().early_refreshes == 1


def test_old_codec_version_is_a_miss(cache: Cache) -> None:
    """A payload from another codec version is deleted and recomputed, never decoded."""
    calls = {"n": 0}

    @cache.memoize
    def f() -> int:
        calls["n"] += 1
        return calls["n"]

    assert f() == 1
    key = f.cache_key()
    snap = cache.backend.snapshot(["*"])
    assert snap is not None
    entry = cache.backend.get(key)
    assert entry is not None
    good = entry.payload
    old = good[:17] + b"OC\x00" + good[20:]  # version byte 0
    assert cache.backend.set(key, old, 60, snap)
    assert f() == 2
    assert cache.stats().corrupt == 1


@pytest.mark.slow
def test_killed_redis_under_several_serving_processes(
    private_redis: PrivateRedis, tmp_path: Any
) -> None:
    """Three serving processes: Redis is killed and restarted under them. No call fails,
    no answer is wrong, no call waits past the timeout, and they cache again afterwards."""
    from sqlalchemy import create_engine

    from tests import fault_workers
    from tests.models import Base

    db_url = f"sqlite:///{tmp_path}/mp.db"
    engine = create_engine(db_url)
    Base.metadata.create_all(engine)
    keys = seed(sessionmaker(engine), n=4)
    engine.dispose()
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    results = ctx.Queue()
    ready = ctx.Value("i", 0)
    procs = [
        ctx.Process(
            target=fault_workers.serve,
            args=(db_url, private_redis.url, keys, TIMEOUT, stop, results, ready),
        )
        for _ in range(3)
    ]
    for p in procs:
        p.start()
    # Every process serving before the kill (spawning takes seconds on a loaded machine).
    deadline = time.monotonic() + 60
    while ready.value < len(procs) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    private_redis.kill()
    time.sleep(1.0)
    private_redis.start()
    time.sleep(2.0)
    stop.set()
    outcomes = [results.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(timeout=10)
    print(f"\n(calls, failures, wrong, slowest s, hits, errors) per process: {outcomes}")
    assert all(o[1] == 0 for o in outcomes), outcomes
    assert all(o[2] == 0 for o in outcomes), outcomes
    assert all(o[3] < TIMEOUT + 0.5 for o in outcomes), outcomes
    assert all(o[5] > 0 for o in outcomes), "the kill was not noticed"
    assert all(o[4] > 0 for o in outcomes)


def test_eviction_under_maxmemory_never_serves_stale_data(
    tmp_path: Any, sqlite_engine: Any
) -> None:
    """Redis evicting keys (entries and generations alike) under maxmemory: every read
    still equals the database after every commit."""
    server = PrivateRedis(str(tmp_path), "--maxmemory", "2mb", "--maxmemory-policy", "allkeys-lru")
    server.start()
    try:
        Session = sessionmaker(sqlite_engine, expire_on_commit=False)
        keys = seed(Session, n=20)
        cache = Cache(server.url, namespace="evict", socket_timeout=1.0)
        cache.attach(Session)

        @cache.memoize(ttl=600)
        def padded(api_key: str, pad: int) -> str | None:
            with Session() as s:
                user = s.scalars(
                    select(User).where(User.api_key_hash == key_hash(api_key))
                ).one_or_none()
                return None if user is None else user.name + "|" + "x" * 2000

        for round_ in range(6):
            for pad in range(400):  # ~1.8 MB of entries per round: forces evictions
                for i in (0, 1):
                    got = padded(keys[i], pad)
                    assert got is not None
                    assert got.split("|")[0] == (
                        f"user{i}" if round_ == 0 else f"r{round_ - 1}-{i}"
                    )
            with Session() as s:
                for i in (0, 1):
                    s.get(User, i + 1).name = f"r{round_}-{i}"  # type: ignore[union-attr]
                s.commit()
        info = redis.Redis(port=server.port).info("stats")
        assert info["evicted_keys"] > 0, (info, cache.stats())
        cache.close()
    finally:
        server.kill()


def test_fromcache_recovers_after_an_outage(
    private_redis: PrivateRedis, sqlite_engine: Any
) -> None:
    """Regression: a backend failure during a FromCache call marked the thread as "failed"
    for good, so FromCache never used the cache again after an outage."""
    from ormcache import FromCache

    Session = sessionmaker(sqlite_engine, expire_on_commit=False)
    seed(Session, n=1)
    cache = Cache(
        private_redis.url,
        namespace="fc-recover",
        socket_timeout=TIMEOUT,
        connect_timeout=TIMEOUT,
        breaker_cooldown=0.2,
    )
    cache.attach(Session)

    def lookup() -> str:
        with Session() as s:
            return s.scalars(select(User).where(User.id == 1).options(FromCache())).one().name

    assert lookup() == lookup() == "user0"
    private_redis.kill()
    assert [lookup() for _ in range(5)] == ["user0"] * 5
    private_redis.start()
    time.sleep(0.3)
    deadline = time.monotonic() + 3
    hits = cache.stats().hits
    while cache.stats().hits < hits + 3 and time.monotonic() < deadline:
        assert lookup() == "user0"
        time.sleep(0.05)
    assert cache.stats().hits >= hits + 3
    cache.close()


class _FailingOnce:
    """The memory backend, with chosen operations failing the next time they run: a
    deterministic stand-in for a backend that drops out for one call."""

    def __init__(self) -> None:
        from ormcache.backends.memory import MemoryBackend

        self.inner = MemoryBackend("failing-once")
        self.fail_next: set[str] = set()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            if name in self.fail_next:
                self.fail_next.discard(name)
                from ormcache.errors import BackendError

                raise BackendError(f"injected failure of {name}")
            return attr(*args, **kwargs)

        return call


def test_failed_unlock_does_not_stall_the_next_miss() -> None:
    """A computation whose unlock failed left its lock in the backend. The next miss on
    that key must not wait lock_wait for a holder that has moved on: the unlock is owed
    and paid before the next lock."""
    backend = _FailingOnce()
    cache = Cache(backend=backend, lock_wait=3.0, breaker_threshold=100)  # type: ignore[arg-type]
    calls = {"n": 0}

    @cache.memoize(ttl=60)
    def f() -> int:
        calls["n"] += 1
        return calls["n"]

    backend.fail_next = {"set", "unlock"}  # the store and the unlock both fail
    assert f() == 1
    start = time.monotonic()
    assert f() == 2  # a miss (nothing was stored), computed at once
    assert time.monotonic() - start < 1.0, "waited for a lock nobody holds"
    assert f() == 2  # and stored this time


def test_failed_release_is_paid_when_the_backend_returns(sqlite_engine: Any) -> None:
    """A commit whose lease release failed must not block stores on its tags until the
    lease expires: the release is owed, and paid with the owed bumps."""
    backend = _FailingOnce()
    cache = Cache(backend=backend, lease_ttl=30.0, breaker_threshold=100)  # type: ignore[arg-type]
    Session = sessionmaker(sqlite_engine, expire_on_commit=False)
    keys = seed(Session, n=2)
    cache.attach(Session)
    name_of = lookup_fn(cache, Session)
    assert name_of(keys[0]) == "user0"
    backend.fail_next = {"release_lease"}
    with Session() as s:
        s.scalars(select(User)).first().name = "renamed"  # type: ignore[union-attr]
        s.commit()
    stores = cache.stats().stores
    assert name_of(keys[0]) == "renamed"  # fresh: the owed bump was paid first
    assert cache.stats().stores == stores + 1, "the leftover lease still blocks stores"
    assert name_of(keys[0]) == "renamed"
    assert cache.stats().hits >= 1


def test_interrupted_release_is_owed(sqlite_engine: Any) -> None:
    """A commit whose release is interrupted (an asyncio task cancelled while awaiting
    Redis raises CancelledError there) must still owe the bump: the interruption goes
    on, and the next read pays the debt before serving anything."""

    class Interrupted(BaseException):
        pass

    backend = _FailingOnce()
    cache = Cache(backend=backend, breaker_threshold=100)  # type: ignore[arg-type]
    Session = sessionmaker(sqlite_engine, expire_on_commit=False)
    keys = seed(Session, n=1)
    cache.attach(Session)
    name_of = lookup_fn(cache, Session)
    assert name_of(keys[0]) == "user0"
    real_release = backend.inner.release_lease
    calls = {"n": 0}

    def interrupted_release(tags: Any, token: str) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise Interrupted
        real_release(tags, token)

    backend.inner.release_lease = interrupted_release  # type: ignore[method-assign]
    with Session() as s:
        s.scalars(select(User)).one().name = "renamed"
        with pytest.raises(Interrupted):
            s.commit()
    assert cache._core.guard.owed_tags()  # the bump is owed
    assert name_of(keys[0]) == "renamed"
    assert not cache._core.guard.owed_tags()
    assert calls["n"] == 2  # the release was paid too


def test_a_caller_can_know_that_an_invalidation_failed(
    private_redis: PrivateRedis, sqlite_engine: Any
) -> None:
    """Issue 10 §6: with Redis down, ``invalidate()`` and ``clear()`` only logged, so a
    migration script could not fail loudly. They return whether the bump was delivered,
    and ``raise_on_error=True`` raises BackendError saying the bump is owed."""
    from ormcache import BackendError, OrmCacheError

    Session = sessionmaker(sqlite_engine, expire_on_commit=False)
    seed(Session, n=1)
    cache = Cache(
        private_redis.url, namespace="owed", socket_timeout=TIMEOUT, breaker_cooldown=0.05
    )
    assert cache.invalidate(User) is True
    assert cache.clear() is True
    private_redis.kill()
    assert cache.invalidate(User) is False
    with pytest.raises(BackendError, match="owed") as raised:
        cache.invalidate(User, raise_on_error=True)
    assert isinstance(raised.value, OrmCacheError)
    message = str(raised.value)
    assert "invalidate(User)" in message
    assert "before this process serves another hit" in message
    assert f"127.0.0.1:{private_redis.port}" in message
    assert cache.clear() is False
    with pytest.raises(BackendError, match=r"clear\(\) did not reach"):
        cache.clear(raise_on_error=True)
    private_redis.start()  # the same port, empty
    time.sleep(0.1)  # the breaker's cooldown
    assert cache.invalidate(User, raise_on_error=True) is True
    assert cache.clear(raise_on_error=True) is True
    cache.close()


def versioned_config(cache: Cache) -> tuple[Any, dict[str, int]]:
    """A memoized setting, ``name-v<n>``, and the ``n`` a test changes behind its back."""
    version = {"n": 1}

    @cache.memoize
    def config(name: str) -> str:
        return f"{name}-v{version['n']}"

    return config, version


def test_a_failed_entry_delete_is_owed_not_forgotten(tmp_path: Any) -> None:
    """``fn.invalidate(x)`` during an outage returned nothing and forgot the delete: once
    Redis came back with its data, this process served the entry it had been told to
    drop."""
    server = PrivateRedis(str(tmp_path), "--appendonly", "yes", "--appendfsync", "always")
    server.start()
    cache = Cache(
        server.url,
        namespace="owed-delete",
        socket_timeout=TIMEOUT,
        connect_timeout=TIMEOUT,
        breaker_cooldown=0.05,
    )
    config, version = versioned_config(cache)
    try:
        assert config("a") == config("a") == "a-v1"
        assert cache.stats().hits == 1
        server.kill()
        version["n"] = 2
        assert config.invalidate("a") is False
        server.start()  # the same port and data directory: the entry is back
        time.sleep(0.1)  # the breaker's cooldown
        # The first call may find a dropped connection; neither may serve the old entry.
        assert [config("a") for _ in range(3)] == ["a-v2"] * 3
        assert config.invalidate("a") is True
    finally:
        cache.close()
        server.kill()


def test_an_owed_delete_survives_reconfiguration(private_redis: PrivateRedis) -> None:
    """``configure(...)`` (``init_app`` does it) builds a new backend for the same URL:
    a delete owed to the old one named the same keys, but was dropped as if the server
    had changed, and the entry it should have removed was served again (found by
    review). The delete fails here because the user may not ``UNLINK`` yet: it cannot
    arrive late, as a request sent to a hung server does."""
    admin = private_redis.client()
    admin.execute_command("ACL", "SETUSER", "app", "on", ">pw", "~*", "+@all", "-unlink")
    url = f"redis://app:pw@127.0.0.1:{private_redis.port}/0"
    cache = Cache(url, namespace="owed-delete-configure", near_cache=False)
    config, version = versioned_config(cache)
    try:
        assert config("a") == config("a") == "a-v1"
        version["n"] = 2
        assert config.invalidate("a") is False  # NOPERM: owed
        cache.configure(default_ttl=30)  # still refused: the delete stays owed
        admin.execute_command("ACL", "SETUSER", "app", "+unlink")
        assert [config("a") for _ in range(3)] == ["a-v2"] * 3
    finally:
        cache.close()
        admin.close()


@pytest.mark.parametrize("near_cache", [False, True], ids=["redis", "near"])
def test_a_commit_whose_lease_was_refused_still_invalidates_once_redis_is_back(
    private_redis: PrivateRedis, db_engine: Any, near_cache: bool
) -> None:
    """Redis restarts (empty) while a commit is under way: the lease is refused, Redis
    is back before COMMIT, and a process that connected since reads the old row and
    stores it in the new Redis. The commit's release must still bump (a refusal cost
    the commit nothing, so there is no wait to save): before, a refused lease made the
    release owed without trying it, and the other process served the old row after
    commit() returned, until the writer's next cached read paid the debt."""
    from sqlalchemy import create_engine, event, update

    writer_engine = create_engine(db_engine.url)
    reader_engine = create_engine(db_engine.url)
    Writer = sessionmaker(writer_engine, expire_on_commit=False)
    Reader = sessionmaker(reader_engine, expire_on_commit=False)
    keys = seed(Writer, n=2)
    options: dict[str, Any] = {
        "namespace": f"refused-lease-{uuid.uuid4().hex[:8]}",
        "socket_timeout": 1.0,
        "connect_timeout": 1.0,
        "near_cache": near_cache,
    }
    writer_cache = Cache(private_redis.url, **options)
    writer_cache.attach(Writer)
    reader_cache = Cache(private_redis.url, **options)
    reader_cache.attach(Reader)
    name_of = lookup_fn(reader_cache, Reader)
    read_in_between: list[str | None] = []

    def redis_back_and_a_read_before_commit(conn: Any) -> None:
        private_redis.start()  # the same port, empty
        # The old row, stored in the new Redis (a thread: another call, not this one).
        reader = threading.Thread(target=lambda: read_in_between.append(name_of(keys[0])))
        reader.start()
        reader.join()

    private_redis.kill()
    with Writer() as s:
        s.execute(update(User).where(User.id == 1).values(name="renamed"))
        event.listen(writer_engine, "commit", redis_back_and_a_read_before_commit, once=True)
        s.commit()
    assert read_in_between == ["user0"]
    assert reader_cache.stats().stores == 1, "the read in between did not store"
    assert name_of(keys[0]) == "renamed", "the old row was served after commit() returned"
    assert name_of(keys[0]) == "renamed"
    assert reader_cache.stats().hits == 1
    assert writer_cache._core.guard.owed_tags() == [], "Redis answered: nothing is owed"
    writer_cache.close()
    reader_cache.close()
    writer_engine.dispose()
    reader_engine.dispose()


@pytest.mark.parametrize("near_cache", [False, True], ids=["redis", "near"])
def test_a_redis_restored_from_an_older_snapshot_never_serves_what_was_invalidated_since(
    tmp_path: Any, sqlite_engine: Any, near_cache: bool
) -> None:
    """Redis with persistence restarts from an RDB written before a commit (a crash
    between two saves; an AOF with ``appendfsync everysec`` loses its last second the
    same way): the generations come back as they were, so entries that the commit's
    bumps invalidated matched them again, and every process served the old row (found
    by review). The first connection after the restart sees a new run id and bumps the
    namespace before anything is read on it."""
    server = PrivateRedis(str(tmp_path / "redis"))
    server.start()
    Session = sessionmaker(sqlite_engine, expire_on_commit=False)
    keys = seed(Session, n=2)
    options: dict[str, Any] = {"namespace": "restored", "near_cache": near_cache}
    cache = Cache(server.url, **options)
    cache.attach(Session)
    name_of = lookup_fn(cache, Session)
    try:
        assert name_of(keys[0]) == "user0"
        assert name_of(keys[0]) == "user0"
        assert cache.stats().hits == 1
        admin = server.client()
        admin.save()  # the snapshot the restart will load
        admin.close()
        with Session() as s:
            s.scalars(select(User).where(User.id == 1)).one().name = "renamed"
            s.commit()
        assert name_of(keys[0]) == "renamed"
        server.kill()
        server.start()  # the same port and directory: it loads the snapshot
        admin = server.client()
        assert admin.dbsize() > 0, "the snapshot was not loaded: the test is void"
        admin.close()
        for _ in range(3):
            assert name_of(keys[0]) == "renamed", "the restored entry was served"
        later = Cache(server.url, **options)  # a process started after the restart
        assert lookup_fn(later, Session)(keys[0]) == "renamed"
        later.close()
        assert name_of(keys[0]) == "renamed"
        assert cache.stats().hits > 1, "caching did not resume"
    finally:
        cache.close()
        server.kill()


def test_a_writer_that_stops_calling_still_pays_its_debt(
    private_redis: PrivateRedis, sqlite_engine: Any
) -> None:
    """Redis hangs; a writer's calls time out until its breaker opens, so its next
    commit owes the invalidation without trying (a commit must not wait on a hung
    Redis). Redis answers again, and the writer never calls the cache again (a worker
    between jobs): before, the debt waited for that next call, and another process
    served the old row until the entry expired; the guard now pays it by itself."""
    Session = sessionmaker(sqlite_engine, expire_on_commit=False)
    keys = seed(Session, n=2)
    options: dict[str, Any] = {
        "namespace": f"payer-{uuid.uuid4().hex[:8]}",
        "socket_timeout": TIMEOUT,
        "connect_timeout": TIMEOUT,
        "breaker_threshold": 2,
        "breaker_cooldown": 0.5,
        "near_cache": False,
    }
    writer = Cache(private_redis.url, **options)
    writer.attach(Session)
    write_name_of = lookup_fn(writer, Session)
    reader_engine = create_engine(sqlite_engine.url)
    Reader = sessionmaker(reader_engine, expire_on_commit=False)
    reader = Cache(private_redis.url, **options)
    reader.attach(Reader)
    name_of = lookup_fn(reader, Reader)
    assert name_of(keys[0]) == "user0"
    assert name_of(keys[0]) == "user0"
    assert reader.stats().hits == 1
    assert private_redis.proc is not None
    os.kill(private_redis.proc.pid, signal.SIGSTOP)
    try:
        for _ in range(2):
            write_name_of(keys[1])  # times out: the breaker opens after a slow failure
        with Session() as s:
            s.scalars(select(User).where(User.id == 1)).one().name = "renamed"
            started = time.monotonic()
            s.commit()
            assert time.monotonic() - started < TIMEOUT, "the commit waited on a hung Redis"
        assert writer._core.guard.owed_tags(), "the invalidation was not owed: the test is void"
    finally:
        os.kill(private_redis.proc.pid, signal.SIGCONT)
    deadline = time.monotonic() + 5
    while writer._core.guard.owed_tags() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert writer._core.guard.owed_tags() == [], "the debt was not paid without a call"
    assert name_of(keys[0]) == "renamed"
    writer.close()
    reader.close()
    reader_engine.dispose()


@pytest.mark.parametrize("near_cache", [False, True], ids=["redis", "near"])
@pytest.mark.parametrize("refusal", ["min-replicas", "replica"])
def test_a_redis_that_refuses_writes_never_serves_what_a_commit_changed(
    private_redis: PrivateRedis, sqlite_engine: Any, refusal: str, near_cache: bool
) -> None:
    """Redis refuses writes but still answers reads: too few replicas for
    ``min-replicas-to-write`` (NOREPLICAS), the server turned into a read-only replica
    (READONLY), a failed background save (MISCONF). A commit's bump is refused, and even
    the delete a full Redis allows is: before, every other process went on serving the
    old row until it expired (found by review). Reads now write too (a no-op PEXPIRE),
    so they fail while writes do, and go to the database; the near cache turns off
    within one health interval."""
    Session = sessionmaker(sqlite_engine, expire_on_commit=False)
    keys = seed(Session, n=2)
    options: dict[str, Any] = {
        "namespace": f"refuse-{uuid.uuid4().hex[:8]}",
        "socket_timeout": 1.0,
        "near_cache": near_cache,
    }
    writer = Cache(private_redis.url, **options)
    writer.attach(Session)
    reader_engine = create_engine(sqlite_engine.url)
    Reader = sessionmaker(reader_engine, expire_on_commit=False)
    reader = Cache(private_redis.url, **options)
    reader.attach(Reader)
    name_of = lookup_fn(reader, Reader)
    admin = private_redis.client()
    try:
        assert name_of(keys[0]) == "user0"
        assert name_of(keys[0]) == "user0"
        assert reader.stats().hits == 1
        if refusal == "min-replicas":
            admin.config_set("min-replicas-to-write", 1)
        else:
            from tests.support.net import free_port

            admin.execute_command("REPLICAOF", "127.0.0.1", str(free_port()))
        with Session() as s:
            s.scalars(select(User).where(User.id == 1)).one().name = "renamed"
            s.commit()
        assert writer._core.guard.owed_tags(), "the bump went through: the test is void"
        if near_cache:
            channel = reader.backend.channel  # type: ignore[attr-defined]
            deadline = time.monotonic() + 3
            while channel.up and time.monotonic() < deadline:
                time.sleep(0.02)
            assert not channel.up, "the near cache still serves while writes are refused"
        for _ in range(3):
            assert name_of(keys[0]) == "renamed", "the old row was served"
    finally:
        admin.config_set("min-replicas-to-write", 0)
        admin.execute_command("REPLICAOF", "NO", "ONE")
        admin.close()
        writer.close()
        reader.close()
        reader_engine.dispose()
