"""Read after commit, across processes, under real races (README "Guarantees and their
limits", 2).

The multi-process test is the heart of the consistency protocol: if any ordering of
snapshot, store, lease and bump were wrong it would show up here as a stale read.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import create_engine, select, update
from sqlalchemy.orm import sessionmaker

from ormcache import Cache, FromCache
from tests import race_workers
from tests.models import User, key_hash, seed

READS_REQUIRED = int(os.environ.get("ORMCACHE_RACE_READS", "20000"))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fromcache", "memoize", "transaction"])
@pytest.mark.parametrize("database", ["postgresql", "mariadb"])
def test_no_stale_reads_across_processes(
    request: pytest.FixtureRequest, redis_url: str, namespace: str, database: str, mode: str
) -> None:
    """3 readers and 2 writers in separate processes on one counter table: every read that
    starts after a writer published its committed version sees at least that version.

    ``transaction``: each reader first reads in one transaction (a plain read, then
    cached reads: MariaDB's default REPEATABLE READ keeps the first read's snapshot;
    PostgreSQL's READ COMMITTED does not), then checks a fresh cached read."""
    db_url = request.getfixturevalue("postgres_url" if database == "postgresql" else "mariadb_url")
    race_across_processes(db_url, redis_url, namespace, mode, database)


def race_across_processes(
    db_url: str,
    cache_url: str,
    namespace: str,
    mode: str,
    label: str,
    *,
    writer_pause: float = 0.002,
    reads_required: int = READS_REQUIRED,
    chaos: Callable[[], None] | None = None,
    chaos_every: float = 2.0,
    min_seconds: float = 5.0,
    reader_pause: float = 0.0001,
    near_cache: bool | None = None,
) -> dict[str, int]:
    """The race itself, for any database and cache URL (Sentinel and Cluster run it too).

    ``chaos`` runs every ``chaos_every`` seconds while the race goes on (killing the
    near cache's push connections, restarting Redis); the race lasts at least
    ``min_seconds``, and readers pause ``reader_pause`` between reads: near-cache hits
    take microseconds, and unpaused readers on two cores would starve the writers the
    race needs. Bounded at 240 s. ``near_cache`` is every worker's setting (None: the
    URL's default). Returns the totals."""
    n_rows = 4
    engine = create_engine(db_url)
    race_workers.Base.metadata.drop_all(engine)
    race_workers.Base.metadata.create_all(engine)
    with sessionmaker(engine)() as s:
        s.add_all(race_workers.Counter(id=i + 1, version=0) for i in range(n_rows))
        s.commit()

    ctx = mp.get_context("spawn")
    published = [ctx.Value("q", 0) for _ in range(n_rows)]
    stop = ctx.Event()
    results = ctx.Queue()
    progress = ctx.Value("q", 0)
    writers = [
        ctx.Process(
            target=race_workers.writer,
            args=(
                db_url,
                cache_url,
                namespace,
                published,
                stop,
                n_rows,
                i,
                writer_pause,
                near_cache,
            ),
        )
        for i in range(2)
    ]
    readers = [
        ctx.Process(
            target=race_workers.reader,
            args=(
                db_url,
                cache_url,
                namespace,
                mode,
                published,
                stop,
                n_rows,
                i,
                results,
                progress,
                reader_pause,
                near_cache,
            ),
        )
        for i in range(3)
    ]
    for p in writers + readers:
        p.start()
    # Run until enough reads are done (bounded: the test stops itself after 240 s).
    started = time.monotonic()
    deadline = started + 240
    next_chaos = started + chaos_every
    chaos_runs = 0
    while (
        progress.value < reads_required + 500 or time.monotonic() < started + min_seconds
    ) and time.monotonic() < deadline:
        time.sleep(0.2)
        if chaos is not None and time.monotonic() >= next_chaos:
            chaos()
            chaos_runs += 1
            next_chaos = time.monotonic() + chaos_every
    stop.set()
    outcomes = [results.get(timeout=60) for _ in readers]
    for p in writers + readers:
        p.join(timeout=30)
        assert p.exitcode == 0, f"worker {p.name} exited with {p.exitcode}"
    reads = sum(o[0] for o in outcomes)
    stale = sum(o[1] for o in outcomes)
    hits = sum(o[3] for o in outcomes)
    conflicts = sum(o[4] for o in outcomes)
    near_hits = sum(o[5] for o in outcomes)
    versions = [v.value for v in published]
    print(
        f"\n{label}/{mode}: {reads} reads, {stale} stale, {hits} hits ({near_hits} near), "
        f"{conflicts} refused stores, committed versions {versions}, chaos x{chaos_runs}"
    )
    race_workers.Base.metadata.drop_all(engine)
    engine.dispose()
    served_by = [o[6] for o in outcomes if o[6]]
    assert stale == 0, (
        f"{stale} stale reads (worst lag {max(o[2] for o in outcomes)}; served by, per "
        f"reader: {served_by})"
    )
    assert min(versions) > 10, "writers made too little progress for a meaningful race"
    assert hits > 0, "the cache never served a hit: the race did not exercise it"
    assert reads >= reads_required, f"only {reads} reads within the 240 s bound"
    return {"reads": reads, "stale": stale, "hits": hits, "near_hits": near_hits}


def test_store_racing_a_commit_is_refused(cache: Cache, db_engine: Any) -> None:
    """Deterministic interleaving: the function reads, then a commit lands, then the store
    happens. The store must be refused and the next call must see the commit."""
    Session = sessionmaker(db_engine, expire_on_commit=False)
    cache.attach(Session)
    seed(Session)
    injected = {"done": False}

    @cache.memoize(ttl=60)
    def name_of(api_key: str) -> str:
        with Session() as s:
            user = s.scalars(select(User).where(User.api_key_hash == key_hash(api_key))).one()
            name = user.name
        if not injected["done"]:
            injected["done"] = True
            with Session() as w:  # a concurrent writer commits after our read
                w.get(User, 1).name = "after"  # type: ignore[union-attr]
                w.commit()
        return name

    assert name_of("key-0-secret") == "user0"  # the value read before the commit ...
    assert cache.stats().stores == 0  # ... is never stored as current
    assert cache.stats().store_conflicts == 1
    assert name_of("key-0-secret") == "after"
    assert name_of("key-0-secret") == "after"
    assert cache.stats().hits == 1


def test_fromcache_store_racing_a_commit_is_refused(cache: Cache, db_engine: Any) -> None:
    """The same interleaving for FromCache, injected between the SELECT and the store."""
    from sqlalchemy import event

    Session = sessionmaker(db_engine, expire_on_commit=False)
    cache.attach(Session)
    seed(Session)
    state = {"armed": True}

    def after_select(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if state["armed"] and statement.lstrip().upper().startswith("SELECT"):
            state["armed"] = False
            with Session() as w:  # another connection commits between SELECT and store
                w.execute(update(User).where(User.id == 1).values(name="after"))
                w.commit()

    def lookup() -> str:
        with Session() as s:
            return (
                s.scalars(
                    select(User)
                    .where(User.api_key_hash == key_hash("key-0-secret"))
                    .options(FromCache())
                )
                .one()
                .name
            )

    if db_engine.dialect.name == "sqlite":
        pytest.skip("SQLite cannot commit from a second connection while a read is open")
    event.listen(db_engine, "after_cursor_execute", after_select)
    try:
        first = lookup()
    finally:
        event.remove(db_engine, "after_cursor_execute", after_select)
    assert first == "user0"
    assert cache.stats().stores == 0
    assert lookup() == "after"
    assert lookup() == "after"
    assert cache.stats().hits == 1


def test_crashed_writers_lease_blocks_stores_only_until_it_expires(
    cache: Cache, db_engine: Any
) -> None:
    """A writer that took its lease and died never releases it: until the lease expires,
    reads of its tags go to the database and are not stored; then caching resumes."""
    Session = sessionmaker(db_engine, expire_on_commit=False)
    cache.attach(Session)
    seed(Session)

    def lookup() -> str:
        with Session() as s:
            return s.scalars(select(User).where(User.id == 1).options(FromCache())).one().name

    lookup()
    assert lookup() == "user0"
    assert cache.stats().hits == 1
    tags = ["t:oc_users", "a:oc_users"] + [
        t for t in _row_tags(Session) if t.startswith("p:oc_users:id:")
    ]
    cache.backend.acquire_lease(tags, "crashed-writer", 0.6)
    stores = cache.stats().stores
    assert lookup() == "user0"  # the lease's bump invalidated the entry: a miss
    assert lookup() == "user0"  # still leased: not stored, so another miss
    assert cache.stats().stores == stores
    time.sleep(0.8)
    lookup()
    assert cache.stats().stores == stores + 1
    hits = cache.stats().hits
    lookup()
    assert cache.stats().hits == hits + 1


def _row_tags(Session: Any) -> set[str]:
    from ormcache.sqla.tags import instance_tags

    with Session() as s:
        return instance_tags(s.get(User, 1))


def test_generation_loss_never_resurrects_entries(
    redis_url: str, namespace: str, db_engine: Any
) -> None:
    """Deleting every generation key (eviction, FLUSHALL) makes entries misses."""
    import redis

    cache = Cache(redis_url, namespace=namespace, strict=True)
    Session = sessionmaker(db_engine, expire_on_commit=False)
    cache.attach(Session)
    seed(Session)

    def lookup() -> str:
        with Session() as s:
            return s.scalars(select(User).where(User.id == 1).options(FromCache())).one().name

    lookup()
    lookup()
    assert cache.stats().hits == 1
    client = redis.Redis.from_url(redis_url)
    gens = list(client.scan_iter(f"{namespace}:g:*"))
    assert gens
    client.delete(*gens)
    lookup()
    assert cache.stats().hits == 1  # a miss, not a resurrected hit
    lookup()
    assert cache.stats().hits == 2
    client.close()
    cache.clear()
    cache.close()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fromcache", "memoize"])
def test_no_stale_reads_across_threads_on_the_memory_backend(
    postgres_url: str, namespace: str, mode: str
) -> None:
    """The embedded backend under threads: 4 readers and 1 writer in one process."""
    import threading

    from sqlalchemy import event

    engine = create_engine(postgres_url, pool_size=8)
    race_workers.Base.metadata.drop_all(engine)
    race_workers.Base.metadata.create_all(engine)
    Session = sessionmaker(engine, expire_on_commit=False)
    with Session() as s:
        s.add(race_workers.Counter(id=1, version=0))
        s.commit()
    event.listen(engine, "commit", lambda conn: time.sleep(0.002))  # a slow COMMIT
    cache = Cache(namespace=namespace, strict=True)
    cache.attach(Session)
    published = [0]
    lock = threading.Lock()
    stop = threading.Event()
    stale: list[tuple[int, int]] = []
    reads = [0]

    @cache.memoize(ttl=60)
    def memoized() -> int:
        with Session() as s:
            return s.scalars(
                select(race_workers.Counter.version).where(race_workers.Counter.id == 1)
            ).one()

    def from_cache() -> int:
        with Session() as s:
            stmt = select(race_workers.Counter).where(race_workers.Counter.id == 1)
            return s.scalars(stmt.options(FromCache())).one().version

    read = memoized if mode == "memoize" else from_cache

    def writer() -> None:
        while not stop.is_set():
            with Session() as s:
                row = s.get(race_workers.Counter, 1, with_for_update=True)
                assert row is not None
                row.version += 1
                done = row.version
                s.commit()
            with lock:
                published[0] = max(published[0], done)
            time.sleep(0.001)

    def reader() -> None:
        while not stop.is_set():
            floor = published[0]
            got = read()
            with lock:
                reads[0] += 1
            if got < floor:
                stale.append((got, floor))

    threads = [threading.Thread(target=writer)] + [
        threading.Thread(target=reader) for _ in range(4)
    ]
    for t in threads:
        t.start()
    time.sleep(4)
    stop.set()
    for t in threads:
        t.join()
    print(f"\nthreads/{mode}: {reads[0]} reads, {len(stale)} stale, {cache.stats()}")
    race_workers.Base.metadata.drop_all(engine)
    engine.dispose()
    assert stale == []
    assert cache.stats().hits > 0
    assert published[0] > 20
