"""A reading process for the full-Redis test: serves a memoized lookup and a FromCache
query until told to stop, and counts answers older than the last commit that returned
before the call began."""

from __future__ import annotations

from typing import Any

from sqlalchemy import create_engine, select
from sqlalchemy.orm import sessionmaker

from ormcache import Cache, FromCache
from tests.fault_workers import lookup_fn
from tests.models import User


def version_of(name: str | None) -> int:
    """Names are written as ``user0#<version>``; the seeded name is version 0."""
    return int(name.rpartition("#")[2]) if name and "#" in name else 0


def read(
    db_url: str,
    redis_url: str,
    namespace: str,
    api_key: str,
    committed: Any,
    ready: Any,
    stop: Any,
    results: Any,
) -> None:
    engine = create_engine(db_url)
    Session = sessionmaker(engine, expire_on_commit=False)
    cache = Cache(redis_url, namespace=namespace, socket_timeout=0.5, connect_timeout=0.5)
    cache.attach(Session)
    name_of = lookup_fn(cache, Session)
    stmt = select(User).where(User.id == 1).options(FromCache(ttl=60))

    def from_cache() -> str:
        with Session() as s:
            return s.scalars(stmt).one().name

    calls = failures = 0
    stale: list[tuple[int, int]] = []
    said_ready = False
    while not stop.is_set():
        for call in (lambda: name_of(api_key), from_cache):
            floor = committed.value  # read before the call begins
            try:
                got = version_of(call())
            except Exception:
                failures += 1
                continue
            calls += 1
            if got < floor:
                stale.append((floor, got))
        if not said_ready and cache.stats().hits:
            ready.put(True)
            said_ready = True
    results.put((calls, failures, len(stale), stale[:5], cache.stats().hits))
    cache.close()
    engine.dispose()
