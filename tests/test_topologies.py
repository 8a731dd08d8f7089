"""Redis Sentinel and Redis Cluster: the backend contract, the ORM guarantees end to end,
the Cluster layout, and a Sentinel failover under load. Each topology is a set of
redis-server processes of this module's own, on free ports."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from ormcache import Cache, FromCache
from ormcache.backends import create_backend
from ormcache.backends.redis import (
    RedisClusterBackend,
    RedisSentinelBackend,
    parse_sentinel_url,
)
from ormcache.errors import ConfigurationError
from ormcache.testing import BackendContract
from tests.fault_workers import lookup_fn
from tests.models import User, key_hash, seed
from tests.redis_procs import ClusterSetup, SentinelSetup
from tests.support.sql import SQLCounter

TIMEOUT = 0.2


@pytest.fixture(scope="module")
def sentinel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelSetup]:
    setup = SentinelSetup(tmp_path_factory.mktemp("sentinel"))
    try:
        setup.start()
        yield setup
    finally:
        setup.stop()


class TestSentinelBackend(BackendContract):
    @pytest.fixture
    def backend(self, sentinel: SentinelSetup, namespace: str) -> Iterator[RedisSentinelBackend]:
        backend = RedisSentinelBackend.from_url(sentinel.url(), namespace)
        yield backend
        backend.clear()
        backend.close()

    @pytest.fixture
    def make_backend(self, sentinel: SentinelSetup, namespace: str) -> Iterator[Any]:
        made: list[RedisSentinelBackend] = []

        def make() -> RedisSentinelBackend:
            made.append(RedisSentinelBackend.from_url(sentinel.url(), namespace))
            return made[-1]

        yield make
        for b in made:
            b.close()

    def test_invalidations_wait_for_a_replica(
        self, sentinel: SentinelSetup, namespace: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        """With wait_replicas, a bump returns only once a replica has it (WAIT), or after
        wait_timeout with a warning: a frozen replica makes the bump wait and warn; with
        wait_replicas=0 it does not wait."""
        waiting = RedisSentinelBackend.from_url(
            sentinel.url("?wait_replicas=1&wait_timeout=0.15"), namespace
        )
        eager = RedisSentinelBackend.from_url(sentinel.url("?wait_replicas=0"), namespace)
        try:
            start = time.perf_counter()
            waiting.bump(["t:a"])
            assert time.perf_counter() - start < 0.14  # the replica is up: acked at once
            assert sentinel.replica.proc is not None
            os.kill(sentinel.replica.proc.pid, signal.SIGSTOP)
            try:
                with caplog.at_level(logging.WARNING, logger="ormcache"):
                    start = time.perf_counter()
                    waiting.bump(["t:a"])
                    assert time.perf_counter() - start >= 0.14
                    start = time.perf_counter()
                    eager.bump(["t:a"])
                    assert time.perf_counter() - start < 0.14
            finally:
                os.kill(sentinel.replica.proc.pid, signal.SIGCONT)
            assert "0 of 1 replicas acknowledged" in caplog.text
        finally:
            waiting.close()
            eager.close()


class TestClusterBackend(BackendContract):
    @pytest.fixture
    def backend(self, cluster: ClusterSetup, namespace: str) -> Iterator[RedisClusterBackend]:
        backend = RedisClusterBackend.from_url(cluster.url, namespace)
        yield backend
        backend.clear()
        backend.close()

    @pytest.fixture
    def make_backend(self, cluster: ClusterSetup, namespace: str) -> Iterator[Any]:
        made: list[RedisClusterBackend] = []

        def make() -> RedisClusterBackend:
            made.append(RedisClusterBackend.from_url(cluster.url, namespace))
            return made[-1]

        yield make
        for b in made:
            b.close()

    def test_tags_spread_over_slots_and_nodes(
        self, cluster: ClusterSetup, backend: RedisClusterBackend
    ) -> None:
        """Generation keys of different tags land on different slots and on every node,
        not pinned to one; a tag's generation and lease share a slot (its scripts are
        atomic)."""
        tags = [f"t:table{i}" for i in range(30)]
        assert backend.snapshot(tags) is not None
        backend.acquire_lease(tags[:1], "w", 5.0)
        client = backend.client
        slots = {client.keyslot(backend._gen_key(t)) for t in tags}
        assert len(slots) >= 25
        assert client.keyslot(backend._gen_key(tags[0])) == client.keyslot(
            backend._lease_key(tags[0])
        )
        per_node = []
        for node in cluster.nodes:
            direct = node.client()
            per_node.append(len(list(direct.scan_iter(match=f"{{{backend.namespace}:*}}:g"))))
            direct.close()
        assert sum(per_node) == 30
        assert all(n > 0 for n in per_node), per_node
        backend.release_lease(tags[:1], "w")

    def test_entry_rewritten_with_other_tags(self, backend: RedisClusterBackend) -> None:
        """A process that learned an entry's tags still checks the right generations
        after another process rewrote the entry with other tags."""
        snap = backend.snapshot(["t:a"])
        assert snap is not None
        assert backend.set("k", b"one", 60, snap)
        assert backend.get("k").payload == b"one"
        other = RedisClusterBackend(backend.client, backend.namespace)
        snap = other.snapshot(["t:b"])
        assert snap is not None
        assert other.set("k", b"two", 60, snap)
        backend.bump(["t:b"])
        assert backend.get("k") is None
        assert other.get("k") is None


@pytest.fixture(params=["sentinel", "cluster"])
def topology_url(request: pytest.FixtureRequest) -> str:
    if request.param == "sentinel":
        setup: SentinelSetup = request.getfixturevalue("sentinel")
        return setup.url()
    cluster: ClusterSetup = request.getfixturevalue("cluster")
    return cluster.url


def test_orm_guarantees_end_to_end(topology_url: str, sqlite_engine: Any, namespace: str) -> None:
    """Memoize and FromCache through Sentinel and Cluster: a hit runs no SQL and equals
    a fresh read; a commit invalidates both (the database is the oracle)."""
    Session = sessionmaker(sqlite_engine, expire_on_commit=False)
    keys = seed(Session, n=3)
    cache = Cache(topology_url, namespace=namespace, strict=True)
    cache.attach(Session)
    counter = SQLCounter(sqlite_engine)
    name_of = lookup_fn(cache, Session)
    stmt = select(User).where(User.api_key_hash == key_hash(keys[1])).options(FromCache(ttl=60))
    try:
        assert name_of(keys[0]) == "user0"
        with Session() as s:
            assert s.scalars(stmt).one().name == "user1"
        counter.reset()
        assert name_of(keys[0]) == "user0"
        with Session() as s:
            hit = s.scalars(stmt).one()
            assert hit.name == "user1"
        assert counter.count == 0
        with Session() as s:
            fresh = s.get(User, hit.id)
            assert fresh is not None
            assert (hit.email, hit.balance, hit.created_at) == (
                fresh.email,
                fresh.balance,
                fresh.created_at,
            )
        with Session() as s:
            for user in s.scalars(select(User)):
                user.name = f"renamed-{user.name}"
            s.commit()
        assert name_of(keys[0]) == "renamed-user0"
        with Session() as s:
            assert s.scalars(stmt).one().name == "renamed-user1"
        stats = cache.stats()
        assert stats.hits >= 2
        assert stats.errors == 0
    finally:
        cache.clear()
        cache.close()


@pytest.mark.slow
def test_sentinel_failover_under_load(tmp_path: Path, sqlite_engine: Any) -> None:
    """The master dies under four serving threads and a writer: no call fails, no answer
    is older than a commit that returned before the call began, and after Sentinel
    promotes the replica the cache serves hits again (from the new master)."""
    setup = SentinelSetup(tmp_path / "failover")
    setup.start()
    Session = sessionmaker(sqlite_engine, expire_on_commit=False)
    keys = seed(Session, n=4)
    cache = Cache(
        setup.url(),
        namespace="failover",
        socket_timeout=TIMEOUT,
        connect_timeout=TIMEOUT,
        breaker_cooldown=0.3,
    )
    cache.attach(Session)
    name_of = lookup_fn(cache, Session)
    # The version each user's name had when its last commit returned.
    committed = dict.fromkeys(range(4), 0)
    failures: list[BaseException] = []
    stale: list[tuple[int, int, str | None]] = []
    stop = threading.Event()

    def reader(n: int) -> None:
        i = n
        while not stop.is_set():
            idx = i % 4
            floor = committed[idx]  # read before the call starts
            try:
                got = name_of(keys[idx])
            except BaseException as exc:
                failures.append(exc)
                continue
            version = int(got.rpartition("#")[2]) if got and "#" in got else 0
            if version < floor:
                stale.append((idx, floor, got))
            i += 1

    def writer() -> None:
        version = 0
        while not stop.is_set():
            version += 1
            idx = version % 4
            try:
                with Session() as s:
                    user = s.scalars(
                        select(User).where(User.api_key_hash == key_hash(keys[idx]))
                    ).one()
                    user.name = f"user{idx}#{version}"
                    s.commit()
            except BaseException as exc:
                failures.append(exc)
                continue
            committed[idx] = version
            time.sleep(0.02)

    threads = [threading.Thread(target=reader, args=(n,)) for n in range(4)]
    threads.append(threading.Thread(target=writer))
    try:
        for t in threads:
            t.start()
        time.sleep(0.5)
        old_master = setup.master.port
        setup.master.kill()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and setup.current_master_port() == old_master:
            time.sleep(0.1)
        assert setup.current_master_port() == setup.replica.port, "Sentinel did not fail over"
        hits_after = cache.stats().hits
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and cache.stats().hits <= hits_after + 20:
            time.sleep(0.1)
        assert cache.stats().hits > hits_after + 20, "caching did not resume after failover"
        # The near cache (on by default) follows the new master: its push channel is set
        # up there, and hits are served from memory again.
        near_after = cache.stats().near_hits
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and cache.stats().near_hits <= near_after + 20:
            time.sleep(0.1)
        assert cache.stats().near_hits > near_after + 20, "the near cache did not resume"
    finally:
        stop.set()
        for t in threads:
            t.join()
        cache.close()
        setup.stop()
    assert failures == []
    assert stale == []
    assert cache.stats().errors > 0  # the outage was seen, and absorbed


def test_sentinel_url_parsing() -> None:
    target = parse_sentinel_url(
        "redis+sentinel://:s%40cret@10.0.0.1:26380,[::1],sentinel-3/main/2"
        "?sentinel_password=x&wait_replicas=2&wait_timeout=0.5"
    )
    assert target.hosts == [("10.0.0.1", 26380), ("::1", 26379), ("sentinel-3", 26379)]
    assert (target.service, target.db, target.password, target.username) == (
        "main",
        2,
        "s@cret",
        None,
    )
    assert (target.sentinel_password, target.wait_replicas, target.wait_timeout) == (
        "x",
        2,
        0.5,
    )
    assert parse_sentinel_url(
        "redis+sentinel://h/svc?sentinel_password=a+b%26c"
    ).sentinel_password == ("a+b&c")
    assert parse_sentinel_url("redis+sentinel://h/svc").db == 0
    assert parse_sentinel_url("redis+sentinel://h/svc").wait_replicas == 1


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis+sentinel://:hunter2@h:26379", "must name the master's service"),
        ("redis+sentinel://:hunter2@h:26379/svc?waitreplicas=1", "unknown options"),
        ("redis+sentinel://:hunter2@h:x/svc", "bad host:port"),
        ("redis+sentinel://:hun/ter2@h/svc", "bad host:port"),
        ("redis://:hun/ter2@h:6379/0", "bad host:port"),
        ("redis+sentinel://h/svc?sentinel_password=hunter2&bogus=1", "unknown options"),
        ("redis+sentinel://:hunter2@h/svc?wait_replicas=-1", "wait_replicas must be"),
        ("redis+sentinel://:hunter2@h/svc?wait_timeout=0.3", "must be below socket_timeout"),
        ("redis+cluster://:hunter2@h:7000/0", "no /db path"),
        ("redis+sentinel://:hunter2@::1:26379/svc", "IPv6 address in brackets"),
        ("redis+cluster://:hunter2@h:7000?db=1", "takes hosts and"),
    ],
)
def test_bad_topology_urls_say_what_is_wrong(url: str, message: str) -> None:
    """A bad URL fails at construction, says what to write instead, and never echoes
    the password."""
    with pytest.raises(ConfigurationError, match=message) as info:
        create_backend(url, "n")
    assert "hunter2" not in str(info.value)


def test_cluster_refuses_braces_in_namespace() -> None:
    client = redis.RedisCluster.__new__(redis.RedisCluster)  # never connects
    with pytest.raises(ConfigurationError, match="braces"):
        RedisClusterBackend(client, "a{b}")


def test_unreachable_cluster_at_start_up_is_an_outage_not_a_crash(sqlite_engine: Any) -> None:
    """A RedisCluster client connects as it is built; the cache must still start, and
    calls go to the database, while no node answers."""
    from tests.support.net import free_port

    Session = sessionmaker(sqlite_engine, expire_on_commit=False)
    keys = seed(Session, n=1)
    cache = Cache(f"redis+cluster://127.0.0.1:{free_port()}", namespace="down")
    cache.attach(Session)
    name_of = lookup_fn(cache, Session)
    assert name_of(keys[0]) == "user0"
    with Session() as s:
        s.scalars(select(User)).one().name = "renamed"
        s.commit()
    assert name_of(keys[0]) == "renamed"
    assert cache.stats().errors >= 1
    cache.close()


def test_topologies_on_an_event_loop(topology_url: str, tmp_path: Path) -> None:
    """An async memoized function through Sentinel and Cluster: the event loop's
    redis.asyncio twin finds the master through the Sentinels, or the nodes of the
    Cluster, and the sync client never opens a connection."""
    import asyncio

    from tests.models import Base

    sync_engine = create_engine_for(tmp_path)
    Base.metadata.create_all(sync_engine)
    keys = seed(sessionmaker(sync_engine), n=1)
    cache = Cache(topology_url, namespace="topology-aio", strict=True)

    async def scenario() -> None:
        engine, Session, name_of = async_lookup(cache, tmp_path)
        assert await name_of(keys[0]) == "user0"
        assert await name_of(keys[0]) == "user0"
        async with Session() as s:
            (await s.scalars(select(User))).one().name = "renamed"
            await s.commit()
        assert await name_of(keys[0]) == "renamed"
        await engine.dispose()

    try:
        asyncio.run(scenario())
        assert cache.stats().hits == 1
        assert cache.stats().errors == 0
        backend: Any = cache.backend
        if isinstance(backend, RedisClusterBackend):
            assert backend._client is None  # built on first sync use: never
        else:
            assert backend.client.connection_pool._created_connections == 0
    finally:
        cache.clear()
        cache.close()
        sync_engine.dispose()


def test_invalidations_on_an_event_loop_reach_every_topology(
    topology_url: str, tmp_path: Path
) -> None:
    """On the event loop, a corrupt entry is deleted and the delete fenced through the
    loop's redis.asyncio twin. On a Cluster the fence called methods the asyncio client
    does not have (every fence failed, and failed invalidations became debts the loop
    could never pay) and the delete queued a coroutine instead of ``UNLINK`` (nothing was
    deleted, and nothing said so). Found by review."""
    import asyncio

    from tests.models import Base

    sync_engine = create_engine_for(tmp_path)
    Base.metadata.create_all(sync_engine)
    keys = seed(sessionmaker(sync_engine), n=1)
    cache = Cache(topology_url, namespace="topology-aio-inval", strict=True)
    failing = {"now": False}

    async def scenario() -> None:
        engine, _Session, name_of = async_lookup(cache, tmp_path, failing)
        assert await name_of(keys[0]) == "user0"
        redis_backend: Any = getattr(cache.backend, "_inner", cache.backend)  # near or not
        client = redis_backend.client
        prefix = redis_backend.entry_name("")
        [entry] = list(client.scan_iter(match=prefix.replace("{", "[{]") + "*"))
        client.set(entry, b"not an entry")
        failing["now"] = True
        with pytest.raises(RuntimeError):
            await name_of(keys[0])  # corrupt: deleted and fenced, then the call fails
        assert not client.exists(entry), "the corrupt entry is still there"
        await engine.dispose()

    try:
        asyncio.run(scenario())
        stats = cache.stats()
        assert stats.corrupt == 1
        assert stats.errors == 0, "an invalidation on the event loop failed"
        assert cache._core.guard.owed_deletes() == []
    finally:
        cache.clear()
        cache.close()
        sync_engine.dispose()


def async_lookup(
    cache: Cache, tmp_path: Path, failing: dict[str, bool] | None = None
) -> tuple[Any, Any, Any]:
    """An async engine on the test's SQLite file, its attached sessionmaker, and an
    async memoized lookup by API key (that raises while ``failing["now"]``)."""
    from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path}/t.db")
    Session = async_sessionmaker(engine, expire_on_commit=False)
    cache.attach(Session)

    @cache.memoize(ttl=60)
    async def name_of(api_key: str) -> str:
        if failing is not None and failing["now"]:
            raise RuntimeError("the recomputation fails")
        async with Session() as s:
            stmt = select(User).where(User.api_key_hash == key_hash(api_key))
            return str((await s.scalars(stmt)).one().name)

    return engine, Session, name_of


def create_engine_for(tmp_path: Path) -> Any:
    from sqlalchemy import create_engine

    return create_engine(f"sqlite:///{tmp_path}/t.db")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fromcache", "memoize"])
@pytest.mark.parametrize("topology", ["cluster", "sentinel"])
def test_no_stale_reads_across_processes_on_topologies(
    request: pytest.FixtureRequest, postgres_url: str, namespace: str, topology: str, mode: str
) -> None:
    """The cross-process race of test_consistency (3 readers, 2 writers, slow COMMITs) on
    a Cluster, where a hit reads its entry and generations from several nodes without
    one atomic script, and through Sentinel: no read is older than a published commit.
    The near cache is on in both (opted into on the Cluster: one push channel per
    primary); test_near_cache.py runs a read-mostly race where it serves most reads."""
    from tests.test_consistency import race_across_processes

    if topology == "cluster":
        url = request.getfixturevalue("cluster").url
    else:
        url = request.getfixturevalue("sentinel").url()
    race_across_processes(postgres_url, url, namespace, mode, topology, near_cache=True)


def test_near_cache_follows_a_sentinel_failover_that_demotes_the_master(
    tmp_path: Path, sqlite_engine: Any
) -> None:
    """``SENTINEL FAILOVER``: the old master lives on as a replica, so the near cache's
    push connection to it stays open. Its health check (``ROLE``) notices the demotion,
    the channel moves to the new master, and a commit made there is seen by the next
    read; near hits resume."""
    from ormcache.backends.near import NearCache

    setup = SentinelSetup(tmp_path / "demote")
    setup.start()
    Session = sessionmaker(sqlite_engine, expire_on_commit=False)
    keys = seed(Session, n=2)
    cache = Cache(setup.url("?wait_replicas=0"), namespace="demote", breaker_cooldown=0.2)
    cache.attach(Session)
    writer = Cache(
        setup.url("?wait_replicas=0"), namespace="demote", near_cache=False, breaker_cooldown=0.2
    )
    name_of = lookup_fn(cache, Session)
    near = cache.backend
    assert isinstance(near, NearCache)
    try:
        deadline = time.monotonic() + 5
        while not near.channel.current() and time.monotonic() < deadline:
            time.sleep(0.02)
        for _ in range(3):
            assert name_of(keys[1]) == "user1"
        assert cache.stats().near_hits > 0
        old_master = setup.master.port
        sentinel = redis.Redis(port=setup.sentinel_port)
        deadline = time.monotonic() + 20
        while True:
            try:
                sentinel.execute_command("SENTINEL", "FAILOVER", SentinelSetup.SERVICE)
                break
            except redis.exceptions.ResponseError as exc:
                # NOGOODSLAVE until Sentinel has heard from the replica for a while.
                if "NOGOODSLAVE" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        sentinel.close()
        while time.monotonic() < deadline and setup.current_master_port() == old_master:
            time.sleep(0.05)
        assert setup.current_master_port() == setup.replica.port
        # Wait until the new master accepts writes, then write there behind the cache.
        new_master = redis.Redis(port=setup.replica.port)
        while time.monotonic() < deadline:
            if new_master.info("replication")["role"] == "master":
                break
            time.sleep(0.05)
        new_master.close()
        with sqlite_engine.begin() as c:
            c.execute(User.__table__.update().where(User.id == 2).values(name="demoted"))
        while time.monotonic() < deadline and not writer.invalidate(User):
            time.sleep(0.05)
        # Until the channel has moved, nothing may come from memory: every read is new.
        for _ in range(50):
            assert name_of(keys[1]) == "demoted"
            time.sleep(0.02)
        before = cache.stats().near_hits
        while time.monotonic() < deadline and cache.stats().near_hits <= before + 5:
            name_of(keys[1])
            time.sleep(0.01)
        assert cache.stats().near_hits > before + 5, "the near cache did not resume"
    finally:
        writer.close()
        cache.close()
        setup.stop()
