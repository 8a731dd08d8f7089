"""A serving process for the Redis-kill test: calls a memoized lookup until told to stop."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import create_engine, select
from sqlalchemy.orm import sessionmaker

from ormcache import Cache
from tests.models import User, key_hash


def lookup_fn(cache: Cache, Session: Any, name: str | None = None) -> Any:
    """The memoized lookup every fault test serves through (``name``: one key in every
    process that uses it)."""

    @cache.memoize(ttl=60, name=name)
    def name_of(api_key: str) -> str | None:
        with Session() as s:
            user = s.scalars(
                select(User).where(User.api_key_hash == key_hash(api_key))
            ).one_or_none()
            return None if user is None else user.name

    return name_of


def serve(
    db_url: str,
    redis_url: str,
    keys: list[str],
    timeout: float,
    stop: Any,
    results: Any,
    ready: Any = None,
) -> None:
    engine = create_engine(db_url)
    Session = sessionmaker(engine, expire_on_commit=False)
    cache = Cache(
        redis_url,
        namespace="faults-mp",
        socket_timeout=timeout,
        connect_timeout=timeout,
        breaker_cooldown=0.3,
    )
    cache.attach(Session)

    name_of = lookup_fn(cache, Session)

    calls = failures = wrong = 0
    slowest = 0.0
    i = 0
    while not stop.is_set():
        key = keys[i % len(keys)]
        start = time.perf_counter()
        try:
            got = name_of(key)
        except Exception:
            failures += 1
        else:
            if got != f"user{keys.index(key)}":
                wrong += 1
        slowest = max(slowest, time.perf_counter() - start)
        calls += 1
        i += 1
        if calls == 50 and ready is not None:
            with ready.get_lock():
                ready.value += 1
    results.put((calls, failures, wrong, slowest, cache.stats().hits, cache.stats().errors))
    cache.close()
    engine.dispose()
