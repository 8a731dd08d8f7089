"""Whatever Redis holds or refuses, the cache never raises, never serves stale data, and
a commit still invalidates (DESIGN §6; issue 12): hostile or wrong-typed contents under
every key kind the cache writes, and a full Redis (``maxmemory`` with ``noeviction``).
Every server here is a private redis-server process of this module's own."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import create_engine, select, text, update
from sqlalchemy.orm import sessionmaker

from ormcache import Cache, FromCache
from ormcache.backends.base import UNREADABLE, Snapshot
from ormcache.backends.redis import RedisBackend, RedisClusterBackend
from tests import oom_workers
from tests.fault_workers import lookup_fn
from tests.models import Base, User, seed
from tests.redis_procs import ClusterSetup, PrivateRedis

# Contents planted under keys: strings no generation may be read as, and other types.
STRINGS = {
    "word": b"abc",
    "float": b"1.5",
    "empty": b"",
    "pickle": b"\x80\x04\x95\x0b\x00\x00\x00\x00\x00\x00\x00}\x94\x8c\x01x\x94K\x01s.",
    "megabyte of digits": b"9" * 1_000_000,
    "int64 max": b"9223372036854775807",
    "negative": b"-1",
    "leading zero": b"007",
}
TYPES = ("list", "hash", "set", "zset")
KINDS = [*STRINGS, *TYPES]


def plant(client: Any, name: str | bytes, kind: str) -> None:
    """Replace whatever ``name`` holds with garbage of ``kind``, without an expiry."""
    client.delete(name)
    if kind == "list":
        client.rpush(name, "x")
    elif kind == "hash":
        client.hset(name, "f", "v")
    elif kind == "set":
        client.sadd(name, "x")
    elif kind == "zset":
        client.zadd(name, {"x": 1})
    else:
        client.set(name, STRINGS[kind])


# -- backends on private servers ---------------------------------------------------------
@pytest.fixture(scope="module")
def standalone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRedis]:
    server = PrivateRedis(str(tmp_path_factory.mktemp("hostile")))
    server.start()
    yield server
    server.kill()


class Layout:
    """A backend and the names of its keys, to plant garbage under."""

    def __init__(self, backend: RedisBackend | RedisClusterBackend, servers: list[Any]) -> None:
        self.backend = backend
        self.client = backend.client
        self.servers = servers  # a client per server, to fill their memory
        self.ns = backend.namespace

    def gen(self, tag: str) -> str:
        if isinstance(self.backend, RedisClusterBackend):
            return f"{{{self.ns}:{tag}}}:g"
        return f"{self.ns}:g:{tag}"

    def lease(self, tag: str) -> str:
        if isinstance(self.backend, RedisClusterBackend):
            return f"{{{self.ns}:{tag}}}:l"
        return f"{self.ns}:l:{tag}"

    def entry(self, key: str) -> str:
        return f"{self.ns}:e:{key}"

    def lock(self, key: str) -> str:
        return f"{self.ns}:k:{key}"


@pytest.fixture(params=["standalone", "cluster"])
def layout(request: pytest.FixtureRequest) -> Iterator[Layout]:
    namespace = f"h-{uuid.uuid4().hex[:10]}"
    backend: RedisBackend | RedisClusterBackend
    if request.param == "standalone":
        server: PrivateRedis = request.getfixturevalue("standalone")
        backend = RedisBackend.from_url(server.url, namespace)
        servers = [backend.client]
    else:
        setup: ClusterSetup = request.getfixturevalue("cluster")
        backend = RedisClusterBackend.from_url(setup.url, namespace)
        servers = [node.client() for node in setup.nodes]
    yield Layout(backend, servers)
    for server in servers:
        server.config_set("maxmemory", 0)
    backend.clear()
    backend.close()


def stored(backend: Any, key: str, tags: list[str], payload: bytes = b"v") -> Snapshot:
    snap = backend.snapshot(tags)
    assert snap is not None
    assert backend.set(key, payload, 60, snap)
    assert backend.get(key).payload == payload
    return snap


def invalidate(backend: Any, step: str, tags: list[str]) -> None:
    """Each way a backend advances generations: a bump, a commit's lease, its release."""
    if step == "bump":
        backend.bump(tags)
    elif step == "lease":
        backend.acquire_lease(tags, "w", 5.0)
    else:
        backend.release_lease(tags, "w")


@pytest.mark.parametrize("kind", KINDS)
def test_unreadable_generation_is_unknown(layout: Layout, kind: str) -> None:
    """Regression (issue 12): a generation that is not an integer raised ValueError from
    snapshot() into every caller. It is now unknown: entries recorded against the tag
    are misses, the next snapshot starts the tag over, stores work again, and a bump
    still invalidates."""
    backend = layout.backend
    stored(backend, "k", ["t:a", "t:b"])
    plant(layout.client, layout.gen("t:a"), kind)
    assert backend.get("k") is None
    snap = backend.snapshot(["t:a", "t:b"])
    assert snap is not None
    assert all(0 <= g < 2**63 - 1 for g in snap.gens)
    assert backend.set("k", b"again", 60, snap)
    assert backend.get("k").payload == b"again"
    backend.bump(["t:a"])
    assert backend.get("k") is None


@pytest.mark.parametrize("kind", KINDS)
def test_bump_is_never_cut_short(layout: Layout, kind: str) -> None:
    """Regression (issue 12): a generation INCR refuses (not an integer, at 2^63-1, of
    another type) aborted the bump script there, so tags after it in sorted order were
    never bumped and their entries stayed valid. Every tag is now bumped or replaced,
    by bump, lease and release alike."""
    backend = layout.backend
    for step in ("bump", "release", "lease"):
        stored(backend, "k", ["t:b"])
        plant(layout.client, layout.gen("t:a"), kind)  # sorts before t:b
        invalidate(backend, step, ["t:a", "t:b"])
        assert backend.get("k") is None, step
    assert backend.snapshot(["t:a", "t:b"]) is None  # the lease holds
    backend.release_lease(["t:a", "t:b"], "w")
    assert backend.snapshot(["t:a", "t:b"]) is not None


@pytest.mark.parametrize("kind", KINDS)
def test_foreign_entry_is_unreadable(layout: Layout, kind: str) -> None:
    """Anything under an entry key that is not an entry, of any Redis type, comes back
    as UNREADABLE (the read path deletes it as corrupt), whether or not this process
    knows the entry's tags; a store replaces it."""
    backend = layout.backend
    snap = stored(backend, "k", ["t:a"])
    plant(layout.client, layout.entry("k"), kind)
    first = backend.get("k")  # tags known: the batched read
    assert first in (UNREADABLE, None)  # None: MGET cannot see another type
    other = type(backend)(layout.client, layout.ns)  # a process that knows nothing
    assert other.get("k") == UNREADABLE
    backend.delete(["k"])
    assert backend.get("k") is None
    plant(layout.client, layout.entry("k"), kind)
    assert backend.set("k", b"v", 60, snap)
    assert other.get("k").payload == b"v"


@pytest.mark.parametrize("kind", KINDS)
def test_foreign_lease_and_lock(layout: Layout, kind: str) -> None:
    """A lease or lock key holding something else never fails a call: stores are
    refused at most until the next snapshot, leases still block stores and bumps still
    invalidate, and a lock that is no lock of ours (no expiry, or another type) is
    taken over instead of blocking every miss on its key."""
    backend = layout.backend
    stored(backend, "k", ["t:a"])
    plant(layout.client, layout.lease("t:a"), kind)
    backend.snapshot(["t:a"])  # may refuse once
    snap = backend.snapshot(["t:a"])
    assert snap is not None
    assert backend.set("k", b"w", 60, snap)
    plant(layout.client, layout.lease("t:a"), kind)
    backend.acquire_lease(["t:a"], "w", 5.0)
    assert backend.get("k") is None
    assert backend.snapshot(["t:a"]) is None  # leased
    plant(layout.client, layout.lease("t:a"), kind)
    backend.release_lease(["t:a"], "w")
    assert backend.snapshot(["t:a"]) is not None

    plant(layout.client, layout.lock("k"), kind)
    backend.unlock("k", "me")
    assert backend.lock("k", "me", 5.0)
    backend.unlock("k", "me")
    assert backend.lock("k", "you", 5.0)
    assert not backend.lock("k", "me", 5.0)  # a real lock still excludes


def test_leases_and_locks_that_outlive_any_of_ours_are_foreign(layout: Layout) -> None:
    """A lease token that expires far later than any lease lasts (a never-expiring one
    planted on the namespace tag refused every store, for good, with no error counted),
    and a lock string that lives far longer than any lock is taken for (every miss on
    its key waited lock_wait for it, for a day): neither is ours, and both go. Found by
    review."""
    backend = layout.backend
    plant_lease = layout.client.zadd
    plant_lease(layout.lease("*"), {"x": float("inf")})
    plant_lease(layout.lease("t:a"), {"y": time.time() * 1000 + 3_600_000})
    snap = backend.snapshot(["*", "t:a"])
    assert snap is not None, "a foreign lease refuses every store"
    assert backend.set("k", b"v", 60, snap)
    backend.acquire_lease(["t:a"], "w", 5.0)
    assert backend.snapshot(["t:a"]) is None  # a real lease still blocks stores
    backend.release_lease(["t:a"], "w")
    layout.client.set(layout.lock("k"), "garbage", ex=86_400)
    assert backend.lock("k", "me", 5.0), "a foreign lock made every miss wait"
    assert not backend.lock("k", "you", 5.0)  # a real lock still excludes
    backend.unlock("k", "me")


def test_no_read_while_the_servers_refuse_writes(layout: Layout) -> None:
    """While Redis refuses writes (here: too few replicas for min-replicas-to-write) no
    invalidation can reach it, so a read must fail too rather than serve an entry a
    refused bump should have invalidated: on one server and on every Cluster node."""
    backend = layout.backend
    from ormcache.errors import BackendError

    stored(backend, "k", ["t:a"])
    for server in layout.servers:
        server.config_set("min-replicas-to-write", 1)
    try:
        with pytest.raises(BackendError, match=r"NOREPLICAS|enough good replicas"):
            backend.get("k")
    finally:
        for server in layout.servers:
            server.config_set("min-replicas-to-write", 0)
    assert backend.get("k") is not None


def fill(servers: list[Any]) -> None:
    """Fill every server: maxmemory just above what it uses, noeviction, then junk of
    our own until it refuses. Then maxmemory goes below what it uses, so that memory
    freed by chance (a client's buffer) never lets a write through."""
    for server in servers:
        server.config_set("maxmemory-policy", "noeviction")
        used = int(server.info("memory")["used_memory"])
        server.config_set("maxmemory", used + 512 * 1024)
        with pytest.raises(redis.exceptions.OutOfMemoryError):  # noqa: PT012
            for i in range(30_000):
                # On a Cluster node, a key whose slot lives elsewhere is MOVED.
                with contextlib.suppress(redis.exceptions.MovedError):
                    server.set(f"junk:{uuid.uuid4().hex}:{i}", b"x" * 16384)
        used = int(server.info("memory")["used_memory"])
        server.config_set("maxmemory", used - 256 * 1024)


def test_full_redis_bump_invalidates(layout: Layout) -> None:
    """Regression (issue 12): with Redis full, a bump was refused (OOM) and every entry
    stayed valid in every other process. A generation that cannot be written is now
    deleted (DEL is allowed when memory is full), so its entries are misses; a refused
    snapshot or store fails with an error that says what to do, and the cache reads
    through."""
    from ormcache.errors import BackendError

    backend = layout.backend
    for step in ("bump", "release", "lease"):
        stored(backend, "k1", ["t:a"])
        stored(backend, "k2", ["t:b"])
        fill(layout.servers)
        try:
            invalidate(backend, step, ["t:a", "t:b"])
            assert backend.get("k1") is None, step
            assert backend.get("k2") is None, step
            # Stores may go through where Redis finds room; if refused, it says why.
            refused = ""
            try:
                snap = backend.snapshot(["t:a"])
                if snap is not None:
                    backend.set("k1", b"x", 60, snap)
            except BackendError as exc:
                refused = str(exc)
            assert refused == "" or "out of memory" in refused, refused
        finally:
            for server in layout.servers:
                server.config_set("maxmemory", 0)
                for name in server.scan_iter(match="junk:*", count=1000):
                    server.delete(name)
        backend.release_lease(["t:a", "t:b"], "w")


# -- the whole cache ----------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_poisoned_namespace_never_fails_a_call(
    standalone: PrivateRedis, tmp_path: Path, kind: str
) -> None:
    """Every key the cache wrote (entries, generations, leases, locks) overwritten with
    garbage: no call raises or errors, every answer equals the database, foreign entries
    are counted as corrupt, and a commit in another process still invalidates."""
    namespace = f"hp-{uuid.uuid4().hex[:10]}"
    db_url = f"sqlite:///{tmp_path}/p.db"
    engines = [create_engine(db_url), create_engine(db_url)]
    Base.metadata.create_all(engines[0])
    keys = seed(sessionmaker(engines[0]), n=2)
    reader_session = sessionmaker(engines[0], expire_on_commit=False)
    writer_session = sessionmaker(engines[1], expire_on_commit=False)
    reader = Cache(standalone.url, namespace=namespace, strict=True)
    writer = Cache(standalone.url, namespace=namespace, strict=True)
    reader.attach(reader_session)
    writer.attach(writer_session)
    name_of = lookup_fn(reader, reader_session)
    stmt = select(User).where(User.id == 1).options(FromCache(ttl=60))

    def answers() -> tuple[str | None, str]:
        with reader_session() as s:
            return name_of(keys[0]), s.scalars(stmt).one().name

    def database() -> str:
        with writer_session() as s:
            return s.scalars(select(User.name).where(User.id == 1)).one()

    try:
        assert answers() == ("user0", "user0")
        assert answers() == ("user0", "user0")
        assert reader.stats().hits == 2
        client = standalone.client()
        names = set(client.scan_iter(match=f"{namespace}:*"))
        for name in list(names):
            ns, part, *rest = name.decode().split(":", 2)  # {ns}:boot has no third part
            if rest:
                names.add({"e": f"{ns}:k:{rest[0]}", "g": f"{ns}:l:{rest[0]}"}.get(part, name))
        for name in names:
            plant(client, name, kind)
        for _ in range(3):
            assert answers() == (database(),) * 2
        if kind in STRINGS:  # MGET reads another type as missing: a plain miss
            assert reader.stats().corrupt >= 1
        with writer_session() as s:
            s.execute(update(User).where(User.id == 1).values(name=f"renamed-{kind}"))
            s.commit()
        for _ in range(3):
            assert answers() == (f"renamed-{kind}",) * 2
        assert reader.stats().errors == 0
        assert writer.stats().errors == 0
        client.close()
    finally:
        reader.clear()
        reader.close()
        writer.close()
        for engine in engines:
            engine.dispose()


@pytest.mark.slow
def test_full_redis_never_serves_an_old_row_in_another_process(tmp_path: Path) -> None:
    """Regression (issue 12): Redis full (maxmemory, noeviction), commits went through but
    their invalidations were refused, and readers in other processes served old rows
    for as long as the entries lived. Now no read that starts after a commit returned
    sees an older row, in any process."""
    server = PrivateRedis(str(tmp_path / "redis"), "--maxmemory-policy", "noeviction")
    server.start()
    db_url = f"sqlite:///{tmp_path}/oom.db"
    engine = create_engine(db_url)
    Base.metadata.create_all(engine)
    with engine.connect() as conn:
        conn.execute(text("PRAGMA journal_mode=WAL"))
    keys = seed(sessionmaker(engine), n=1)
    writer_session = sessionmaker(engine, expire_on_commit=False)
    cache = Cache(server.url, namespace="oom", socket_timeout=0.5, connect_timeout=0.5)
    cache.attach(writer_session)
    ctx = mp.get_context("spawn")
    committed = ctx.Value("q", 0)
    ready, stop, results = ctx.Queue(), ctx.Event(), ctx.Queue()
    readers = [
        ctx.Process(
            target=oom_workers.read,
            args=(db_url, server.url, "oom", keys[0], committed, ready, stop, results),
        )
        for _ in range(2)
    ]
    client = server.client()
    version = 0

    def commit_for(seconds: float) -> None:
        nonlocal version
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            version += 1
            with writer_session() as s:
                s.execute(update(User).where(User.id == 1).values(name=f"user0#{version}"))
                s.commit()
            committed.value = version
            time.sleep(0.1)  # let the readers cache the new row again

    try:
        for p in readers:
            p.start()
        for _ in readers:
            ready.get(timeout=60)
        commit_for(1.0)
        fill([client])
        commit_for(3.0)
        stop.set()
        outcomes = [results.get(timeout=60) for _ in readers]
    finally:
        stop.set()
        for p in readers:
            p.join(timeout=10)
        cache.close()
        client.close()
        server.kill()
        engine.dispose()
    print(f"\n(calls, failures, stale, examples, hits) per reader: {outcomes}")
    assert all(o[1] == 0 for o in outcomes), outcomes
    assert all(o[2] == 0 for o in outcomes), outcomes
    assert all(o[4] > 0 for o in outcomes), outcomes
    assert version >= 10
