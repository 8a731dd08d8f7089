"""asyncio: AsyncSession with FromCache, async memoized functions, on SQLite (aiosqlite)
and PostgreSQL (psycopg's async driver), with the memory backend and real Redis through
redis.asyncio. The database is the oracle, as in the sync suites."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from sqlalchemy import create_engine, select, update
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import selectinload

from ormcache import Cache, FromCache
from tests.models import Base, User, key_hash, seed
from tests.support.sql import SQLCounter

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(params=["sqlite", "postgresql"])
def db_urls(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[tuple[str, str]]:
    """(sync URL, async URL) of one database, with the test tables fresh and seeded."""
    if request.param == "sqlite":
        urls = (f"sqlite:///{tmp_path}/a.db", f"sqlite+aiosqlite:///{tmp_path}/a.db")
    else:
        sync_url = request.getfixturevalue("postgres_url")
        urls = (sync_url, sync_url.replace("+psycopg:", "+psycopg_async:"))
    engine = create_engine(urls[0])
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    from sqlalchemy.orm import sessionmaker

    seed(sessionmaker(engine), n=3)
    engine.dispose()
    yield urls
    engine = create_engine(urls[0])
    Base.metadata.drop_all(engine)
    engine.dispose()


@pytest.fixture
async def aengine(db_urls: tuple[str, str]) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(db_urls[1])
    yield engine
    await engine.dispose()


def by_key(n: int, *options: Any) -> Any:
    return select(User).where(User.api_key_hash == key_hash(f"key-{n}-secret")).options(*options)


def memoized_name(cache: Cache, aengine: AsyncEngine) -> tuple[Any, Any]:
    """An attached async_sessionmaker and a memoized async lookup of user n's name."""
    Session = async_sessionmaker(aengine, expire_on_commit=False)
    cache.attach(Session)

    @cache.memoize(ttl=60)
    async def name_of(n: int) -> str:
        async with Session() as s:
            return (await s.scalars(by_key(n))).one().name

    return Session, name_of


async def test_fromcache_hits_on_async_session(cache: Cache, aengine: AsyncEngine) -> None:
    """A hit runs no SQL, equals a fresh read (eager-loaded relationship included), and
    a commit through an AsyncSession invalidates it before commit() returns."""
    Session = async_sessionmaker(aengine, expire_on_commit=False)
    cache.attach(Session)
    counter = SQLCounter(aengine.sync_engine)
    stmt = by_key(1, FromCache(ttl=60), selectinload(User.addresses))
    async with Session() as s:
        miss = (await s.scalars(stmt)).one()
        assert cache.stats().hits == 0  # the selectin load is a cached query of its own
    counter.reset()
    async with Session() as s:
        hit = (await s.scalars(stmt)).one()
        assert counter.count == 0
        assert cache.stats().hits >= 1
        assert hit in s  # in the session's identity map, as a loaded row is
        assert sorted(a.city for a in hit.addresses) == ["city1a", "city1b"]
    assert (hit.id, hit.name, hit.email, hit.balance, hit.created_at) == (
        miss.id,
        miss.name,
        miss.email,
        miss.balance,
        miss.created_at,
    )
    async with Session() as s:
        await s.execute(update(User).where(User.id == hit.id).values(name="renamed"))
        await s.commit()
    async with Session() as s:
        assert (await s.scalars(stmt)).one().name == "renamed"


async def test_async_memoize_hits_and_invalidation(cache: Cache, aengine: AsyncEngine) -> None:
    Session = async_sessionmaker(aengine, expire_on_commit=False)
    cache.attach(Session)
    counter = SQLCounter(aengine.sync_engine)
    calls = {"n": 0}

    @cache.memoize(ttl=60)
    async def get_user(api_key: str) -> User | None:
        calls["n"] += 1
        async with Session() as s:
            stmt = select(User).where(User.api_key_hash == key_hash(api_key))
            return (await s.scalars(stmt)).one_or_none()

    first = await get_user("key-0-secret")
    assert first is not None
    assert first.name == "user0"
    counter.reset()
    again = await get_user("key-0-secret")
    assert counter.count == 0
    assert calls["n"] == 1
    assert again is not None
    # A detached snapshot: every loaded attribute readable without a session.
    assert (again.id, again.email, again.balance) == (first.id, first.email, first.balance)
    assert await get_user("unknown") is None
    async with Session() as s:
        user = (await s.scalars(by_key(0))).one()
        user.name = "renamed"
        await s.commit()
    renamed = await get_user("key-0-secret")
    assert renamed is not None
    assert renamed.name == "renamed"
    get_user.invalidate("key-0-secret")
    assert (await get_user("key-0-secret")).name == "renamed"  # type: ignore[union-attr]
    assert calls["n"] == 4


async def test_reads_inside_a_writing_transaction_see_its_writes(
    cache: Cache, aengine: AsyncEngine
) -> None:
    """Within an AsyncSession transaction that wrote a table, queries on it bypass the
    cache (read your own writes), and a rollback leaves the cache valid."""
    Session = async_sessionmaker(aengine, expire_on_commit=False)
    cache.attach(Session)
    stmt = by_key(2, FromCache(ttl=60))
    async with Session() as s:
        assert (await s.scalars(stmt)).one().name == "user2"
    async with Session() as s:
        await s.execute(update(User).where(User.id == 3).values(name="uncommitted"))
        s.expire_all()
        assert (await s.scalars(stmt)).one().name == "uncommitted"
        await s.rollback()
    async with Session() as s:
        assert (await s.scalars(stmt)).one().name == "user2"


async def test_concurrent_misses_compute_once_without_blocking_the_loop(
    cache: Cache, aengine: AsyncEngine
) -> None:
    """50 tasks miss on one key at once: one computation, every caller gets the value,
    and the followers' waits yield to the loop (a blocking wait would deadlock the
    leader, which runs on the same loop, until lock_wait)."""
    Session = async_sessionmaker(aengine, expire_on_commit=False)
    cache.attach(Session)
    calls = {"n": 0}

    @cache.memoize(ttl=60)
    async def slow_name(api_key: str) -> str | None:
        calls["n"] += 1
        await asyncio.sleep(0.1)
        async with Session() as s:
            user = (await s.scalars(by_key(int(api_key[4])))).one_or_none()
            return None if user is None else user.name

    ticks = 0
    stop = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            await asyncio.sleep(0.005)

    tick_task = asyncio.ensure_future(ticker())
    start = time.monotonic()
    names = await asyncio.gather(*(slow_name("key-1-secret") for _ in range(50)))
    took = time.monotonic() - start
    stop.set()
    await tick_task
    assert names == ["user1"] * 50
    assert calls["n"] == 1
    # A wait that blocked the loop would end only at lock_wait (5 s); the computation
    # itself takes 0.1 s, and a loaded machine may add a few seconds to 50 tasks.
    assert took < 4.0, took
    assert ticks >= 10  # the loop kept running while everyone waited


async def test_the_event_loop_never_uses_the_sync_redis_client(
    redis_url: str, namespace: str, aengine: AsyncEngine
) -> None:
    """On an event loop every Redis round trip goes through redis.asyncio: the sync
    client, whose socket calls would block the loop, never opens a connection."""
    cache = Cache(redis_url, namespace=namespace, strict=True)
    Session, name_of = memoized_name(cache, aengine)

    try:
        stmt = by_key(0, FromCache(ttl=60))
        for _ in range(2):
            assert await name_of(1) == "user1"
            async with Session() as s:
                assert (await s.scalars(stmt)).one().name == "user0"
        async with Session() as s:
            (await s.scalars(by_key(0))).one().name = "renamed"
            await s.commit()
        assert await name_of(1) == "user1"
        async with Session() as s:
            assert (await s.scalars(stmt)).one().name == "renamed"
        stats = cache.stats()
        assert stats.hits >= 2
        assert stats.errors == 0
        backend: Any = cache.backend
        assert backend.client.connection_pool._created_connections == 0
        # Behind the near cache (on by default), the Redis backend itself.
        assert getattr(backend, "inner", backend)._lane.conn is None
        twin = backend.for_event_loop()
        assert twin is not backend
        assert twin is backend.for_event_loop()  # one twin per loop
    finally:
        cache.clear()
        cache.close()


async def test_async_calls_go_through_when_redis_is_down(aengine: AsyncEngine) -> None:
    from tests.support.net import free_port

    cache = Cache(f"redis://127.0.0.1:{free_port()}/0", namespace="down")
    Session, name_of = memoized_name(cache, aengine)

    assert await name_of(0) == "user0"
    async with Session() as s:
        (await s.scalars(by_key(0))).one().name = "renamed"
        await s.commit()
    assert await name_of(0) == "renamed"
    async with Session() as s:
        assert (await s.scalars(by_key(1, FromCache(ttl=60)))).one().name == "user1"
    assert cache.stats().errors >= 1
    cache.close()


async def test_stale_while_revalidate_refreshes_on_the_loop(
    cache: Cache, aengine: AsyncEngine
) -> None:
    """Past its TTL, an entry inside stale_ttl is served at once while a task of the same
    loop recomputes it; the next call gets the fresh value."""
    calls = {"n": 0}

    @cache.memoize(ttl=0.2, stale_ttl=30)
    async def counter() -> int:
        calls["n"] += 1
        await asyncio.sleep(0.05)
        return calls["n"]

    assert await counter() == 1
    await asyncio.sleep(0.3)
    start = time.monotonic()
    assert await counter() == 1  # stale, served without waiting for the refresh
    assert time.monotonic() - start < 0.05
    deadline = time.monotonic() + 3
    while calls["n"] < 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    assert await counter() == 2
    assert cache.stats().stale_hits == 1


async def test_a_background_refresh_runs_in_a_context_of_its_own(
    cache: Cache, aengine: AsyncEngine
) -> None:
    """The refresh task ran in a copy of the caller's context: what the caller had set
    (its request's variables, the reads of computations enclosing it) was the refresh's
    too, unlike a refresh on a worker thread (found by review)."""
    import contextvars

    request: contextvars.ContextVar[str] = contextvars.ContextVar("request", default="none")
    seen: list[str] = []

    @cache.memoize(ttl=0.2, stale_ttl=30)
    async def value() -> int:
        seen.append(request.get())
        return len(seen)

    assert await value() == 1
    await asyncio.sleep(0.3)
    request.set("caller")
    assert await value() == 1  # stale: a refresh task starts
    deadline = time.monotonic() + 3
    while len(seen) < 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert seen == ["none", "none"], "the refresh saw the caller's context"


async def test_async_memoize_merges_hits_into_an_async_session(
    cache: Cache, aengine: AsyncEngine
) -> None:
    """merge= naming the AsyncSession's sync_session puts a hit's instances into that
    session's identity map, as a query there would."""
    Session = async_sessionmaker(aengine, expire_on_commit=False)
    cache.attach(Session)
    current: dict[str, Any] = {}

    @cache.memoize(ttl=60, merge=lambda: current["session"].sync_session)
    async def get_user(n: int) -> User:
        async with Session() as s:
            return (await s.scalars(by_key(n))).one()

    async with Session() as s:
        current["session"] = s
        await get_user(1)
        hit = await get_user(1)
        assert cache.stats().hits == 1
        assert hit in s
        assert hit is await s.get(User, hit.id)  # the identity map's instance


async def test_near_cache_hits_on_the_event_loop(
    redis_url: str, namespace: str, aengine: AsyncEngine
) -> None:
    """asyncio gets near hits too (the drain needs no await), they run no SQL, and a
    commit through an AsyncSession is seen by the next read."""
    from ormcache.backends.near import NearCache

    cache = Cache(redis_url, namespace=namespace, strict=True)
    assert isinstance(cache.backend, NearCache)
    Session = async_sessionmaker(aengine, expire_on_commit=False)
    cache.attach(Session)
    counter = SQLCounter(aengine.sync_engine)
    stmt = by_key(0, FromCache(ttl=60), selectinload(User.addresses))
    deadline = time.monotonic() + 5
    while not cache.backend.channel.current() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    try:
        for _ in range(3):
            async with Session() as s:
                (await s.scalars(stmt)).one()
        counter.reset()
        before = cache.stats().near_hits
        for _ in range(20):
            async with Session() as s:
                user = (await s.scalars(stmt)).one()
                assert (user.name, [a.city for a in user.addresses]) == (
                    "user0",
                    ["city0a", "city0b"],
                )
        assert counter.count == 0
        assert cache.stats().near_hits - before == 20
        async with Session() as s:
            (await s.scalars(by_key(0))).one().name = "renamed"
            await s.commit()
        async with Session() as s:
            assert (await s.scalars(stmt)).one().name == "renamed"
    finally:
        cache.clear()
        cache.close()


async def test_a_commit_in_another_process_is_seen_by_the_next_read_on_the_event_loop(
    redis_url: str, namespace: str, db_urls: tuple[str, str]
) -> None:
    """The near cache's mutation check, on asyncio: another process commits (or
    invalidates) and answers once its call has returned; the next AsyncSession
    FromCache read and async memoized read, made at once on the loop, equal the new
    value, 30 rounds each, though the reads in between are near hits."""
    import multiprocessing as mp

    from ormcache.backends.near import NearCache
    from tests import near_workers

    cache = Cache(redis_url, namespace=namespace, strict=True)
    assert isinstance(cache.backend, NearCache)
    aengine = create_async_engine(db_urls[1])
    Session, name_of = memoized_name(cache, aengine)
    stmt = by_key(1, FromCache(ttl=60))
    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    proc = ctx.Process(target=near_workers.writer, args=(db_urls[0], redis_url, namespace, there))
    proc.start()
    try:
        assert here.poll(30)
        assert here.recv() == "ready"
        deadline = time.monotonic() + 5
        while not cache.backend.channel.current() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for i in range(30):
            for _ in range(3):
                await name_of(1)
                async with Session() as s:
                    (await s.scalars(stmt)).one()
            value = f"v{i}"
            here.send(("commit" if i % 2 else "invalidate-table", "key-1-secret", value))
            assert here.poll(30)
            assert here.recv() == "done"
            # The other process's call has returned: no read from now on may be older.
            assert await name_of(1) == value, f"round {i}: stale memoize read"
            async with Session() as s:
                assert (await s.scalars(stmt)).one().name == value, f"round {i}: stale"
        assert cache.stats().near_hits > 60, "the near cache never served: the test is void"
    finally:
        here.send(None)
        proc.join(30)
        cache.clear()
        cache.close()
        await aengine.dispose()
    assert proc.exitcode == 0
