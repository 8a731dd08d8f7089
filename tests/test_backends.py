"""The backend contract, on the embedded memory backend and on real Redis."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import pytest

from ormcache.backends import create_backend
from ormcache.backends.base import UNREADABLE
from ormcache.backends.memory import MemoryBackend
from ormcache.backends.redis import RedisBackend
from ormcache.errors import BackendError, ConfigurationError
from ormcache.testing import BackendContract
from tests.support.net import free_port
from tests.support.threads import run_threads


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

    def test_garbage_entry_is_never_served(self, backend: RedisBackend) -> None:
        """A value under an entry key that is not an entry (bad framing, a generation
        that is not a number, another program's bytes) is UNREADABLE, which the read
        path deletes as corrupt: on the script path and on the known-tags path."""
        snap = backend.snapshot(["t:a"])
        assert snap is not None
        for garbage in [
            b"",
            b"OCE1",
            b"OCE1\xff\xff",
            b"OCE1\x00\x05ab\nc",
            b"OCE1\x00\x04a\nx\npayload",
            b"\x80\x04pickle",
        ]:
            assert backend.set("g", b"v", 60, snap)
            assert backend.get("g").payload == b"v"
            backend.client.set(f"{backend.namespace}:e:g", garbage)
            assert backend.get("g") == UNREADABLE  # the MGET path: the tags are known
            backend._known.clear()
            assert backend.get("g") == UNREADABLE  # the script path

    def test_read_after_script_flush(self, backend: RedisBackend) -> None:
        """A server that forgot the read script (SCRIPT FLUSH, restart) still serves the
        hit: the read connection's EVALSHA falls back to loading the script."""
        snap = backend.snapshot(["t:a"])
        assert snap is not None
        assert backend.set("k", b"v", 60, snap)
        backend._known.clear()  # force the script path
        backend.client.script_flush()
        assert backend.get("k").payload == b"v"

    def test_reads_use_one_connection_per_thread(self, backend: RedisBackend) -> None:
        """Hits run on a per-thread connection: threads never share a socket."""
        snap = backend.snapshot(["t:a"])
        assert snap is not None
        assert backend.set("k", b"v", 60, snap)
        seen: list[int] = []

        def read(n: int) -> None:
            for _ in range(200):
                assert backend.get("k").payload == b"v"
            conn = backend._lane.conn
            assert conn is not None
            seen.append(id(conn))

        run_threads(read, 4)
        assert len(set(seen)) == 4

    def test_forked_child_reads_on_its_own_connection(self, backend: RedisBackend) -> None:
        """After fork the child must not talk on the parent's socket (their replies
        would interleave); it opens its own and the parent's keeps working."""
        snap = backend.snapshot(["t:a"])
        assert snap is not None
        assert backend.set("k", b"v", 60, snap)
        assert backend.get("k").payload == b"v"
        parent_conn = backend._lane.conn
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            ok = all(backend.get("k").payload == b"v" for _ in range(50))
            ok = ok and backend._lane.conn is not parent_conn
            os._exit(0 if ok else 1)
        for _ in range(50):
            assert backend.get("k").payload == b"v"
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert backend._lane.conn is parent_conn


def test_managed_pools_keep_reads_on_the_pool(redis_url: str, namespace: str) -> None:
    """Over a pool that manages its own connections (Sentinel's, or an application's
    subclass), hits go through that pool instead of a connection of our own."""
    import redis

    class ManagedPool(redis.ConnectionPool):
        pass

    client = redis.Redis(connection_pool=ManagedPool.from_url(redis_url))
    backend = RedisBackend(client, namespace)
    try:
        snap = backend.snapshot(["t:a"])
        assert snap is not None
        assert backend.set("k", b"v", 60, snap)
        backend._known.clear()
        assert backend.get("k").payload == b"v"  # the Lua path
        assert backend.get("k").payload == b"v"  # the MGET path
        assert backend._lane.conn is None
    finally:
        backend.clear()
        backend.close()


def test_unreachable_redis_raises_backend_error_quickly() -> None:
    """Nothing listening: every call fails fast with a BackendError that says what to do."""
    backend = RedisBackend.from_url(f"redis://127.0.0.1:{free_port()}/0", "x", connect_timeout=0.2)
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


def test_unknown_url_option_is_an_outage_not_a_crash(redis_url: str, namespace: str) -> None:
    """redis-py turns unknown query options into connection arguments and fails only
    when it connects: that must be a backend error the cache rides out, not an
    exception in the caller."""
    from ormcache import Cache

    cache = Cache(f"{redis_url}?wait_replicas=1", namespace=namespace)
    calls = {"n": 0}

    @cache.memoize(ttl=60)
    def f() -> int:
        calls["n"] += 1
        return 7

    assert f() == 7
    assert f() == 7
    assert calls["n"] == 2  # uncached, but served
    assert cache.stats().errors >= 1
    cache.close()


def test_event_loop_twins_do_not_pile_up(redis_url: str, namespace: str) -> None:
    """Code that runs asyncio.run() per job gets one twin per loop; twins of closed
    loops are dropped, not kept with their connections."""
    import asyncio

    backend = RedisBackend.from_url(redis_url, namespace)

    async def use() -> None:
        from ormcache.aio import greenlet_spawn

        twin = backend.for_event_loop()
        assert twin is not backend
        await greenlet_spawn(twin.get, "absent")

    try:
        for _ in range(5):
            asyncio.run(use())
        assert len(backend._twins) == 1
    finally:
        backend.close()


def test_every_redis_error_has_a_row_of_its_own_kind() -> None:
    """Every exception class redis-py defines maps to advice for its kind (its own row
    or a redis-py base's), never only to the catch-all: a new class outside redis-py's
    hierarchy must be looked at, as httpx checks its transport error map."""
    import redis.exceptions
    import redis.sentinel

    from ormcache.backends.redis.errors import row_for

    classes = {
        value
        for module in (redis.exceptions, redis.sentinel)
        for value in vars(module).values()
        if isinstance(value, type)
        and issubclass(value, BaseException)
        and value.__module__.startswith("redis")
    }
    assert len(classes) > 20
    assert sorted(c.__name__ for c in classes if row_for(c) in (None, Exception)) == []


def test_client_errors_become_backend_errors_that_say_what_to_do(
    redis_url: str, namespace: str
) -> None:
    """A refused command (here: an expiry Redis cannot represent) and a client-side
    error both reach the cache as BackendError, chained to the original."""
    import redis

    backend = RedisBackend.from_url(redis_url, namespace)
    try:
        with pytest.raises(BackendError, match="refused lock") as info:
            backend.lock("held", "token", 1e20)
        assert isinstance(info.value.__cause__, redis.exceptions.ResponseError)
        with pytest.raises(BackendError, match="failed delete: TypeError"):
            backend.delete([object()])  # type: ignore[list-item]
    finally:
        backend.close()


def test_the_restart_check_covers_a_client_passed_in(redis_url: str, namespace: str) -> None:
    """Backends built on the application's own client: its connections made before,
    a second namespace on the same client, and the application's own connect hook all
    keep working, and every connection checks every namespace's boot key (the check
    that notices a Redis restored from a snapshot; see test_faults.py)."""
    import redis

    seen: list[int] = []

    def app_hook(conn: Any) -> None:
        conn.on_connect()
        seen.append(1)

    client = redis.Redis.from_url(redis_url, redis_connect_func=app_hook)
    client.ping()  # a connection made before any backend
    names = [f"{namespace}-a", f"{namespace}-b"]
    backends = [RedisBackend(client, ns) for ns in names]
    try:
        client.delete(*(f"{ns}:boot" for ns in names))
        client.connection_pool.disconnect()  # as a restart would
        client.ping()
        assert all(client.get(f"{ns}:boot") for ns in names), "a namespace was not checked"
        assert len(seen) >= 2, "the application's own hook was dropped"
    finally:
        client.delete(*(f"{ns}:boot" for ns in names), *(f"{ns}:g:*" for ns in names))
        for backend in backends:
            backend.close()


_URL_SHAPES = [
    "{scheme}://{user}:{pw}@cache.internal:6379/0",
    "{scheme}://:{pw}@cache.internal:6379/0?next=http://x",
    "{scheme}://cache.internal:6379/0?password={pw}",
    "{scheme}://cache.internal:26379/m?sentinel_password={pw}#frag",
    "{scheme}:/:{pw}@cache.internal:6379/0",  # a slash missing
    "{scheme}:/:{pw}@cache.internal:6379/0?next=http://x",
    "{scheme}//{user}:{pw}@cache.internal",  # a colon missing
    "cache.internal:6379?password={pw}",  # no scheme
    "{pw}",  # a password pasted in place of the URL
]


def test_redacted_urls_never_show_the_password() -> None:
    """Every shape a cache URL takes in errors and logs, well-formed or mistyped (found
    by review: ``redis:/:pw@host`` was echoed whole), and any password."""
    from hypothesis import given
    from hypothesis import strategies as st

    from ormcache.backends.base import redact_url

    # The characters that confuse URL parsing, often; any others too.
    passwords = st.text(
        alphabet=st.sampled_from(list(":/?#@%=&+. ")) | st.characters(), min_size=1, max_size=40
    ).filter(lambda p: "://" not in p)

    @given(
        shape=st.sampled_from(_URL_SHAPES),
        scheme=st.sampled_from(["redis", "rediss", "redis+sentinel", "redis+cluster", "x"]),
        user=st.sampled_from(["", "app", "default"]),
        pw=passwords,
    )
    def check(shape: str, scheme: str, user: str, pw: str) -> None:
        # Nothing of the password shows, not even a part: what is shown is what a plain
        # password shows, or less.
        url = shape.format(scheme=scheme, user=user, pw=pw)
        plain = redact_url(shape.format(scheme=scheme, user=user, pw="plain"))
        assert redact_url(url) in (plain, f"{scheme}://[redacted]", "[not a URL: no scheme://]")
        assert "plain" not in plain

    check()
